"""target_l0: every method trains to the L0 it is asked for, on held-out data, and the same seed still gives the
same weights (the coefficient's controller is part of the run, not noise on it)."""

from __future__ import annotations

import pytest
import torch

from crosscoder import CrossCoderConfig, InputError, fit
from crosscoder.synthetic import planted_features

DATA = planted_features(8000, 3, 32, 96, seed=0).activations  # its own L0 is about 4 features per token


def trained(method: str, target: float, seed: int = 0):
    config = CrossCoderConfig(
        expansion_ratio=4,
        sparsity=method,
        target_l0=target,
        n_steps=1000,
        batch_size=256,
        learning_rate=4e-3,
        seed=seed,
    )
    return fit(DATA[:6000], config, eval_activations=DATA[6000:])


@pytest.mark.parametrize("method, target", [("jumprelu", 3), ("l1", 3), ("topk", 3), ("batchtopk", 3), ("l1", 6)])
def test_every_method_reaches_its_target_l0_on_held_out_data(method, target):
    result = trained(method, target)
    assert result.metrics.l0 == pytest.approx(target, rel=0.1), result.metrics.l0
    if method in ("jumprelu", "l1"):  # the coefficient moved to get there: from its default, over the run
        coefficients = [entry["sparsity_coefficient"] for entry in result.history]
        assert coefficients[-1] != pytest.approx(coefficients[len(coefficients) // 2], rel=1e-3)


def test_the_same_seed_gives_the_same_weights_with_a_target():
    first, second = trained("jumprelu", 3), trained("jumprelu", 3)
    assert torch.equal(first.model.decoder_weight, second.model.decoder_weight)
    assert torch.equal(first.model.sparsity_control, second.model.sparsity_control)
    assert not torch.equal(first.model.decoder_weight, trained("jumprelu", 3, seed=1).model.decoder_weight)


def test_a_target_below_one_feature_is_refused():
    with pytest.raises(InputError, match="target_l0 must be at least 1"):
        CrossCoderConfig(target_l0=0.5)
    assert CrossCoderConfig(sparsity="topk", target_l0=6.4).k == 6  # topk fires the target
