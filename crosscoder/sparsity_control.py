"""Holding L0 at a target: for the penalised methods (jumprelu, l1) the sparsity coefficient is adapted during
training, for the top-k ones ``k`` is the target itself (``CrossCoderConfig.target_l0``).

A fixed coefficient reaches an L0 that moves with everything else: the dictionary size, the snapshots, the layer,
and the number of steps (JumpReLU's L0 keeps falling for thousands of steps). The controller here is an integral
one on the log scale: after the sparsity warm-up, every step moves log(coefficient) by CONTROL_RATE times
log(running L0 / target), at most MAX_STEP, where the running L0 is an exponential mean over recent
training batches (the whole crosscoder's, on every rank of a split one). The coefficient therefore settles where
the L0 equals the target. A proportional part was tried beside it and left out: a burst of L0 (dead features just
resampled) made it silence the codes.

The controller reads the training batches' L0; a dictionary fires a little more on tokens it was not trained on
(held-out L0 5-10 % above the target on the embedded model's activations, at 17 passes over them). Correcting for
that with a held-out sample was tried and left out: a crosscoder split over workers trains without evaluation data,
and would then no longer train as one process does.

The state is a buffer of the model: checkpoints carry it, a resumed run continues where it stopped, and the same
seed gives the same coefficients and weights.
"""

from __future__ import annotations

import math

import torch

CONTROL_RATE = 0.02
"""Change of log(coefficient) per step per unit of log(L0 / target). JumpReLU's L0 follows its coefficient weakly
and late (its thresholds learn at a tenth of the learning rate), so a slower rate leaves it off target at 1,000
steps; faster, it swings."""
RUNNING_DECAY = 0.9
"""Weight of the running L0 against each new batch's: a mean over about ten batches."""
MAX_STEP = 0.02
"""Largest change of log(coefficient) in one step: a tenfold gap (the codes are dense when the warm-up ends) takes
about 115 steps to close. L1's codes follow the coefficient within tens of steps; at 0.05 they overshot to a
hundredth of the target before coming back (measured on crosscoder.synthetic's planted features)."""


def initial_control(coefficient: float, target_l0: float) -> torch.Tensor:
    """The controller's state [log coefficient, running L0]: at the configured coefficient, on target."""
    return torch.tensor([math.log(coefficient), target_l0], dtype=torch.float64)


def coefficient_of(state: torch.Tensor) -> float:
    return float(state[0].exp())


def adapt(state: torch.Tensor, batch_l0: float, target_l0: float, adapting: bool) -> None:
    """Fold one batch's L0 into the running mean, and (``adapting``: after the warm-up) move the coefficient toward
    the one that holds the target: up where the codes are too dense, down where too sparse. In place."""
    state[1] = RUNNING_DECAY * state[1] + (1 - RUNNING_DECAY) * batch_l0
    if adapting:
        error = math.log(max(float(state[1]), 1e-3) / target_l0)
        state[0] += max(-MAX_STEP, min(MAX_STEP, CONTROL_RATE * error))
