"""One-to-one matching of two dictionaries' decoders by cosine over all snapshots.

``match_features`` is the exact Hungarian method on the dense F_a x F_b cosine matrix: for small
dictionaries and as the reference. ``stability`` scales to paper 1's 98,304 features: cosines in
row blocks (never the whole matrix in memory), each feature's nearest partners kept as a sparse
candidate graph, and the one-to-one assignment solved exactly on that graph's connected components
(which are small: a feature has few partners above the threshold).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

CANDIDATES = 8
"""Nearest partners in B kept per feature of A: an edge above the threshold outside them would need a
feature with more than this many partners above it."""
BLOCK_ELEMENTS = 1 << 26
"""Cosines computed at once (256 MB in float32), whatever the dictionaries' sizes."""


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


class Candidates(NamedTuple):
    """Each feature of A's nearest features in B by decoder cosine, best first."""

    cosines: torch.Tensor
    """[F_a, k]"""
    partners: torch.Tensor
    """[F_a, k] indices into B."""


def unit_rows(decoder: torch.Tensor, device: torch.device) -> torch.Tensor:
    flat = decoder.flatten(1).to(device=device, dtype=torch.float32)
    return flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def nearest_partners(
    decoder_a: torch.Tensor, decoder_b: torch.Tensor, k: int = CANDIDATES, device: str | torch.device | None = None
) -> Candidates:
    """The k best cosines of every feature of A with B's ([F, S, d] decoders), from row blocks of the
    cosine matrix: memory is the two dictionaries plus one block, linear in F. On the GPU where there is one."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    units_a, units_b = unit_rows(decoder_a, device), unit_rows(decoder_b, device)
    k = min(k, len(units_b))
    rows_per_block = max(1, BLOCK_ELEMENTS // len(units_b))
    cosines, partners = [], []
    for start in range(0, len(units_a), rows_per_block):
        block = units_a[start : start + rows_per_block] @ units_b.T
        best = block.topk(k, dim=1)
        cosines.append(best.values.cpu())
        partners.append(best.indices.cpu())
    return Candidates(torch.cat(cosines), torch.cat(partners))


def match_candidates(candidates: Candidates, n_b: int, threshold: float) -> FeatureMatch:
    """The one-to-one pairs above ``threshold`` that maximise the summed cosine, among the candidate edges:
    the Hungarian method on each connected component of the graph of edges above the threshold."""
    above = candidates.cosines > threshold
    rows = torch.arange(len(candidates.cosines))[:, None].expand_as(above)[above].numpy()
    columns, cosines = candidates.partners[above].numpy(), candidates.cosines[above].numpy()
    n_a = len(candidates.cosines)
    graph = coo_matrix((np.ones(len(rows)), (rows, n_a + columns)), shape=(n_a + n_b, n_a + n_b))
    _, component = connected_components(graph, directed=False)
    matched_rows, matched_columns, matched_cosines = [], [], []
    order = np.argsort(component[rows], kind="stable")
    edges = np.split(order, np.flatnonzero(np.diff(component[rows][order])) + 1) if len(order) else []
    for edge in edges:
        if len(edge) == 1:  # most components: one feature and its one partner
            matched_rows.append(rows[edge])
            matched_columns.append(columns[edge])
            matched_cosines.append(cosines[edge])
            continue
        local_rows, row_index = np.unique(rows[edge], return_inverse=True)
        local_columns, column_index = np.unique(columns[edge], return_inverse=True)
        weights = np.zeros((len(local_rows), len(local_columns)))
        weights[row_index, column_index] = cosines[edge]
        chosen_rows, chosen_columns = linear_sum_assignment(weights, maximize=True)
        kept = weights[chosen_rows, chosen_columns] > threshold  # a zero is a pair with no edge
        matched_rows.append(local_rows[chosen_rows[kept]])
        matched_columns.append(local_columns[chosen_columns[kept]])
        matched_cosines.append(weights[chosen_rows[kept], chosen_columns[kept]])
    if not matched_rows:
        empty = torch.zeros(0, dtype=torch.long)
        return FeatureMatch(empty, empty, torch.zeros(0))
    return FeatureMatch(
        torch.as_tensor(np.concatenate(matched_rows)),
        torch.as_tensor(np.concatenate(matched_columns)),
        torch.as_tensor(np.concatenate(matched_cosines), dtype=torch.float32),
    )


class Stability(NamedTuple):
    """How much of dictionary A is found again in dictionary B."""

    shared_share: float
    """Share of the one-to-one pairs whose cosine exceeds the threshold (over min(F_a, F_b) pairs)."""
    mean_max_cosine: float
    """Mean over A's features of the largest cosine with any feature of B."""
    n_pairs: int
    """min(F_a, F_b): the pairs a one-to-one matching has."""
    match: FeatureMatch
    """The pairs above the threshold."""


def stability(
    decoder_a: torch.Tensor, decoder_b: torch.Tensor, threshold: float = 0.7, device: str | torch.device | None = None
) -> Stability:
    """Feature stability between two crosscoders (decoders [F, S, d]); pass the smaller dictionary as A
    to read ``shared_share`` as the share of its features that have a partner in the larger one.
    Computed from the candidate graph (``nearest_partners``), never the dense cosine matrix."""
    candidates = nearest_partners(decoder_a, decoder_b, device=device)
    match = match_candidates(candidates, len(decoder_b), threshold)
    n_pairs = min(len(decoder_a), len(decoder_b))
    mean_max = float(candidates.cosines[:, 0].double().mean())
    return Stability(len(match.cosines) / n_pairs, mean_max, n_pairs, match)


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
