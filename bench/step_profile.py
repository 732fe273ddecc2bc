"""Where one training step's time goes: the torch profiler's table of operators, on any device.

    python bench/step_profile.py [--device cuda] [--dtype bfloat16] [--method jumprelu]
                                 [--shape 8x768x6144x8192] [--density 0.01] [--mode auto|dense|sparse] [--rows 15]

Builds the crosscoder of ``bench/crosscoder_throughput.py`` at the given share of firing codes, runs
three warm-up steps, then profiles three more and prints the operators that took the most time
(self time, device time on CUDA), with each one's share of the total.
"""

from __future__ import annotations

import torch
from crosscoder_throughput import model_in_mode, one_step_parser, synchronize
from torch.profiler import ProfilerActivity, profile

from crosscoder.trainer import training_step


def main() -> None:
    parser = one_step_parser(__doc__.split("\n\n")[0], shape="8x768x6144x1024", mode="auto")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    timed, batch, optimizer = model_in_mode(args)
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
