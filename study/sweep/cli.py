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
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from study.analysis.verdicts import Verdict
from study.errors import StudyInputError
from study.paths import cache_location
from study.ray_runtime import ensure_ray
from study.record import OPTION_TAG, TAG
from study.sweep.execute import check_resumable, experiment_path, run_trials
from study.sweep.memory import check_memory, largest_node_memory
from study.sweep.options import SweepOptions, add_flags, options_of, recorded_options, without_credentials
from study.sweep.plan import describe, plan_sweep
from study.sweep.prepare import prepare_sweep
from study.sweep.search_space import available_axes
from study.sweep.summary import summarise
from study.tracking import (
    check_artifact_location,
    check_store,
    close_interrupted_sweep,
    tracking_environment,
    tracking_uri,
    ui_instructions,
)


class SweepResult(NamedTuple):
    """What a sweep gives back to Python (``run``)."""

    trials: pd.DataFrame
    """One row per trial: its swept values, status (done, FAILED, stopped early, interrupted) and headline metrics;
    for a dry run, the planned trials."""
    verdicts: list[Verdict]
    """One per claim (empty for a dry run)."""
    parent_run_id: str | None
    """The sweep's MLflow run."""
    report: str | None
    """Where the HTML report was written, if it was."""
    interrupted: bool = False
    """Whether Ctrl-C stopped the sweep (no verdicts then: the same command continues it)."""


def as_overrides(overrides: Sequence[str] | Mapping[str, object]) -> list[str]:
    """``["key=value", ...]`` as on the command line, or ``{key: value}`` (values in Tune's grammar)."""
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]  # JSON is YAML
    return list(overrides)


def run(
    axis: str,
    overrides: Sequence[str] | Mapping[str, object] = (),
    experiment: str | None = None,
    options: SweepOptions | None = None,
    **option_values: Any,
) -> SweepResult:
    """Run a sweep from Python, e.g. ``run("seed", {"n_steps": 300}, experiment="mine", search="optuna")``: the
    same as ``python -m study.sweep``, with the overrides as ``--set`` and the options as ``SweepOptions`` or
    its fields by name. Bad input raises ``StudyInputError`` before Ray starts or anything is written."""
    unknown = set(option_values) - {item.name for item in fields(SweepOptions)}
    if unknown:
        raise StudyInputError(f"unknown sweep option(s) {', '.join(sorted(unknown))}; see study.sweep.SweepOptions")
    options = replace(options or SweepOptions(), **option_values)
    options.check()
    os.environ.update(tracking_environment())  # the driver rides through an outage as its trials do
    check_store(tracking_uri())
    plan = plan_sweep(axis, as_overrides(overrides), experiment, options.cache_dir, options.workers_per_trial)
    headline, *details = describe(plan, options.num_samples).splitlines()
    print(headline)
    if options.dry_run:
        print("\n".join(details))
        return SweepResult(
            pd.DataFrame([{key: trial[key] for key in plan.swept} for trial in plan.trials]), [], None, None
        )
    check_resumable(options, plan.sweep_name)
    check_artifact_location(plan.experiment, options.artifacts)

    search_tags = {
        TAG.search: options.search,
        TAG.scheduler: options.scheduler,
        TAG.search_metric: f"{options.metric} ({options.mode})",
    }
    ensure_ray()
    check_memory(plan, largest_node_memory(), options.workers_per_trial)  # before any trial starts
    local_cache = None if options.local_cache is None else str(Path(options.local_cache).resolve())
    option_tags = {f"{OPTION_TAG}{name}": value for name, value in recorded_options(options).items()} | {
        TAG.cache_location: without_credentials(cache_location(options.cache_dir).uri),
        TAG.storage_location: without_credentials(experiment_path(options, plan.sweep_name).uri),
    }
    context = prepare_sweep(
        plan,
        options.cache_dir,
        search_tags,
        option_tags,
        options.artifacts,
        judged_while_training=options.judged_while_training,
        local_cache=local_cache,
    )
    table, interrupted = run_trials(plan.space, plan.swept, plan.sweep_name, context, options)
    if interrupted:
        return interrupted_sweep(plan, table, context.experiment_id, context.parent_run_id, options)
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


INTERRUPTED = 130
"""Exit code of a sweep stopped by Ctrl-C (the shell's for SIGINT)."""


def interrupted_sweep(plan, table: pd.DataFrame, experiment_id: str, parent_run_id: str, options: SweepOptions):
    """Ctrl-C: close the runs left in flight (KILLED), mark the parent interrupted, and say how to continue."""
    close_interrupted_sweep(experiment_id, parent_run_id)
    planned = len(plan.trials) * options.num_samples
    done = int((table["status"] == "done").sum()) if len(table) else 0
    stopped = int((table["status"] == "interrupted").sum()) if len(table) else 0
    print(
        f"interrupted: {done} of {planned} trial(s) finished and are kept, {stopped} stopped in flight (their runs "
        "KILLED). Run the same command again to continue: finished trials are not re-run, stopped ones restart "
        "from their last checkpoint.",
        file=sys.stderr,
    )
    return SweepResult(table, [], parent_run_id, None, interrupted=True)


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
        help="embedded, planted, a folder of step<N>/ checkpoints, a hub model id, planted:NAME, or frozen:SPEC / shuffled:SPEC / reversed:SPEC",
    )
    parser.add_argument("--revisions", help="comma-separated hub revisions, e.g. step0,step1000,step143000")
    parser.add_argument("--tokens", type=int, help="activation rows per snapshot (n_tokens)")
    parser.add_argument("--experiment", help="MLflow experiment (default crosscoder-AXIS)")
    add_flags(parser)
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
    result = run(args.axis, overrides_of(args), args.experiment, options_of(args))
    if result.interrupted:
        return INTERRUPTED
    failed = "status" in result.trials and bool(result.trials["status"].str.startswith("FAILED").any())
    return 1 if failed else 0
