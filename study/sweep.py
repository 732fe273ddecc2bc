"""Sweep one axis of the crosscoder's free choices with Ray Tune, every trial tracked in MLflow.

    python -m study.sweep AXIS [--set key=value ...] [--trajectory SPEC] [--experiment NAME] ...

AXIS names a file in search_spaces/ (it overrides search_spaces/defaults.yaml). Each distinct
activation set is extracted once (Ray Data) before the trials; each trial trains one crosscoder
on it and logs a child run under the sweep's parent run in MLflow. Re-running the same command
continues a killed sweep: finished trials are neither re-run nor logged twice.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
import pandas as pd
import ray
from ray import tune
from transformers import AutoConfig

from study.errors import StudyInputError, run_cli
from study.extraction import ActivationRequest, ensure_activations
from study.model_curves import MODEL_CURVES, model_curves
from study.robustness import analyse_sweep
from study.search_space import ACTIVATION_KEYS, activation_set, available_axes, grid_points, load_space, swept_keys, to_tune
from study.storage import Location
from study.tracking import parent_run, tracking_uri
from study.trajectory import Trajectory, explained_load_errors, resolve_trajectory
from study.trial import SWEEP, run_trial


class TrialLines(tune.Callback):
    """One line per trial as it starts and ends, instead of Tune's own table."""

    def __init__(self, keys: list[str]):
        self.keys = keys

    def describe(self, trial) -> str:
        return " ".join(f"{key}={trial.config[key]}" for key in self.keys) or trial.trial_id

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"[start]  {trial.trial_id}  {self.describe(trial)}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result
        print(
            f"[done]   {trial.trial_id}  {self.describe(trial)}  EV={result.get('explained_variance', float('nan')):.3f} "
            f"L0={result.get('l0', float('nan')):.1f} dead={result.get('dead_fraction', float('nan')):.2f} ({result.get('seconds', 0):.0f} s)",
            flush=True,
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[FAILED] {trial.trial_id}  {self.describe(trial)}  (see the trial's MLflow run, tag 'error')", flush=True)


MAX_FAILURES = 2
"""Restarts of a trial (node lost, worker killed) before it counts as failed."""

COST_KEYS = ("expansion_ratio", "n_snapshots", "n_steps", "batch_size", "n_tokens")
"""Keys whose larger values make a trial slower."""


def costliest_first(param_space: dict) -> dict:
    """Grid values of the cost keys, largest first: Tune starts trials in grid order, and on a few
    CPUs the longest trial should not start last and run alone while the others sit idle."""
    ordered = dict(param_space)
    for key in COST_KEYS:
        value = ordered.get(key)
        if isinstance(value, dict) and "grid_search" in value and all(isinstance(v, (int, float)) for v in value["grid_search"]):
            ordered[key] = {"grid_search": sorted(value["grid_search"], reverse=True)}
    return ordered


def activation_request(point: dict, trajectory: Trajectory) -> ActivationRequest:
    """The extraction that a point of the search space (its activation keys) needs."""
    n_contexts = -(-point["n_tokens"] // (point["context_length"] - 1))
    # At least 8 shards of at most 128 contexts, of nearly equal size: the last shards are held out
    # for evaluation, and a remainder shard of a few contexts would leave almost nothing to measure.
    n_shards = max(8, -(-n_contexts // 128))
    return ActivationRequest(
        trajectory.select(point["n_snapshots"], point["snapshot_placement"]),
        layers=(point["layer"],),
        corpus=point["corpus"],
        n_tokens=point["n_tokens"],
        context_length=point["context_length"],
        seed=point["data_seed"],
        contexts_per_shard=max(1, -(-n_contexts // n_shards)),
    )


def snapshots_for_model_curves(points: list[tuple[dict, Trajectory]]) -> list[tuple[Trajectory, str]]:
    """(trajectory, corpus) pairs for the activation points (each with its whole trajectory), each
    trajectory cut to the union of the snapshots its trials use."""
    chosen: dict[tuple[str, str], set] = {}
    for point, trajectory in points:
        selected = trajectory.select(point["n_snapshots"], point["snapshot_placement"]).snapshots
        chosen.setdefault((trajectory.name, point["corpus"]), set()).update(selected)
    return [(Trajectory(name, tuple(sorted(snapshots, key=lambda s: s.step))), corpus) for (name, corpus), snapshots in chosen.items()]


def log_model_curves(parent_run_id: str, curve_sets: list[tuple[Trajectory, str]], cache_dir: str | None) -> None:
    """Each trajectory's model-level curves (n-gram KL, loss, agreement), computed once and cached,
    as metrics of the parent run over the snapshot steps and as a Parquet artifact."""
    frames = []
    for trajectory, corpus in curve_sets:
        frames.append(model_curves(trajectory, corpus, cache_dir).assign(trajectory=trajectory.name, corpus=corpus))
    with mlflow.start_run(run_id=parent_run_id):
        single = len(frames) == 1
        for curves in frames:
            prefix = "model/" if single else f"model/{curves['trajectory'].iloc[0]}/"
            for row in curves.itertuples():
                mlflow.log_metrics({f"{prefix}{name}": getattr(row, name) for name in MODEL_CURVES}, step=row.step)
        with tempfile.TemporaryDirectory() as folder:
            pd.concat(frames).to_parquet(Path(folder) / "model_curves.parquet", index=False)
            mlflow.log_artifact(str(Path(folder) / "model_curves.parquet"))


def write_report(parent_run_id: str, folder: Location) -> bool:
    """``python -m reports.robustness`` in its own process: the report reads only what MLflow holds."""
    command = [sys.executable, "-m", "reports.robustness", "--run", parent_run_id, "--out", folder.uri, "--log"]
    finished = subprocess.run(command, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()})
    if finished.returncode != 0:
        print(f"the report failed (exit {finished.returncode}); run again: {' '.join(command[1:])}", file=sys.stderr)
    return finished.returncode == 0


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m study.sweep",
        description=__doc__.split("\n\n")[0],
        epilog=f"axes found in search_spaces/: {', '.join(available_axes())}",
    )
    parser.add_argument("axis", help="a file of search_spaces/ without .yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (YAML value, Tune grammar allowed)")
    parser.add_argument("--trajectory", help="embedded, a folder of step<N>/ checkpoints, or a hub model id")
    parser.add_argument("--revisions", help="comma-separated hub revisions, e.g. step0,step1000,step143000")
    parser.add_argument("--tokens", type=int, help="activation rows per snapshot (n_tokens)")
    parser.add_argument("--search", choices=("grid", "optuna"), default="grid")
    parser.add_argument("--num-samples", type=int, default=1, help="repeats of the grid, or Optuna trials")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, help="fraction of a GPU per trial (0 on CPU)")
    parser.add_argument("--max-concurrent", type=int, default=0, help="trials at once (0: as many as resources allow)")
    parser.add_argument("--experiment", help="MLflow experiment (default crosscoder-AXIS)")
    parser.add_argument("--resume", action="store_true", help="require an earlier run of this sweep to continue")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and activation sets, run nothing")
    parser.add_argument("--cache-dir", help="cache of trajectories and activations (a URI such as s3://bucket/cache holds the activations only)")
    parser.add_argument("--storage", default="sweeps", help="Tune's experiment state and the report: a folder every node sees, or a URI such as s3://bucket/sweeps (default ./sweeps)")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.gpus_per_trial < 0 or args.max_concurrent < 0:
        raise StudyInputError("--num-samples must be >= 1, --gpus-per-trial >= 0 and --max-concurrent >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    overrides = list(args.set)
    if args.trajectory:
        overrides.append(f"trajectory={args.trajectory}")
    if args.revisions:
        overrides.append(f"revisions=[{args.revisions}]")
    if args.tokens is not None:
        overrides.append(f"n_tokens={args.tokens}")
    space = load_space(args.axis, overrides)
    experiment = args.experiment or f"crosscoder-{args.axis}"
    sweep_name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{experiment}-{args.axis}")

    # Everything that can be wrong is checked before anything is written to the MLflow store.
    activation_points = grid_points(space, ACTIVATION_KEYS)
    trajectories = {}
    for point in activation_points:
        spec = (point["trajectory"], tuple(point["revisions"] or ()))
        if spec not in trajectories:
            trajectory = resolve_trajectory(point["trajectory"], point["revisions"], args.cache_dir)
            with explained_load_errors(trajectory.snapshots[-1]):
                config = AutoConfig.from_pretrained(trajectory.snapshots[-1].source, revision=trajectory.snapshots[-1].revision)
            trajectories[spec] = (trajectory, config.num_hidden_layers)
        trajectory, n_layers = trajectories[spec]
        if point["layer"] > n_layers:
            raise StudyInputError(f"layer {point['layer']} is beyond {trajectory.name}, which has layers 0..{n_layers}; choose one of those")
        trajectory.select(point["n_snapshots"], point["snapshot_placement"])  # raises if there are too few snapshots

    keys = swept_keys(space)
    trials = grid_points(space)
    sampled = [key for key in keys if next(iter(space[key])) not in ("grid_search", "choice")]
    print(f"sweep {sweep_name}: axis {args.axis}, {len(trials) * args.num_samples} trial(s){' (plus sampled ' + ', '.join(sampled) + ')' if sampled else ''}")
    if args.dry_run:
        for index, trial in enumerate(trials):
            print(f"  trial {index}: " + " ".join(f"{key}={trial[key]}" for key in keys))
        print(f"{len(activation_points)} activation set(s), each extracted once:")
        for point in activation_points:
            print("  " + " ".join(f"{key}={point[key]}" for key in ACTIVATION_KEYS))
        return 0

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
    caches, snapshots = {}, {}
    for point in activation_points:
        trajectory, _ = trajectories[(point["trajectory"], tuple(point["revisions"] or ()))]
        request = activation_request(point, trajectory)
        caches[activation_set(point)] = str(ensure_activations(request, args.cache_dir).folder)
        snapshots[activation_set(point)] = [[s.step, s.source, s.revision] for s in request.trajectory.snapshots]

    storage = Location.of(args.storage)
    experiment_path = storage / sweep_name
    restoring = tune.Tuner.can_restore(experiment_path.uri)
    if args.resume and not restoring:
        raise StudyInputError(f"--resume: no earlier run of {sweep_name} in {storage}; drop --resume to start it")
    base = {key: str(value) for key, value in space.items()}
    tags = {"axis": args.axis, "git_commit": git_commit(), **{f"version.{package}": version(package) for package in ("torch", "ray", "mlflow", "transformers")}}
    experiment_id, parent_run_id = parent_run(experiment, sweep_name, {"axis": args.axis, **{f"base.{key}": value for key, value in base.items()}}, tags)
    if not any(name.startswith("model/") for name in MlflowClient().get_run(parent_run_id).data.metrics):  # once per sweep, also on resume
        points = [(point, trajectories[(point["trajectory"], tuple(point["revisions"] or ()))][0]) for point in activation_points]
        log_model_curves(parent_run_id, snapshots_for_model_curves(points), args.cache_dir)
    sweep_context = {
        "tracking_uri": tracking_uri(),
        "experiment_id": experiment_id,
        "parent_run_id": parent_run_id,
        "caches": caches,
        "snapshots": snapshots,
    }
    trainable = tune.with_resources(run_trial, {"cpu": 1, "gpu": args.gpus_per_trial})
    if restoring:
        print(f"continuing {sweep_name} from {experiment_path}")
        tuner = tune.Tuner.restore(experiment_path.uri, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        param_space = costliest_first(to_tune(space))
        search_alg = None
        if args.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            param_space = {key: tune.choice(value["grid_search"]) if isinstance(value, dict) and "grid_search" in value else value for key, value in param_space.items()}
            search_alg = OptunaSearch(metric="explained_variance", mode="max", seed=0)
        param_space[SWEEP] = sweep_context
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(num_samples=args.num_samples, max_concurrent_trials=args.max_concurrent or None, search_alg=search_alg),
            run_config=tune.RunConfig(
                name=sweep_name,
                storage_path=storage.uri,
                verbose=0,
                # A trial whose node is lost restarts elsewhere from its last checkpoint (a failing
                # trial also gets these retries before it is marked FAILED).
                failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
                callbacks=[TrialLines(keys)],
            ),
        )
    # Progress is TrialLines' one line per trial; Ray's newer console output ignores verbose=0,
    # and MLflow would draw a bar per artifact the analysis downloads.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Failures are reported by TrialLines and recorded in MLflow; Tune's tracebacks would bury them.
    for name in ("ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    results = tuner.fit()
    report_folder = experiment_path / "report"

    rows = []
    for result in results:
        row = {key: result.config.get(key) for key in keys}
        row.update({"status": "FAILED" if result.error else "done", **{name: (result.metrics or {}).get(name) for name in ("explained_variance", "l0", "dead_fraction")}})
        rows.append(row)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    failed = int((table["status"] == "FAILED").sum()) if len(table) else 0
    with mlflow.start_run(run_id=parent_run_id):
        mlflow.log_metrics({"trials_done": len(table) - failed, "trials_failed": failed})
        with tempfile.TemporaryDirectory() as folder:
            table.to_csv(Path(folder) / "trials.csv", index=False)
            mlflow.log_artifact(str(Path(folder) / "trials.csv"))
    for verdict in analyse_sweep(parent_run_id):
        print(f"  {verdict.claim:<18} {verdict.verdict:<13} {verdict.evidence}")
    report_ok = write_report(parent_run_id, report_folder)
    print(f"MLflow: {tracking_uri()}  experiment '{experiment}', parent run {parent_run_id}")
    if report_ok:
        print(f"report: {report_folder}/report.html (also in the parent run's artifacts, report/)")
    if failed:
        print(f"{failed} trial(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
