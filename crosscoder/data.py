"""Activations in, batches out: checks before training and a seeded, resumable batch order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from crosscoder.config import InputError

Activations = torch.Tensor | np.ndarray


def as_tensor(activations: Activations) -> torch.Tensor:
    """A [tokens, S, d_model] tensor, checked for shape and finite values."""
    tensor = torch.as_tensor(activations)
    if tensor.dim() != 3:
        raise InputError(
            f"activations must have shape [tokens, snapshots, d_model], got {tuple(tensor.shape)}; "
            "stack snapshots on axis 1 (a single snapshot is [tokens, 1, d_model])"
        )
    if min(tensor.shape) == 0:
        raise InputError(f"activations of shape {tuple(tensor.shape)} are empty")
    if not tensor.is_floating_point():
        raise InputError(f"activations must be floating point, got {tensor.dtype}")
    check_finite(tensor, "activations")
    return tensor


def check_finite(tensor: torch.Tensor, what: str) -> None:
    finite = torch.isfinite(tensor)
    if not finite.all():
        token = int((~finite).flatten(1).any(1).nonzero()[0])
        raise InputError(f"{what} hold NaN or inf (first at token {token}); drop or repair those rows before training")


def array_batches(activations: torch.Tensor, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Endless batches of a fresh seeded permutation per epoch; step j's batch depends only on (seed, j)."""
    n_tokens = activations.shape[0]
    if batch_size > n_tokens:
        raise InputError(
            f"batch_size {batch_size} exceeds the {n_tokens} tokens given; lower batch_size or pass more tokens"
        )
    batches_per_epoch = n_tokens // batch_size
    step = start_step
    while True:
        epoch, position = divmod(step, batches_per_epoch)
        order = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for batch_index in range(position, batches_per_epoch):
            yield activations[order[batch_index * batch_size : (batch_index + 1) * batch_size]]
        step = (epoch + 1) * batches_per_epoch


def iterable_batches(batches: Iterable, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Batches from any iterable of [B, S, d] arrays (e.g. an activation-cache reader), checked as they come."""
    for index, batch in enumerate(batches):
        if index < start_step:
            continue  # a resumed run skips what the checkpoint has already seen
        tensor = torch.as_tensor(batch)
        if tensor.dim() != 3:
            raise InputError(
                f"batch {index} has shape {tuple(tensor.shape)}; batches must be [batch, snapshots, d_model]"
            )
        yield tensor


def take_sample(activations: Activations | Iterable, n_tokens: int, seed: int) -> tuple[torch.Tensor, Iterable]:
    """Up to ``n_tokens`` rows for the normalisation and initialisation, and the data to train on.

    From an array, a seeded random subset; from an iterable, its first batches, which are then
    put back in front so that training still sees them.
    """
    if isinstance(activations, (torch.Tensor, np.ndarray)):
        tensor = as_tensor(activations)
        rows = torch.randperm(tensor.shape[0], generator=torch.Generator().manual_seed(seed))[:n_tokens]
        return tensor[rows].float(), tensor
    iterator = iter(activations)
    taken, count = [], 0
    for batch in iterator:
        tensor = torch.as_tensor(batch)
        if tensor.dim() != 3:
            raise InputError(f"batches must be [batch, snapshots, d_model], got {tuple(tensor.shape)}")
        taken.append(tensor)
        count += tensor.shape[0]
        if count >= n_tokens:
            break
    if not taken:
        raise InputError("the activation iterable yielded no batch")
    sample = torch.cat(taken)[:n_tokens].float()
    check_finite(sample, "activations")

    def replay() -> Iterator:
        yield from taken
        yield from iterator

    return sample, replay()
