"""ΔCE: how much worse the language model predicts when a layer's activations are replaced by their reconstruction."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from study.activations.residual import next_token_loss, residual_replaced
from study.lm.trajectory import Snapshot, load_model

BATCH_SIZE = 16
"""Contexts per forward pass."""


class SplicedLoss(NamedTuple):
    """Per snapshot, in snapshot order (nats per token)."""

    clean_loss: list[float]
    spliced_loss: list[float]
    delta_ce: list[float]
    """spliced minus clean."""
    loss_recovered: list[float]
    """1 - delta_ce / (mean-ablated minus clean): the share of the loss the layer's content is worth that the
    reconstruction keeps (1: lossless, 0: no better than the layer's mean activation at every position)."""


@torch.no_grad()
def spliced_loss(
    snapshots: list[Snapshot] | tuple[Snapshot, ...],
    contexts: torch.Tensor,
    layer: int,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    device: str | torch.device = "cpu",
) -> SplicedLoss:
    """Each snapshot's next-token loss on ``contexts`` [n, length], clean and with the residual stream
    at ``layer`` (positions 1 onwards, as the crosscoder was trained) replaced by ``reconstruct``'s output.

    ``reconstruct`` maps [tokens, S, d] activations of all snapshots at once to the same shape, as a
    crosscoder does: each snapshot's reconstruction depends on every snapshot's input.
    """
    clean, captured = [], []
    for snapshot in snapshots:
        model = load_model(snapshot, device=device)
        parts: list[torch.Tensor] = []

        def keep(hidden: torch.Tensor) -> torch.Tensor:
            parts.append(hidden[:, 1:].float().cpu())  # noqa: B023 (called within the iteration)
            return hidden

        with residual_replaced(model, layer, keep):
            clean.append(next_token_loss(model, contexts, BATCH_SIZE))
        captured.append(torch.cat(parts))  # [n, length - 1, d]
    activations = torch.stack(captured, 2)  # [n, length - 1, S, d]
    reconstruction = reconstruct(activations.flatten(0, 1)).view(activations.shape)
    mean = activations.mean((0, 1), keepdim=True).expand_as(activations)
    spliced = [
        loss_with(snapshot, contexts, layer, reconstruction[:, :, index], device)
        for index, snapshot in enumerate(snapshots)
    ]
    ablated = [
        loss_with(snapshot, contexts, layer, mean[:, :, index], device) for index, snapshot in enumerate(snapshots)
    ]
    delta = [after - before for before, after in zip(clean, spliced)]
    recovered = [
        1 - change / (floor - before) if floor > before else float("nan")
        for change, floor, before in zip(delta, ablated, clean)
    ]
    return SplicedLoss(clean, spliced, delta, recovered)


def loss_with(
    snapshot: Snapshot, contexts: torch.Tensor, layer: int, replacement: torch.Tensor, device: str | torch.device
) -> float:
    """The snapshot's next-token loss with positions 1 onwards of the layer's stream set to ``replacement``
    [n, length - 1, d]."""
    model = load_model(snapshot, device=device)
    batches = iter(replacement.split(BATCH_SIZE))

    def splice(hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([hidden[:, :1], next(batches).to(hidden.device, hidden.dtype)], 1)

    with residual_replaced(model, layer, splice):
        return next_token_loss(model, contexts, BATCH_SIZE)
