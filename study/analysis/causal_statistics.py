"""The causal claims' statistics for one trained crosscoder: attribution, ablation curves and RelIE on
the agreement task at every snapshot (claims ``causal`` and ``relie`` of ``study.record.CLAIMS``, docs/claims.md)."""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd
import torch

from crosscoder import CrossCoder
from crosscoder.feature_statistics import bootstrap
from study.activations.direct import direct_activations
from study.analysis.attribution import SnapshotModel, Task, Terms, relative_indirect_effect
from study.errors import StudyInputError
from study.lm.trajectory import Snapshot, load_model
from study.record import (
    IE_COLUMN,
    RELIE_COLUMN,
    RELIE_ONSET,
    TASK_LEARNED_ACCURACY,
    TOP_FEATURES,
    CausalCurves,
    CausalSummary,
    ablate_count,
    keep_count,
)

ABLATION_KS = (1, 2, 5, 10, 15, 20, 50, 100, 200, 500, 1000)
"""Numbers of top features ablated or kept, as far as the dictionary reaches."""


class CausalStatistics(NamedTuple):
    summary: CausalSummary
    by_snapshot: CausalCurves
    curves: pd.DataFrame
    """One row per (snapshot step, k): metric with the top k ablated / kept, and relative to clean, on the
    measuring prompts."""
    features: pd.DataFrame
    """One row per feature: ie_step<N> at every snapshot, relie_step<N> at the RelIE snapshots."""


def relative(value: float, clean: float, baseline: float) -> float:
    """Share of the clean-minus-baseline gap that ``value`` keeps: 1 at clean, 0 at the baseline."""
    return (value - baseline) / (clean - baseline) if clean != baseline else float("nan")


def split_prompts(items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranking rows, measuring rows): features are ranked on one half of the prompts and tested on the other, so
    a ranking cannot fit the noise of the prompts it is judged on. Pairs of neighbours go to each half in turn, so
    a task listing its classes or conditions in turn has them in both halves."""
    if items < 4:
        raise StudyInputError(f"the causal analyses need at least 4 task prompts, got {items}: raise task_items")
    rows = torch.arange(items)
    return rows[rows % 4 < 2], rows[rows % 4 >= 2]


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


class Measured(NamedTuple):
    """One learned snapshot's metric per measuring prompt: clean, at the baseline, and with features changed."""

    clean: torch.Tensor
    baseline: torch.Tensor
    top_ablated: torch.Tensor
    top_kept: torch.Tensor
    random_ablated: torch.Tensor
    random_kept: torch.Tensor


def mean_relative(measured: list[Measured], field: str, rows: torch.Tensor) -> float:
    """The share of the clean-minus-baseline gap ``field`` keeps on the prompts ``rows``, mean over snapshots."""
    shares = [
        relative(
            float(getattr(snapshot, field)[rows].mean()),
            float(snapshot.clean[rows].mean()),
            float(snapshot.baseline[rows].mean()),
        )
        for snapshot in measured
    ]
    return float(torch.tensor(shares, dtype=torch.float64).nanmean()) if shares else float("nan")


def relie_onset(effects: torch.Tensor, steps: list[int], top: torch.Tensor) -> tuple[list[float], float]:
    """The ``top`` features' RelIE at each snapshot against the last one, their indirect effects pooled
    (|IE_s| / (|IE_s| + |IE_last|) over the set), and the first step where it reaches RELIE_ONSET: where they
    start to matter (nan where they matter at none)."""
    magnitude = effects[top].abs().sum(0)  # [S]
    curve = (magnitude / (magnitude + magnitude[-1]).clamp_min(1e-30)).tolist()
    onset = next((float(step) for step, value in zip(steps, curve) if value >= RELIE_ONSET), float("nan"))
    return curve, onset


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
    seed: int = 0,
) -> CausalStatistics:
    """Attribute the task metric at every snapshot, rank features by indirect effect (largest first) on half the
    prompts and measure ablation curves on the other half, beside as many random features (drawn with ``seed``);
    RelIE compares ``relie_snapshots`` snapshots (see ``relie_indices``) and dates the top features' onset."""
    crosscoder = crosscoder.eval()
    device = crosscoder.decoder_weight.device
    steps = [snapshot.step for snapshot in snapshots]
    items = len(task.input_ids)
    ranking_rows, measuring_rows = split_prompts(items)
    # Clean and corrupted prompts have the same shape: one pass per snapshot gives both.
    prompts = torch.cat([task.input_ids, task.corrupted_ids]) if baseline == "corrupted" else task.input_ids
    activations = direct_activations(snapshots, prompts, layer, device=device).split(items * (prompts.shape[1] - 1))
    clean_terms = snapshot_terms(crosscoder, activations[0], items)
    corrupted_terms = snapshot_terms(crosscoder, activations[1], items) if baseline == "corrupted" else None
    n_features = crosscoder.n_features
    ablated_k, kept_k = ablate_count(n_features), keep_count(n_features)
    ks = sorted({k for k in ABLATION_KS if k <= n_features} | {ablated_k, kept_k})
    random_order = torch.randperm(n_features, generator=torch.Generator().manual_seed(seed))

    effects, rows, measured = [], [], []
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
        ranking = attribution.item_effects[ranking_rows].sum(0).argsort(descending=True)
        curves = model.ablation_curves(clean, reference, ranking, ks)
        random_curves = model.ablation_curves(clean, reference, random_order, [ablated_k, kept_k])
        effects.append(attribution.feature_effects)

        clean_values, baseline_values = attribution.clean_values, attribution.baseline_values
        clean_metric, baseline_metric = (
            float(clean_values[measuring_rows].mean()),
            float(baseline_values[measuring_rows].mean()),
        )
        learned = attribution.accuracy >= TASK_LEARNED_ACCURACY
        for k, ablated, kept in zip(curves.ks, curves.ablated, curves.kept):
            ablated_mean, kept_mean = float(ablated[measuring_rows].mean()), float(kept[measuring_rows].mean())
            rows.append(
                {
                    "step": snapshot.step,
                    "k": k,
                    "accuracy": attribution.accuracy,
                    "learned": learned,
                    "clean": clean_metric,
                    "baseline": baseline_metric,
                    "ablated": ablated_mean,
                    "kept": kept_mean,
                    "ablated_relative": relative(ablated_mean, clean_metric, baseline_metric),
                    "kept_relative": relative(kept_mean, clean_metric, baseline_metric),
                }
            )
        snapshot_measured = Measured(
            clean_values,
            baseline_values,
            curves.ablated[curves.ks.index(ablated_k)],
            curves.kept[curves.ks.index(kept_k)],
            random_curves.ablated[0],
            random_curves.kept[1],
        )
        if learned:
            measured.append(snapshot_measured)
        difference = attribution.clean_metric - attribution.baseline_metric
        total_effect = float(attribution.feature_effects.sum()) + attribution.error_effect
        per_snapshot["task_logit_difference"].append(attribution.clean_metric)
        per_snapshot["task_accuracy"].append(attribution.accuracy)
        per_snapshot["error_effect_share"].append(
            abs(attribution.error_effect)
            / max(float(attribution.feature_effects.abs().sum()) + abs(attribution.error_effect), 1e-30)
        )
        # Integrated gradients are complete: the effects add up to the metric difference, up to the Riemann sum's error.
        per_snapshot["attribution_gap"].append(abs(total_effect - difference) / max(abs(difference), 1e-6))
        for name, field in (("ablate_top_relative", "top_ablated"), ("keep_top_relative", "top_kept")):
            per_snapshot[name].append(
                mean_relative([snapshot_measured], field, measuring_rows) if learned else float("nan")
            )

    effects_by_feature = torch.stack(effects, 1)  # [F, S]
    chosen = relie_indices(per_snapshot["task_accuracy"], relie_snapshots, relie_span)
    relie = relative_indirect_effect(effects_by_feature[:, chosen])
    top_last = effects_by_feature[:, -1].argsort(descending=True)[:TOP_FEATURES]
    onset_curve, onset = relie_onset(effects_by_feature, steps, top_last)
    learned_steps = [
        step for step, accuracy in zip(steps, per_snapshot["task_accuracy"]) if accuracy >= TASK_LEARNED_ACCURACY
    ]
    learned_snapshots = [
        index for index, accuracy in enumerate(per_snapshot["task_accuracy"]) if accuracy >= TASK_LEARNED_ACCURACY
    ]
    # The intervals resample the measuring prompts, the same draw at every learned snapshot.
    on_measuring = [Measured(*(values[measuring_rows] for values in snapshot)) for snapshot in measured]
    every_prompt = torch.arange(len(measuring_rows))
    n_prompts = len(measuring_rows) if measured else 0
    ablate = bootstrap(lambda draw: mean_relative(on_measuring, "top_ablated", draw), n_prompts, seed)
    keep = bootstrap(lambda draw: mean_relative(on_measuring, "top_kept", draw), n_prompts, seed)
    nan = float("nan")
    summary = CausalSummary(
        task_learned_snapshots=float(len(learned_steps)),
        task_learned_step=float(learned_steps[0]) if learned_steps else nan,
        causal_ablate_relative=ablate.value,
        causal_ablate_relative_low=ablate.low,
        causal_ablate_relative_high=ablate.high,
        causal_keep_relative=keep.value,
        causal_keep_relative_low=keep.low,
        causal_keep_relative_high=keep.high,
        causal_random_ablate_relative=mean_relative(on_measuring, "random_ablated", every_prompt),
        causal_random_keep_relative=mean_relative(on_measuring, "random_kept", every_prompt),
        causal_ablate_k=float(ablated_k),
        causal_keep_k=float(kept_k),
        attribution_gap_max=max(per_snapshot["attribution_gap"][index] for index in learned_snapshots)
        if learned_snapshots
        else nan,
        error_effect_share_max=max(per_snapshot["error_effect_share"][index] for index in learned_snapshots)
        if learned_snapshots
        else nan,
        relie_top_mean=float(
            relie[effects_by_feature[:, chosen[-1]].argsort(descending=True)[:TOP_FEATURES], -1].mean()
        ),
        relie_onset_step=onset,
    )
    features = pd.DataFrame({"feature": range(n_features)})
    for index, step in enumerate(steps):
        features[f"{IE_COLUMN}{step}"] = effects_by_feature[:, index].numpy()
    for column, index in enumerate(chosen):
        features[f"{RELIE_COLUMN}{steps[index]}"] = relie[:, column].numpy()
    by_snapshot = CausalCurves(
        **{f"{name}_by_snapshot": values for name, values in per_snapshot.items()}, relie_top_by_snapshot=onset_curve
    )
    return CausalStatistics(summary, by_snapshot, pd.DataFrame(rows), features)
