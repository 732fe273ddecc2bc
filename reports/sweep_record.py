"""Everything a robustness report shows, read from MLflow alone: the parent run of a sweep and its trials."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from study.errors import StudyInputError
from study.record import (
    ABLATION_CURVES_ARTIFACT,
    BY_AXIS_VALUE_ARTIFACT,
    DECODER_NORMS_ARTIFACT,
    FEATURE_PAGES_ARTIFACT,
    FEATURES_ARTIFACT,
    METRIC,
    MODEL_CURVES_ARTIFACT,
    PARTNER_COLUMNS,
    PARTNERS_ARTIFACT,
    PLOTTED_CURVES,
    ROBUSTNESS_FOLDER,
    STABILITY_ARTIFACT,
    TAG,
    VERDICTS_ARTIFACT,
)


class ReportInputError(StudyInputError):
    """The experiment or run asked for does not exist, or is not a sweep's parent run."""


class SweepRecord(NamedTuple):
    parent: Run
    trials: pd.DataFrame
    """One row per trial: run_id, run_name, status, error, params.*, summary metrics."""
    curves: dict[str, pd.DataFrame]
    """Curve name -> columns run_id, step, value."""
    decoder_norms: dict[str, pd.DataFrame]
    """run_id -> [features, snapshots] decoder norms (columns step<N>)."""
    features: dict[str, pd.DataFrame]
    """run_id -> the trial's per-feature table (with indirect effects and RelIE)."""
    ablation_curves: dict[str, pd.DataFrame]
    """run_id -> the task metric with the top-k features ablated / kept, per snapshot and k."""
    model_curves: pd.DataFrame
    by_axis_value: pd.DataFrame
    stability: pd.DataFrame
    verdicts: list[dict]
    axis_keys: list[str]
    feature_pages: dict[str, dict]
    """run_id -> the trial's feature browser data (``study.analysis.feature_pages``)."""
    partners: pd.DataFrame
    """Matched feature pairs between trials: run_a, feature_a, run_b, feature_b, cosine."""


def find_parent_run(client: MlflowClient, experiment: str | None, run_id: str | None) -> Run:
    """The sweep's parent run: ``run_id`` itself, or the newest parent run of ``experiment``."""
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ReportInputError(
                f"no MLflow run {run_id} in {client.tracking_uri}; pass a sweep's parent run id (the sweep prints it)"
            ) from None
        if "mlflow.parentRunId" in run.data.tags:
            raise ReportInputError(
                f"run {run_id} is a trial; pass its sweep's parent run {run.data.tags['mlflow.parentRunId']}"
            )
        return run
    assert experiment is not None  # the command line asks for --experiment or --run
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise ReportInputError(
            f"no MLflow experiment '{experiment}' in {client.tracking_uri}; experiments there: {names}"
        )
    parents = client.search_runs(
        [found.experiment_id],
        filter_string="tags.sweep_name != ''",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise ReportInputError(
            f"experiment '{experiment}' holds no sweep; run python -m study.sweep AXIS --experiment {experiment}"
        )
    return parents[0]


def artifact_or_none(client: MlflowClient, run_id: str, path: str, folder: Path) -> Path | None:
    try:
        return Path(client.download_artifacts(run_id, path, str(folder)))
    except (MlflowException, OSError):
        return None


# Over 60 lines on purpose: one walk over the sweep's child runs, reading each run's metrics, curves and
# artifacts once (a download per artifact).
def read_sweep(client: MlflowClient, parent: Run) -> SweepRecord:
    parent_id = parent.info.run_id
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=10_000
    )
    rows = []
    curves: dict[str, list[dict]] = {name: [] for name in PLOTTED_CURVES}
    decoder_norms: dict[str, pd.DataFrame] = {}
    features: dict[str, pd.DataFrame] = {}
    ablation_curves: dict[str, pd.DataFrame] = {}
    feature_pages: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        for run in children:
            run_id = run.info.run_id
            rows.append(
                {
                    METRIC.run_id: run_id,
                    "run_name": run.info.run_name,
                    "status": run.info.status,
                    TAG.error: run.data.tags.get(TAG.error, ""),
                    TAG.stopped_early: run.data.tags.get(TAG.stopped_early) == "true",
                    **{f"params.{k}": v for k, v in run.data.params.items()},
                    **run.data.metrics,
                }
            )
            if run.info.status != "FINISHED":
                continue
            for name in PLOTTED_CURVES:
                curves[name] += [
                    {METRIC.run_id: run_id, METRIC.step: m.step, METRIC.value: m.value}
                    for m in client.get_metric_history(run_id, name)
                ]
            for name, table in (
                (DECODER_NORMS_ARTIFACT, decoder_norms),
                (FEATURES_ARTIFACT, features),
                (ABLATION_CURVES_ARTIFACT, ablation_curves),
            ):
                path = artifact_or_none(client, run_id, name, scratch / run_id)
                if path is not None:
                    table[run_id] = pd.read_parquet(path)
            pages = artifact_or_none(client, run_id, FEATURE_PAGES_ARTIFACT, scratch / run_id)
            if pages is not None:
                feature_pages[run_id] = json.loads(pages.read_text())

        def parent_artifact(name: str) -> Path | None:
            return artifact_or_none(client, parent_id, name, scratch / "parent")

        verdict_file = parent_artifact(f"{ROBUSTNESS_FOLDER}/{VERDICTS_ARTIFACT}")
        payload = json.loads(verdict_file.read_text()) if verdict_file else {"verdicts": [], "axis_keys": []}
        by_axis = read_csv(parent_artifact(f"{ROBUSTNESS_FOLDER}/{BY_AXIS_VALUE_ARTIFACT}"))
        stability = read_csv(parent_artifact(f"{ROBUSTNESS_FOLDER}/{STABILITY_ARTIFACT}"))
        model_curves_file = parent_artifact(MODEL_CURVES_ARTIFACT)
        model_curves = pd.read_parquet(model_curves_file) if model_curves_file else pd.DataFrame()
        partners_file = parent_artifact(f"{ROBUSTNESS_FOLDER}/{PARTNERS_ARTIFACT}")
        partners = pd.read_parquet(partners_file) if partners_file else pd.DataFrame(columns=PARTNER_COLUMNS)
    trials = pd.DataFrame(rows)
    if not trials.empty:
        trials = trials.sort_values("run_name").reset_index(drop=True)
    curve_frames = {
        name: pd.DataFrame(entries, columns=[METRIC.run_id, METRIC.step, METRIC.value]).sort_values(
            [METRIC.run_id, METRIC.step]
        )
        for name, entries in curves.items()
    }
    return SweepRecord(
        parent,
        trials,
        curve_frames,
        decoder_norms,
        features,
        ablation_curves,
        model_curves,
        by_axis,
        stability,
        payload["verdicts"],
        payload["axis_keys"],
        feature_pages,
        partners,
    )


def read_csv(path: Path | None) -> pd.DataFrame:
    if path is None:
        return pd.DataFrame()
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def trial_labels(record: SweepRecord) -> dict[str, str]:
    """run_id -> "key=value ..." over the swept keys (the run name where nothing is swept)."""
    keys = record.axis_keys + (
        ["seed"]
        if "seed" not in record.axis_keys and record.trials.get("params.seed", pd.Series()).nunique() > 1
        else []
    )
    labels = {}
    for row in record.trials.to_dict("records"):
        described = " ".join(f"{key}={row.get(f'params.{key}')}" for key in keys if f"params.{key}" in row)
        labels[row[METRIC.run_id]] = described or row["run_name"]
    return labels
