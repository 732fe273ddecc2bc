"""Where one training step's time goes, phase by phase, timed by the wall clock inside real steps.

    python bench/step_phases.py [--device cuda] [--dtype bfloat16] [--method jumprelu]
                                [--shape 2x768x24576x512] [--density 0.01] [--mode auto|dense|sparse] [--steps 5]

The torch profiler's self time per operator (``bench/step_profile.py``) names the operators, but on a
2-core CPU the memory-bound ones are charged unevenly from run to run. This times whole phases of
``crosscoder.trainer.training_step`` instead, on the crosscoder of ``bench/crosscoder_throughput.py``:
each function the model's forward calls by name (``crosscoder.model``'s encoder, decoder norms,
sparsity function, active pairs and decoding) is wrapped in a timer, the tensors they return are
hooked so that backward reports when each gradient arrives, and Adam's step is timed on its own. It
prints each phase's median over the timed steps, after two warm-up steps.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import defaultdict

import torch
from crosscoder_throughput import model_in_mode, one_step_parser, synchronize

import crosscoder.model
from crosscoder import CrossCoder
from crosscoder.trainer import training_step

# Module-level functions of crosscoder.model that its forward calls, and the methods of CrossCoder it calls.
FORWARD_FUNCTIONS = ("encode", "decoder_and_norms", "jumprelu", "shared_entries", "active_pairs")
FORWARD_METHODS = ("encode", "decode_sparse", "decode_dense")


class PhaseClock:
    """One step's events, each with the name of the phase it ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events: list[tuple[str, float]] = []

    def end(self, phase: str) -> None:
        synchronize(self.device)
        self.events.append((phase, time.perf_counter()))

    def timed(self, name: str, function):
        """``function``, its run a phase of its own, the wait for its output's gradient another."""

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            self.end("forward: the rest (loss, casts, schedules)")
            result = function(*args, **kwargs)
            self.end(f"forward: {name}")
            output = result
            while isinstance(output, tuple):  # (entries, frequency), entries, (reconstruction, codes), ...
                output = output[0]
            if output.requires_grad:
                output.register_hook(lambda _: self.end(f"backward: until the gradient of {name}'s output"))
            return result

        return wrapper

    def durations(self) -> dict[str, float]:
        """Seconds per phase in this step."""
        totals: dict[str, float] = defaultdict(float)
        for (_, before), (phase, at) in zip(self.events, self.events[1:], strict=False):
            totals[phase] += at - before
        return totals


def main() -> None:
    parser = one_step_parser(__doc__.split("\n\n")[0], shape="2x768x24576x512", mode="sparse")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    timed, batch, optimizer = model_in_mode(args)

    clock = PhaseClock(device)
    for name in FORWARD_FUNCTIONS:
        setattr(crosscoder.model, name, clock.timed(name, getattr(crosscoder.model, name)))
    for name in FORWARD_METHODS:
        setattr(CrossCoder, name, clock.timed(f"CrossCoder.{name}", getattr(CrossCoder, name)))
    for name, parameter in timed.named_parameters():
        parameter.register_post_accumulate_grad_hook(
            lambda _, name=name: clock.end(f"backward: until {name}'s gradient")
        )
    backward, adam_step = torch.Tensor.backward, optimizer.step

    def timed_backward(tensor, *args, **kwargs):
        clock.end("forward: the rest (loss, casts, schedules)")
        backward(tensor, *args, **kwargs)
        clock.end("backward: after the last gradient")

    def timed_adam_step(*args, **kwargs):
        clock.end("between backward and Adam")
        result = adam_step(*args, **kwargs)
        clock.end("Adam's step")
        return result

    torch.Tensor.backward, optimizer.step = timed_backward, timed_adam_step
    per_step: list[dict[str, float]] = []
    for index in range(2 + args.steps):
        clock.events.clear()
        clock.end("")
        training_step(timed, optimizer, batch, step=500)
        clock.end("after Adam")
        if index >= 2:  # warm-up
            per_step.append(clock.durations())
    torch.Tensor.backward = backward

    phases = list(per_step[-1])
    total = statistics.median(sum(step.values()) for step in per_step)
    print(f"{args.method} {args.dtype} {args.mode} at {args.shape}, density {args.density}, on {device}")
    print(f"medians over {args.steps} steps; the whole step {total * 1e3:.1f} ms")
    for phase in phases:
        median = statistics.median(step.get(phase, 0.0) for step in per_step)
        print(f"  {median * 1e3:8.1f} ms  {median / total:6.1%}  {phase}")


if __name__ == "__main__":
    main()
