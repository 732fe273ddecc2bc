"""What feature matching costs as dictionaries grow, against the bare blocked cosine product in the same
run: time, and peak memory above the two dictionaries (each size in a fresh process).

    python bench/matching_scale.py [--sizes 1024 2048 ... 32768] [--width 1536]

``width`` is S x d_model (1536: 2 snapshots of Pythia-160M's 768). Dictionary B is A's features
shuffled, duplicated in part, with noise of every level, so that the matching has work to do.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import torch

from crosscoder.matching import BLOCK_ELEMENTS, stability, unit_rows


def dictionaries(n_features: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n_features, width, generator=generator)
    copies = a[torch.randint(0, n_features, (n_features,), generator=generator)]
    noise = torch.rand(n_features, 1, generator=generator) * 1.5
    return a[:, None], (copies + noise * torch.randn(copies.shape, generator=generator))[:, None]


def bare_cosines(a: torch.Tensor, b: torch.Tensor) -> None:
    """Every cosine once, in the same row blocks, kept nowhere: the floor any matching pays."""
    units_a, units_b = unit_rows(a, torch.device("cpu")), unit_rows(b, torch.device("cpu"))
    rows = max(1, BLOCK_ELEMENTS // len(units_b))
    for start in range(0, len(units_a), rows):
        units_a[start : start + rows] @ units_b.T


def measure(n_features: int, width: int, queue) -> None:
    a, b = dictionaries(n_features, width)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    bare_cosines(a, b)
    bare = time.perf_counter() - started
    bare_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    started = time.perf_counter()
    result = stability(a, b, device="cpu")
    matched = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    queue.put((bare, matched, bare_memory / 1024, peak / 1024, result.shared_share))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--width", type=int, default=1536)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, width S x d = {args.width}, blocks of {BLOCK_ELEMENTS:,} cosines")
    print("features | bare cosines s | stability s | ratio | peak MB above the dictionaries (bare, stability) | shared")
    context = multiprocessing.get_context("spawn")
    for n_features in args.sizes:
        queue = context.Queue()
        process = context.Process(target=measure, args=(n_features, args.width, queue))
        process.start()
        bare, matched, bare_memory, peak, shared = queue.get()
        process.join()
        print(
            f"{n_features:>8} | {bare:>14.2f} | {matched:>11.2f} | {matched / bare:>5.2f} | "
            f"{bare_memory:>8.0f}, {peak:>8.0f} | {shared:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
