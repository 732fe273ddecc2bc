"""Activation extraction and cache reading, as ratios measured in one run on this machine.

    python bench/extraction_throughput.py [--preset default|tiny] [--tokens 50000] [--batch-size 32]

1. Extraction tokens/s through Ray Data (``ensure_activations`` into a fresh cache, all snapshots,
   start-up included) at a middle and at the last layer, against a plain full-model
   ``output_hidden_states`` forward of the same contexts with the same batch size in this process.
2. Reader rows/s (``ActivationCache.batches``) against the rows/s a crosscoder consumes in
   training at that shape (expansion 8, JumpReLU, batch 1024).
3. Peak memory (RSS) of a process reading a whole cache, for a cache and one ten times larger.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from study.activations.contexts import sample_contexts
from study.activations.extraction import ActivationRequest, ensure_activations
from study.lm.pretrain_config import PRESETS
from study.lm.trajectory import embedded_trajectory, load_model, load_tokenizer
from study.ray_runtime import ensure_ray

# The child's own high-water mark: ru_maxrss would carry the parent's peak across fork and exec.
READ_SCRIPT = """
import json, sys
from study.activations.cache import ActivationCache
cache = ActivationCache(sys.argv[1])
rows = sum(len(batch) for batch in cache.batches(int(sys.argv[2]), batch_size=1024, seed=0, epochs=1))
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"rows": rows, "peak_rss_mb": peak_kb / 1024}))
"""


def plain_forward_rate(model, contexts: torch.Tensor, batch_size: int) -> float:
    """Tokens/s of a full forward with ``output_hidden_states`` (the usual way to get activations)."""
    with torch.no_grad():
        model(input_ids=contexts[:batch_size], output_hidden_states=True)
        started = time.perf_counter()
        for start in range(0, len(contexts), batch_size):
            model(input_ids=contexts[start : start + batch_size], output_hidden_states=True)
    return contexts.numel() / (time.perf_counter() - started)


def extraction_rate(request: ActivationRequest) -> float:
    """Tokens/s (context tokens x snapshots) of a whole extraction into a fresh cache."""
    with tempfile.TemporaryDirectory() as cache_dir:
        started = time.perf_counter()
        cache = ensure_activations(request, cache_dir, progress=False)
        seconds = time.perf_counter() - started
        contexts = cache.n_tokens // (request.context_length - 1)
    return contexts * request.context_length * len(request.trajectory.snapshots) / seconds


def crosscoder_consumption(n_snapshots: int, d_model: int) -> float:
    """Rows/s a crosscoder training step consumes at this shape."""
    from crosscoder import CrossCoder, CrossCoderConfig
    from crosscoder.trainer import make_optimizer, training_step

    config = CrossCoderConfig(expansion_ratio=8, batch_size=1024)
    batch = torch.randn(1024, n_snapshots, d_model)
    model = CrossCoder(n_snapshots, d_model, config)
    model.initialize(batch, torch.Generator().manual_seed(0))
    optimizer = make_optimizer(model)
    training_step(model, optimizer, batch, step=500)
    started = time.perf_counter()
    for _ in range(5):
        training_step(model, optimizer, batch, step=500)
    return 5 * 1024 / (time.perf_counter() - started)


def reader_rate(cache, layer: int) -> float:
    started = time.perf_counter()
    rows = sum(len(batch) for batch in cache.batches(layer, batch_size=1024, seed=0, epochs=1))
    return rows / (time.perf_counter() - started)


def reader_peak_memory(folder: str, layer: int) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", READ_SCRIPT, folder, str(layer)], capture_output=True, text=True, check=True
    )
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    trajectory = embedded_trajectory(PRESETS[args.preset])
    model = load_model(trajectory.snapshots[-1])
    n_layers = model.config.num_hidden_layers
    context_length = PRESETS[args.preset].context_length
    contexts = sample_contexts(
        load_tokenizer(trajectory.snapshots[-1]), "embedded", context_length, args.tokens, seed=0
    )
    ensure_ray()
    print(
        f"{len(trajectory.snapshots)} snapshots, {n_layers} layers, {contexts.numel()} context tokens per snapshot, batch {args.batch_size}"
    )

    plain = plain_forward_rate(model, contexts, args.batch_size)
    print(f"plain full forward with output_hidden_states: {plain:,.0f} tokens/s")
    for label, layer in (("middle", n_layers // 2), ("last", n_layers)):
        request = ActivationRequest(
            trajectory, layers=(layer,), n_tokens=args.tokens, context_length=context_length, batch_size=args.batch_size
        )
        rate = extraction_rate(request)
        print(
            f"Ray Data extraction, {label} layer {layer}: {rate:,.0f} tokens/s = {rate / plain:.2f} x the plain forward"
        )

    layer = n_layers // 2
    with tempfile.TemporaryDirectory() as cache_dir:
        small = ActivationRequest(
            trajectory,
            layers=(layer,),
            n_tokens=args.tokens // 10,
            context_length=context_length,
            contexts_per_shard=64,
        )
        large = ActivationRequest(
            trajectory, layers=(layer,), n_tokens=args.tokens, context_length=context_length, contexts_per_shard=64
        )
        small_cache, large_cache = (
            ensure_activations(small, cache_dir, progress=False),
            ensure_activations(large, cache_dir, progress=False),
        )
        read = reader_rate(large_cache, layer)
        consumed = crosscoder_consumption(len(trajectory.snapshots), large_cache.d_model)
        print(
            f"reader: {read:,.0f} rows/s; crosscoder training consumes {consumed:,.0f} rows/s: reader = {read / consumed:.1f} x consumption"
        )
        for name, cache in (("small", small_cache), ("10x larger", large_cache)):
            measured = reader_peak_memory(str(cache.folder), layer)
            size_mb = sum(path.stat().st_size for path in Path(cache.files.path).rglob("*.npy")) / 1e6
            print(
                f"reader process peak RSS, {name} cache ({size_mb:.0f} MB, {measured['rows']} rows read): {measured['peak_rss_mb']:.0f} MB"
            )
    print(f"driver peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
