"""Activations generated from a known sparse dictionary over snapshots, to check that training finds it."""

from __future__ import annotations

from typing import NamedTuple

import torch


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


def planted_features(
    n_tokens: int,
    n_snapshots: int,
    d_model: int,
    n_features: int,
    firing_probability: float = 0.04,
    drift: float = 0.2,
    noise: float = 0.01,
    seed: int = 0,
) -> PlantedFeatures:
    """A third of the features exist from the first snapshot on, a third appear at a later snapshot,
    a third fade out before the last. Directions drift a little between snapshots; each token
    fires each feature with ``firing_probability`` at a magnitude in [0.5, 1.5].
    """
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n_features, 1, d_model, generator=generator)
    directions = base + drift * torch.randn(n_features, n_snapshots, d_model, generator=generator)
    directions /= directions.norm(dim=-1, keepdim=True)

    kind = torch.arange(n_features) % 3  # 0: from the start, 1: emerging, 2: fading
    change = torch.randint(1, n_snapshots, (n_features,), generator=generator)
    first = torch.where(kind == 1, change, 0)
    last = torch.where(kind == 2, change - 1, n_snapshots - 1)
    snapshot = torch.arange(n_snapshots)
    present = (snapshot >= first[:, None]) & (snapshot <= last[:, None])
    directions = directions * present[..., None]

    fires = torch.rand(n_tokens, n_features, generator=generator) < firing_probability
    magnitudes = 0.5 + torch.rand(n_tokens, n_features, generator=generator)
    codes = fires * magnitudes
    activations = torch.einsum("tf,fsd->tsd", codes, directions)
    activations += noise * torch.randn(activations.shape, generator=generator)
    return PlantedFeatures(activations, directions, first, last)
