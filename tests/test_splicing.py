"""ΔCE on the tiny trajectory: zero for an exact reconstruction, large for a destroyed one."""

from __future__ import annotations

import pytest
import torch

from study.activations.contexts import sample_contexts
from study.activations.residual import next_token_loss, residual_replaced
from study.analysis.splicing import spliced_loss
from study.lm.trajectory import directory_trajectory, load_model, load_tokenizer


@pytest.fixture(scope="module")
def setting(tiny_trajectory_folder):
    trajectory = directory_trajectory(tiny_trajectory_folder).select(3, "log")
    contexts = sample_contexts(load_tokenizer(trajectory.snapshots[-1]), "embedded", 24, 400, seed=5)
    return trajectory, contexts


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_delta_ce_is_zero_when_the_reconstruction_is_exact(setting, layer):
    trajectory, contexts = setting
    exact = spliced_loss(trajectory.snapshots, contexts, layer, lambda activations: activations.clone())
    assert max(abs(delta) for delta in exact.delta_ce) < 1e-5
    assert exact.clean_loss[-1] < exact.clean_loss[0]  # the trained snapshot predicts better than step 0


def test_delta_ce_is_large_when_the_layer_is_destroyed(setting):
    trajectory, contexts = setting
    generator = torch.Generator().manual_seed(0)
    noise = spliced_loss(
        trajectory.snapshots, contexts, 1, lambda a: a + 10 * a.std() * torch.randn(a.shape, generator=generator)
    )
    assert noise.delta_ce[-1] > 0.5
    # Mixing snapshots up (each snapshot fed another's activations) hurts too: the splice uses the right column.
    rolled = spliced_loss(trajectory.snapshots, contexts, 1, lambda activations: activations.roll(1, dims=1))
    assert rolled.delta_ce[-1] > 0.01  # against < 1e-5 for the right column


def test_identity_replacement_leaves_the_loss_unchanged(setting):
    trajectory, contexts = setting
    model = load_model(trajectory.snapshots[-1])
    clean = next_token_loss(model, contexts)
    for layer in (0, 2):
        with residual_replaced(model, layer, lambda hidden: hidden):
            assert next_token_loss(model, contexts) == pytest.approx(clean, abs=1e-6)
