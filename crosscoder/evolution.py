"""How features change over snapshots, read from a trained crosscoder's decoders.

Paper 1's two evolution statistics: the total feature dimensionality at each snapshot (its
turning point marks the change from statistical to feature learning) and each feature's
emergence step (where its decoder norm first reaches half its maximum).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

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

    index: int | None
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
