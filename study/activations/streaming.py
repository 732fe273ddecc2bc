"""Streaming mode (``activation_mode: stream``): activations computed when read, for activation sets
that fit no disk.

``StreamedActivations`` is a cache reader whose shards are never written: each is computed from its
contexts when read, by the same function as extraction, so it holds the cache's rows bit for bit
(and ``batches`` shuffles them exactly as the cache's reader would). It keeps every snapshot's model
loaded (memory: S x model size) and pays the forward passes every epoch instead of once.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoConfig

from study.activations.cache import ActivationCache, dtype_of
from study.activations.contexts import sample_contexts
from study.activations.extraction import ActivationRequest, shard_rows
from study.lm.trajectory import load_model, load_tokenizer


def cache_bytes(request: ActivationRequest, d_model: int) -> int:
    """Disk a cache of ``request`` would take: tokens x snapshots x d_model x 2 bytes per layer."""
    return request.n_tokens * len(request.trajectory.snapshots) * d_model * 2 * len(request.layers)


class StreamedActivations(ActivationCache):
    """The reader of ``request``'s cache, computing each shard when it is read."""

    def __init__(self, request: ActivationRequest, device: str = "cpu"):
        self.request, self.device = request, device
        snapshots = request.trajectory.snapshots
        self.contexts = sample_contexts(
            load_tokenizer(snapshots[-1]), request.corpus, request.context_length, request.n_tokens, request.seed
        )
        per_shard, rows_per_context = request.contexts_per_shard, request.context_length - 1
        n_contexts = len(self.contexts)
        last = snapshots[-1]
        # What a cache's manifest says of its rows; the files, sizes and norms a stream does not have.
        self.manifest = {
            "steps": request.trajectory.steps,
            "layers": sorted(request.layers),
            "corpus": request.corpus,
            "n_tokens": n_contexts * rows_per_context,
            "context_length": request.context_length,
            "seed": request.seed,
            "dtype": request.dtype,
            "d_model": AutoConfig.from_pretrained(last.source, revision=last.revision).hidden_size,
            "rows_per_shard": [
                (min(start + per_shard, n_contexts) - start) * rows_per_context
                for start in range(0, n_contexts, per_shard)
            ],
        }
        self.files = self.folder = self.staged = None
        self.models: dict[int, torch.nn.Module] = {}

    def model(self, snapshot: int) -> torch.nn.Module:
        if snapshot not in self.models:
            self.models[snapshot] = load_model(self.request.trajectory.snapshots[snapshot], device=self.device)
        return self.models[snapshot]

    def shard(self, layer: int, index: int, snapshots: list[int] | None = None) -> torch.Tensor:
        """[rows of shard ``index``, S, d_model] in the request's dtype, computed now."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not in this request (layers {self.layers})")
        per_shard = self.request.contexts_per_shard
        contexts = self.contexts[index * per_shard : (index + 1) * per_shard]
        columns = [
            shard_rows(self.model(snapshot), contexts, [layer], self.request.batch_size, self.device)[layer]
            for snapshot in (snapshots if snapshots is not None else range(len(self.steps)))
        ]
        return torch.stack(columns, dim=1).to(dtype_of(self.request.dtype))

    def token_ids(self) -> np.ndarray:
        return self.contexts[:, 1:].reshape(-1).numpy().astype(np.int32)

    def positions(self) -> np.ndarray:
        return np.tile(np.arange(1, self.request.context_length, dtype=np.int16), len(self.contexts))


def open_activations(source: str | ActivationRequest, stage: str | None = None) -> ActivationCache:
    """The reader of a trial's activations: its cache folder or URI (staged in ``stage`` if given), or
    its request where the sweep streams them (on the GPU where there is one)."""
    if isinstance(source, ActivationRequest):
        return StreamedActivations(source, "cuda" if torch.cuda.is_available() else "cpu")
    return ActivationCache(source, stage=stage)
