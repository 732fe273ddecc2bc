"""Sweep one axis of the crosscoder's free choices with Ray Tune, every trial tracked in MLflow.

    python -m study.sweep AXIS [--set key=value ...] [--trajectory SPEC] [--experiment NAME] ...

AXIS names a file in search_spaces/ (it overrides search_spaces/defaults.yaml). Each distinct
activation set is extracted once (Ray Data) before the trials; each trial trains one crosscoder
on it and logs a child run under the sweep's parent run in MLflow. Re-running the same command
continues a killed sweep: finished trials are neither re-run nor logged twice.

The stages, one module each: plan (validate, resolve, list) -> prepare (extract, parent run,
model curves) -> execute (Tune) -> summary (verdicts, report).
"""

from __future__ import annotations

import argparse
import sys

from study.errors import StudyInputError
from study.sweep.execute import RunOptions, check_resumable, experiment_path, run_trials
from study.sweep.plan import describe, plan_sweep
from study.sweep.prepare import prepare_sweep
from study.sweep.search_space import available_axes
from study.sweep.summary import summarise
from study.tracking import tracking_uri


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m study.sweep",
        description=__doc__.split("\n\n")[0],
        epilog=f"axes found in search_spaces/: {', '.join(available_axes())}",
    )
    parser.add_argument("axis", help="a file of search_spaces/ without .yaml")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key (YAML value, Tune grammar allowed)",
    )
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
    parser.add_argument(
        "--cache-dir",
        help="cache of trajectories and activations (a URI such as s3://bucket/cache holds the activations only)",
    )
    parser.add_argument(
        "--storage",
        default="sweeps",
        help="Tune's experiment state and the report: a folder every node sees, or a URI such as s3://bucket/sweeps (default ./sweeps)",
    )
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.gpus_per_trial < 0 or args.max_concurrent < 0:
        raise StudyInputError("--num-samples must be >= 1, --gpus-per-trial >= 0 and --max-concurrent >= 0")
    return args


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
    plan = plan_sweep(args.axis, overrides_of(args), args.experiment, args.cache_dir)
    headline, *details = describe(plan, args.num_samples).splitlines()
    print(headline)
    if args.dry_run:
        print("\n".join(details))
        return 0
    options = RunOptions(
        args.search, args.num_samples, args.gpus_per_trial, args.max_concurrent, args.storage, args.resume
    )
    check_resumable(options, plan.sweep_name)

    context = prepare_sweep(plan, args.cache_dir)
    table = run_trials(plan.space, plan.swept, plan.sweep_name, context, options)
    report_folder = experiment_path(options, plan.sweep_name) / "report"
    failed, _, report_ok = summarise(context.parent_run_id, table, report_folder)
    print(f"MLflow: {tracking_uri()}  experiment '{plan.experiment}', parent run {context.parent_run_id}")
    if report_ok:
        print(f"report: {report_folder}/report.html (also in the parent run's artifacts, report/)")
    if failed:
        print(f"{failed} trial(s) failed", file=sys.stderr)
    return 1 if failed else 0
