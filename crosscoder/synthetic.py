"""Activations generated from a known sparse dictionary over snapshots, to check that training finds it.

``planted_features`` draws a dictionary whose features exist from the start, appear later or fade out,
with directions drifting between snapshots; ``hard_planted_features`` is the set each sparsity method is
judged on at its defaults (more features than dimensions, Zipf-distributed frequencies, noise;
``bench/hard_planted.py`` prints how much each recovers), and
``planted_recovery`` scores a trained crosscoder against the truth.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from crosscoder.evolution import EMERGENCE_FRACTION
from crosscoder.matching import match_features

RECOVERED_COSINE = 0.9
"""A planted feature is recovered when its one-to-one partner's decoder has at least this cosine with it."""


class PlantedFeatures(NamedTuple):
    """Synthetic activations and the dictionary that produced them."""

    activations: torch.Tensor
    """[tokens, S, d_model]."""
    directions: torch.Tensor
    """[n_features, S, d_model] each feature's unit direction at each snapshot (zero where absent)."""
    first_snapshot: torch.Tensor
    """[n_features] first snapshot at which the feature exists."""
    last_snapshot: torch.Tensor
    """[n_features] last snapshot at which the feature exists."""
    firing_probability: torch.Tensor
    """[n_features] share of tokens each feature fires on."""


def planted_features(
    n_tokens: int,
    n_snapshots: int,
    d_model: int,
    n_features: int,
    firing_probability: float = 0.04,
    drift: float = 0.2,
    noise: float = 0.01,
    zipf_exponent: float = 0.0,
    seed: int = 0,
) -> PlantedFeatures:
    """A third of the features exist from the first snapshot on, a third appear at a later snapshot,
    a third fade out before the last. Directions drift a little between snapshots; each token fires
    feature i with a probability proportional to (r_i + 1) ** -zipf_exponent, r_i its drawn frequency rank,
    whose mean over features is ``firing_probability``, at a magnitude in [0.5, 1.5].
    """
    # numpy's generator, not torch's: a crosscoder initialised with torch.manual_seed(seed) would
    # otherwise draw the very same normal numbers for its initial directions and start on the truth.
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))

    base = normal(n_features, 1, d_model)
    directions = base + drift * normal(n_features, n_snapshots, d_model)
    directions /= directions.norm(dim=-1, keepdim=True)

    kind = torch.arange(n_features) % 3  # 0: from the start, 1: emerging, 2: fading
    change = torch.from_numpy(rng.integers(1, n_snapshots, n_features))
    first = torch.where(kind == 1, change, 0)
    last = torch.where(kind == 2, change - 1, n_snapshots - 1)
    snapshot = torch.arange(n_snapshots)
    present = (snapshot >= first[:, None]) & (snapshot <= last[:, None])
    directions = directions * present[..., None]

    # Frequency rank is drawn apart from kind, so every kind has frequent and rare features.
    rank = torch.from_numpy(rng.permutation(n_features)).double()
    weights = (rank + 1) ** -zipf_exponent
    probability = (firing_probability * n_features * weights / weights.sum()).clamp(max=1.0).float()
    fires = torch.from_numpy(rng.random((n_tokens, n_features), dtype=np.float32)) < probability
    magnitudes = 0.5 + torch.from_numpy(rng.random((n_tokens, n_features), dtype=np.float32))
    codes = fires * magnitudes
    activations = torch.einsum("tf,fsd->tsd", codes, directions)
    activations += noise * normal(*activations.shape)
    return PlantedFeatures(activations, directions, first, last, probability)


def hard_planted_features(n_tokens: int = 60_000, seed: int = 0) -> PlantedFeatures:
    """The hard set: 256 features in 64 dimensions over 12 snapshots, Zipf frequencies (exponent 0.7, the
    rarest feature firing on about 1 token in 100) at a mean L0 of 6, drift 0.2 and noise 0.05."""
    return planted_features(
        n_tokens,
        n_snapshots=12,
        d_model=64,
        n_features=256,
        firing_probability=6 / 256,
        drift=0.2,
        noise=0.05,
        zipf_exponent=0.7,
        seed=seed,
    )


class PlantedRecovery(NamedTuple):
    """How much of a planted dictionary a crosscoder found."""

    recovered_share: float
    """Share of planted features whose one-to-one partner has decoder cosine >= RECOVERED_COSINE."""
    onsets_exact_share: float
    """Share of the recovered ones whose first and last present snapshots are exactly the planted ones."""
    rarest_recovered_probability: float
    """Firing probability of the rarest planted feature that was recovered (nan if none)."""


def present_range(decoder_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First (the emergence index of ``crosscoder.evolution``) and last snapshot where each feature's
    decoder norm reaches EMERGENCE_FRACTION of its maximum."""
    present = decoder_norms >= EMERGENCE_FRACTION * decoder_norms.max(1, keepdim=True).values
    snapshot = torch.arange(decoder_norms.shape[1])
    return present.float().argmax(1), torch.where(present, snapshot, -1).max(1).values


def planted_recovery(planted: PlantedFeatures, decoder: torch.Tensor) -> PlantedRecovery:
    """Score a trained decoder [F, S, d_model] against the planted dictionary (one-to-one, Hungarian)."""
    decoder = decoder.detach().float().cpu()
    match = match_features(planted.directions, decoder)
    recovered = match.cosines >= RECOVERED_COSINE
    first, last = present_range(decoder.norm(dim=-1)[match.columns])
    exact = (first == planted.first_snapshot[match.rows]) & (last == planted.last_snapshot[match.rows])
    n_recovered = int(recovered.sum())
    probability = planted.firing_probability[match.rows][recovered]
    return PlantedRecovery(
        recovered_share=n_recovered / len(planted.directions),
        onsets_exact_share=float(exact[recovered].float().mean()) if n_recovered else float("nan"),
        rarest_recovered_probability=float(probability.min()) if n_recovered else float("nan"),
    )
