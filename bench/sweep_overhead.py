"""What the harness costs: a sweep of N trials against the same N trainings in a bare Python loop,
measured in one run on this machine.

    python bench/sweep_overhead.py [--trials 3] [--steps 500] [--tokens 60000]

Both sides train the same crosscoders on the same cached activations and compute the same claim
statistics (``study.analysis.measure.train_and_measure``), one trial at a time on one CPU thread, so the ratio
is what Ray Tune, MLflow logging, the model curves, the sweep's robustness analysis and its report
add. The activation cache and the model curves are built before either side is timed.

Where the difference goes: the sweep's stages are timed as they run (prepare: Ray, parent run, model
curves; trials: Tune; summary: robustness analysis and report), and inside the trials stage each
trial's MLflow run (training, statistics and logging) against the same trial in the bare loop; the
rest of that stage is Tune's (trial processes, scheduling, checkpoints handed to storage).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import mlflow
import torch

import study.sweep.cli as sweep_cli
from study.activations.extraction import ensure_activations
from study.analysis.measure import train_and_measure
from study.analysis.model_curves import model_curves
from study.sweep.plan import plan_sweep
from study.sweep.prepare import snapshots_for_model_curves
from study.trial_config import TrialConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="expansion ratios 4, 8, 16, ... (one trial each)")
    parser.add_argument("--steps", type=int, default=500, help="training steps per trial")
    parser.add_argument("--tokens", type=int, default=60_000)
    parser.add_argument("--cache-dir", help="trajectory and activation cache (default: the harness's)")
    args = parser.parse_args()
    ratios = [4 * 2**index for index in range(args.trials)]
    overrides = [f"expansion_ratio={{grid_search: {ratios}}}", f"n_steps={args.steps}", f"n_tokens={args.tokens}"]
    plan = plan_sweep("expansion_ratio", overrides, "overhead", args.cache_dir)
    (activation_set,) = plan.activation_sets.values()
    request = activation_set.request
    cache = ensure_activations(request, args.cache_dir, progress=False)
    for curve_trajectory, corpus in snapshots_for_model_curves([activation_set]):
        model_curves(curve_trajectory, corpus, args.cache_dir)

    torch.set_num_threads(1)  # as a Tune trial on one CPU runs (Ray sets OMP_NUM_THREADS=1)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        trial_seconds = []
        for index, config in enumerate(plan.trials):
            begun = time.perf_counter()
            train_and_measure(
                TrialConfig.from_flat(config),
                str(cache.folder),
                list(request.trajectory.snapshots),
                Path(scratch) / f"loop{index}",
            )
            trial_seconds.append(time.perf_counter() - begun)
        loop_seconds = time.perf_counter() - started

        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(scratch) / 'mlflow.db'}"
        arguments = [
            "expansion_ratio",
            *[item for override in overrides for item in ("--set", override)],
            "--max-concurrent",
            "1",
            "--experiment",
            "overhead",
            "--storage",
            str(Path(scratch) / "sweeps"),
        ]
        if args.cache_dir:
            arguments += ["--cache-dir", args.cache_dir]
        stage_seconds = time_stages()
        started = time.perf_counter()
        exit_code = sweep_cli.main(arguments)
        sweep_seconds = time.perf_counter() - started
        runs = mlflow.search_runs(experiment_names=["overhead"])
        runs = runs[runs["tags.mlflow.parentRunId"].notna()]  # the trials' runs, not the sweep's own
        trial_run_seconds = sorted(((runs["end_time"] - runs["start_time"]).dt.total_seconds()).tolist())
    print(
        json.dumps(
            {
                "trials": args.trials,
                "bare_loop_trial_seconds": sorted(round(seconds, 1) for seconds in trial_seconds),
                "bare_loop_seconds": round(loop_seconds, 1),
                "sweep_seconds": round(sweep_seconds, 1),
                "sweep_stage_seconds": {name: round(seconds, 1) for name, seconds in stage_seconds.items()},
                "sweep_trial_run_seconds": [round(seconds, 1) for seconds in trial_run_seconds],
                "trials_stage_outside_trial_runs": round(stage_seconds["trials"] - sum(trial_run_seconds), 1),
                "sweep_exit_code": exit_code,
                "sweep_over_loop": round(sweep_seconds / loop_seconds, 3),
            },
            indent=1,
        )
    )


def time_stages() -> dict[str, float]:
    """Wrap the sweep command's three stages so that each one's seconds land in the returned dict."""
    seconds: dict[str, float] = {}
    for name, attribute in (("prepare", "prepare_sweep"), ("trials", "run_trials"), ("summary", "summarise")):
        stage = getattr(sweep_cli, attribute)

        def timed(*args, stage=stage, name=name, **kwargs):
            started = time.perf_counter()
            try:
                return stage(*args, **kwargs)
            finally:
                seconds[name] = time.perf_counter() - started

        setattr(sweep_cli, attribute, timed)
    return seconds


if __name__ == "__main__":
    main()
