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

TRIAL_CURVES = (
    "feature_dimensionality_by_snapshot",
    "explained_variance_by_snapshot",
    "delta_ce_by_snapshot",
    "probe_error_by_snapshot",
    "token_entropy_by_peak_snapshot",
    "alignment_overlap_by_snapshot",
    "ablate_top_relative_by_snapshot",
    "keep_top_relative_by_snapshot",
)
"""Per-snapshot metrics of each trial that the report plots."""


class ReportInputError(ValueError):
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


def find_parent_run(client: MlflowClient, experiment: str | None, run_id: str | None) -> Run:
    """The sweep's parent run: ``run_id`` itself, or the newest parent run of ``experiment``."""
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ReportInputError(f"no MLflow run {run_id} in {client.tracking_uri}; pass a sweep's parent run id (the sweep prints it)") from None
        if "mlflow.parentRunId" in run.data.tags:
            raise ReportInputError(f"run {run_id} is a trial; pass its sweep's parent run {run.data.tags['mlflow.parentRunId']}")
        return run
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise ReportInputError(f"no MLflow experiment '{experiment}' in {client.tracking_uri}; experiments there: {names}")
    parents = client.search_runs([found.experiment_id], filter_string="tags.sweep_name != ''", order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise ReportInputError(f"experiment '{experiment}' holds no sweep; run python -m study.sweep AXIS --experiment {experiment}")
    return parents[0]


def artifact_or_none(client: MlflowClient, run_id: str, path: str, folder: Path) -> Path | None:
    try:
        return Path(client.download_artifacts(run_id, path, str(folder)))
    except (MlflowException, OSError):
        return None


def read_sweep(client: MlflowClient, parent: Run) -> SweepRecord:
    parent_id = parent.info.run_id
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=10_000)
    rows = []
    curves: dict[str, list[dict]] = {name: [] for name in TRIAL_CURVES}
    decoder_norms, features, ablation_curves = {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for run in children:
            run_id = run.info.run_id
            rows.append(
                {
                    "run_id": run_id,
                    "run_name": run.info.run_name,
                    "status": run.info.status,
                    "error": run.data.tags.get("error", ""),
                    **{f"params.{k}": v for k, v in run.data.params.items()},
                    **run.data.metrics,
                }
            )
            if run.info.status != "FINISHED":
                continue
            for name in TRIAL_CURVES:
                curves[name] += [{"run_id": run_id, "step": m.step, "value": m.value} for m in client.get_metric_history(run_id, name)]
            for name, table in (("decoder_norms.parquet", decoder_norms), ("features.parquet", features), ("ablation_curves.parquet", ablation_curves)):
                path = artifact_or_none(client, run_id, name, scratch / run_id)
                if path is not None:
                    table[run_id] = pd.read_parquet(path)
        robustness = {}
        for name in ("robustness/by_axis_value.csv", "robustness/stability.csv", "robustness/verdicts.json", "model_curves.parquet"):
            robustness[name] = artifact_or_none(client, parent_id, name, scratch / "parent")
        verdict_file = robustness["robustness/verdicts.json"]
        payload = json.loads(verdict_file.read_text()) if verdict_file else {"verdicts": [], "axis_keys": []}
        by_axis = read_csv(robustness["robustness/by_axis_value.csv"])
        stability = read_csv(robustness["robustness/stability.csv"])
        model_curves = pd.read_parquet(robustness["model_curves.parquet"]) if robustness["model_curves.parquet"] else pd.DataFrame()
    trials = pd.DataFrame(rows)
    if not trials.empty:
        trials = trials.sort_values("run_name").reset_index(drop=True)
    curve_frames = {name: pd.DataFrame(entries, columns=["run_id", "step", "value"]).sort_values(["run_id", "step"]) for name, entries in curves.items()}
    return SweepRecord(parent, trials, curve_frames, decoder_norms, features, ablation_curves, model_curves, by_axis, stability, payload["verdicts"], payload["axis_keys"])


def read_csv(path: Path | None) -> pd.DataFrame:
    if path is None:
        return pd.DataFrame()
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
