"""How much memory one trial needs, estimated from its keys before any trial starts, and the refusal of a trial
that cannot fit the largest node of the cluster: Ray's OOM killer would otherwise end it mid-run, MAX_FAILURES
times, with a traceback that names neither the trial nor what to lower."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import ray

from study.errors import StudyInputError
from study.lm.trajectory import Trajectory
from study.sweep.plan import SweepPlan, at_bounds, held_out_tokens
from study.trial_config import TrialConfig

FLOAT = 4
"""Bytes of a float32: weights, gradients, optimizer moments and activations in training."""
PROCESS_BYTES = 1024**3
"""A trial process before its data: Python with torch, transformers, MLflow and Ray imported. With the parts below
it covers the peak RSS measured of the main command's trials (``bench/trial_memory.py``, ``bench/README.md``):
1.36 GiB at x4 and 2.31 to 2.86 GiB at x16 over two runs, estimated 1.48 and 2.74."""
STEP_COPIES = 4
"""Copies of a batch's [B, S, d] a training step holds at once (input, normalised input, reconstruction, error)."""
CODE_COPIES = 3
"""Copies of a batch's codes a step holds at once (pre-activations, codes, their gradient), each [S, B, F] at most:
JumpReLU gates each snapshot apart."""
EVALUATION_ROWS = 4096
"""Held-out rows evaluated at once (``crosscoder.evaluate``, the claim statistics)."""
EVALUATION_COPIES = 5
"""Copies of an evaluation chunk's [S, rows, F] codes alive at once, fitted to the measured peaks: at x16 the
evaluation, not the training step, sets a trial's peak."""


class TrialMemory(NamedTuple):
    """A trial's estimated peak memory, by part (bytes)."""

    crosscoder: int
    """Weights, gradients and Adam's two moments: four float32 copies of the parameters."""
    step: int
    """One training step's batch and codes."""
    evaluation: int
    """One evaluation chunk's codes."""
    held_out: int
    """The held-out activations, kept in float32 for evaluation and every statistic."""
    models: int
    """The snapshot models the causal statistics and ΔCE load (the last one's weights, twice: loaded models are
    kept until another would exceed their cap)."""
    process: int = PROCESS_BYTES

    @property
    def total(self) -> int:
        return sum(self)


def snapshot_weight_bytes(trajectory: Trajectory) -> int:
    """Bytes of the last snapshot's weight files where they are local (a hub revision's are not known here: 0)."""
    folder = Path(trajectory.snapshots[-1].source).expanduser()
    if not folder.is_dir():
        return 0
    return sum(path.stat().st_size for pattern in ("*.safetensors", "*.bin") for path in folder.glob(pattern))


def trial_memory(point: dict, config: TrialConfig, d_model: int, model_bytes: int, workers: int = 1) -> TrialMemory:
    """The estimate for one trial (``point`` its flat keys, ``config`` the same typed) on a model of ``d_model``;
    split over ``workers``, each holds that share of the features (the largest share is what must fit a node)."""
    crosscoder = config.crosscoder
    snapshots, batch = config.n_snapshots, crosscoder.batch_size
    features = -(-crosscoder.n_features(d_model) // workers)
    parameters = 2 * features * snapshots * d_model + 2 * features + snapshots * d_model
    return TrialMemory(
        crosscoder=4 * parameters * FLOAT,
        step=(STEP_COPIES * batch * snapshots * d_model + CODE_COPIES * batch * features * snapshots) * FLOAT,
        evaluation=EVALUATION_COPIES * EVALUATION_ROWS * features * snapshots * FLOAT,
        held_out=held_out_tokens(point) * snapshots * d_model * FLOAT,
        models=2 * model_bytes,
    )


def largest_node_memory() -> int:
    """The largest ``memory`` resource any alive node of the Ray cluster reports (bytes)."""
    return int(max(node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]))


def gigabytes(count: int) -> str:
    return f"{count / 1024**3:.1f} GB"


def check_memory(plan: SweepPlan, available: int, workers: int = 1) -> None:
    """Refuse, before any trial starts, a trial whose estimate exceeds ``available`` bytes (the largest node's),
    naming it, its estimate by part and what to lower."""
    for activation_key, chosen in plan.activation_sets.items():
        model_bytes = snapshot_weight_bytes(chosen.request.trajectory)
        for point in plan.trials:
            if all(point.get(key) == value for key, value in chosen.point.items()):
                for bound in at_bounds(point, plan.space):
                    config = TrialConfig.from_flat(bound)
                    memory = trial_memory(bound, config, plan.d_models[activation_key], model_bytes, workers)
                    if memory.total > available:
                        named = " ".join(f"{key}={bound[key]}" for key in plan.swept) or "the trial"
                        parts = ", ".join(f"{name} {gigabytes(value)}" for name, value in memory._asdict().items())
                        raise StudyInputError(
                            f"{named} needs about {gigabytes(memory.total)} ({parts}), more than the largest node's "
                            f"{gigabytes(available)}: lower expansion_ratio, batch_size or n_tokens, or split the "
                            "crosscoder with --workers-per-trial"
                        )
