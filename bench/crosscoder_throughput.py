"""Crosscoder training throughput: the sparse step against the dense step, measured in one run.

    python bench/crosscoder_throughput.py [--device cpu|cuda] [--dtypes float32,bfloat16]
                                          [--methods jumprelu,l1] [--densities 0.01,0.05,0.1]
                                          [--steps N] [--shapes 8x128x1024x1024,...]
                                          [--window-per-fired 0.8|initial]

For each shape (S snapshots, d_model, n_features, batch), sparsity method, dtype and share of
(token, feature) codes that fire, it times full training steps (``crosscoder.trainer.training_step``:
forward, loss, backward, Adam) on random input in memory three ways in the same process, taking one
step of each in turn:

* dense: the dense reference step (``sparse_step_max_density=0``), every product over all F features;
* sparse: the sparse step forced (``sparse_step_max_density=1``), to show where it stops paying;
* auto: the default, which picks one of the two per step from the measured density.

It prints tokens/s of each (from its fastest step), auto / dense, the dense step's FLOP/s and the auto step's dense-equivalent
FLOP/s (both counted as 10 * S * d * F per token) as shares of the dense matmul rate of the same dtype
measured in the same process, and Adam's share of the auto step. The density is set at initialisation (JumpReLU's thresholds, l1's
encoder bias, TopK's k) and held by a tiny learning rate: Adam's cost does not depend on it.

JumpReLU's step also pays for the zero codes inside its threshold's straight-through window. On this
random input, thresholds set at initialisation put three such cells beside every firing one; the
main command's JumpReLU crosscoders, trained 1,000 steps on the embedded trajectory, have 0.71-0.81
(``python bench/convergence.py`` prints it per trial). So by default the window is narrowed until it
holds ``--window-per-fired`` 0.8 zero cells per firing cell, the cost of a trained crosscoder's step;
``--window-per-fired initial`` keeps the window as initialised.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from crosscoder import CrossCoder, CrossCoderConfig
from crosscoder.cpu_memory import reuse_freed_memory
from crosscoder.sparsity import JumpReLU
from crosscoder.trainer import make_optimizer, training_step

# The shapes of issue 18's table: (S, d_model, n_features, batch).
SHAPES = "8x128x1024x1024,8x768x6144x1024,2x768x24576x512"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = {"dense": 0.0, "sparse": 1.0, "auto": None}  # auto: the device's measured crossover
# Zero codes in JumpReLU's window per firing code, in the main command's trained crosscoders (0.71-0.81).
TRAINED_WINDOW_PER_FIRED = 0.8


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


def model_at_density(
    shape: tuple[int, int, int, int],
    method: str,
    dtype: torch.dtype,
    device: torch.device,
    density: float,
    window_per_fired: float | None = TRAINED_WINDOW_PER_FIRED,
) -> tuple[CrossCoder, torch.Tensor]:
    """A crosscoder whose codes fire on about ``density`` of (token, feature) pairs, and a batch; JumpReLU's
    window holds ``window_per_fired`` zero codes per firing one (None: as initialised)."""
    n_snapshots, d_model, n_features, batch_size = shape
    config = CrossCoderConfig(
        expansion_ratio=n_features / d_model,
        sparsity=method,
        autocast_bf16=dtype == torch.bfloat16,
        batch_size=batch_size,
        k=max(1, round(density * n_features)),
        jumprelu_initial_firing=density,
        learning_rate=1e-9,
        n_steps=1000,
        device=str(device),
    )
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(batch_size, n_snapshots, d_model, generator=generator)
    model = CrossCoder(n_snapshots, d_model, config)
    model.initialize(batch[:512], generator)
    if method == "jumprelu" and window_per_fired is not None:
        narrow_window(model, batch, window_per_fired)
    if method == "l1":  # relu fires wherever pre > 0: shift each feature's bias to its density quantile
        with torch.no_grad():
            pre = model.encode(model.normalise(batch))
            model.encoder_bias.sub_(pre.quantile(1 - density, dim=0))
    return model.to(device), batch.to(device)


def one_step_parser(description: str, shape: str, mode: str) -> argparse.ArgumentParser:
    """The arguments of a bench that looks into one kind of step (``step_profile``, ``step_phases``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--method", default="jumprelu")
    parser.add_argument("--shape", default=shape, help="SxDxFxBATCH")
    parser.add_argument("--density", type=float, default=0.01, help="share of (token, feature) codes that fire")
    parser.add_argument("--mode", default=mode, choices=MODES)
    return parser


def model_in_mode(args: argparse.Namespace) -> tuple[CrossCoder, torch.Tensor, torch.optim.Adam]:
    """The crosscoder ``one_step_parser``'s arguments describe, with its batch and optimizer."""
    device = torch.device(args.device)
    if device.type == "cpu":
        reuse_freed_memory()  # as crosscoder.fit does on CPU: no page faults on each step's temporaries
    shape = tuple(int(part) for part in args.shape.split("x"))
    model, batch = model_at_density(shape, args.method, DTYPES[args.dtype], device, args.density)
    config = replace(model.config, sparse_step_max_density=MODES[args.mode])
    in_mode = CrossCoder(shape[0], shape[1], config).to(device)
    in_mode.load_state_dict(model.state_dict())
    return in_mode, batch, make_optimizer(in_mode)


def window_cells_per_firing(model: CrossCoder, batch: torch.Tensor) -> float:
    """JumpReLU's zero codes inside the threshold's window, per code that fires, on ``batch``."""
    with torch.no_grad():
        pre = model.encode(model.normalise(batch))
        gate = JumpReLU.gate(pre, model.decoder_norms(), model.log_threshold, model.jumprelu_window.item())
    return int((gate.in_window & ~gate.active).sum()) / max(1, int(gate.active.sum()))


@torch.no_grad()
def narrow_window(model: CrossCoder, batch: torch.Tensor, per_fired: float) -> None:
    """Set JumpReLU's window so that on ``batch`` it holds ``per_fired`` zero codes per firing code."""
    pre = model.encode(model.normalise(batch))
    scaled = pre[:, :, None] * model.decoder_norms()  # [B, F, S]: the gated quantity
    gaps = (model.log_threshold.exp()[:, None] - scaled).flatten()  # > 0 below the threshold
    below = gaps[gaps >= 0]
    wanted = min(len(below), max(1, round(per_fired * (len(gaps) - len(below)))))
    # A zero code is in the window when its gap is below half the width.
    model.jumprelu_window.fill_(2 * below.kthvalue(wanted).values.item())


def time_steps(models: dict[str, CrossCoder], batch: torch.Tensor, steps: int) -> dict[str, tuple[float, float, float]]:
    """Per model: the fastest of its timed training steps in seconds, the share of pairs active, and Adam's
    seconds.

    The models take their steps in turn, one each per round after a warm-up round, so that a slower
    spell of a shared machine falls on all of them alike rather than on whichever ran then. The fastest
    step, not the median: a shared machine only ever adds time to the step's own cost, and identical
    steps here varied by up to 1.5x."""
    device = batch.device
    optimizers = {name: make_optimizer(model) for name, model in models.items()}
    times, active = {name: [] for name in models}, {name: [] for name in models}
    for index in range(steps + 1):
        for name, model in models.items():
            synchronize(device)
            started = time.perf_counter()
            result = training_step(model, optimizers[name], batch, step=500)  # mid-run: full rate and coefficient
            synchronize(device)
            if index:
                times[name].append(time.perf_counter() - started)
                active[name].append(result.active.float().mean().item())
    timings = {}
    for name, optimizer in optimizers.items():
        started = time.perf_counter()
        optimizer.step()  # the gradients of the last step are still there
        synchronize(device)
        timings[name] = min(times[name]), statistics.mean(active[name]), time.perf_counter() - started
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--methods", default="jumprelu,l1")
    parser.add_argument("--densities", default="0.01,0.05,0.1", help="shares of (token, feature) codes that fire")
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated SxDxFxBATCH")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per mode, after one warm-up (default: 4 on CPU, 10 on CUDA)",
    )
    parser.add_argument(
        "--window-per-fired",
        default=str(TRAINED_WINDOW_PER_FIRED),
        help="JumpReLU: zero codes in the threshold's window per firing code, or 'initial' (as initialised)",
    )
    args = parser.parse_args()
    window_per_fired = None if args.window_per_fired == "initial" else float(args.window_per_fired)
    device = torch.device(args.device)
    steps = args.steps or (4 if device.type == "cpu" else 10)  # a GPU step takes milliseconds: time more of them
    if device.type == "cpu":
        reuse_freed_memory()  # as crosscoder.fit does on CPU
    shapes = [tuple(int(part) for part in shape.split("x")) for shape in args.shapes.split(",")]
    size = 2048 if device.type == "cpu" else 8192
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"{'S':>2} {'d':>4} {'F':>6} {'batch':>5} {'method':>8} {'dtype':>8} {'active':>6} {'window':>6} "
        f"{'dense tok/s':>11} {'sparse tok/s':>12} {'auto tok/s':>10} {'auto/dense':>10} "
        f"{'dense share of matmul':>21} {'auto share':>10} {'Adam share':>10}"
    )
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        rate = matmul_rate(dtype, device, size)
        print(f"{dtype_name} dense matmul rate: {rate / 1e9:.0f} GFLOP/s", flush=True)  # first: a cut run keeps it
        for shape in shapes:
            n_snapshots, d_model, n_features, batch_size = shape
            for method in args.methods.split(","):
                for density in (float(value) for value in args.densities.split(",")):
                    model, batch = model_at_density(shape, method, dtype, device, density, window_per_fired)
                    window = f"{window_cells_per_firing(model, batch):.2f}" if method == "jumprelu" else "-"
                    models = {}
                    for mode, max_density in MODES.items():
                        timed = replace(model.config, sparse_step_max_density=max_density)
                        models[mode] = CrossCoder(n_snapshots, d_model, timed).to(device)
                        models[mode].load_state_dict(model.state_dict())
                    timings = time_steps(models, batch, steps)
                    seconds = {mode: timing[0] for mode, timing in timings.items()}
                    shares = [timing[1] for timing in timings.values()]
                    adam = timings["auto"][2]
                    step_flops = 10 * n_snapshots * d_model * n_features * batch_size
                    print(
                        f"{n_snapshots:>2} {d_model:>4} {n_features:>6} {batch_size:>5} {method:>8} {dtype_name:>8} "
                        f"{statistics.mean(shares):>6.3f} {window:>6} {batch_size / seconds['dense']:>11.0f} "
                        f"{batch_size / seconds['sparse']:>12.0f} {batch_size / seconds['auto']:>10.0f} "
                        f"{seconds['dense'] / seconds['auto']:>10.2f} {step_flops / seconds['dense'] / rate:>21.2f} "
                        f"{step_flops / seconds['auto'] / rate:>10.2f} "
                        f"{adam / seconds['auto']:>10.2f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
