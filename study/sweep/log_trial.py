"""Write what one trial produced (``study.analysis.measure.TrialOutcome``) into its MLflow run, under the
record's names."""

from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import pandas as pd

from reports.figures import trial_decoder_norm_figure
from study.analysis.claim_statistics import ClaimStatistics
from study.analysis.measure import TrialOutcome
from study.record import (
    ABLATION_CURVES_ARTIFACT,
    ALONG_TRAINING_PREFIX,
    CROSSCODER_ARTIFACT,
    DECODER_NORMS_ARTIFACT,
    DECODER_NORMS_FIGURE,
    FEATURE_PAGES_ARTIFACT,
    FEATURES_ARTIFACT,
    L0_TARGET_TOLERANCE,
    TAG,
    TRAINING_PREFIX,
    AlongTraining,
    TrialSummary,
)


def log_statistics(statistics: ClaimStatistics, steps: list[int]) -> None:
    mlflow.log_metrics(statistics.summary._asdict())
    missed = l0_target_missed(statistics.summary)
    if missed:
        mlflow.set_tag(TAG.l0_target_missed, missed)
    # Curves over snapshots use the snapshot's training step as MLflow's step; adjacent-pair curves
    # sit at the later snapshot of each pair. One call per snapshot: each call is a store write.
    by_step: dict[int, dict[str, float]] = {step: {} for step in steps}
    for name, values in statistics.by_snapshot._asdict().items():
        for snapshot_step, value in zip(steps[len(steps) - len(values) :], values):
            by_step[snapshot_step][name] = value
    for snapshot_step, values in by_step.items():
        mlflow.log_metrics(values, step=snapshot_step)


def l0_target_missed(summary: TrialSummary) -> str | None:
    """One line where the held-out L0 missed its target by more than L0_TARGET_TOLERANCE: by how much, and what to
    change; None on target or without one."""
    gap = summary.l0_target_gap
    if not abs(gap) > L0_TARGET_TOLERANCE:
        return None
    target = summary.l0 / (1 + gap)
    coefficient = (
        f" at coefficient {summary.sparsity_coefficient_reached:.3g}" if summary.sparsity_coefficient_reached else ""
    )
    side = "denser than" if gap > 0 else "sparser than"
    advice = "raise target_l0 or n_steps" if gap > 0 else "lower target_l0, or raise expansion_ratio"
    return f"held-out L0 {summary.l0:.1f} is {abs(gap):.0%} {side} target_l0 {target:g}{coefficient}: {advice}"


def log_table(frame: pd.DataFrame, name: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        frame.to_parquet(Path(folder) / name, index=False)
        mlflow.log_artifact(str(Path(folder) / name))


def log_outcome(outcome: TrialOutcome) -> None:
    """Everything a trial produced, into the active MLflow run."""
    result, statistics, steps, planted, pages = outcome
    if planted is not None:
        mlflow.log_metrics(planted._asdict())
    for entry in result.history:
        mlflow.log_metrics(
            {f"{TRAINING_PREFIX}{key}": value for key, value in entry.items() if key != "step"}, step=int(entry["step"])
        )
    log_statistics(statistics, steps)
    for row in statistics.along_training.to_dict("records"):
        mlflow.log_metrics(
            {f"{ALONG_TRAINING_PREFIX}{name}": row[name] for name in AlongTraining._fields}, step=int(row["step"])
        )
    log_table(statistics.features, FEATURES_ARTIFACT)
    log_table(statistics.ablation_curves, ABLATION_CURVES_ARTIFACT)
    mlflow.log_dict(pages, FEATURE_PAGES_ARTIFACT)
    decoder_norms = pd.DataFrame(result.metrics.decoder_norms.numpy(), columns=[f"step{step}" for step in steps])
    log_table(decoder_norms, DECODER_NORMS_ARTIFACT)
    with tempfile.TemporaryDirectory() as folder:
        result.model.save(Path(folder) / CROSSCODER_ARTIFACT)  # the sweep's stability analysis matches these decoders
        mlflow.log_artifact(str(Path(folder) / CROSSCODER_ARTIFACT))
    figure = trial_decoder_norm_figure(decoder_norms)
    mlflow.log_figure(figure, DECODER_NORMS_FIGURE)
    plt.close(figure)
