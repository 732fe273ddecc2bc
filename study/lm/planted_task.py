"""A task on the planted trajectory, whose answer the logits read through planted features, so that the causal
claims have a known answer.

Prompts are two tokens, any first token and then a *class token*; the model should prefer answer token ``a``
after a class-A token and ``b`` after a class-B one (a two-way task in the spirit of subject-verb agreement).
From ``task_onset`` on, the final layer norm passes the residual stream and the two answer tokens' unembedding
rows are ``+u`` and ``-u``, so the logit difference reads the residual along ``u``:

* ``sparse``: a few task features (half for each class), each alone in a dimension reserved for it (every other
  feature is planted orthogonal to those dimensions), on the class tokens from the onset; ``u`` reads exactly
  them, so ablating them removes the task and keeping them alone restores it;
* ``dense``: no task features; ``u`` is a signed mixture of every shared feature's direction and a token's class
  is the sign of its embedding along ``u``, so the task is spread over many features and no small set carries it.

Before the onset ``u`` is zero: the task is not learned there (accuracy 0).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from study.record import CUT_OFFS, TOP_FEATURES, ablate_count, keep_count

TaskKind = Literal["none", "sparse", "dense"]


class TaskPlan(NamedTuple):
    """Which tokens ask what, and which features carry the answer."""

    prompt_tokens: list[int]
    """The class tokens prompts end with."""
    classes: list[int]
    """+1 where the right answer is ``answers[0]``, -1 where it is ``answers[1]``."""
    answers: tuple[int, int]
    first_token: int
    """The prompts' first token (never replaced by the causal analyses)."""
    features: list[int]
    """The planted features carrying the task (sparse); empty for dense."""


def reserve_task_dimensions(decoder: torch.Tensor, count: int) -> torch.Tensor:
    """Every feature's decoder with dimensions 1..count zeroed, each vector kept at its norm: those dimensions are
    the task features' own (dimension 0 carries the unigram phase)."""
    norms = decoder.norm(dim=-1, keepdim=True)
    cleared = decoder.clone()
    cleared[..., 1 : count + 1] = 0
    return cleared * (norms / cleared.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def class_tokens(frequency: torch.Tensor, coefficients: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` most frequent tokens that carry two features (shared ones: a token-specific feature is its
    token's only one), not the most frequent, which starts every prompt."""
    carried = (coefficients != 0).sum(0) >= 2
    by_frequency = frequency.argsort(descending=True)
    return by_frequency[carried[by_frequency]][1 : count + 1]


def add_sparse_task(
    coefficients: torch.Tensor,
    decoder: torch.Tensor,
    frequency: torch.Tensor,
    steps: tuple[int, ...],
    onset: int,
    n_features: int,
    n_tokens: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(coefficients, decoder, task features) with ``n_features`` task features appended: half for class A, half
    for B, each in a dimension of its own, present from ``onset``, on the first ``n_tokens`` class tokens in turn.

    A class token carries its task feature only: beside a token's shared features, a crosscoder absorbs part of the
    task direction into features of those tokens' combinations (measured: a dozen features at cosine 0.4-0.5 with
    it, holding 40 % of the task's effect), and then no small set of its features carries the task, whatever the
    planted one does."""
    tokens = class_tokens(frequency, coefficients, n_tokens)
    coefficients = coefficients.clone()
    coefficients[:, tokens] = 0
    decoder = reserve_task_dimensions(decoder, n_features)
    first = len(coefficients)
    task_coefficients = torch.zeros(n_features, coefficients.shape[1], dtype=coefficients.dtype)
    for index, token in enumerate(tokens.tolist()):
        per_class = n_features // 2
        feature = (index % 2) * per_class + (index // 2) % per_class  # even tokens class A, odd class B
        task_coefficients[feature, token] = 0.75 + 0.5 * float(torch.rand((), generator=generator))
    task_decoder = torch.zeros(n_features, len(steps), decoder.shape[-1], dtype=decoder.dtype)
    present = torch.tensor([step >= onset for step in steps], dtype=decoder.dtype)
    for feature in range(n_features):
        task_decoder[feature, :, feature + 1] = present
    return (
        torch.cat([coefficients, task_coefficients]),
        torch.cat([decoder, task_decoder]),
        list(range(first, first + n_features)),
    )


def sparse_readout(dimension: int, n_features: int) -> torch.Tensor:
    """[d] u: plus along class A's task dimensions, minus along class B's."""
    readout = torch.zeros(dimension, dtype=torch.float64)
    readout[1 : n_features // 2 + 1] = 1.0
    readout[n_features // 2 + 1 : n_features + 1] = -1.0
    return readout / readout.norm()


def dense_readout(decoder: torch.Tensor, n_shared: int, snapshot: int, seed: int) -> torch.Tensor:
    """[d] u at ``snapshot``: the shared features' directions there with seeded random signs, dimension 0 out."""
    signs = torch.randint(0, 2, (n_shared,), generator=torch.Generator().manual_seed(seed + 7)).double() * 2 - 1
    directions = decoder[:n_shared, snapshot]
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    readout = (signs[:, None] * directions).sum(0)
    readout[0] = 0
    return readout / readout.norm()


def task_plan(
    kind: TaskKind,
    coefficients: torch.Tensor,
    decoder: torch.Tensor,
    frequency: torch.Tensor,
    readout: torch.Tensor,
    features: list[int],
    n_tokens: int,
) -> TaskPlan:
    """The prompts: for sparse, the class tokens of the task features; for dense, the tokens whose last-snapshot
    embedding lies furthest along ``readout``, each of the class its sign says."""
    by_frequency = frequency.argsort(descending=True)
    answers = (int(by_frequency[-1]), int(by_frequency[-2]))  # rare tokens, outside every prompt
    if kind == "sparse":
        carriers = coefficients[features]
        tokens = carriers.abs().sum(0).nonzero().squeeze(1)
        half = len(features) // 2
        classes = [1 if bool(carriers[:half, token].abs().sum() > 0) else -1 for token in tokens.tolist()]
    else:
        along = (coefficients.T @ decoder[:, -1]) @ readout
        candidates = class_tokens(frequency, coefficients, 2 * n_tokens)
        # The most frequent of the clearer half: clear enough to be learned, spread over every shared feature.
        clear = along[candidates].abs() >= along[candidates].abs().median()
        tokens = candidates[clear][:n_tokens]
        classes = [1 if float(along[token]) > 0 else -1 for token in tokens.tolist()]
    return TaskPlan(tokens.tolist(), classes, answers, int(by_frequency[0]), features)


def task_truth(plan: TaskPlan, coefficients: torch.Tensor, decoder: torch.Tensor, readout: torch.Tensor) -> dict:
    """What the causal analyses should read at the last snapshot: each planted feature's share of the task's logit
    difference (linear, before the final layer norm), and with it the metric left with the top features ablated
    and kept with only the top ones, as many as the causal claim changes in a dictionary the planted one's size."""
    classes = torch.tensor(plan.classes, dtype=torch.float64)
    along = decoder[:, -1] @ readout  # [F] each feature's push along u
    effects = (coefficients[:, plan.prompt_tokens] * classes).mean(1) * along
    ranked = effects.sort(descending=True).values
    total = float(effects.sum())
    left = 1 - float(ranked[: ablate_count(len(effects))].sum()) / total
    kept = float(ranked[: keep_count(len(effects))].sum()) / total
    return {
        **plan._asdict(),
        "ablate_left": left,
        "keep_recovered": kept,
        "carried_by_few": left < CUT_OFFS.ablate_left_below and kept > CUT_OFFS.keep_recovers_above,
        # As many as carry a sparse task; the top TOP_FEATURES where none does (dense).
        "top_features": effects.argsort(descending=True)[: len(plan.features) or TOP_FEATURES].tolist(),
    }
