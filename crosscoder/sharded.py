"""One crosscoder split by features over the ranks of a torch.distributed process group.

Each rank holds a contiguous range of features: their encoder rows, decoder rows, encoder bias
and JumpReLU thresholds, and Adam's moments for those. The decoder bias and the input
normalisation are replicated. A step costs one all-reduce of the partial reconstructions,
[batch, S, d], whatever the dictionary size. Splitting by snapshots instead, as paper 1's library
can, would all-reduce the [batch, F] pre-activation, which grows with the dictionary.

The sparsity methods keep their meaning:

* JumpReLU's gate, its frequency penalty and L1's penalty are per feature, so each rank computes
  its own part, and the penalty is their sum.
* TopK and BatchTopK select globally: each rank's own best k values per token (k * batch for
  BatchTopK) are gathered, and every rank keeps its codes at or above the global cut-off.

Every rank computes the same loss from the summed reconstruction. The gradient reaching a rank's
partial reconstruction is therefore that loss's gradient, with no communication backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from crosscoder.config import InputError
from crosscoder.methods import METHODS
from crosscoder.model import CrossCoder

# Parameters and buffers indexed by feature along their first axis; the rest are replicated.
FEATURE_MAJOR = ("encoder_weight", "encoder_bias", "decoder_weight", "log_threshold")


def feature_range(n_features: int, rank: int, world_size: int) -> range:
    """The features rank ``rank`` of ``world_size`` holds: contiguous, sizes differing by at most one."""
    base, extra = divmod(n_features, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def shard_of(model: CrossCoder, group: dist.ProcessGroup | None = None) -> CrossCoder:
    """This rank's shard of an initialised ``model``: its features' rows, the replicated rest."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    features = feature_range(model.n_features, rank, world_size)
    config = model.config
    if METHODS[config.sparsity].uses_k and len(features) < config.k:
        raise InputError(
            f"k = {config.k} is more than the {len(features)} features a worker holds; use fewer workers or a lower k"
        )
    shard = CrossCoder(model.n_snapshots, model.d_model, config, features=features)
    state = {
        name: tensor[features.start : features.stop] if name in FEATURE_MAJOR else tensor
        for name, tensor in model.state_dict().items()
    }
    shard.load_state_dict(state)
    shard.process_group = group if group is not None else dist.group.WORLD
    return shard


def gather_model(shard: CrossCoder) -> CrossCoder:
    """The whole crosscoder, assembled on every rank from the shards."""
    group = shard.process_group
    world_size = dist.get_world_size(group)
    sizes = [len(feature_range(shard.total_features, rank, world_size)) for rank in range(world_size)]
    full = CrossCoder(shard.n_snapshots, shard.d_model, shard.config)
    state = {}
    for name, tensor in shard.state_dict().items():
        if name not in FEATURE_MAJOR:
            state[name] = tensor.detach().clone()
            continue
        # all_gather needs equal sizes: pad each shard to the largest, then drop the padding.
        padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: len(tensor)] = tensor.detach()
        parts = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(parts, padded, group=group)
        state[name] = torch.cat([part[:size] for part, size in zip(parts, sizes)])
    full.load_state_dict(state)
    return full.to(shard.decoder_weight.device)


class SumOverRanks(torch.autograd.Function):
    """Forward: the sum of ``tensor`` over the group's ranks. Backward: the gradient unchanged, since
    every rank computes the same loss from the sum and so holds the same gradient of it."""

    @staticmethod
    def forward(ctx, tensor, group):
        # Collectives add storages element by element: every rank's layout must be the same.
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return grad_total, None


def sum_over_ranks(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return SumOverRanks.apply(tensor, group)


def whole_reconstruction(model: CrossCoder, reconstruction: torch.Tensor) -> torch.Tensor:
    """The whole crosscoder's reconstruction from a shard's own (which carries the replicated decoder
    bias once); unchanged for a crosscoder that is not split."""
    if model.process_group is None:
        return reconstruction
    return sum_over_ranks(reconstruction - model.decoder_bias, model.process_group) + model.decoder_bias


def all_counts(count: int, group: dist.ProcessGroup | None) -> list[int]:
    """``count`` of every rank, in rank order (``[count]`` without a group)."""
    if group is None:
        return [count]
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([count]), group=group)
    return [int(value) for value in counts]


def total(value: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """A detached value summed over ranks (a penalty, a count); unchanged without a group."""
    if group is None:
        return value
    summed = value.detach().clone()
    dist.all_reduce(summed, group=group)
    return summed
