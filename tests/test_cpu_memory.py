"""A training step in a thread other than the main one reuses freed memory only in a process started with
one malloc arena, as the sweep starts its Ray workers (their Tune trials train in such a thread)."""

from __future__ import annotations

import os
import subprocess
import sys

from study.ray_runtime import RUNTIME_ENVIRONMENT

# Dense training steps in a thread; prints the fewest page faults of a step after two warm-up steps. The heap
# may still grow in any of the next few steps (with one arena, steps 2 and 3 both faulted in thousands of
# pages in one run of five), so the fewest is taken over six. The [S, B, F] codes of a dense JumpReLU step
# (67.1 MB) are above the 64 MB heaps of a thread's own arena.
THREAD_STEPS = """
import resource, threading, torch
from crosscoder import CrossCoder, CrossCoderConfig
from crosscoder.cpu_memory import reuse_freed_memory
from crosscoder.trainer import make_optimizer, training_step

torch.set_num_threads(1)
faults = []

def train():
    reuse_freed_memory()
    config = CrossCoderConfig(expansion_ratio=512, sparse_step_max_density=0.0, initialization_tokens=64)
    model = CrossCoder(2, 32, config)
    batch = torch.randn(512, 2, 32)
    model.initialize(batch, torch.Generator().manual_seed(0))
    optimizer = make_optimizer(model)
    for step in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        training_step(model, optimizer, batch, step=step)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=train)
thread.start()
thread.join()
print(min(faults[2:]))
"""


def page_faults_of_thread_steps(environment: dict[str, str]) -> int:
    completed = subprocess.run(
        [sys.executable, "-c", THREAD_STEPS], env=environment, capture_output=True, text=True, check=True
    )
    return int(completed.stdout.split()[-1])


def test_a_training_thread_of_a_sweep_worker_faults_in_no_fresh_pages():
    plain = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    as_a_sweep_worker = page_faults_of_thread_steps(plain | RUNTIME_ENVIRONMENT["env_vars"])
    as_a_plain_process = page_faults_of_thread_steps(plain)
    # 4 KB pages: mapping the 67.1 MB codes afresh alone faults in about 16,000 (measured in all: 49,156 and 0).
    assert as_a_sweep_worker < 1_000
    assert as_a_plain_process > 16_000
