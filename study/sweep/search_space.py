"""Sweep axes as YAML in Ray Tune's grammar: loading, validation, and the grid of trials they imply."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from ray import tune

import search_spaces
from study.errors import StudyInputError
from study.trial_config import STUDY_KEYS, check_key

SEARCH_SPACES = Path(search_spaces.__file__).resolve().parent
DEFAULTS = "defaults"
ACTIVATION_KEYS = (
    "trajectory",
    "revisions",
    "n_snapshots",
    "snapshot_placement",
    "layer",
    "corpus",
    "n_tokens",
    "context_length",
    "data_seed",
    "activation_mode",
)
"""Keys that change the activations: fixed, grid_search or choice only, so each set is extracted once."""
SAMPLERS: dict[str, Callable[..., Any]] = {
    "choice": tune.choice,
    "uniform": lambda bounds: tune.uniform(*bounds),
    "loguniform": lambda bounds: tune.loguniform(*bounds),
    "randint": lambda bounds: tune.randint(*bounds),
}
GRAMMAR = ("grid_search", *SAMPLERS)


def available_axes() -> list[str]:
    return sorted(path.stem for path in SEARCH_SPACES.glob("*.yaml") if path.stem != DEFAULTS)


def axis_file(axis: str) -> Path:
    """A shipped axis by name, or any YAML file by path."""
    if axis.endswith((".yaml", ".yml")) or "/" in axis:
        path = Path(axis).expanduser()
        if not path.is_file():
            raise StudyInputError(
                f"axis file {axis} does not exist; pass a YAML file or one of: {', '.join(available_axes())}"
            )
        return path
    if axis not in available_axes():
        raise StudyInputError(
            f"unknown axis '{axis}'; choose one of: {', '.join(available_axes())}, or pass a path to a YAML file"
        )
    return SEARCH_SPACES / f"{axis}.yaml"


def axis_name(axis: str) -> str:
    """The axis as experiments and sweep folders name it: ``expansion_ratio``, ``my_axis`` for ``./my_axis.yaml``."""
    return Path(axis).stem if axis.endswith((".yaml", ".yml")) or "/" in axis else axis


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
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in GRAMMAR:
            raise StudyInputError(
                f"{source}: {key} must be a value or one of {{{', '.join(GRAMMAR)}: ...}}, got {value}"
            )
        ((kind, argument),) = value.items()
        if key in ACTIVATION_KEYS and kind not in ("grid_search", "choice"):
            raise StudyInputError(
                f"{source}: {key} changes the activations, so it takes a value, grid_search or choice, not {kind}"
            )
        if kind in ("grid_search", "choice"):
            if not isinstance(argument, list) or not argument:
                raise StudyInputError(f"{source}: {key}.{kind} needs a non-empty list")
            for item in argument:
                check_key(source, key, item)
        elif not (
            isinstance(argument, list) and len(argument) == 2 and all(isinstance(x, (int, float)) for x in argument)
        ):
            raise StudyInputError(f"{source}: {key}.{kind} needs [low, high]")
        else:
            for bound in argument:
                check_key(source, key, bound)
        return
    check_key(source, key, value)


def load_space(axis: str, overrides: list[str]) -> dict:
    """defaults.yaml, then the axis (``<axis>.yaml`` or a YAML file's path), then ``--set key=value``
    overrides (values read as YAML), each validated the same way."""
    space: dict[str, Any] = {}
    for path in (SEARCH_SPACES / f"{DEFAULTS}.yaml", axis_file(axis)):
        for key, value in read_yaml(path).items():
            check_value(path.name, key, value)
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
    missing = [key for key in STUDY_KEYS if key not in space]
    if missing:
        raise StudyInputError(f"{DEFAULTS}.yaml lacks {', '.join(missing)}; restore them")
    return space


def to_tune(space: dict) -> dict:
    """Ray Tune's ``param_space``: grid_search stays a dict, samplers become Tune domains."""
    converted = {}
    for key, value in space.items():
        if isinstance(value, dict) and next(iter(value)) in SAMPLERS:
            ((kind, argument),) = value.items()
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
