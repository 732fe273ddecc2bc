"""Streaming mode (``activation_mode: stream``): activations computed when read, for activation sets
that fit no disk.

``StreamedActivations`` is a cache reader whose shards are never written: each is computed from its
contexts when read, by the same function as extraction, so it holds the cache's rows bit for bit
(and ``batches`` shuffles them exactly as the cache's reader would). It keeps the snapshots' models
loaded and pays the forward passes every epoch instead of once. Given a process group (the Ray
Train workers of one crosscoder, which all read the same rows), each rank computes every
world-size-th snapshot and the columns are all-gathered: each worker holds S / N models and pays
S / N of the forward passes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoConfig

from study.activations.cache import ActivationCache, dtype_of
from study.activations.contexts import sample_contexts
from study.activations.extraction import ActivationRequest, shard_rows
from study.lm.trajectory import load_model, load_tokenizer


def cache_bytes(request: ActivationRequest, d_model: int) -> int:
    """Disk a cache of ``request`` would take: tokens x snapshots x d_model x 2 bytes per layer."""
    return request.n_tokens * len(request.trajectory.snapshots) * d_model * 2 * len(request.layers)


class StreamedActivations(ActivationCache):
    """The reader of ``request``'s cache, computing each shard when it is read (with ``group``, a
    collective: every rank reads the same shards in the same order)."""

    def __init__(self, request: ActivationRequest, device: str = "cpu", group: dist.ProcessGroup | None = None):
        self.request, self.device, self.group = request, device, group
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
        self.files = self.folder = self.staged = None  # type: ignore[assignment]  # nothing is on disk
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
        chosen = list(snapshots) if snapshots is not None else list(range(len(self.steps)))
        rank, world_size = (
            (0, 1) if self.group is None else (dist.get_rank(self.group), dist.get_world_size(self.group))
        )
        columns = [
            shard_rows(self.model(snapshot), contexts, [layer], self.request.batch_size, self.device)[layer]
            for snapshot in chosen[rank::world_size]
        ]
        if world_size > 1:
            columns = self.gather_columns(columns, index, len(chosen), world_size)
        return torch.stack(columns, dim=1).to(dtype_of(self.request.dtype))

    def gather_columns(self, mine: list[torch.Tensor], index: int, count: int, world_size: int) -> list[torch.Tensor]:
        """Every rank's columns (rank r holds snapshots r, r + N, ...), in snapshot order. Ranks hold at
        most one column fewer than the first, so each pads to the first's count for the all-gather."""
        per_rank = -(-count // world_size)
        on = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        padded = torch.zeros(per_rank, self.manifest["rows_per_shard"][index], self.d_model, device=on)
        if mine:  # a rank beyond the snapshot count computes none
            padded[: len(mine)] = torch.stack(mine).to(on)
        gathered = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(gathered, padded, group=self.group)
        return [gathered[position % world_size][position // world_size].cpu() for position in range(count)]

    def token_ids(self) -> np.ndarray:
        return self.contexts[:, 1:].reshape(-1).numpy().astype(np.int32)

    def positions(self) -> np.ndarray:
        return np.tile(np.arange(1, self.request.context_length, dtype=np.int16), len(self.contexts))


def open_activations(
    source: str | ActivationRequest, stage: str | None = None, group: dist.ProcessGroup | None = None
) -> ActivationCache:
    """The reader of a trial's activations: its cache folder or URI (staged in ``stage`` if given), or
    its request where the sweep streams them (on the GPU where there is one; split over ``group``'s
    ranks by snapshot)."""
    if isinstance(source, ActivationRequest):
        return StreamedActivations(source, "cuda" if torch.cuda.is_available() else "cpu", group)
    return ActivationCache(source, stage=stage)
