"""How features change over snapshots, read from a trained crosscoder's decoders.

Paper 1's two evolution statistics: the total feature dimensionality at each snapshot (its
turning point marks the change from statistical to feature learning) and each feature's
emergence step (where its decoder norm first reaches half its maximum).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from crosscoder.feature_statistics import spearman

EMERGENCE_FRACTION = 0.5
"""A feature has emerged at the first snapshot where its decoder norm reaches this share of its maximum."""


def feature_dimensionality(decoder: torch.Tensor, block_size: int = 4096) -> torch.Tensor:
    """[F, S]: each feature's dimensionality at each snapshot, from that snapshot's decoder alone.

    With W_i the decoder row of feature i at snapshot s and Ŵ_i = W_i / ||W_i||,
    D_i = ||W_i||² / Σ_j (Ŵ_i · W_j)², the measure of Elhage et al. (2022) that paper 1 sums over
    features. D_i is 1 for a feature with a direction of its own, 1/k for k features sharing one,
    and 0 for a feature whose decoder is zero. ``decoder`` is [F, S, d_model].
    """
    decoder = decoder.detach().float()
    n_features, n_snapshots, _ = decoder.shape
    dimensionality = torch.zeros(n_features, n_snapshots)
    for snapshot in range(n_snapshots):
        weights = decoder[:, snapshot]
        squared_norms = weights.square().sum(-1)
        units = weights / squared_norms.sqrt().clamp_min(1e-12)[:, None]
        # Row blocks keep the [F, F] overlap matrix out of memory for large dictionaries.
        for start in range(0, n_features, block_size):
            overlaps = (units[start : start + block_size] @ weights.T).square().sum(-1)
            block_norms = squared_norms[start : start + block_size]
            dimensionality[start : start + block_size, snapshot] = torch.where(
                block_norms > 0, block_norms / overlaps.clamp_min(1e-30), 0.0
            ).cpu()
    return dimensionality


class TurningPoint(NamedTuple):
    """Where a curve over snapshots turns from falling to rising; index and step are None when it does not."""

    index: int | None  # type: ignore[assignment]  # a field, shadowing tuple.index on purpose
    step: int | None


def turning_point(values: list[float] | torch.Tensor, steps: list[int]) -> TurningPoint:
    """The snapshot of the curve's minimum, if it lies strictly inside: the curve fell before it and rose after.

    A minimum at the first or last snapshot means the curve only rose or only fell: no turning point.
    """
    values = torch.as_tensor(values, dtype=torch.float64)
    if len(values) != len(steps):
        raise ValueError(f"{len(values)} values for {len(steps)} steps")
    lowest = int(values.argmin())
    if 0 < lowest < len(values) - 1 and values[0] > values[lowest] < values[-1]:
        return TurningPoint(lowest, steps[lowest])
    return TurningPoint(None, None)


class Emergence(NamedTuple):
    """When each feature emerges, and the summary paper 1 draws from it."""

    emergence_index: torch.Tensor
    """[F] snapshot index where the decoder norm first reaches half its maximum (-1 for features left out)."""
    peak_index: torch.Tensor
    """[F] snapshot index of the largest decoder norm (-1 for features left out)."""
    initial_share: float
    """Share of the included features already there at the first snapshot (initialization-dependent)."""
    emergent_share: float
    """Share that emerges at a later snapshot."""
    median_emergence_step: float
    """Median emergence step of the emergent features (nan if there are none)."""


def emergence(decoder_norms: torch.Tensor, steps: list[int], include: torch.Tensor | None = None) -> Emergence:
    """Emergence of the features of ``decoder_norms`` [F, S]; ``include`` [F] bool leaves out
    features such as dead ones, whose decoders never moved from their (flat) initial norm."""
    norms = decoder_norms.detach().float()
    include = torch.ones(len(norms), dtype=torch.bool) if include is None else include.bool()
    reached = norms >= EMERGENCE_FRACTION * norms.max(1, keepdim=True).values
    first = reached.float().argmax(1)  # first True in each row
    emergence_index = torch.where(include, first, -1)
    peak_index = torch.where(include, norms.argmax(1), -1)
    counted = emergence_index[include]
    if len(counted) == 0:
        return Emergence(emergence_index, peak_index, float("nan"), float("nan"), float("nan"))
    initial = float((counted == 0).double().mean())
    later_steps = torch.tensor([steps[index] for index in counted[counted > 0].tolist()], dtype=torch.float64)
    median = float(later_steps.median()) if len(later_steps) else float("nan")
    return Emergence(emergence_index, peak_index, initial, 1 - initial, median)


UNRESOLVED_CHANGE = 0.1
"""A feature whose decoder moved by less than this share of its initial norm at every snapshot is unresolved."""


def unresolved(decoder: torch.Tensor, initial_decoder: torch.Tensor) -> torch.Tensor:
    """[F] bool: features whose decoder [F, S, d] never left its initial value measurably at any snapshot.

    Every decoder starts equal at all snapshots, so an unmoved feature looks "present from the start"
    to the emergence statistic; such a feature tells nothing about when it arose, and is counted apart.
    """
    change = (decoder.detach().float() - initial_decoder.detach().float()).norm(dim=-1)
    scale = initial_decoder.detach().float().norm(dim=-1).clamp_min(1e-12)
    return (change / scale < UNRESOLVED_CHANGE).all(1).cpu()


def order_coherence(activations: torch.Tensor) -> float:
    """How well the snapshots' order explains how far their activations lie apart, in [-1, 1].

    ``activations`` [N, S, d] hold the same tokens at every snapshot. For each snapshot, the Spearman
    correlation over the others between distance in the order and mean squared distance of the
    (norm-scaled) activations, averaged over snapshots: near 1 for a training run, where a model
    drifts away from where it was; near 0 for snapshots in shuffled order; nan when the snapshots
    are all the same (nothing evolves). The evolution claims need it high.
    """
    activations = activations.detach().double()
    scaled = activations / activations.norm(dim=-1).mean(0).clamp_min(1e-12)[None, :, None]
    n_snapshots = scaled.shape[1]
    distances = torch.stack([(scaled - scaled[:, [s]]).square().sum(-1).mean(0) for s in range(n_snapshots)])  # [S, S]
    if float(distances.max()) <= 1e-12:
        return float("nan")
    order = torch.arange(n_snapshots, dtype=torch.float64)
    correlations = []
    for anchor in range(n_snapshots):
        others = order != anchor
        correlations.append(spearman((order - anchor).abs()[others], distances[anchor][others]))
    values = torch.tensor(correlations, dtype=torch.float64)
    return float(values.nanmean()) if not values.isnan().all() else float("nan")


def isotonic(values: list[float], increasing: bool = True) -> list[float]:
    """The least-squares non-decreasing (or non-increasing) fit of ``values`` (pool adjacent violators)."""
    sign = 1.0 if increasing else -1.0
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([sign * value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            blocks[-1] = [
                (blocks[-1][0] * blocks[-1][1] + mean * count) / (blocks[-1][1] + count),
                blocks[-1][1] + count,
            ]
    return [sign * mean for mean, count in blocks for _ in range(int(count))]


def fit_share(values: list[float], fitted: list[float]) -> float:
    """Share of the variance of ``values`` that ``fitted`` explains."""
    mean = sum(values) / len(values)
    total = sum((value - mean) ** 2 for value in values)
    residual = sum((value - fit) ** 2 for value, fit in zip(values, fitted))
    return 1.0 - residual / total if total > 0 else 0.0


def monotone_fit(values: list[float]) -> float:
    """How much of the curve's variance a monotone curve (rising or falling) explains."""
    return max(fit_share(values, isotonic(values, increasing)) for increasing in (True, False))


VALLEY_MIN_DEPTH = 0.1
"""A valley's shallower arm must rise at least this share of the curve's range above its bottom: a dip of a few
per cent inside a rising curve is noise, not a turn. A tenth, not more: a crosscoder's dimensionality range is
dominated by the collapse from its random initialisation, and the embedded model's later rise (7.6 to 13.5 of a
range of 38) is a turn."""


def valley_fit(values: list[float], min_depth: float = VALLEY_MIN_DEPTH) -> float:
    """How much of the curve's variance a valley explains: falling to an inner snapshot and rising after it, each
    arm by at least ``min_depth`` of the curve's range (0 where no such valley exists, as for a monotone curve)."""
    span = max(values) - min(values)
    best = 0.0
    for bottom in range(1, len(values) - 1):
        falling, rising = isotonic(values[: bottom + 1], False), isotonic(values[bottom:], True)
        lowest = min(falling[-1], rising[0])
        if span <= 0 or min(falling[0] - lowest, rising[-1] - lowest) < min_depth * span:
            continue
        best = max(best, fit_share(values, falling[:-1] + [lowest] + rising[1:]))
    return best


class ValleyTest(NamedTuple):
    """Whether a curve over snapshots falls and rises again more clearly than its own values in random order do."""

    valley_fit: float
    """Share of the variance a valley with two real arms explains (``valley_fit``; 0 without one)."""
    monotone_fit: float
    """Share of the variance the best monotone curve explains."""
    p_value: float
    """Share of orderings of the same values (the snapshot order permuted) whose valley fits at least as well: the
    chance of so clear a turn in a curve whose order means nothing."""


def valley_test(values: list[float] | torch.Tensor, permutations: int = 999, seed: int = 0) -> ValleyTest:
    """The turn of ``values`` against the same values in random snapshot orders (``permutations`` of them,
    seeded). With S snapshots no p-value falls below (2^(S-1) - 2) / S! (``smallest_valley_p``)."""
    curve = [float(value) for value in torch.as_tensor(values, dtype=torch.float64)]
    if len(curve) < 3:
        return ValleyTest(0.0, 1.0, 1.0)
    observed = valley_fit(curve)
    if observed == 0.0:
        return ValleyTest(0.0, monotone_fit(curve), 1.0)
    generator = torch.Generator().manual_seed(seed)
    as_good = sum(
        valley_fit([curve[index] for index in torch.randperm(len(curve), generator=generator).tolist()])
        >= observed - 1e-12
        for _ in range(permutations)
    )
    return ValleyTest(observed, monotone_fit(curve), (1 + as_good) / (1 + permutations))


def smallest_valley_p(n_snapshots: int) -> float:
    """The share of orderings of S distinct values that form a perfect valley with an inner bottom: no valley test
    on S snapshots can give a smaller p-value (4 snapshots: 0.25; 6: 0.042)."""
    return (2 ** (n_snapshots - 1) - 2) / math.factorial(n_snapshots)
