"""Where the answer is planted (``study.lm.planted``): how much of the planted dictionary a trained
crosscoder recovered, and whether it dates the recovered features as planted. A high explained
variance can hide a wrong dictionary; these figures cannot."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from crosscoder.evolution import emergence, feature_dimensionality, turning_point
from study.lm.planted import PLANTED_DECODER, read_truth
from study.record import PlantedSummary

RECOVERED_COSINE = 0.9
"""A planted feature is recovered when some crosscoder feature's decoder, over all snapshots, has at least this cosine with it."""
SPECIFIC_ENTROPY = 0.5
"""A feature is token-specific when the entropy (nats) of the token ids carrying its activation is below
this: 0 for one token id, 0.33 for a 90 / 10 split between two, log 2 = 0.69 for an even one."""

SHOWN_TOKENS = 8
"""A planted feature's tokens listed on the page of the feature that recovers it (shared ones have dozens)."""


class PlantedRecovery(NamedTuple):
    summary: PlantedSummary
    """The scalars logged beside the trial's own statistics."""
    best_cosine: torch.Tensor
    """[planted features] the largest decoder cosine of any crosscoder feature with each."""
    best_feature: torch.Tensor
    """[planted features] the crosscoder feature with that cosine."""


def recovered_by_feature(recovery: PlantedRecovery, folder: Path, tokenizer) -> dict[int, dict]:
    """Each crosscoder feature that recovers a planted one (cosine at least RECOVERED_COSINE): the planted feature's
    index, kind, tokens (as text) and the cosine; the closer planted feature where a crosscoder feature recovers two."""
    truth = read_truth(folder)["features"]
    found: dict[int, dict] = {}
    for planted, (cosine, feature) in enumerate(zip(recovery.best_cosine.tolist(), recovery.best_feature.tolist())):
        if cosine >= RECOVERED_COSINE and cosine > found.get(feature, {}).get("cosine", 0.0):
            tokens = truth[planted]["tokens"]
            found[feature] = {
                "index": planted,
                "kind": truth[planted]["kind"],
                "tokens": [tokenizer.decode([token]) for token in tokens[:SHOWN_TOKENS]],
                "token_count": len(tokens),
                "cosine": round(cosine, 4),
            }
    return found


def planted_recovery(
    decoder: torch.Tensor, emergence_step: torch.Tensor, token_entropy: torch.Tensor, steps: list[int], folder: Path
) -> PlantedRecovery:
    """Compare a crosscoder's ``decoder`` [F, S, d], its features' ``emergence_step`` [F] (nan where left
    out) and ``token_entropy`` [F] (nats, held-out tokens) with the planted dictionary at the same ``steps``."""
    truth = read_truth(folder)
    columns = [truth["steps"].index(step) for step in steps]
    planted = torch.load(folder / PLANTED_DECODER)[:, columns].float()
    planted_emergence = emergence(planted.norm(dim=-1), steps).emergence_index
    planted_turn = turning_point(feature_dimensionality(planted).sum(0), steps).step

    def unit_rows(weights: torch.Tensor) -> torch.Tensor:
        flat = weights.detach().float().cpu().flatten(1)
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)

    cosines = unit_rows(planted) @ unit_rows(decoder).T  # [P, F]
    best_cosine, best_feature = cosines.max(1)
    recovered = best_cosine >= RECOVERED_COSINE
    planted_step = torch.tensor(steps, dtype=torch.float64)[planted_emergence]
    dated = emergence_step.double().cpu()[best_feature] == planted_step
    planted_specific = torch.tensor([feature["kind"] == "specific" for feature in truth["features"]])
    found_specific = token_entropy.double().cpu()[best_feature] < SPECIFIC_ENTROPY
    same_kind = found_specific == planted_specific

    def share_of_recovered(agrees: torch.Tensor) -> float:
        return float(agrees[recovered].double().mean()) if recovered.any() else float("nan")

    summary = PlantedSummary(
        planted_recovered_share=float(recovered.double().mean()),
        planted_emergence_agreement=share_of_recovered(dated),
        planted_token_kind_agreement=share_of_recovered(same_kind),
        planted_initial_share=float((planted_emergence == 0).double().mean()),
        planted_turning_step=float(planted_turn) if planted_turn is not None else float("nan"),
    )
    return PlantedRecovery(summary, best_cosine, best_feature)
