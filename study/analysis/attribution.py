"""Causal analyses of one snapshot: integrated-gradient attribution of a task metric to crosscoder
features (and the reconstruction error), ablation curves, and the relative indirect effect (RelIE).

The residual stream at the crosscoder's layer is written as x = codes @ decoder + bias + error
(``crosscoder.SnapshotTerms``), at positions 1 onwards as the crosscoder was trained. A baseline
gives other codes and error (zero, or those of a corrupted prompt); attribution integrates the
metric's gradient along the straight path from the baseline's terms to the clean ones, so the
feature effects plus the error effect add up to metric(clean) - metric(baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from study.activations.residual import residual_replaced
from study.errors import StudyInputError
from study.lm.agreement import encode_items
from study.lm.grammar import AgreementItem, flip_subject_number


class Task(NamedTuple):
    """Prompts, their corrupted counterparts (same length, the answer flipped), and a metric on the logits.

    Any task fits: the metric maps logits [items, length, vocab] to one number per item, larger
    meaning the model does the task better."""

    input_ids: torch.Tensor
    """[items, length]"""
    corrupted_ids: torch.Tensor
    """[items, length]; position 0 must equal input_ids' (it is never replaced)."""
    metric: Callable[[torch.Tensor], torch.Tensor]


def agreement_task(items: list[AgreementItem], tokenizer: PreTrainedTokenizerBase) -> Task:
    """Subject-verb agreement: the metric is the logit difference, agreeing verb minus the other form;
    the corrupted prompt has the subject in the other number."""
    clean = encode_items(items, tokenizer)
    corrupted = encode_items([flip_subject_number(item) for item in items], tokenizer)
    if clean.input_ids.shape != corrupted.input_ids.shape or not torch.equal(
        clean.last_position, corrupted.last_position
    ):
        raise StudyInputError(
            "the tokenizer splits a subject noun differently in its two numbers; the corrupted baseline needs equal "
            "lengths, use --set attribution_baseline=zero"
        )
    rows = torch.arange(len(items))

    def logit_difference(logits: torch.Tensor) -> torch.Tensor:
        final = logits[rows, clean.last_position.to(logits.device)]
        return final[rows, clean.correct_token.to(logits.device)] - final[rows, clean.wrong_token.to(logits.device)]

    return Task(clean.input_ids, corrupted.input_ids, logit_difference)


def planted_task(task: dict, items: int) -> Task:
    """The task a planted trajectory's truth describes (``study.lm.planted_task``): prompts of its first token and
    a class token, the metric the logit difference of the right answer over the other, the corrupted prompt the
    same with a class token of the other class. ``items`` prompts at most, the two classes in turn."""
    tokens, classes = task["prompt_tokens"], task["classes"]
    by_class = {sign: [token for token, c in zip(tokens, classes) if c == sign] for sign in (1, -1)}
    count = min(items, 2 * min(len(by_class[1]), len(by_class[-1])))
    chosen = [by_class[1 if index % 2 == 0 else -1][index // 2] for index in range(count)]
    other = [by_class[-1 if index % 2 == 0 else 1][index // 2] for index in range(count)]
    signs = torch.tensor([1.0 if index % 2 == 0 else -1.0 for index in range(count)])
    first = task["first_token"]
    clean = torch.tensor([[first, token] for token in chosen])
    corrupted = torch.tensor([[first, token] for token in other])
    right, wrong = task["answers"]

    def logit_difference(logits: torch.Tensor) -> torch.Tensor:
        final = logits[:, -1]
        return signs.to(final.device) * (final[:, right] - final[:, wrong])

    return Task(clean, corrupted, logit_difference)


class Terms(NamedTuple):
    """One snapshot's residual stream at the layer, positions 1 onwards, split by the crosscoder."""

    codes: torch.Tensor
    """[items, positions, F]"""
    error: torch.Tensor
    """[items, positions, d]"""


class Attribution(NamedTuple):
    """Integrated gradients of the mean task metric, from the baseline's terms to the clean ones."""

    item_effects: torch.Tensor
    """[items, F] each feature's indirect effect through each prompt (prompts never mix: a prompt's metric has
    no gradient through another's stream), so features can be ranked on some prompts and tested on others."""
    error_effect: float
    """The reconstruction error's share."""
    clean_values: torch.Tensor
    """[items] the metric of each clean prompt."""
    baseline_values: torch.Tensor
    """[items] the metric of each prompt at the baseline's terms."""

    @property
    def feature_effects(self) -> torch.Tensor:
        """[F] each feature's indirect effect on the mean metric (its share of metric(clean) - metric(baseline))."""
        return self.item_effects.sum(0)

    @property
    def clean_metric(self) -> float:
        return self.clean_values.mean().item()

    @property
    def baseline_metric(self) -> float:
        return self.baseline_values.mean().item()

    @property
    def accuracy(self) -> float:
        """Share of items whose clean metric is positive (for agreement: the agreeing verb is preferred)."""
        return (self.clean_values > 0).float().mean().item()


class AblationCurves(NamedTuple):
    """The task metric per prompt with features changed to their baseline values, error kept clean."""

    ks: list[int]
    ablated: list[torch.Tensor]
    """[items] per k: the top-k features set to their baseline value, the rest clean."""
    kept: list[torch.Tensor]
    """[items] per k: only the top-k features clean, the rest at their baseline value."""


class SnapshotModel:
    """One snapshot's language model on the task, with the residual stream at ``layer`` replaceable."""

    def __init__(self, model: PreTrainedModel, layer: int, task: Task, decoder: torch.Tensor, bias: torch.Tensor):
        self.model, self.layer, self.task = model, layer, task
        self.device = next(model.parameters()).device
        self.decoder = decoder.to(self.device)  # [F, d], raw units
        self.bias = bias.to(self.device)  # [d]
        model.requires_grad_(False)

    def residual(self, codes: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        return codes.to(self.device) @ self.decoder + self.bias + error.to(self.device)

    def metric(self, residual: torch.Tensor) -> torch.Tensor:
        """[items] task metric with positions 1 onwards of the layer's stream set to ``residual``."""

        def splice(hidden: torch.Tensor) -> torch.Tensor:
            return torch.cat([hidden[:, :1], residual.to(hidden.dtype)], 1)

        with residual_replaced(self.model, self.layer, splice):
            logits = self.model(input_ids=self.task.input_ids.to(self.device)).logits.float()
        return self.task.metric(logits)

    def integrated_gradients(self, clean: Terms, baseline: Terms, steps: int) -> Attribution:
        """Midpoint Riemann sum over ``steps`` points of the path; the gradient is taken with respect
        to the residual stream, and a feature's effect is its code change times the gradient's
        component along its decoder direction (exact, the decoder being linear)."""
        clean_residual = self.residual(*clean)
        baseline_residual = self.residual(*baseline)
        gradient_sum = torch.zeros_like(clean_residual)
        for step in range(steps):
            alpha = (step + 0.5) / steps
            point = (baseline_residual + alpha * (clean_residual - baseline_residual)).requires_grad_(True)
            with torch.enable_grad():
                (gradient,) = torch.autograd.grad(self.metric(point).mean(), point)
            gradient_sum += gradient
        mean_gradient = gradient_sum / steps  # [items, positions, d]
        code_change = (clean.codes - baseline.codes).to(self.device)
        item_effects = torch.einsum("ipf,ipf->if", code_change, mean_gradient @ self.decoder.T)
        error_effect = ((clean.error - baseline.error).to(self.device) * mean_gradient).sum()
        with torch.no_grad():
            clean_values = self.metric(clean_residual).cpu()
            baseline_values = self.metric(baseline_residual).cpu()
        return Attribution(item_effects.cpu(), error_effect.item(), clean_values, baseline_values)

    @torch.no_grad()
    def ablation_curves(self, clean: Terms, baseline: Terms, ranking: torch.Tensor, ks: list[int]) -> AblationCurves:
        """``ranking`` [F]: feature indices, most important first."""
        ablated, kept = [], []
        for k in ks:
            top = ranking[:k].to(clean.codes.device)
            codes = clean.codes.clone()
            codes[..., top] = baseline.codes[..., top]
            ablated.append(self.metric(self.residual(codes, clean.error)).cpu())
            codes = baseline.codes.clone()
            codes[..., top] = clean.codes[..., top]
            kept.append(self.metric(self.residual(codes, clean.error)).cpu())
        return AblationCurves(list(ks), ablated, kept)


def relative_indirect_effect(effects: torch.Tensor) -> torch.Tensor:
    """RelIE [F, n] from indirect effects [F, n] at n snapshots: abs(IE_s) / sum_t abs(IE_t), the
    share of a feature's effect that belongs to snapshot s (for two snapshots the papers'
    abs(IE_b) / (abs(IE_a) + abs(IE_b)); one against the rest for three); 1/n where all are zero."""
    magnitude = effects.abs()
    total = magnitude.sum(1, keepdim=True)
    return torch.where(
        total > 0, magnitude / total.clamp_min(1e-30), torch.full_like(magnitude, 1.0 / effects.shape[1])
    )
