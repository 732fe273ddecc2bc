"""One-to-one matching of two dictionaries' decoders by cosine over all snapshots (Hungarian)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from scipy.optimize import linear_sum_assignment


class FeatureMatch(NamedTuple):
    """Pairs (rows[j], columns[j]) of features of dictionary A and B with their cosine."""

    rows: torch.Tensor
    columns: torch.Tensor
    cosines: torch.Tensor


def decoder_cosines(decoder_a: torch.Tensor, decoder_b: torch.Tensor) -> torch.Tensor:
    """[F_a, F_b] cosines between decoders [F, S, d] (or [S, F, d] transposed by the caller), flattened over snapshots."""
    flat_a = decoder_a.flatten(1).float()
    flat_b = decoder_b.flatten(1).float()
    flat_a = flat_a / flat_a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    flat_b = flat_b / flat_b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return flat_a @ flat_b.T


def match_features(decoder_a: torch.Tensor, decoder_b: torch.Tensor) -> FeatureMatch:
    """The one-to-one pairing that maximises the summed cosine; min(F_a, F_b) pairs."""
    cosines = decoder_cosines(decoder_a, decoder_b)
    rows, columns = linear_sum_assignment(cosines.numpy(), maximize=True)
    rows, columns = torch.as_tensor(rows), torch.as_tensor(columns)
    return FeatureMatch(rows, columns, cosines[rows, columns])


class Stability(NamedTuple):
    """How much of dictionary A is found again in dictionary B."""

    shared_share: float
    """Share of the one-to-one pairs whose cosine exceeds the threshold (over min(F_a, F_b) pairs)."""
    mean_max_cosine: float
    """Mean over A's features of the largest cosine with any feature of B."""
    n_pairs: int
    match: FeatureMatch


def stability(decoder_a: torch.Tensor, decoder_b: torch.Tensor, threshold: float = 0.7) -> Stability:
    """Feature stability between two crosscoders (decoders [F, S, d]); pass the smaller dictionary as A
    to read ``shared_share`` as the share of its features that have a partner in the larger one."""
    match = match_features(decoder_a, decoder_b)
    mean_max = float(decoder_cosines(decoder_a, decoder_b).max(1).values.mean())
    return Stability(float((match.cosines > threshold).double().mean()), mean_max, len(match.cosines), match)


def matched_jaccard(match: FeatureMatch, top_a: torch.Tensor, top_b: torch.Tensor, threshold: float = 0.7) -> float:
    """Jaccard index of feature sets ``top_a`` (indices into A) and ``top_b`` (into B) once A's features
    are renamed to their matched partners in B; a feature without a partner above ``threshold`` is
    counted as different from every feature of B."""
    partner = {
        int(row): int(column)
        for row, column, cosine in zip(match.rows, match.columns, match.cosines)
        if cosine > threshold
    }
    renamed = {partner[int(feature)] for feature in top_a if int(feature) in partner}
    shared = len(renamed & {int(feature) for feature in top_b})
    union = len(top_a) + len(top_b) - shared
    return shared / union if union else 1.0
