"""Streaming mode: activations computed on the fly for training, when a cache would not fit on disk.

Holds every snapshot's model at once (memory: S x model size) and yields the same rows a cache
of the same request would hold, shuffled within each block of contexts. Nothing is written.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from study.activations.cache import rebatch
from study.activations.contexts import sample_contexts
from study.activations.extraction import ActivationRequest
from study.activations.residual import residual_stream
from study.lm.trajectory import load_model, load_tokenizer


def cache_bytes(request: ActivationRequest, d_model: int) -> int:
    """Disk a cache of ``request`` would take: tokens x snapshots x d_model x 2 bytes per layer."""
    return request.n_tokens * len(request.trajectory.snapshots) * d_model * 2 * len(request.layers)


def stream_activations(
    request: ActivationRequest, layer: int, batch_size: int, seed: int, device: str = "cpu"
) -> Iterator[torch.Tensor]:
    """Endless float32 batches [batch_size, S, d_model] of ``layer``, epoch after epoch."""
    snapshots = request.trajectory.snapshots
    contexts = sample_contexts(
        load_tokenizer(snapshots[-1]), request.corpus, request.context_length, request.n_tokens, request.seed
    )
    models = [load_model(snapshot, device=device) for snapshot in snapshots]
    generator = torch.Generator().manual_seed(seed)
    block = max(1, batch_size // (request.context_length - 1))  # contexts per block: about one batch of rows

    def blocks() -> Iterator[torch.Tensor]:
        while True:  # one epoch per pass over the contexts, in a fresh seeded order
            order = torch.randperm(len(contexts), generator=generator)
            for start in range(0, len(order), block):
                ids = contexts[order[start : start + block]].to(device)
                yield torch.stack(
                    [residual_stream(model, ids, [layer])[layer][:, 1:].flatten(0, 1) for model in models], dim=1
                ).cpu()

    return rebatch(blocks(), batch_size, generator)
