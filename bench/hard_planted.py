"""Each sparsity method at its defaults on the hard planted set, and on the embedded trajectory, in one run.

    python bench/hard_planted.py [--methods jumprelu l1 topk batchtopk] [--set KEY=VALUE ...] [--no-embedded]

The hard set (``crosscoder.synthetic.hard_planted_features``): 256 features in 64 dimensions over 12
snapshots, Zipf frequencies at a mean L0 of 6, features that appear and fade, drift and noise. Per
method: planted features recovered (decoder cosine >= 0.9, one-to-one), the share of those whose
first and last present snapshots are exact, EV, L0 and dead share. Then, for the same defaults, the
embedded trajectory's activations (9 snapshots, layer 2, 60,000 tokens: the main command's) with
EV, L0 and dead share: the defaults must serve real activations too. Every crosscoder is the
library's default (x8, 2,000 steps) unless --set says otherwise.
"""

from __future__ import annotations

import argparse
import time

import torch
import yaml

from crosscoder import CrossCoderConfig, fit
from crosscoder.synthetic import hard_planted_features, planted_recovery
from study.activations.extraction import ActivationRequest, ensure_activations
from study.lm.trajectory import embedded_trajectory


def embedded_activations() -> torch.Tensor:
    """The main command's activations (9 log-placed snapshots of the embedded trajectory, layer 2, 60,000
    tokens), from the study's activation cache: built with Ray Data on first use, read after."""
    request = ActivationRequest(embedded_trajectory().select(9, "log"), layers=(2,), n_tokens=60_000)
    return ensure_activations(request, progress=False).load(2).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["jumprelu", "l1", "topk", "batchtopk"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a CrossCoderConfig field")
    parser.add_argument("--no-embedded", action="store_true", help="the planted set only")
    args = parser.parse_args()
    overrides = {key: yaml.safe_load(value) for key, value in (text.split("=", 1) for text in args.set)}
    planted = hard_planted_features()
    print(
        f"hard set: planted L0 {planted.firing_probability.sum():.2f}, rarest feature fires on "
        f"{planted.firing_probability.min():.4f} of tokens; overrides {overrides or 'none'}"
    )
    print("method | recovered | onsets exact | EV | L0 | dead | seconds")
    for method in args.methods:
        started = time.perf_counter()
        result = fit(planted.activations, CrossCoderConfig(**({"sparsity": method} | overrides)))
        recovery = planted_recovery(planted, result.model.decoder_weight)
        metrics = result.metrics
        print(
            f"{method} | {recovery.recovered_share:.3f} | {recovery.onsets_exact_share:.3f} | "
            f"{metrics.explained_variance:.4f} | {metrics.l0:.2f} | {metrics.dead_fraction:.2f} | "
            f"{time.perf_counter() - started:.0f}",
            flush=True,
        )
    if args.no_embedded:
        return
    activations = embedded_activations()
    print(
        f"embedded trajectory: {activations.shape[0]} tokens x {activations.shape[1]} snapshots x d {activations.shape[2]}"
    )
    print("method | EV | L0 | dead | seconds")
    for method in args.methods:
        started = time.perf_counter()
        metrics = fit(activations, CrossCoderConfig(**({"sparsity": method} | overrides))).metrics
        print(
            f"{method} | {metrics.explained_variance:.4f} | {metrics.l0:.2f} | {metrics.dead_fraction:.2f} | "
            f"{time.perf_counter() - started:.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
