"""What the causal analyses cost per trial, against the plain forward passes they are made of,
measured in one run on this machine.

    python bench/causal_cost.py CROSSCODER.safetensors [--steps 10] [--items 16] [--cache-dir DIR]

On the embedded default trajectory at the crosscoder's snapshots (its trial's ``crosscoder.safetensors``
artifact, 9 snapshots at the defaults): times ``study.analysis.causal_statistics.causal_statistics``
(integrated gradients with ``--steps`` points, ablation curves, RelIE) and one plain forward pass of
the same agreement prompts through every snapshot. The attribution alone needs ``steps`` forward and
backward passes per snapshot, the curves two forward passes per k, so the ratio shows what the
bookkeeping around them adds.
"""

from __future__ import annotations

import argparse
import time

import torch

from crosscoder import CrossCoder
from study.analysis.attribution import agreement_task
from study.analysis.causal_statistics import ABLATION_KS, causal_statistics
from study.lm.agreement import agreement_items
from study.lm.trajectory import load_model, load_tokenizer, resolve_trajectory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crosscoder", help="a trial's crosscoder.safetensors, trained on the embedded default")
    parser.add_argument("--steps", type=int, default=10, help="integrated-gradient steps")
    parser.add_argument("--items", type=int, default=16, help="agreement prompts per condition")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--cache-dir")
    args = parser.parse_args()
    torch.set_num_threads(1)
    crosscoder = CrossCoder.load(args.crosscoder)
    trajectory = resolve_trajectory("embedded", None, args.cache_dir)
    snapshots = list(trajectory.select(crosscoder.n_snapshots, "log").snapshots)
    task = agreement_task(agreement_items(args.items), load_tokenizer(snapshots[-1]))

    models = [load_model(snapshot) for snapshot in snapshots]
    started = time.perf_counter()
    with torch.no_grad():
        for model in models:
            model(input_ids=task.input_ids)
    forward = time.perf_counter() - started

    started = time.perf_counter()
    statistics = causal_statistics(crosscoder, snapshots, args.layer, task, "zero", args.steps, 3)
    causal = time.perf_counter() - started
    ks = len([k for k in ABLATION_KS if k <= crosscoder.n_features]) + 1
    passes = args.steps * 3 + 2 * ks + 2  # a backward costs about two forwards
    print(
        f"{len(task.input_ids)} prompts x {task.input_ids.shape[1]} tokens, {len(snapshots)} snapshots, "
        f"{crosscoder.n_features} features, {args.steps} IG steps, one CPU thread"
    )
    print(f"plain forward through every snapshot: {forward:.3f} s")
    print(f"causal analyses (model loading included): {causal:.2f} s = {causal / forward:.0f} x the plain forward")
    print(
        f"forward-pass equivalents they need per snapshot: about {passes}; overhead beyond them: {causal / (forward * passes):.2f} x"
    )
    print(f"largest attribution gap (completeness): {statistics.summary.attribution_gap_max:.3f}")


if __name__ == "__main__":
    main()
