"""Sweep one axis of the crosscoder's free choices with Ray Tune, every trial tracked in MLflow.

    python -m study.sweep AXIS [--set key=value ...] [--trajectory SPEC] [--experiment NAME] ...

AXIS names a shipped axis (a file of search_spaces/) or is a path to your own YAML file; it
overrides search_spaces/defaults.yaml. Each distinct activation set is extracted once (Ray Data)
before the trials; each trial trains one crosscoder on it and logs a child run under the sweep's
parent run in MLflow. Re-running the same command continues a killed sweep: finished trials are
neither re-run nor logged twice.

The stages, one module each: plan (validate, resolve, list) -> prepare (extract, parent run,
model curves) -> execute (Tune) -> summary (verdicts, report). ``run`` is the same from Python.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from study.analysis.verdicts import Verdict
from study.errors import StudyInputError
from study.sweep.execute import RunOptions, check_resumable, experiment_path, run_trials
from study.sweep.plan import describe, plan_sweep
from study.sweep.prepare import prepare_sweep
from study.sweep.search_space import available_axes
from study.sweep.summary import summarise
from study.sweep.trial import PROGRESS_METRICS
from study.tracking import check_artifact_location, check_store, tracking_uri, ui_instructions

SEARCHES = ("grid", "optuna")
SCHEDULERS = ("fifo", "asha")
MODES = ("max", "min")


class SweepResult(NamedTuple):
    """What a sweep gives back to Python (``run``)."""

    trials: pd.DataFrame
    """One row per trial: its swept values, status (done, FAILED, stopped early) and headline metrics;
    for a dry run, the planned trials."""
    verdicts: list[Verdict]
    """One per claim (empty for a dry run)."""
    parent_run_id: str | None
    """The sweep's MLflow run."""
    report: str | None
    """Where the HTML report was written, if it was."""


def as_overrides(overrides: Sequence[str] | Mapping[str, object]) -> list[str]:
    """``["key=value", ...]`` as on the command line, or ``{key: value}`` (values in Tune's grammar)."""
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]  # JSON is YAML
    return list(overrides)


def check_options(options: RunOptions) -> None:
    """The Tune options, before anything runs."""
    if options.num_samples < 1 or options.gpus_per_trial < 0 or options.max_concurrent < 0:
        raise StudyInputError("--num-samples must be >= 1, --gpus-per-trial >= 0 and --max-concurrent >= 0")
    if options.workers_per_trial < 1:
        raise StudyInputError("--workers-per-trial must be >= 1")
    if options.workers_per_trial > 1 and options.gpus_per_trial not in (0, 1):
        raise StudyInputError(
            "with --workers-per-trial each worker takes one whole GPU: set --gpus-per-trial 1 (or 0 for one CPU each)"
        )
    if options.workers_per_trial > 1 and options.scheduler == "asha":
        raise StudyInputError(
            "--scheduler asha cannot stop a trial split over workers; use fifo or --workers-per-trial 1"
        )
    for name, value, allowed in (
        ("search", options.search, SEARCHES),
        ("scheduler", options.scheduler, SCHEDULERS),
        ("metric", options.metric, PROGRESS_METRICS),
        ("mode", options.mode, MODES),
    ):
        if value not in allowed:
            raise StudyInputError(f"--{name} {value!r} is unknown; choose one of {', '.join(allowed)}")


def run(
    axis: str,
    overrides: Sequence[str] | Mapping[str, object] = (),
    experiment: str | None = None,
    *,
    search: str = "grid",
    scheduler: str = "fifo",
    metric: str = "explained_variance",
    mode: str = "max",
    num_samples: int = 1,
    gpus_per_trial: float = 0.0,
    max_concurrent: int = 0,
    storage: str = "sweeps",
    resume: bool = False,
    cache_dir: str | None = None,
    artifacts: str | None = None,
    workers_per_trial: int = 1,
    local_cache: str | None = None,
    dry_run: bool = False,
) -> SweepResult:
    """Run a sweep from Python, e.g. ``run("seed", {"n_steps": 300}, experiment="mine")``: the same as
    ``python -m study.sweep``, with the overrides as ``--set``. Bad input raises ``StudyInputError``
    before Ray starts or anything is written."""
    options = RunOptions(
        search, num_samples, gpus_per_trial, max_concurrent, storage, resume, metric, mode, scheduler, workers_per_trial
    )
    check_options(options)
    if local_cache is not None and "://" in local_cache:
        raise StudyInputError(f"--local-cache {local_cache} is a URI; give a folder on each node's own disk")
    check_store(tracking_uri())
    plan = plan_sweep(axis, as_overrides(overrides), experiment, cache_dir, workers_per_trial)
    headline, *details = describe(plan, num_samples).splitlines()
    print(headline)
    if dry_run:
        print("\n".join(details))
        return SweepResult(
            pd.DataFrame([{key: trial[key] for key in plan.swept} for trial in plan.trials]), [], None, None
        )
    check_resumable(options, plan.sweep_name)
    check_artifact_location(plan.experiment, artifacts)

    search_tags = {"search": search, "scheduler": scheduler, "search_metric": f"{metric} ({mode})"}
    context = prepare_sweep(
        plan,
        cache_dir,
        search_tags,
        artifacts,
        judged_while_training=options.judged_while_training,
        local_cache=None if local_cache is None else str(Path(local_cache).resolve()),
    )
    table = run_trials(plan.space, plan.swept, plan.sweep_name, context, options)
    report_folder = experiment_path(options, plan.sweep_name) / "report"
    failed, verdicts, report_ok = summarise(context.parent_run_id, table, report_folder)
    print(
        f"MLflow: experiment '{plan.experiment}', parent run {context.parent_run_id}; to browse and compare the runs:"
    )
    for line in ui_instructions(tracking_uri(), context.experiment_id):
        print(f"  {line}")
    report = f"{report_folder}/report.html" if report_ok else None
    if report:
        print(f"report: {report} (also in the parent run's artifacts, report/)")
    if failed:
        print(f"{failed} trial(s) failed", file=sys.stderr)
    return SweepResult(table, verdicts, context.parent_run_id, report)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m study.sweep",
        description=__doc__.split("\n\n")[0],
        epilog=f"shipped axes: {', '.join(available_axes())}. For sparsity=topk or batchtopk, choose k near the "
        "data's own L0 (an l1 trial's, e.g. --set k=8): far above it features split into partial copies at a high EV.",
    )
    parser.add_argument("axis", help="a shipped axis (see below) or a path to your own YAML file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key (YAML value, Tune grammar allowed)",
    )
    parser.add_argument(
        "--trajectory",
        help="embedded, planted, a folder of step<N>/ checkpoints, a hub model id, or frozen:SPEC / shuffled:SPEC",
    )
    parser.add_argument("--revisions", help="comma-separated hub revisions, e.g. step0,step1000,step143000")
    parser.add_argument("--tokens", type=int, help="activation rows per snapshot (n_tokens)")
    parser.add_argument("--search", choices=SEARCHES, default="grid", help="grid, or optuna over the sampled keys")
    parser.add_argument(
        "--scheduler", choices=SCHEDULERS, default="fifo", help="asha stops trials that trail on --metric early"
    )
    parser.add_argument(
        "--metric",
        choices=PROGRESS_METRICS,
        default="explained_variance",
        help="what optuna optimises and asha judges, measured on held-out tokens at every checkpoint",
    )
    parser.add_argument("--mode", choices=MODES, default="max")
    parser.add_argument("--num-samples", type=int, default=1, help="repeats of the grid, or Optuna trials")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, help="fraction of a GPU per trial (0 on CPU)")
    parser.add_argument(
        "--workers-per-trial",
        type=int,
        default=1,
        help="split each trial's crosscoder by features over N Ray Train workers (one GPU each with "
        "--gpus-per-trial 1, else one CPU each): for dictionaries larger than one device holds",
    )
    parser.add_argument("--max-concurrent", type=int, default=0, help="trials at once (0: as many as resources allow)")
    parser.add_argument("--experiment", help="MLflow experiment (default crosscoder-AXIS)")
    parser.add_argument("--resume", action="store_true", help="require an earlier run of this sweep to continue")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and activation sets, run nothing")
    parser.add_argument(
        "--cache-dir",
        help="cache of trajectories and activations (a URI such as s3://bucket/cache holds the activations only)",
    )
    parser.add_argument(
        "--local-cache",
        metavar="DIR",
        help="a folder on each node's own disk where trials keep copies of the activation files they read, "
        "so a shared folder or object store is read once per node",
    )
    parser.add_argument(
        "--storage",
        default="sweeps",
        help="Tune's experiment state and the report: a folder every node sees, or a URI such as s3://bucket/sweeps (default ./sweeps)",
    )
    parser.add_argument(
        "--artifacts",
        help="where a new experiment keeps its MLflow artifacts (crosscoders, plots, report), e.g. s3://bucket/mlflow; "
        "default: beside the tracking store",
    )
    return parser.parse_args(argv)


def overrides_of(args: argparse.Namespace) -> list[str]:
    """``--set`` and the shorthand options, as key=value overrides."""
    overrides = list(args.set)
    if args.trajectory:
        overrides.append(f"trajectory={args.trajectory}")
    if args.revisions:
        overrides.append(f"revisions=[{args.revisions}]")
    if args.tokens is not None:
        overrides.append(f"n_tokens={args.tokens}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    result = run(
        args.axis,
        overrides_of(args),
        args.experiment,
        search=args.search,
        scheduler=args.scheduler,
        metric=args.metric,
        mode=args.mode,
        num_samples=args.num_samples,
        gpus_per_trial=args.gpus_per_trial,
        max_concurrent=args.max_concurrent,
        storage=args.storage,
        resume=args.resume,
        cache_dir=args.cache_dir,
        artifacts=args.artifacts,
        workers_per_trial=args.workers_per_trial,
        local_cache=args.local_cache,
        dry_run=args.dry_run,
    )
    failed = "status" in result.trials and bool((result.trials["status"] == "FAILED").any())
    return 1 if failed else 0
