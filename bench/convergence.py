"""How flat the main command's crosscoders end: the training loss's drop over the last fifth of the steps,
for several step counts, on the main command's own activations (built first if missing).

    python bench/convergence.py [--ratios 4,8,16] [--steps 500,1500] [--cooldown 0.2] [--learning-rate 1e-3]
                                 [--cache-dir DIR]

Each line: expansion ratio, steps, training seconds, ``loss_drop_last_fifth`` (the figure each trial
logs; the report flags trials above 2 %), explained variance, L0 and dead share on the held-out shard,
and for JumpReLU the zero codes inside the threshold's window per firing code on a held-out batch (what
``bench/crosscoder_throughput.py`` sets its window from). ``--cooldown 0`` tells annealing apart from a
run still learning.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from crosscoder_throughput import window_cells_per_firing

from crosscoder import fit, loss_drop_last_fifth
from study.activations.cache import ActivationCache
from study.activations.extraction import ensure_activations
from study.sweep.plan import plan_sweep
from study.trial_config import TrialConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="4,8,16")
    parser.add_argument("--steps", default="500,1500")
    parser.add_argument("--cooldown", type=float, default=None, help="lr_cooldown_fraction (default: the trial's)")
    parser.add_argument("--learning-rate", type=float, default=None, help="(default: the trial's)")
    parser.add_argument("--cache-dir", help="trajectory and activation cache (default: the harness's)")
    args = parser.parse_args()
    plan = plan_sweep("expansion_ratio", [], "convergence", args.cache_dir)
    (activation_set,) = plan.activation_sets.values()
    cache = ActivationCache(ensure_activations(activation_set.request, args.cache_dir, progress=False).folder)
    trial = TrialConfig.from_flat(plan.trials[0])
    training_shards = list(range(cache.n_shards - trial.held_out_shards))
    held_out = torch.cat([cache.shard(trial.layer, index) for index in range(len(training_shards), cache.n_shards)])
    for ratio in (float(value) for value in args.ratios.split(",")):
        for steps in (int(value) for value in args.steps.split(",")):
            config = replace(trial.crosscoder, expansion_ratio=ratio, n_steps=steps, device="auto")
            if args.cooldown is not None:
                config = replace(config, lr_cooldown_fraction=args.cooldown)
            if args.learning_rate is not None:
                config = replace(config, learning_rate=args.learning_rate)
            batches = cache.batches(trial.layer, config.batch_size, config.seed, shards=training_shards)
            started = time.perf_counter()
            result = fit(batches, config, eval_activations=held_out.float())
            seconds = time.perf_counter() - started
            metrics = result.metrics
            window = ""
            if config.sparsity == "jumprelu":
                window = f", window {window_cells_per_firing(result.model, held_out[: config.batch_size].float()):.2f}"
            print(
                f"x{ratio:g} {steps} steps: {seconds:.0f} s, loss drop over the last fifth "
                f"{loss_drop_last_fifth(result.history):.3f}, EV {metrics.explained_variance:.4f}, "
                f"L0 {metrics.l0:.1f}, dead {metrics.dead_fraction:.3f}{window}",
                flush=True,
            )


if __name__ == "__main__":
    main()
