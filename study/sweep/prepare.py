"""Prepare a planned sweep: Ray, the activation caches (extracted once each), the parent MLflow run
and the trajectory's model-level curves. Returns the context every trial receives."""

from __future__ import annotations

import subprocess
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from study.activations.extraction import ensure_activations
from study.analysis.model_curves import model_curves
from study.lm.trajectory import Trajectory
from study.ray_runtime import ensure_ray
from study.record import MODEL_CURVES, MODEL_CURVES_ARTIFACT, MODEL_PREFIX, TAG
from study.sweep.plan import ActivationSet, SweepPlan
from study.sweep.trial import SweepContext
from study.tracking import parent_run, tracking_environment, tracking_uri


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def snapshots_for_model_curves(activation_sets: list[ActivationSet]) -> list[tuple[Trajectory, str]]:
    """(trajectory, corpus) pairs for the activation sets, each trajectory cut to the union of the
    snapshots its trials use."""
    chosen: dict[tuple[str, str], set] = {}
    for activation_set in activation_sets:
        chosen.setdefault((activation_set.trajectory.name, activation_set.point["corpus"]), set()).update(
            activation_set.request.trajectory.snapshots
        )
    return [
        (Trajectory(name, tuple(sorted(snapshots, key=lambda s: s.step))), corpus)
        for (name, corpus), snapshots in chosen.items()
    ]


def log_model_curves(parent_run_id: str, curve_sets: list[tuple[Trajectory, str]], cache_dir: str | None) -> None:
    """Each trajectory's model-level curves (n-gram KL, loss, agreement), computed once and cached,
    as metrics of the parent run over the snapshot steps and as a Parquet artifact."""
    frames = [
        model_curves(trajectory, corpus, cache_dir).assign(trajectory=trajectory.name, corpus=corpus)
        for trajectory, corpus in curve_sets
    ]
    with mlflow.start_run(run_id=parent_run_id):
        single = len(frames) == 1
        for curves in frames:
            prefix = MODEL_PREFIX if single else f"{MODEL_PREFIX}{curves['trajectory'].iloc[0]}/"
            for row in curves.itertuples():
                mlflow.log_metrics({f"{prefix}{name}": getattr(row, name) for name in MODEL_CURVES}, step=row.step)
        with tempfile.TemporaryDirectory() as folder:
            pd.concat(frames).to_parquet(Path(folder) / MODEL_CURVES_ARTIFACT, index=False)
            mlflow.log_artifact(str(Path(folder) / MODEL_CURVES_ARTIFACT))


def prepare_sweep(
    plan: SweepPlan,
    cache_dir: str | None,
    search_tags: dict[str, str],
    option_tags: dict[str, str],
    artifacts: str | None = None,
    judged_while_training: bool = True,
    local_cache: str | None = None,
) -> SweepContext:
    """Extract every activation set (Ray Data), open the parent run (reused on resume, tagged with how
    the trials are searched: ``search_tags``, and with every sweep option and location: ``option_tags``, re-tagged
    on resume, where the options may differ; a new experiment's artifacts at ``artifacts``) and log the
    model-level curves once. ``judged_while_training``: a searcher or scheduler reads held-out metrics
    at every checkpoint. ``local_cache``: a folder on each node where trials keep copies of the shards
    they read."""
    ensure_ray()
    caches = {
        key: chosen.request
        if chosen.point["activation_mode"] == "stream"
        else str(ensure_activations(chosen.request, cache_dir).folder)
        for key, chosen in plan.activation_sets.items()
    }
    snapshots = {key: list(chosen.request.trajectory.snapshots) for key, chosen in plan.activation_sets.items()}
    base = {key: str(value) for key, value in plan.space.items()}
    tags = {
        "axis": plan.axis,
        "git_commit": git_commit(),
        **search_tags,
        **{f"version.{package}": version(package) for package in ("torch", "ray", "mlflow", "transformers")},
    }
    params = {"axis": plan.axis, **{f"base.{key}": value for key, value in base.items()}}
    experiment_id, parent_run_id = parent_run(plan.experiment, plan.sweep_name, params, tags, artifacts)
    # Re-tagged on every run of the sweep: a resumed sweep may run with other options, and is no longer interrupted.
    option_tags = option_tags | {TAG.sweep_interrupted: "false"}
    MlflowClient().log_batch(parent_run_id, tags=[RunTag(key, value) for key, value in option_tags.items()])
    if not any(
        name.startswith(MODEL_PREFIX) for name in MlflowClient().get_run(parent_run_id).data.metrics
    ):  # once per sweep, also on resume
        log_model_curves(parent_run_id, snapshots_for_model_curves(list(plan.activation_sets.values())), cache_dir)
    return SweepContext(
        tracking_uri(),
        experiment_id,
        parent_run_id,
        caches,
        snapshots,
        tuple(plan.swept),
        judged_while_training,
        local_cache=local_cache,
        axis=plan.axis,
        tracking_environment=tracking_environment(),
    )
