"""The typed configuration of one trial: the single source of the sweepable keys, their types and checks.

A search-space file maps these keys (flat: the crosscoder's keys sit beside the study's) to values;
``study.sweep.search_space`` validates every value through ``check_key`` and every grid point through
``TrialConfig.from_flat``. Each key's check follows from its type (a ``Literal`` lists its values) and its
``minimum``; its one default is in ``search_spaces/defaults.yaml`` (study keys) or ``CrossCoderConfig``.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal, NamedTuple

from crosscoder.config import CrossCoderConfig, InputError
from study.errors import StudyInputError

SnapshotPlacement = Literal["log", "uniform"]
ActivationMode = Literal["cache", "stream"]
AttributionBaseline = Literal["zero", "corrupted"]
RelieSpan = Literal["emergence", "learned"]
RelieSnapshots = Literal[2, 3]

TRIAL_SET_KEYS = ("device", "checkpoint_every", "checkpoint_dir")
"""CrossCoderConfig fields the trial sets itself; a search space cannot."""
CROSSCODER_KEYS = tuple(field.name for field in fields(CrossCoderConfig) if field.name not in TRIAL_SET_KEYS)
"""Crosscoder keys a search space may set; those it leaves out take CrossCoderConfig's defaults."""


class AtLeast(NamedTuple):
    """The lowest value of an integer key, which ``check_key`` enforces (``Annotated[int, AtLeast(2)]``)."""

    minimum: int


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs: which activations, which crosscoder, which causal analyses."""

    trajectory: str
    """embedded, planted, a folder of step<N>/ checkpoints, a hub model id, planted:NAME, or frozen:SPEC / shuffled:SPEC / reversed:SPEC."""
    revisions: list[str] | None
    """Hub revisions; None takes the trajectory's own list."""
    n_snapshots: Annotated[int, AtLeast(2)]
    """Snapshots the crosscoder spans, always the first and the last."""
    snapshot_placement: SnapshotPlacement
    """log (dense early, like Pythia's schedule) or uniform (even in steps)."""
    layer: Annotated[int, AtLeast(0)]
    """0 = embeddings, l = the residual stream after block l."""
    corpus: str
    """embedded, or a .txt / .jsonl / .parquet file."""
    n_tokens: Annotated[int, AtLeast(1)]
    """Activation rows per snapshot."""
    context_length: Annotated[int, AtLeast(2)]
    """Tokens per packed context."""
    data_seed: Annotated[int, AtLeast(0)]
    """Seed of the token sample."""
    activation_mode: ActivationMode
    """cache: extracted once by Ray Data and read from disk; stream: computed in the trial, never written."""
    held_out_shards: Annotated[int, AtLeast(1)]
    """Shards of the activation cache kept out of training for the metrics and statistics."""
    task_items: Annotated[int, AtLeast(1)]
    """Agreement prompts per condition (4 conditions) for the causal analyses."""
    attribution_baseline: AttributionBaseline
    """zero (codes and error set to zero) or corrupted (the prompt with the other subject number)."""
    attribution_steps: Annotated[int, AtLeast(1)]
    """Integrated-gradient steps."""
    relie_snapshots: RelieSnapshots
    """Snapshots RelIE compares: 2 or 3."""
    relie_span: RelieSpan
    """emergence: from the last snapshot before the task is learned on; learned: learned snapshots only."""
    crosscoder: CrossCoderConfig
    """The crosscoder and its training; its keys sit flat beside the study's in a search space."""

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrialConfig:
        """The trial of a flat key -> value mapping (a grid point, a Tune config)."""
        for key, value in values.items():
            check_key("trial", key, value)
        missing = [key for key in STUDY_KEYS if key not in values]
        if missing:
            raise StudyInputError(f"the trial lacks {', '.join(missing)}; give them in search_spaces/defaults.yaml")
        try:
            crosscoder = CrossCoderConfig(**{key: values[key] for key in CROSSCODER_KEYS if key in values})
        except InputError as error:
            raise StudyInputError(f"crosscoder settings: {error}") from None
        return cls(**{key: values[key] for key in STUDY_KEYS}, crosscoder=crosscoder)


STUDY_KEYS = tuple(item.name for item in fields(TrialConfig) if item.name != "crosscoder")
"""The study's own keys, each given by search_spaces/defaults.yaml."""
ANNOTATED = typing.get_type_hints(TrialConfig, include_extras=True)
MINIMUM = {key: hint.__metadata__[0].minimum for key, hint in ANNOTATED.items() if typing.get_origin(hint) is Annotated}
"""The lowest value of each bounded integer key."""
HINTS = typing.get_type_hints(TrialConfig) | typing.get_type_hints(CrossCoderConfig)


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` names (plain types, unions, lists, tuples and Literal)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(value == option and type(value) is type(option) for option in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str) and bool(value)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(entry, item) for entry in value)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(typing.get_args(hint))
    return isinstance(value, hint)


def expected(key: str) -> str:
    """What a valid value of ``key`` is, as an error message says it."""
    hint = HINTS[key]
    if typing.get_origin(hint) is Literal:
        return " or ".join(str(option) for option in typing.get_args(hint))
    if key in MINIMUM:
        return f"an integer >= {MINIMUM[key]}"
    if hint is str:
        return "a non-empty string"
    return str(hint).replace("typing.", "")


def check_key(source: str, key: str, value: Any) -> None:
    """Raise naming ``source`` and ``key`` unless ``value`` is a valid value of ``key``."""
    if key not in STUDY_KEYS and key not in CROSSCODER_KEYS:
        raise StudyInputError(
            f"{source}: unknown key '{key}'; valid keys: {', '.join((*STUDY_KEYS, *CROSSCODER_KEYS))}"
        )
    if not _matches(value, HINTS[key]) or (key in MINIMUM and value < MINIMUM[key]):
        raise StudyInputError(f"{source}: {key} = {value!r} is invalid; expected {expected(key)}")
    if key in STUDY_KEYS:
        return
    try:
        CrossCoderConfig(**{key: value})
    except InputError as error:
        raise StudyInputError(f"{source}: {key} = {value!r} is invalid; {error}") from None
