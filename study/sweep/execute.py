"""Run a prepared sweep's trials with Ray Tune: one trainable per trial, the sweep's context bound
to it, restarts from checkpoints, one line per trial as it starts and ends."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import NamedTuple

import pandas as pd
import ray
from ray import tune

from study.analysis.measure import CHECKPOINTS_PER_TRIAL
from study.errors import StudyInputError
from study.record import TABLE_METRICS, TRIAL_RESULT
from study.storage import Location
from study.sweep.options import SweepOptions
from study.sweep.search_space import to_tune
from study.sweep.trial import SweepContext, run_trial
from study.sweep.workers import WorkerPlan
from study.tracking import close_orphaned_runs, close_stopped_run

MAX_FAILURES = 2
"""Restarts of a trial (node lost, worker killed) before it counts as failed."""
DRIVER_MEMORY = 256 * 1024**2
"""Bytes a trial asks for when its crosscoder is trained by Ray Train workers (it holds no CPU)."""
COST_KEYS = ("expansion_ratio", "n_snapshots", "n_steps", "batch_size", "n_tokens")
"""Keys whose larger values make a trial slower."""


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
        ev, l0, dead, drop = (result.get(name, float("nan")) for name in TABLE_METRICS)
        print(
            f"[done]   {trial.trial_id}  {self.describe(trial)}  EV={ev:.3f} L0={l0:.1f} dead={dead:.2f} "
            f"loss drop over the last fifth {drop:.1%} ({result.get('seconds', 0):.0f} s)",
            flush=True,
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        print(
            f"[FAILED] {trial.trial_id}  {self.describe(trial)}  (see the trial's MLflow run, tag 'error')", flush=True
        )


def costliest_first(param_space: dict) -> dict:
    """Grid values of the cost keys, largest first: Tune starts trials in grid order, and on a few
    CPUs the longest trial should not start last and run alone while the others sit idle."""
    ordered = dict(param_space)
    for key in COST_KEYS:
        value = ordered.get(key)
        if (
            isinstance(value, dict)
            and "grid_search" in value
            and all(isinstance(v, (int, float)) for v in value["grid_search"])
        ):
            ordered[key] = {"grid_search": sorted(value["grid_search"], reverse=True)}
    return ordered


def experiment_path(options: SweepOptions, sweep_name: str) -> Location:
    return Location.of(options.storage) / sweep_name


def check_resumable(options: SweepOptions, sweep_name: str) -> None:
    """``--resume`` needs Tune's state of an earlier run of this sweep."""
    if options.resume and not tune.Tuner.can_restore(experiment_path(options, sweep_name).uri):
        raise StudyInputError(
            f"--resume: no earlier run of {sweep_name} in {options.storage}; drop --resume to start it"
        )


def build_tuner(
    space: dict, swept: list[str], sweep_name: str, context: SweepContext, options: SweepOptions
) -> tune.Tuner:
    """A new Tuner over the search space, or the sweep's earlier one restored from the storage."""
    path = experiment_path(options, sweep_name)
    resources = {"cpu": 1, "gpu": options.gpus_per_trial}
    max_concurrent = options.max_concurrent or None
    if options.workers_per_trial > 1:
        use_gpu = options.gpus_per_trial > 0
        context = context._replace(workers=WorkerPlan(options.workers_per_trial, use_gpu, (path / "workers").uri))
        # The trial only drives its workers, which hold the CPUs or GPUs; it asks for memory alone (it
        # loads the assembled crosscoder to measure it), as Tune refuses a request for nothing. Without
        # a cap Tune would start every trial at once and their trainers would queue for workers.
        resources = {"cpu": 0, "gpu": 0, "memory": DRIVER_MEMORY}
        units = int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 0))
        max_concurrent = max_concurrent or max(1, units // options.workers_per_trial)
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=context), resources)
    if tune.Tuner.can_restore(path.uri):
        print(f"continuing {sweep_name} from {path}")
        return tune.Tuner.restore(path.uri, trainable=trainable, resume_unfinished=True, resume_errored=False)
    param_space = costliest_first(to_tune(space))
    search_alg = scheduler = None
    if options.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        param_space = {
            key: tune.choice(value["grid_search"]) if isinstance(value, dict) and "grid_search" in value else value
            for key, value in param_space.items()
        }
        search_alg = OptunaSearch(seed=0)  # metric and mode come from TuneConfig
    if options.scheduler == "asha":
        # One Tune iteration per checkpoint, CHECKPOINTS_PER_TRIAL of them and the final report.
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="training_iteration", max_t=CHECKPOINTS_PER_TRIAL + 1, grace_period=2, reduction_factor=2
        )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            # Without a reader, Tune would insist on the metric in every checkpoint's report.
            metric=options.metric if options.judged_while_training else None,
            mode=options.mode if options.judged_while_training else None,
            num_samples=options.num_samples,
            max_concurrent_trials=max_concurrent,
            search_alg=search_alg,
            scheduler=scheduler,
            # A trial's process imports torch, transformers, MLflow and Ray (about 8 s on 2 cores) and
            # loads every snapshot model: reused processes pay that once per slot, not once per trial.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=sweep_name,
            storage_path=Location.of(options.storage).uri,
            verbose=0,
            # A trial whose node is lost restarts elsewhere from its last checkpoint (a failing
            # trial also gets these retries before it is marked FAILED).
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            callbacks=[TrialLines(swept)],
        ),
    )


class TrialsRun(NamedTuple):
    table: pd.DataFrame
    """One row per trial Tune started: its swept values, done, FAILED, stopped early or interrupted, TABLE_METRICS."""
    interrupted: bool
    """Whether Ctrl-C (SIGINT) stopped the sweep before every trial ended."""


def exit_at_once(signal_number, frame) -> None:
    """A second Ctrl-C: Tune is already saving its state after the first; leave without waiting for it."""
    print("\ninterrupted again: exiting now; run the same command to continue", file=sys.stderr, flush=True)
    os._exit(130)


def fit_interruptible(tuner: tune.Tuner):
    """``tuner.fit()``, and whether Ctrl-C stopped it. Tune answers the first SIGINT itself (it stops the trials,
    keeps their checkpoints, saves its state) and then puts back the handler it found: ours, which exits at once
    on a second one, and whose presence afterwards tells that the first came."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return tuner.fit(), False
    previous = signal.signal(signal.SIGINT, exit_at_once)
    try:
        results = tuner.fit()
        return results, signal.getsignal(signal.SIGINT) is exit_at_once
    finally:
        signal.signal(signal.SIGINT, previous)


def killed_for_memory(error: BaseException) -> bool:
    """Whether Ray's OOM killer ended the trial (its error says so in its type or its text)."""
    return "OutOfMemoryError" in type(error).__name__ or "out of memory" in str(error).lower()


def run_trials(
    space: dict, swept: list[str], sweep_name: str, context: SweepContext, options: SweepOptions
) -> TrialsRun:
    """Run every trial (until Ctrl-C)."""
    tuner = build_tuner(space, swept, sweep_name, context, options)
    # Progress is TrialLines' one line per trial; Ray's newer console output ignores verbose=0,
    # and MLflow would draw a bar per artifact the analysis downloads.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Failures are reported by TrialLines and recorded in MLflow; Tune's tracebacks would bury them.
    for name in ("ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    rows = []
    results, interrupted = fit_interruptible(tuner)
    if not interrupted:
        close_orphaned_runs(
            context.experiment_id,
            context.parent_run_id,
            "FAILED",
            "its process died before it could close this run (killed for memory, or its node lost) and Tune's "
            f"{MAX_FAILURES} restarts ran out",
        )
    for result in results:
        metrics = result.metrics or {}
        status = "FAILED" if result.error else "done"
        if result.error is not None and killed_for_memory(result.error):
            status = "FAILED: out of memory"
        if not result.error and TRIAL_RESULT.seconds not in metrics:
            status = "interrupted"
            if not interrupted:  # the scheduler stopped it at a checkpoint
                status = "stopped early"
                close_stopped_run(context.experiment_id, context.parent_run_id, metrics.get(TRIAL_RESULT.trial_id, ""))
        row = {key: result.config.get(key) for key in swept}
        row.update({"status": status, **{name: metrics.get(name) for name in TABLE_METRICS}})
        rows.append(row)
    return TrialsRun(pd.DataFrame(rows), interrupted)
