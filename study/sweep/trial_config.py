"""The typed configuration of one trial: the single source of the sweepable keys and their checks.

A search-space file maps these keys (flat: the crosscoder's keys sit beside the study's) to values;
``search_space`` validates every value through ``check_key`` and every grid point through
``TrialConfig.from_flat``, and ``search_spaces/defaults.yaml`` must give every study key.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

from crosscoder.config import CrossCoderConfig, InputError
from study.analysis.attribution import BASELINES
from study.errors import StudyInputError

TRIAL_SET_KEYS = ("device", "checkpoint_every", "checkpoint_dir")
"""CrossCoderConfig fields the trial sets itself; a search space cannot."""
CROSSCODER_KEYS = tuple(field.name for field in fields(CrossCoderConfig) if field.name not in TRIAL_SET_KEYS)
"""Crosscoder keys a search space may set; those it leaves out take CrossCoderConfig's defaults."""


def _integer(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


STUDY_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "trajectory": (lambda v: isinstance(v, str) and bool(v), "embedded, a folder or a hub model id"),
    "revisions": (
        lambda v: v is None or (isinstance(v, list) and all(isinstance(r, str) for r in v)),
        "null or a list of revision names",
    ),
    "n_snapshots": (lambda v: _integer(v, 2), "an integer >= 2"),
    "snapshot_placement": (lambda v: v in ("log", "uniform"), "log or uniform"),
    "layer": (lambda v: _integer(v, 0), "an integer >= 0"),
    "corpus": (lambda v: isinstance(v, str) and bool(v), "embedded or a file path"),
    "n_tokens": (lambda v: _integer(v, 1), "a positive integer"),
    "context_length": (lambda v: _integer(v, 2), "an integer >= 2"),
    "data_seed": (lambda v: _integer(v, 0), "an integer >= 0"),
    "activation_mode": (lambda v: v in ("cache", "stream"), "cache or stream"),
    "held_out_shards": (lambda v: _integer(v, 1), "a positive integer"),
    "task_items": (lambda v: _integer(v, 1), "a positive integer"),
    "attribution_baseline": (lambda v: v in BASELINES, " or ".join(BASELINES)),
    "attribution_steps": (lambda v: _integer(v, 1), "a positive integer"),
    "relie_snapshots": (lambda v: v in (2, 3), "2 or 3"),
    "relie_span": (lambda v: v in ("emergence", "learned"), "emergence or learned"),
}
"""Each study key: its check and what it expects, as the error message says it."""


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs: which activations, which crosscoder, which causal analyses."""

    trajectory: str
    """embedded, a folder of step<N>/ checkpoints, or a hub model id."""
    revisions: list[str] | None
    """Hub revisions; None takes the trajectory's own list."""
    n_snapshots: int
    """Snapshots the crosscoder spans, always the first and the last."""
    snapshot_placement: str
    """log (dense early, like Pythia's schedule) or uniform (even in steps)."""
    layer: int
    """0 = embeddings, l = the residual stream after block l."""
    corpus: str
    """embedded, or a .txt / .jsonl / .parquet file."""
    n_tokens: int
    """Activation rows per snapshot."""
    context_length: int
    """Tokens per packed context."""
    data_seed: int
    """Seed of the token sample."""
    activation_mode: str
    """cache: extracted once by Ray Data and read from disk; stream: computed in the trial, never written."""
    held_out_shards: int
    """Shards of the activation cache kept out of training for the metrics and statistics."""
    task_items: int
    """Agreement prompts per condition (4 conditions) for the causal analyses."""
    attribution_baseline: str
    """zero (codes and error set to zero) or corrupted (the prompt with the other subject number)."""
    attribution_steps: int
    """Integrated-gradient steps."""
    relie_snapshots: int
    """Snapshots RelIE compares: 2 or 3."""
    relie_span: str
    """emergence: from the last snapshot before the task is learned on; learned: learned snapshots only."""
    crosscoder: CrossCoderConfig
    """The crosscoder and its training; its keys sit flat beside the study's in a search space."""

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrialConfig:
        """The trial of a flat key -> value mapping (a grid point, a Tune config)."""
        for key, value in values.items():
            check_key("trial", key, value)
        missing = [key for key in STUDY_CHECKS if key not in values]
        if missing:
            raise StudyInputError(f"the trial lacks {', '.join(missing)}; give them in search_spaces/defaults.yaml")
        try:
            crosscoder = CrossCoderConfig(**{key: values[key] for key in CROSSCODER_KEYS if key in values})
        except InputError as error:
            raise StudyInputError(f"crosscoder settings: {error}") from None
        return cls(**{key: values[key] for key in STUDY_CHECKS}, crosscoder=crosscoder)


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` names (the plain types, unions and Literal of CrossCoderConfig)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(typing.get_args(hint))
    return isinstance(value, hint)


CROSSCODER_HINTS = typing.get_type_hints(CrossCoderConfig)


def check_key(source: str, key: str, value: Any) -> None:
    """Raise naming ``source`` and ``key`` unless ``value`` is a valid value of ``key``."""
    if key in STUDY_CHECKS:
        check, expected = STUDY_CHECKS[key]
        if not check(value):
            raise StudyInputError(f"{source}: {key} = {value!r} is invalid; expected {expected}")
        return
    if key not in CROSSCODER_KEYS:
        raise StudyInputError(
            f"{source}: unknown key '{key}'; valid keys: {', '.join((*STUDY_CHECKS, *CROSSCODER_KEYS))}"
        )
    hint = CROSSCODER_HINTS[key]
    if not _matches(value, hint):
        expected = (
            " / ".join(typing.get_args(hint))
            if typing.get_origin(hint) is Literal
            else str(hint).replace("typing.", "")
        )
        raise StudyInputError(f"{source}: {key} = {value!r} is invalid; expected {expected}")
    try:
        CrossCoderConfig(**{key: value})
    except InputError as error:
        raise StudyInputError(f"{source}: {key} = {value!r} is invalid; {error}") from None
