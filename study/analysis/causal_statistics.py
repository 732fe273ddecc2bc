"""The causal claims' statistics for one trained crosscoder: attribution, ablation curves and RelIE on
the agreement task at every snapshot (claims ``causal`` and ``relie`` of ``study.record.CLAIMS``, docs/claims.md)."""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd
import torch

from crosscoder import CrossCoder
from study.activations.direct import direct_activations
from study.analysis.attribution import SnapshotModel, Task, Terms, relative_indirect_effect
from study.lm.trajectory import Snapshot, load_model
from study.record import (
    ABLATE_K,
    IE_COLUMN,
    KEEP_MIN,
    KEEP_SHARE,
    RELIE_COLUMN,
    TASK_LEARNED_ACCURACY,
    TOP_FEATURES,
    CausalCurves,
    CausalSummary,
)

ABLATION_KS = (1, 2, 5, 10, 15, 20, 50, 100, 200, 500, 1000)
"""Numbers of top features ablated or kept, as far as the dictionary reaches."""


class CausalStatistics(NamedTuple):
    summary: CausalSummary
    by_snapshot: CausalCurves
    curves: pd.DataFrame
    """One row per (snapshot step, k): metric with the top k ablated / kept, and relative to clean."""
    features: pd.DataFrame
    """One row per feature: ie_step<N> at every snapshot, relie_step<N> at the RelIE snapshots."""


def relative(value: float, clean: float, baseline: float) -> float:
    """Share of the clean-minus-baseline gap that ``value`` keeps: 1 at clean, 0 at the baseline."""
    return (value - baseline) / (clean - baseline) if clean != baseline else float("nan")


def keep_k(n_features: int) -> int:
    """Paper 1's share of the dictionary (500 of 98,304), at least KEEP_MIN and at most a quarter of it."""
    return min(max(KEEP_MIN, round(KEEP_SHARE * n_features)), max(1, n_features // 4))


def relie_indices(accuracies: list[float], count: int, span: str = "emergence") -> list[int]:
    """``count`` snapshot indices for RelIE. ``emergence`` (paper 2's use: where a feature starts to
    matter): spread from the last snapshot before the task is learned to the last learned one;
    ``learned``: over the learned snapshots only. Over all snapshots where too few qualify."""
    learned = [index for index, accuracy in enumerate(accuracies) if accuracy >= TASK_LEARNED_ACCURACY]
    candidates = learned
    if span == "emergence" and learned and learned[0] > 0:
        candidates = [learned[0] - 1, *learned]
    if len(candidates) < count:
        candidates = list(range(len(accuracies)))
    return sorted({candidates[round(position * (len(candidates) - 1) / (count - 1))] for position in range(count)})


def snapshot_terms(
    crosscoder: CrossCoder, activations: torch.Tensor, items: int
) -> list[tuple[Terms, torch.Tensor, torch.Tensor]]:
    """Per snapshot: (Terms, decoder [F, d], bias [d]) of activations [items * positions, S, d]."""
    n_snapshots, d_model = activations.shape[1:]
    positions = len(activations) // items
    terms = crosscoder.snapshot_terms(activations.to(crosscoder.decoder_weight.device))
    return [
        (
            Terms(
                terms.codes[index].reshape(items, positions, -1).cpu(),
                terms.error[:, index].reshape(items, positions, d_model).cpu(),
            ),
            terms.decoder[index],
            terms.bias[index],
        )
        for index in range(n_snapshots)
    ]


# Over 60 lines on purpose: one pass over the snapshots filling every causal figure; the summary, curves and
# tables it assembles share that pass's arrays.
def causal_statistics(
    crosscoder: CrossCoder,
    snapshots: list[Snapshot],
    layer: int,
    task: Task,
    baseline: str,
    attribution_steps: int,
    relie_snapshots: int,
    relie_span: str = "emergence",
) -> CausalStatistics:
    """Attribute the task metric at every snapshot, rank features by indirect effect (largest first),
    and measure ablation curves; RelIE compares ``relie_snapshots`` snapshots (see ``relie_indices``)."""
    crosscoder = crosscoder.eval()
    device = crosscoder.decoder_weight.device
    steps = [snapshot.step for snapshot in snapshots]
    items = len(task.input_ids)
    # Clean and corrupted prompts have the same shape: one pass per snapshot gives both.
    prompts = torch.cat([task.input_ids, task.corrupted_ids]) if baseline == "corrupted" else task.input_ids
    activations = direct_activations(snapshots, prompts, layer, device=device).split(items * (prompts.shape[1] - 1))
    clean_terms = snapshot_terms(crosscoder, activations[0], items)
    corrupted_terms = snapshot_terms(crosscoder, activations[1], items) if baseline == "corrupted" else None
    n_features = crosscoder.n_features
    kept_k = keep_k(n_features)
    ks = sorted({k for k in ABLATION_KS if k <= n_features} | {kept_k})

    effects, rows = [], []
    per_snapshot: dict[str, list[float]] = {
        name: []
        for name in (
            "task_logit_difference",
            "task_accuracy",
            "error_effect_share",
            "attribution_gap",
            "ablate_top_relative",
            "keep_top_relative",
        )
    }
    for index, snapshot in enumerate(snapshots):
        clean, decoder, bias = clean_terms[index]
        if corrupted_terms is None:
            reference = Terms(torch.zeros_like(clean.codes), torch.zeros_like(clean.error))
        else:
            reference = corrupted_terms[index][0]
        model = SnapshotModel(load_model(snapshot, device=device), layer, task, decoder, bias)
        attribution = model.integrated_gradients(clean, reference, attribution_steps)
        ranking = attribution.feature_effects.argsort(descending=True)
        curves = model.ablation_curves(clean, reference, ranking, ks)
        effects.append(attribution.feature_effects)

        clean_metric = attribution.clean_metric
        learned = attribution.accuracy >= TASK_LEARNED_ACCURACY
        for k, ablated, kept in zip(curves.ks, curves.ablated, curves.kept):
            rows.append(
                {
                    "step": snapshot.step,
                    "k": k,
                    "accuracy": attribution.accuracy,
                    "learned": learned,
                    "clean": clean_metric,
                    "baseline": attribution.baseline_metric,
                    "ablated": ablated,
                    "kept": kept,
                    "ablated_relative": relative(ablated, clean_metric, attribution.baseline_metric),
                    "kept_relative": relative(kept, clean_metric, attribution.baseline_metric),
                }
            )
        difference = clean_metric - attribution.baseline_metric
        total_effect = float(attribution.feature_effects.sum()) + attribution.error_effect
        per_snapshot["task_logit_difference"].append(clean_metric)
        per_snapshot["task_accuracy"].append(attribution.accuracy)
        per_snapshot["error_effect_share"].append(
            abs(attribution.error_effect)
            / max(float(attribution.feature_effects.abs().sum()) + abs(attribution.error_effect), 1e-30)
        )
        # Integrated gradients are complete: the effects add up to the metric difference, up to the Riemann sum's error.
        per_snapshot["attribution_gap"].append(abs(total_effect - difference) / max(abs(difference), 1e-6))
        per_snapshot["ablate_top_relative"].append(
            relative(curves.ablated[curves.ks.index(ABLATE_K)], clean_metric, attribution.baseline_metric)
            if learned and ABLATE_K in curves.ks
            else float("nan")
        )
        per_snapshot["keep_top_relative"].append(
            relative(curves.kept[curves.ks.index(kept_k)], clean_metric, attribution.baseline_metric)
            if learned
            else float("nan")
        )

    effects_by_feature = torch.stack(effects, 1)  # [F, S]
    chosen = relie_indices(per_snapshot["task_accuracy"], relie_snapshots, relie_span)
    relie = relative_indirect_effect(effects_by_feature[:, chosen])
    last = chosen[-1]
    top_last = effects_by_feature[:, last].argsort(descending=True)[:TOP_FEATURES]
    learned_count = sum(accuracy >= TASK_LEARNED_ACCURACY for accuracy in per_snapshot["task_accuracy"])
    summary = CausalSummary(
        task_learned_snapshots=float(learned_count),
        causal_ablate_relative=float(torch.tensor(per_snapshot["ablate_top_relative"]).nanmean()),
        causal_keep_relative=float(torch.tensor(per_snapshot["keep_top_relative"]).nanmean()),
        causal_keep_k=float(kept_k),
        attribution_gap_max=max(per_snapshot["attribution_gap"]),
        relie_top_mean=float(relie[top_last, -1].mean()),
    )
    features = pd.DataFrame({"feature": range(n_features)})
    for index, step in enumerate(steps):
        features[f"{IE_COLUMN}{step}"] = effects_by_feature[:, index].numpy()
    for column, index in enumerate(chosen):
        features[f"{RELIE_COLUMN}{steps[index]}"] = relie[:, column].numpy()
    by_snapshot = CausalCurves(**{f"{name}_by_snapshot": values for name, values in per_snapshot.items()})
    return CausalStatistics(summary, by_snapshot, pd.DataFrame(rows), features)
