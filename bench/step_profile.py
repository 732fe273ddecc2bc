"""Where one training step's time goes: the torch profiler's table of operators, on any device.

    python bench/step_profile.py [--device cuda] [--dtype bfloat16] [--method jumprelu]
                                 [--shape 8x768x6144x8192] [--density 0.01] [--mode auto|dense|sparse] [--rows 15]

Builds the crosscoder of ``bench/crosscoder_throughput.py`` at the given share of firing codes, runs
three warm-up steps, then profiles three more and prints the operators that took the most time
(self time, device time on CUDA), with each one's share of the total.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from crosscoder_throughput import DTYPES, MODES, model_at_density, synchronize
from torch.profiler import ProfilerActivity, profile

from crosscoder import CrossCoder
from crosscoder.cpu_memory import reuse_freed_memory
from crosscoder.trainer import make_optimizer, training_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--method", default="jumprelu")
    parser.add_argument("--shape", default="8x768x6144x1024", help="SxDxFxBATCH")
    parser.add_argument("--density", type=float, default=0.01, help="share of (token, feature) codes that fire")
    parser.add_argument("--mode", default="auto", choices=MODES)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        reuse_freed_memory()  # as crosscoder.train does on CPU: no page faults on each step's temporaries
    shape = tuple(int(part) for part in args.shape.split("x"))
    model, batch = model_at_density(shape, args.method, DTYPES[args.dtype], device, args.density)
    timed = CrossCoder(shape[0], shape[1], replace(model.config, sparse_step_max_density=MODES[args.mode])).to(device)
    timed.load_state_dict(model.state_dict())
    optimizer = make_optimizer(timed)
    for _ in range(3):
        training_step(timed, optimizer, batch, step=500)
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(3):
            training_step(timed, optimizer, batch, step=500)
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{args.method} {args.dtype} {args.mode} at {args.shape}, density {args.density}, on {device}: 3 steps")
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
