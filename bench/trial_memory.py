"""A trial's peak memory against the estimate the sweep refuses trials by (``study.sweep.memory``), on the main
command's trials (built first if missing):

    python bench/trial_memory.py [--ratios 4,16] [--steps 200]

Each ratio's trial trains and measures in a fresh process (as a Tune trial does, without Tune), which reports its
peak resident set size; each line gives it beside the estimate and their ratio.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from study.activations.extraction import ensure_activations
from study.analysis.measure import train_and_measure
from study.sweep.memory import snapshot_weight_bytes, trial_memory
from study.sweep.plan import plan_sweep
from study.trial_config import TrialConfig


def main_trial(ratio: float, steps: int) -> tuple[dict, object]:
    plan = plan_sweep("expansion_ratio", [f"n_steps={steps}"], "trial-memory", None)
    ((key, chosen),) = plan.activation_sets.items()
    point = next(point for point in plan.trials if float(point["expansion_ratio"]) == ratio)
    return point, (plan, key, chosen)


def run_child(ratio: float, steps: int) -> None:
    point, (plan, key, chosen) = main_trial(ratio, steps)
    folder = ensure_activations(chosen.request, None, progress=False).folder
    with tempfile.TemporaryDirectory() as checkpoints:
        train_and_measure(
            TrialConfig.from_flat(point), str(folder), list(chosen.request.trajectory.snapshots), Path(checkpoints)
        )
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="4,16")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        run_child(args.child, args.steps)
        return
    for ratio in (float(value) for value in args.ratios.split(",")):
        point, (plan, key, chosen) = main_trial(ratio, args.steps)
        estimate = trial_memory(
            point, TrialConfig.from_flat(point), plan.d_models[key], snapshot_weight_bytes(chosen.request.trajectory)
        ).total
        command = [sys.executable, __file__, "--child", str(ratio), "--steps", str(args.steps)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
        peak = int(output[-1])
        print(
            f"x{ratio:g}: peak {peak / 1024**3:.2f} GiB, estimated {estimate / 1024**3:.2f} GiB ({estimate / peak:.2f})"
        )


if __name__ == "__main__":
    main()
