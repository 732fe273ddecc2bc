"""Crosscoder training throughput as a share of this machine's own matmul rate, measured in one run.

    python bench/crosscoder_throughput.py [--device cpu|cuda] [--dtypes float32,bfloat16]
                                          [--methods jumprelu,l1,topk] [--steps 4] [--batch-size 1024]
                                          [--firing 0.01]

For each shape (S snapshots, d_model, expansion ratio), sparsity method and dtype it times full
training steps (``crosscoder.trainer.training_step``: forward, loss, backward, Adam) on random
input in memory and reports tokens/s and achieved FLOP/s, counted densely as 10 * S * d_model *
n_features per token (forward 4, backward 6), as a fraction of the dense matmul rate of the same
dtype, measured in the same process before and after (the best of several rounds).

JumpReLU's cost depends on how many (token, feature) pairs fire: ``--firing`` sets its initial
thresholds so that each feature fires on that share of tokens (1 %: L0 = 1 % of n_features, as in
a trained crosscoder; the column ``active`` shows the share measured in the timed steps). TopK
keeps k = 1 % of n_features for the same reason.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from crosscoder import CrossCoder, CrossCoderConfig
from crosscoder.cpu_memory import reuse_freed_memory
from crosscoder.trainer import make_optimizer, training_step

SHAPES = [(8, 768, 8), (32, 128, 32), (2, 768, 32)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(dtype: torch.dtype, device: torch.device, size: int, rounds: int = 5) -> float:
    """Best FLOP/s of a square matmul over ``rounds`` rounds."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    reps = 10 if device.type == "cpu" else 100
    best = 0.0
    for _ in range(rounds):
        a @ b
        synchronize(device)
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize(device)
        best = max(best, 2 * size**3 * reps / (time.perf_counter() - started))
    return best


def step_seconds(
    shape: tuple[int, int, int],
    method: str,
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int,
    steps: int,
    firing: float,
) -> tuple[float, float]:
    """Median wall time of one training step after two warm-up steps, and the share of features active."""
    n_snapshots, d_model, ratio = shape
    config = CrossCoderConfig(
        expansion_ratio=ratio,
        sparsity=method,
        autocast_bf16=dtype == torch.bfloat16,
        batch_size=batch_size,
        k=max(1, round(firing * ratio * d_model)),
        jumprelu_initial_firing=firing,
        n_steps=1000,
        device=str(device),
    )
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(batch_size, n_snapshots, d_model, generator=generator)
    model = CrossCoder(n_snapshots, d_model, config)
    model.initialize(batch[:512], generator)
    model.to(device)
    batch = batch.to(device)
    optimizer = make_optimizer(model)
    times, active = [], []
    for index in range(steps + 2):
        synchronize(device)
        started = time.perf_counter()
        result = training_step(model, optimizer, batch, step=500)  # mid-run: full learning rate and coefficient
        synchronize(device)
        if index >= 2:
            times.append(time.perf_counter() - started)
            active.append(result.active.float().mean().item())
    return statistics.median(times), statistics.mean(active)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--methods", default="jumprelu,l1,topk")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--firing", type=float, default=0.01, help="initial share of tokens each feature fires on")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        reuse_freed_memory()  # as crosscoder.train does on CPU
    size = 2048 if device.type == "cpu" else 8192
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    print(
        f"{'S':>3} {'d':>4} {'ratio':>5} {'F':>6} {'method':>9} {'dtype':>9} {'tokens/s':>9} {'GFLOP/s':>8} "
        f"{'matmul GFLOP/s':>14} {'share':>6} {'active':>7}"
    )
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        before = matmul_rate(dtype, device, size)
        rows = []
        for shape in SHAPES:
            for method in args.methods.split(","):
                seconds, active = step_seconds(shape, method, dtype, device, args.batch_size, args.steps, args.firing)
                rows.append((shape, method, seconds, active))
        reference = max(before, matmul_rate(dtype, device, size))
        for (n_snapshots, d_model, ratio), method, seconds, active in rows:
            n_features = ratio * d_model
            flops = 10 * n_snapshots * d_model * n_features * args.batch_size / seconds
            print(
                f"{n_snapshots:>3} {d_model:>4} {ratio:>5} {n_features:>6} {method:>9} {dtype_name:>9} "
                f"{args.batch_size / seconds:>9.0f} {flops / 1e9:>8.0f} {reference / 1e9:>14.0f} {flops / reference:>6.2f} {active:>7.3f}"
            )


if __name__ == "__main__":
    main()
