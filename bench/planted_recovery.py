"""How much of the planted trajectory's dictionary each sparsity method recovers, in one run: the answer
is known (``study.lm.planted``), so a high explained variance cannot hide a wrong dictionary here.

    python bench/planted_recovery.py [--methods jumprelu l1 topk batchtopk] [--steps 1000] [--set KEY=VALUE ...]

Activations of the planted trajectory's 12 snapshots at layer 1 (12,000 tokens, computed directly),
one crosscoder per method (x4, learning rate 0.004, its other settings at their defaults unless --set),
then per method: planted features recovered (decoder cosine >= 0.9), recovered ones dated at their
planted emergence step, and EV, L0 and dead share measured on the same activations it trained on.
"""

from __future__ import annotations

import argparse
import time

import torch
import yaml

from crosscoder import CrossCoderConfig, fit
from crosscoder.evolution import emergence
from study.activations.contexts import sample_contexts
from study.activations.direct import direct_activations
from study.analysis.planted_recovery import planted_recovery
from study.lm.planted import planted_folder
from study.lm.trajectory import directory_trajectory, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["jumprelu", "l1", "topk", "batchtopk"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a CrossCoderConfig field")
    parser.add_argument("--cache-dir", help="where the planted trajectory is built (default: the study cache)")
    args = parser.parse_args()
    folder = planted_folder(cache_dir=args.cache_dir)
    trajectory = directory_trajectory(folder)
    contexts = sample_contexts(load_tokenizer(trajectory.snapshots[0]), "embedded", 32, 12_000, seed=0)
    activations = direct_activations(trajectory, contexts, layer=1)
    overrides = {key: yaml.safe_load(value) for key, value in (text.split("=", 1) for text in args.set)}
    print(f"planted trajectory {folder.name}: {activations.shape[0]} tokens x {activations.shape[1]} snapshots")
    print("method | recovered | dated as planted | EV | L0 | dead | seconds")
    for method in args.methods:
        config = CrossCoderConfig(
            **{"expansion_ratio": 4, "sparsity": method, "n_steps": args.steps, "learning_rate": 0.004} | overrides
        )
        started = time.perf_counter()
        result = fit(activations, config)
        steps = torch.tensor(trajectory.steps, dtype=torch.float64)
        emergence_step = steps[emergence(result.model.decoder_norms().detach(), trajectory.steps).emergence_index]
        no_entropy = torch.zeros(result.model.n_features)  # token kinds are not judged here
        summary = planted_recovery(
            result.model.decoder_weight, emergence_step, no_entropy, trajectory.steps, folder
        ).summary
        metrics = result.metrics
        print(
            f"{method} | {summary.planted_recovered_share:.2f} | {summary.planted_emergence_agreement:.2f} | "
            f"{metrics.explained_variance:.4f} | {metrics.l0:.2f} | {metrics.dead_fraction:.2f} | "
            f"{time.perf_counter() - started:.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
