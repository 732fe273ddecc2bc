"""Sweep axes as YAML in Ray Tune's grammar: loading, validation, and the grid of trials they imply."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Callable

import yaml
from ray import tune

from crosscoder.config import SPARSITY_METHODS
from study.attribution import BASELINES
from study.errors import StudyInputError

SEARCH_SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
DEFAULTS = "defaults"
ACTIVATION_KEYS = ("trajectory", "revisions", "n_snapshots", "snapshot_placement", "layer", "corpus", "n_tokens", "context_length", "data_seed")
SAMPLERS: dict[str, Callable[..., Any]] = {
    "choice": tune.choice,
    "uniform": lambda bounds: tune.uniform(*bounds),
    "loguniform": lambda bounds: tune.loguniform(*bounds),
    "randint": lambda bounds: tune.randint(*bounds),
}
GRAMMAR = ("grid_search", *SAMPLERS)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "trajectory": (lambda v: isinstance(v, str) and bool(v), "embedded, a folder or a hub model id"),
    "revisions": (lambda v: v is None or (isinstance(v, list) and all(isinstance(r, str) for r in v)), "null or a list of revision names"),
    "n_snapshots": (lambda v: _positive_int(v) and v >= 2, "an integer >= 2"),
    "snapshot_placement": (lambda v: v in ("log", "uniform"), "log or uniform"),
    "layer": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "corpus": (lambda v: isinstance(v, str) and bool(v), "embedded or a file path"),
    "n_tokens": (_positive_int, "a positive integer"),
    "context_length": (lambda v: _positive_int(v) and v >= 2, "an integer >= 2"),
    "data_seed": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "expansion_ratio": (_positive_number, "a number > 0"),
    "sparsity": (lambda v: v in SPARSITY_METHODS, " / ".join(SPARSITY_METHODS)),
    "sparsity_coefficient": (lambda v: v is None or (isinstance(v, (int, float)) and v >= 0), "null or a number >= 0"),
    "k": (_positive_int, "a positive integer"),
    "n_steps": (_positive_int, "a positive integer"),
    "batch_size": (_positive_int, "a positive integer"),
    "learning_rate": (_positive_number, "a number > 0"),
    "seed": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "held_out_shards": (_positive_int, "a positive integer"),
    "task_items": (_positive_int, "a positive integer"),
    "attribution_baseline": (lambda v: v in BASELINES, " or ".join(BASELINES)),
    "attribution_steps": (_positive_int, "a positive integer"),
    "relie_snapshots": (lambda v: v in (2, 3), "2 or 3"),
}


def available_axes() -> list[str]:
    return sorted(path.stem for path in SEARCH_SPACES.glob("*.yaml") if path.stem != DEFAULTS)


def read_yaml(path: Path) -> dict:
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise StudyInputError(f"{path.name}{line} is not valid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(values, dict):
        raise StudyInputError(f"{path.name} must map keys to values, got {type(values).__name__}")
    return values


def check_value(source: str, key: str, value: Any) -> None:
    """Raise naming ``source`` and ``key`` unless ``value`` (or every value of a grid / choice) is valid."""
    if key not in CHECKS:
        raise StudyInputError(f"{source}: unknown key '{key}'; valid keys: {', '.join(CHECKS)}")
    check, expected = CHECKS[key]
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in GRAMMAR:
            raise StudyInputError(f"{source}: {key} must be a value or one of {{{', '.join(GRAMMAR)}: ...}}, got {value}")
        (kind, argument), = value.items()
        if key in ACTIVATION_KEYS and kind not in ("grid_search", "choice"):
            raise StudyInputError(f"{source}: {key} changes the activations, so it takes a value, grid_search or choice, not {kind}")
        if kind in ("grid_search", "choice"):
            if not isinstance(argument, list) or not argument:
                raise StudyInputError(f"{source}: {key}.{kind} needs a non-empty list")
            for item in argument:
                if not check(item):
                    raise StudyInputError(f"{source}: {key} = {item!r} is invalid; expected {expected}")
        elif not (isinstance(argument, list) and len(argument) == 2 and all(isinstance(x, (int, float)) for x in argument)):
            raise StudyInputError(f"{source}: {key}.{kind} needs [low, high]")
        return
    if not check(value):
        raise StudyInputError(f"{source}: {key} = {value!r} is invalid; expected {expected}")


def load_space(axis: str, overrides: list[str]) -> dict:
    """defaults.yaml, then ``<axis>.yaml``, then ``--set key=value`` overrides (values read as YAML)."""
    axes = available_axes()
    if axis not in axes:
        raise StudyInputError(f"unknown axis '{axis}'; choose one of: {', '.join(axes)} (files in {SEARCH_SPACES})")
    space: dict[str, Any] = {}
    for name in (DEFAULTS, axis):
        for key, value in read_yaml(SEARCH_SPACES / f"{name}.yaml").items():
            check_value(f"{name}.yaml", key, value)
            space[key] = value
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator:
            raise StudyInputError(f"--set {override!r} must look like key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise StudyInputError(f"--set {key}: {text!r} is not a YAML value") from None
        check_value("--set", key.strip(), value)
        space[key.strip()] = value
    missing = [key for key in CHECKS if key not in space]
    if missing:
        raise StudyInputError(f"{DEFAULTS}.yaml lacks {', '.join(missing)}; restore them")
    return space


def to_tune(space: dict) -> dict:
    """Ray Tune's ``param_space``: grid_search stays a dict, samplers become Tune domains."""
    converted = {}
    for key, value in space.items():
        if isinstance(value, dict) and next(iter(value)) in SAMPLERS:
            (kind, argument), = value.items()
            converted[key] = SAMPLERS[kind](argument)
        else:
            converted[key] = value
    return converted


def grid_points(space: dict, keys: tuple[str, ...] | None = None) -> list[dict]:
    """The grid of fixed and grid_search values (choices expanded too) over ``keys`` (all keys if None)."""
    keys = keys or tuple(space)
    options = []
    for key in keys:
        value = space[key]
        if isinstance(value, dict) and next(iter(value)) in ("grid_search", "choice"):
            options.append(next(iter(value.values())))
        else:
            options.append([value])
    return [dict(zip(keys, combination)) for combination in itertools.product(*options)]


def activation_set(params: dict) -> str:
    """Names the activation set a trial needs: its values of the keys that change the activations."""
    return json.dumps({key: params[key] for key in ACTIVATION_KEYS}, sort_keys=True)


def swept_keys(space: dict) -> list[str]:
    return [key for key, value in space.items() if isinstance(value, dict)]
