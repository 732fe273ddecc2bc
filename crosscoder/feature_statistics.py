"""Statistics of features over tokens: which token ids carry their activation, and whether they
read the same tokens at every snapshot."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


def token_entropy(feature_activations: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[F] entropy (nats) of the token ids that carry each feature's activation mass; nan where it never fires.

    ``feature_activations`` [N, F] (non-negative) over N tokens whose ids are ``token_ids`` [N]:
    p_f(t) = Σ activations of f on tokens with id t / Σ activations of f. Zero for a feature that
    fires on one token id only; log(k) for one spread evenly over k ids.
    """
    activations = feature_activations.detach().double().clamp_min(0)
    distinct, slot = torch.unique(token_ids, return_inverse=True)
    mass = torch.zeros(len(distinct), activations.shape[1], dtype=torch.float64).index_add_(
        0, slot.to(activations.device).cpu(), activations.cpu()
    )
    total = mass.sum(0)
    share = mass / total.clamp_min(1e-300)
    entropy = -(share * share.clamp_min(1e-300).log()).sum(0)
    return torch.where(total > 0, entropy, float("nan")).float()


def equal_count_entropy(
    feature_activations: torch.Tensor, token_ids: torch.Tensor, count: int, seed: int = 0, chunk: int = 256
) -> torch.Tensor:
    """[F] ``token_entropy`` of each feature on ``count`` of its firing tokens drawn at random; nan where it fires
    on fewer. The plug-in entropy grows with the tokens it is counted on, so a feature that fires more often reads
    as less token-specific for that alone: on equal counts, every feature's estimate has the same bias."""
    generator = torch.Generator().manual_seed(seed)
    n_tokens, n_features = feature_activations.shape
    result = torch.full((n_features,), float("nan"))
    for start in range(0, n_features, chunk):
        block = feature_activations[:, start : start + chunk].float().clamp_min(0)
        keys = torch.rand(block.shape, generator=generator)
        keys = torch.where(block > 0, keys, -1.0)  # silent tokens are never drawn
        drawn = keys.topk(min(count, n_tokens), dim=0).indices  # [count, chunk]
        enough = (block > 0).sum(0) >= count
        subsample = torch.zeros_like(block).scatter_(0, drawn, block.gather(0, drawn))
        entropy = token_entropy(subsample, token_ids)
        result[start : start + chunk] = torch.where(enough, entropy, float("nan"))
    return result


def top_activation_overlap(snapshot_activations: torch.Tensor, top_k: int = 10) -> torch.Tensor:
    """[K, S-1] for K features: the share of the ``top_k`` tokens that activate the feature most at
    snapshot s that are also among its top ``top_k`` at snapshot s+1.

    ``snapshot_activations`` [S, N, K] is each feature's activation computed from one snapshot's
    input alone. A crosscoder that forced unrelated directions into one feature would show low overlap.
    """
    n_snapshots, n_tokens, n_features = snapshot_activations.shape
    top_k = min(top_k, n_tokens)
    top = snapshot_activations.topk(top_k, dim=1).indices  # [S, k, K]
    chosen = torch.zeros(n_snapshots, n_tokens, n_features, dtype=torch.bool)
    chosen.scatter_(1, top.cpu(), True)
    shared = (chosen[:-1] & chosen[1:]).sum(1)  # [S-1, K]
    return (shared.float() / top_k).T


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties); nan with fewer than 3 points or no spread."""
    keep = ~(torch.isnan(x) | torch.isnan(y))
    x, y = x[keep].double(), y[keep].double()
    if len(x) < 3:
        return float("nan")
    return pearson(average_ranks(x), average_ranks(y))


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    order = values.argsort()
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(len(values), dtype=values.dtype)
    distinct, inverse = torch.unique(values, return_inverse=True)
    sums = torch.zeros(len(distinct), dtype=values.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(distinct), dtype=values.dtype).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; nan when either side has no spread."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


class Interval(NamedTuple):
    """A statistic with its 95 % percentile bootstrap interval."""

    value: float
    low: float
    high: float


def bootstrap(statistic: Callable[[torch.Tensor], float], n_items: int, seed: int, samples: int = 200) -> Interval:
    """``statistic`` of index tensors: on all ``n_items`` items, and its 95 % interval over ``samples`` resamples
    of the items (nan where fewer than 3 items or every resample is nan)."""
    value = statistic(torch.arange(n_items)) if n_items else float("nan")
    if n_items < 3:
        return Interval(value, float("nan"), float("nan"))
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_items, (samples, n_items), generator=generator)
    values = torch.tensor([statistic(draw) for draw in draws], dtype=torch.float64)
    values = values[~values.isnan()]
    if len(values) == 0:
        return Interval(value, float("nan"), float("nan"))
    return Interval(value, float(values.quantile(0.025)), float(values.quantile(0.975)))
