"""The statistic behind each claim of DESIGN.md's table, for one trained crosscoder (one trial).

Everything here reads the crosscoder and held-out activations; the language-model side of
``quality`` (ΔCE) is measured by ``study.analysis.splicing``, and that of ``causal`` and ``relie`` by
``study.analysis.causal_statistics``, and both are passed in.
"""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd
import torch

from crosscoder import CrossCoder, CrossCoderMetrics
from crosscoder.evolution import emergence, feature_dimensionality, turning_point
from crosscoder.feature_statistics import spearman, token_entropy, top_activation_overlap
from crosscoder.probing import norm_proxy
from study.analysis.causal_statistics import CausalStatistics
from study.analysis.splicing import SplicedLoss
from study.record import TrialCurves, TrialSummary

SAMPLED_FEATURES = 32
"""Features sampled for the probe (norm_proxy) and top-activation (alignment) analyses."""
MIN_FIRINGS = 20
"""Held-out tokens a feature must fire on to be sampled (its probe fits and scores on 10 each) or to count in token_specificity."""
TOP_K = 10
"""Top-activating tokens compared between adjacent snapshots (alignment)."""
PRESENT = 0.5
"""A feature counts as present at a snapshot when its decoder norm is at least this share of its maximum."""


class ClaimStatistics(NamedTuple):
    """One trial's statistics, ready to log."""

    summary: TrialSummary
    """Scalar metrics (nan where a statistic does not exist, e.g. no turning point)."""
    by_snapshot: TrialCurves
    """Curves over the crosscoder's snapshots, in snapshot order."""
    features: pd.DataFrame
    """One row per feature: activation frequency, alive, emergence / peak step, token entropy, sampled,
    indirect effect at each snapshot and RelIE."""
    ablation_curves: pd.DataFrame
    """The task metric with the top-k features ablated / kept, per snapshot and k."""


@torch.no_grad()
def feature_activations_in_batches(
    model: CrossCoder, activations: torch.Tensor, batch_size: int = 4096
) -> torch.Tensor:
    device = model.decoder_weight.device
    return torch.cat(
        [model.feature_activations(chunk.to(device)).float().cpu() for chunk in activations.split(batch_size)]
    )


def claim_statistics(
    model: CrossCoder,
    held_out: torch.Tensor,
    token_ids: torch.Tensor,
    steps: list[int],
    metrics: CrossCoderMetrics,
    spliced: SplicedLoss,
    causal: CausalStatistics,
    seed: int,
) -> ClaimStatistics:
    """Statistics of ``model`` on held-out activations [N, S, d] whose token ids are ``token_ids`` [N]."""
    model = model.eval()
    n_snapshots = len(steps)
    decoder_norms = metrics.decoder_norms
    activations = feature_activations_in_batches(model, held_out)  # [N, F]
    firings = (activations > 0).sum(0)
    alive = firings > 0

    # transition: total dimensionality of the live features at each snapshot, and where it turns.
    dimensionality = feature_dimensionality(model.decoder_weight.detach().cpu())[alive].sum(0)
    turn = turning_point(dimensionality, steps)

    # emergence: dead features are left out, their decoders never left their (flat) initial norms.
    evolution = emergence(decoder_norms, steps, include=alive)

    # norm_proxy and alignment, on features that fire often enough to probe.
    candidates = (firings >= MIN_FIRINGS).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    sampled = candidates[torch.randperm(len(candidates), generator=generator)[:SAMPLED_FEATURES]].sort().values
    proxy_r, probe_error_curve, overlap_curve, overlap_mean = (
        float("nan"),
        [float("nan")] * n_snapshots,
        [float("nan")] * (n_snapshots - 1),
        float("nan"),
    )
    if len(sampled) >= 2:
        proxy = norm_proxy(held_out, activations[:, sampled] > 0, decoder_norms[sampled], seed)
        proxy_r, probe_error_curve = proxy.correlation, proxy.probe_error.nanmean(0).tolist()
        snapshot_activations = model.snapshot_preactivations(
            held_out.to(model.decoder_weight.device), sampled.to(model.decoder_weight.device)
        ).cpu()
        overlap = top_activation_overlap(snapshot_activations, TOP_K)  # [K, S-1]
        present = proxy.relative_decoder_norm >= PRESENT
        both_present = present[:, :-1] & present[:, 1:]
        overlap = torch.where(both_present, overlap, float("nan"))
        overlap_curve = overlap.nanmean(0).tolist()
        overlap_mean = float(overlap.nanmean()) if both_present.any() else float("nan")

    # token_specificity: entropy of each feature's token ids, grouped by the snapshot of its peak norm.
    entropy = token_entropy(activations, token_ids)
    counted = firings >= MIN_FIRINGS
    peak = evolution.peak_index
    entropy_by_peak = [
        float(entropy[counted & (peak == index)].mean()) if (counted & (peak == index)).any() else float("nan")
        for index in range(n_snapshots)
    ]
    specificity_r = spearman(peak[counted].float(), entropy[counted])

    delta_ce = torch.tensor(spliced.delta_ce)
    summary = TrialSummary(
        explained_variance=metrics.explained_variance,
        min_explained_variance_by_snapshot=min(metrics.explained_variance_per_snapshot),
        l0=metrics.l0,
        dead_fraction=metrics.dead_fraction,
        mse=metrics.mse,
        transition_step=float(turn.step) if turn.step is not None else float("nan"),
        transition_found=float(turn.step is not None),
        initial_share=evolution.initial_share,
        emergent_share=evolution.emergent_share,
        median_emergence_step=evolution.median_emergence_step,
        norm_proxy_r=proxy_r,
        delta_ce_mean=float(delta_ce.mean()),
        delta_ce_max=float(delta_ce.max()),
        token_specificity_r=specificity_r,
        alignment_overlap=overlap_mean,
        sampled_features=float(len(sampled)),
        **causal.summary._asdict(),
    )
    by_snapshot = TrialCurves(
        explained_variance_by_snapshot=list(metrics.explained_variance_per_snapshot),
        l0_by_snapshot=list(metrics.l0_per_snapshot),
        mean_decoder_norm_by_snapshot=decoder_norms[alive].mean(0).tolist()
        if alive.any()
        else [float("nan")] * n_snapshots,
        feature_dimensionality_by_snapshot=dimensionality.tolist(),
        clean_loss_by_snapshot=spliced.clean_loss,
        delta_ce_by_snapshot=spliced.delta_ce,
        probe_error_by_snapshot=probe_error_curve,
        token_entropy_by_peak_snapshot=entropy_by_peak,
        alignment_overlap_by_snapshot=overlap_curve,
        **causal.by_snapshot._asdict(),
    )
    step_of = torch.tensor(steps, dtype=torch.float32)
    features = pd.DataFrame(
        {
            "feature": range(len(alive)),
            "activation_frequency": metrics.activation_frequency.numpy(),
            "alive": alive.numpy(),
            "emergence_step": torch.where(
                evolution.emergence_index >= 0, step_of[evolution.emergence_index.clamp_min(0)], float("nan")
            ).numpy(),
            "peak_step": torch.where(peak >= 0, step_of[peak.clamp_min(0)], float("nan")).numpy(),
            "token_entropy": entropy.numpy(),
            "sampled": torch.isin(torch.arange(len(alive)), sampled).numpy(),
        }
    )
    return ClaimStatistics(summary, by_snapshot, features.merge(causal.features, on="feature"), causal.curves)
