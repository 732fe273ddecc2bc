"""Subject-verb agreement task: does the model prefer the verb form that agrees with the subject?"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from study.errors import StudyInputError
from study.lm.grammar import PLURAL, SINGULAR, AgreementItem, Grammar

CONDITIONS = tuple((number, attractor) for number in (SINGULAR, PLURAL) for attractor in (False, True))


class AgreementBatch(NamedTuple):
    """Tokenised prompts, right-padded, with the two candidate verb tokens of each."""

    input_ids: torch.Tensor
    """[items, length] token ids, the end-of-text token first."""
    last_position: torch.Tensor
    """[items] index of each prompt's last real token."""
    correct_token: torch.Tensor
    """[items] token id of the agreeing verb form."""
    wrong_token: torch.Tensor
    """[items] token id of the other form."""


class AgreementScore(NamedTuple):
    """Agreement accuracy and mean logit difference (correct minus wrong), overall and per condition."""

    accuracy: float
    logit_difference: float
    by_condition: dict[str, tuple[float, float]]
    """``"sg"``, ``"sg+attractor"``, ``"pl"``, ``"pl+attractor"`` -> (accuracy, logit difference)."""


def condition_name(subject_number: str, has_attractor: bool) -> str:
    return subject_number + ("+attractor" if has_attractor else "")


def agreement_items(items_per_condition: int, seed: int = 1234) -> list[AgreementItem]:
    """Prompts in the four conditions, singular / plural subject, with / without an attractor."""
    grammar = Grammar(seed)
    return [
        grammar.agreement_item(number, attractor)
        for number, attractor in CONDITIONS
        for _ in range(items_per_condition)
    ]


def single_token(tokenizer: PreTrainedTokenizerBase, word: str) -> int:
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise StudyInputError(
            f"the verb '{word}' is {len(ids)} tokens for this tokenizer; the agreement task needs single-token verbs"
        )
    return ids[0]


def encode_items(items: list[AgreementItem], tokenizer: PreTrainedTokenizerBase) -> AgreementBatch:
    """Each prompt starts with end-of-text, as a document does in training."""
    prompts = [
        [tokenizer.eos_token_id] + tokenizer(item.prompt, add_special_tokens=False)["input_ids"] for item in items
    ]
    length = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), length), tokenizer.eos_token_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, : len(prompt)] = torch.tensor(prompt)
    return AgreementBatch(
        input_ids=input_ids,
        last_position=torch.tensor([len(prompt) - 1 for prompt in prompts]),
        correct_token=torch.tensor([single_token(tokenizer, item.correct_verb) for item in items]),
        wrong_token=torch.tensor([single_token(tokenizer, item.wrong_verb) for item in items]),
    )


@torch.no_grad()
def logit_differences(model: PreTrainedModel, batch: AgreementBatch) -> torch.Tensor:
    """[items] logit of the agreeing verb minus that of the other form, at the prompt's end.

    Right padding never reaches the last real token under causal attention, so no mask is needed.
    """
    device = next(model.parameters()).device
    logits = model(input_ids=batch.input_ids.to(device)).logits.float().cpu()
    rows = torch.arange(len(batch.input_ids))
    final = logits[rows, batch.last_position]
    return final[rows, batch.correct_token] - final[rows, batch.wrong_token]


def score_agreement(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list[AgreementItem]
) -> AgreementScore:
    differences = logit_differences(model, encode_items(items, tokenizer))
    by_condition = {}
    for number, attractor in CONDITIONS:
        mask = torch.tensor([item.subject_number == number and item.has_attractor == attractor for item in items])
        if mask.any():
            chosen = differences[mask]
            by_condition[condition_name(number, attractor)] = ((chosen > 0).float().mean().item(), chosen.mean().item())
    return AgreementScore(
        accuracy=(differences > 0).float().mean().item(),
        logit_difference=differences.mean().item(),
        by_condition=by_condition,
    )
