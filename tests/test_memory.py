"""A trial's memory, estimated before any trial starts: a trial that cannot fit the largest node is refused with its
estimate and what to lower; one that fits is not. Ray's OOM killer's error is told apart from other failures."""

from __future__ import annotations

import pytest
from ray.exceptions import OutOfMemoryError

from study.errors import StudyInputError
from study.sweep.execute import killed_for_memory
from study.sweep.memory import check_memory, snapshot_weight_bytes, trial_memory
from study.sweep.plan import plan_sweep
from study.trial_config import TrialConfig


@pytest.fixture
def plan(tiny_trajectory_folder):
    overrides = [f"trajectory={tiny_trajectory_folder}", "n_snapshots=4", "layer=1", "context_length=32"]
    return plan_sweep(
        "expansion_ratio", [*overrides, "n_tokens=4400"], "memory", str(tiny_trajectory_folder.parent.parent)
    )


def estimates(plan, workers: int = 1) -> dict[float, int]:
    ((key, chosen),) = plan.activation_sets.items()
    model_bytes = snapshot_weight_bytes(chosen.request.trajectory)
    return {
        point["expansion_ratio"]: trial_memory(
            point, TrialConfig.from_flat(point), plan.d_models[key], model_bytes, workers
        ).total
        for point in plan.trials
    }


def test_a_trial_that_cannot_fit_the_largest_node_is_refused_with_its_estimate(plan):
    need = estimates(plan)
    assert need[4] < need[8] < need[16]  # more features, more memory
    check_memory(plan, need[16])  # every trial fits
    with pytest.raises(
        StudyInputError,
        match=r"expansion_ratio=16 needs about [\d.]+ GB \(crosscoder .*evaluation .*\), "
        r"more than the largest node's [\d.]+ GB: lower expansion_ratio",
    ):
        check_memory(plan, need[16] - 1)
    assert estimates(plan, workers=2)[16] < need[16]  # split over workers, each holds half the features
    check_memory(plan, estimates(plan, workers=2)[16], workers=2)


def test_ray_s_out_of_memory_error_is_told_apart():
    assert killed_for_memory(OutOfMemoryError("Task was killed due to the node running low on memory."))
    assert killed_for_memory(RuntimeError("worker died: the node is out of memory"))
    assert not killed_for_memory(RuntimeError("loss became nan at step 12"))
