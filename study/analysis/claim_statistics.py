"""The statistic behind each claim of ``study.record.CLAIMS`` (docs/claims.md), for one trained crosscoder (one trial).

Everything here reads the crosscoder and held-out activations; the language-model side of
``quality`` (ΔCE) is measured by ``study.analysis.splicing``, and that of ``causal`` and ``relie`` by
``study.analysis.causal_statistics``, and both are passed in.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pandas as pd
import torch

from crosscoder import CrossCoder, CrossCoderMetrics
from crosscoder.evolution import (
    Emergence,
    TurningPoint,
    ValleyTest,
    emergence,
    feature_dimensionality,
    order_coherence,
    turning_point,
    unresolved,
    valley_test,
)
from crosscoder.feature_statistics import (
    Interval,
    bootstrap,
    equal_count_entropy,
    spearman,
    token_entropy,
    top_activation_overlap,
)
from crosscoder.methods import METHODS
from crosscoder.metrics import evaluate
from crosscoder.probing import norm_proxy
from crosscoder.trainer import DecoderRecord, sparsity_coefficient
from study.analysis.causal_statistics import CausalStatistics
from study.analysis.splicing import SplicedLoss
from study.record import AlongTraining, TrialCurves, TrialSummary, near

SAMPLED_FEATURES = 32
"""Features sampled for the probe (norm_proxy) and top-activation (alignment) analyses."""
MIN_FIRINGS = 20
"""Held-out tokens a feature must fire on to be sampled (its probe fits and scores on 10 each) or to count in
token_specificity, whose entropy is read on this many of its firing tokens (``equal_count_entropy``)."""
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
    along_training: pd.DataFrame
    """``along_training``: the order statistics at each checkpoint of the training run."""


@torch.no_grad()
def feature_activations_in_batches(
    model: CrossCoder, activations: torch.Tensor, batch_size: int = 4096
) -> torch.Tensor:
    device = model.decoder_weight.device
    return torch.cat(
        [model.feature_activations(chunk.to(device)).float().cpu() for chunk in activations.split(batch_size)]
    )


class ProbeStatistics(NamedTuple):
    """norm_proxy and alignment on the sampled features."""

    sampled: torch.Tensor
    norm_proxy_r: float
    norm_proxy_within: Interval
    probe_error_curve: list[float]
    overlap_curve: list[float]
    overlap_mean: float


def probe_statistics(
    model: CrossCoder, held_out: torch.Tensor, activations: torch.Tensor, decoder_norms: torch.Tensor, seed: int
) -> ProbeStatistics:
    """norm_proxy and alignment, on features that fire often enough to probe."""
    n_snapshots = held_out.shape[1]
    firings = (activations > 0).sum(0)
    candidates = (firings >= MIN_FIRINGS).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    sampled = candidates[torch.randperm(len(candidates), generator=generator)[:SAMPLED_FEATURES]].sort().values
    if len(sampled) < 2:
        nan = float("nan")
        return ProbeStatistics(
            sampled, nan, Interval(nan, nan, nan), [nan] * n_snapshots, [nan] * (n_snapshots - 1), nan
        )
    proxy = norm_proxy(held_out, activations[:, sampled] > 0, decoder_norms[sampled], seed)
    device = model.decoder_weight.device
    snapshot_activations = model.snapshot_preactivations(held_out.to(device), sampled.to(device)).cpu()
    overlap = top_activation_overlap(snapshot_activations, TOP_K)  # [K, S-1]
    present = proxy.relative_decoder_norm >= PRESENT
    both_present = present[:, :-1] & present[:, 1:]
    overlap = torch.where(both_present, overlap, float("nan"))
    overlap_mean = float(overlap.nanmean()) if both_present.any() else float("nan")
    return ProbeStatistics(
        sampled,
        proxy.correlation,
        proxy.within_snapshot,
        proxy.probe_error.nanmean(0).tolist(),
        overlap.nanmean(0).tolist(),
        overlap_mean,
    )


class TokenSpecificity(NamedTuple):
    r: Interval
    """Spearman r(peak snapshot, token entropy) with its bootstrap interval over features."""
    entropy_by_peak: list[float]
    """Mean entropy of the features peaking at each snapshot."""


def token_specificity(
    activations: torch.Tensor, token_ids: torch.Tensor, peak: torch.Tensor, n_snapshots: int, seed: int
) -> TokenSpecificity:
    """Early token-specific, later abstract: the entropy of each feature's token ids on MIN_FIRINGS of its firings
    (a feature that fires more often is not read as more abstract for that alone) against the snapshot where its
    decoder norm peaks (``peak`` [F], -1 for dead features); features firing less often are left out."""
    entropy = equal_count_entropy(activations, token_ids, MIN_FIRINGS, seed)
    counted = ~entropy.isnan() & (peak >= 0)
    by_peak = [
        float(entropy[counted & (peak == index)].mean()) if (counted & (peak == index)).any() else float("nan")
        for index in range(n_snapshots)
    ]
    peaks, entropies = peak[counted].float(), entropy[counted]
    return TokenSpecificity(bootstrap(lambda rows: spearman(peaks[rows], entropies[rows]), len(peaks), seed), by_peak)


def near_share(emergence_steps: list[int], turning_step: int | None) -> float:
    """Share of the emergent features' emergence steps that lie near the turning step (nan without either)."""
    if not emergence_steps or turning_step is None:
        return float("nan")
    return sum(near(step, turning_step) for step in emergence_steps) / len(emergence_steps)


class OrderStatistics(NamedTuple):
    """What transition and emergence read from a crosscoder's decoders."""

    dimensionality: torch.Tensor
    """[S] total dimensionality of the live features at each snapshot."""
    turn: TurningPoint
    valley: ValleyTest
    evolution: Emergence
    near_share: float
    """Share of the emergent features that emerge near the turning step."""


def order_statistics(
    dimensionality: torch.Tensor,
    decoder_norms: torch.Tensor,
    alive: torch.Tensor,
    resolved: torch.Tensor,
    steps: list[int],
    seed: int,
) -> OrderStatistics:
    """transition from the total dimensionality ([F, S]) of the ``alive`` features at each snapshot (where it turns,
    and whether more clearly than in random snapshot orders); emergence from the decoder norms ([F, S]) of the
    ``resolved`` ones."""
    total_dimensionality = dimensionality[alive].sum(0)
    turn = turning_point(total_dimensionality, steps)
    evolution = emergence(decoder_norms, steps, include=resolved)
    emergent_steps = [steps[index] for index in evolution.emergence_index.tolist() if index > 0]
    valley = valley_test(total_dimensionality, seed=seed)
    return OrderStatistics(total_dimensionality, turn, valley, evolution, near_share(emergent_steps, turn.step))


def along_training(
    records: tuple[DecoderRecord, ...], alive: torch.Tensor, resolved: torch.Tensor, steps: list[int], seed: int
) -> pd.DataFrame:
    """The order statistics at each checkpoint's decoders (one row per training step), read over the features
    live and resolved at the end: whether a verdict's statistics had settled before training stopped."""
    rows = []
    for record in records:
        order = order_statistics(record.dimensionality, record.decoder_norms, alive, resolved, steps, seed)
        rows.append(
            AlongTraining(
                transition_step=float(order.turn.step) if order.turn.step is not None else float("nan"),
                transition_p_value=order.valley.p_value,
                initial_share=order.evolution.initial_share,
                emergence_near_share=order.near_share,
            )._asdict()
            | {"step": record.step}
        )
    return pd.DataFrame(rows, columns=["step", *AlongTraining._fields])


class EvolutionControl(NamedTuple):
    """The evolution statistics of the crosscoder as initialised, before training: what they read by construction."""

    initial_share: float
    transition_found: float
    explained_variance: float
    l0: float


def evolution_control(
    initial_model: CrossCoder, held_out: torch.Tensor, steps: list[int], alive: torch.Tensor
) -> EvolutionControl:
    initial_metrics = evaluate(initial_model, held_out)
    dimensionality = feature_dimensionality(initial_model.decoder_weight.detach().cpu())[alive].sum(0)
    control_emergence = emergence(initial_metrics.decoder_norms, steps, include=alive)
    return EvolutionControl(
        control_emergence.initial_share,
        float(turning_point(dimensionality, steps).step is not None),
        initial_metrics.explained_variance,
        initial_metrics.l0,
    )


# Over 60 lines on purpose: it assembles one TrialSummary field by field, each from a function of crosscoder/;
# the list is long because the record is.
def claim_statistics(
    model: CrossCoder,
    initial_model: CrossCoder,
    held_out: torch.Tensor,
    token_ids: torch.Tensor,
    steps: list[int],
    metrics: CrossCoderMetrics,
    spliced: SplicedLoss,
    causal: CausalStatistics,
    seed: int,
    loss_drop: float = float("nan"),
    records: tuple[DecoderRecord, ...] = (),
) -> ClaimStatistics:
    """Statistics of ``model`` on held-out activations [N, S, d] whose token ids are ``token_ids`` [N];
    ``initial_model`` is the same crosscoder before training, the control; ``loss_drop`` is how much its
    training loss still fell over the last fifth of its steps (``crosscoder.loss_drop_last_fifth``); ``records`` its
    decoders at each checkpoint (``TrainResult.decoder_records``)."""
    model = model.eval()
    n_snapshots = len(steps)
    decoder_norms = metrics.decoder_norms
    activations = feature_activations_in_batches(model, held_out)  # [N, F]
    firings = (activations > 0).sum(0)
    alive = firings > 0

    # emergence leaves out dead features, whose decoders never left their (flat) initial norms, and live ones
    # whose decoders never moved measurably (unresolved), for the same reason.
    still = unresolved(model.decoder_weight, initial_model.decoder_weight)
    decoder = model.decoder_weight.detach().float().cpu()
    order = order_statistics(feature_dimensionality(decoder), decoder_norms, alive, alive & ~still, steps, seed)
    dimensionality, turn, valley, evolution, near_turn = order
    control = evolution_control(initial_model, held_out, steps, alive)
    probes = probe_statistics(model, held_out, activations, decoder_norms, seed)

    # token_specificity: entropy of each feature's token ids on equal counts of its firings, against its peak snapshot.
    entropy = token_entropy(activations, token_ids)
    peak = torch.where(alive, decoder_norms.argmax(1), -1)
    specificity = token_specificity(activations, token_ids, peak, n_snapshots, seed)

    delta_ce = torch.tensor(spliced.delta_ce)
    summary = TrialSummary(
        explained_variance=metrics.explained_variance,
        min_explained_variance_by_snapshot=min(metrics.explained_variance_per_snapshot),
        l0=metrics.l0,
        l0_per_dimension=metrics.l0 / held_out.shape[-1],
        dead_fraction=metrics.dead_fraction,
        live_features=float(alive.sum()),
        l0_per_snapshot=sum(metrics.l0_per_snapshot) / n_snapshots,
        l0_target_gap=(metrics.l0 - target) / target if (target := model.config.target_l0) else float("nan"),
        sparsity_coefficient_reached=sparsity_coefficient(model) if not METHODS[model.config.sparsity].uses_k else 0.0,
        mse=metrics.mse,
        loss_drop_last_fifth=loss_drop,
        transition_step=float(turn.step) if turn.step is not None else float("nan"),
        transition_found=float(turn.step is not None),
        transition_p_value=valley.p_value,
        transition_monotone_fit=valley.monotone_fit,
        initial_share=evolution.initial_share,
        emergent_share=evolution.emergent_share,
        median_emergence_step=evolution.median_emergence_step,
        emergence_near_share=near_turn,
        unresolved_share=float(still[alive].double().mean()) if alive.any() else float("nan"),
        order_coherence=order_coherence(held_out),
        norm_proxy_r=probes.norm_proxy_r,
        norm_proxy_r_within=probes.norm_proxy_within.value,
        norm_proxy_r_within_low=probes.norm_proxy_within.low,
        norm_proxy_r_within_high=probes.norm_proxy_within.high,
        delta_ce_mean=float(delta_ce.mean()),
        delta_ce_max=float(delta_ce.max()),
        # nan at snapshots whose layer is worth no loss (a model at initialisation): nothing to recover there.
        min_loss_recovered_by_snapshot=min(
            (value for value in spliced.loss_recovered if not math.isnan(value)), default=float("nan")
        ),
        token_specificity_r=specificity.r.value,
        token_specificity_r_low=specificity.r.low,
        token_specificity_r_high=specificity.r.high,
        alignment_overlap=probes.overlap_mean,
        sampled_features=float(len(probes.sampled)),
        control_explained_variance=control.explained_variance,
        control_l0=control.l0,
        control_initial_share=control.initial_share,
        control_transition_found=control.transition_found,
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
        loss_recovered_by_snapshot=spliced.loss_recovered,
        probe_error_by_snapshot=probes.probe_error_curve,
        token_entropy_by_peak_snapshot=specificity.entropy_by_peak,
        alignment_overlap_by_snapshot=probes.overlap_curve,
        **causal.by_snapshot._asdict(),
    )
    step_of = torch.tensor(steps, dtype=torch.float32)
    features = pd.DataFrame(
        {
            "feature": range(len(alive)),
            "activation_frequency": metrics.activation_frequency.numpy(),
            "alive": alive.numpy(),
            "unresolved": still.numpy(),
            "emergence_step": torch.where(
                evolution.emergence_index >= 0, step_of[evolution.emergence_index.clamp_min(0)], float("nan")
            ).numpy(),
            "peak_step": torch.where(peak >= 0, step_of[peak.clamp_min(0)], float("nan")).numpy(),
            "token_entropy": entropy.numpy(),
            "sampled": torch.isin(torch.arange(len(alive)), probes.sampled).numpy(),
        }
    )
    return ClaimStatistics(
        summary,
        by_snapshot,
        features.merge(causal.features, on="feature"),
        causal.curves,
        along_training(records, alive, alive & ~still, steps, seed),
    )
