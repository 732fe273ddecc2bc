"""Plan a sweep: validate everything, resolve the trajectories, list the trials and the activation
sets they need. Nothing here writes anything or starts Ray, so every user error surfaces here."""

from __future__ import annotations

import re
from typing import NamedTuple

from transformers import AutoConfig

from crosscoder.methods import METHODS
from study.activations.extraction import ActivationRequest, check_space
from study.errors import StudyInputError
from study.lm.trajectory import Trajectory, explained_load_errors, resolve_trajectory
from study.sweep.search_space import (
    ACTIVATION_KEYS,
    SAMPLERS,
    activation_set,
    axis_name,
    grid_points,
    load_space,
    swept_keys,
)
from study.trial_config import TrialConfig

MIN_HELD_OUT_TOKENS = 2048
"""Fewest held-out activation rows a trial's statistics may rest on."""


class ActivationSet(NamedTuple):
    """One set of activations the sweep's trials share, extracted once."""

    point: dict
    """Its values of the activation keys."""
    trajectory: Trajectory
    """The whole trajectory it is cut from (the model-level curves span it)."""
    request: ActivationRequest
    """The extraction it needs."""


class SweepPlan(NamedTuple):
    """What a sweep will do, before it does any of it."""

    axis: str
    space: dict
    """The merged search space: defaults, the axis file, the overrides."""
    experiment: str
    """The MLflow experiment."""
    sweep_name: str
    """The sweep's name: its parent run, its folder under the storage."""
    swept: list[str]
    """Keys that take several values."""
    trials: list[dict]
    """The grid's points (sampled keys not yet drawn)."""
    activation_sets: dict[str, ActivationSet]
    """``activation_set(point)`` -> the activations of the trials at that point."""
    d_models: dict[str, int]
    """``activation_set(point)`` -> the width of its model's residual stream."""


def sweep_name_of(experiment: str, axis: str) -> str:
    """The experiment, with the axis appended unless the name already holds it."""
    name = experiment if axis in experiment else f"{experiment}-{axis}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def activation_request(point: dict, trajectory: Trajectory) -> ActivationRequest:
    """The extraction that a point of the search space (its activation keys) needs."""
    return ActivationRequest(
        trajectory.select(point["n_snapshots"], point["snapshot_placement"]),
        layers=(point["layer"],),
        corpus=point["corpus"],
        n_tokens=point["n_tokens"],
        context_length=point["context_length"],
        seed=point["data_seed"],
        contexts_per_shard=contexts_per_shard(point),
    )


def contexts_per_shard(point: dict) -> int:
    """Contexts per shard: at least 8 shards of at most 128 contexts, of nearly equal size (the last
    shard is held out for evaluation, and a remainder shard of a few contexts would measure little);
    fewer, larger shards where that would leave the held-out shard under MIN_HELD_OUT_TOKENS."""
    rows_per_context = point["context_length"] - 1
    n_contexts = -(-point["n_tokens"] // rows_per_context)
    n_shards = max(8, -(-n_contexts // 128))
    fewest = -(-MIN_HELD_OUT_TOKENS // rows_per_context)
    if -(-n_contexts // n_shards) < fewest:
        n_shards = max(2, n_contexts // fewest)
    return max(1, -(-n_contexts // n_shards))


def held_out_tokens(point: dict) -> int:
    """Activation rows in the point's held-out shards (the last ``held_out_shards``), as extraction cuts them."""
    rows_per_context = point["context_length"] - 1
    n_contexts = -(-point["n_tokens"] // rows_per_context)
    per_shard = contexts_per_shard(point)
    n_shards = -(-n_contexts // per_shard)
    if point["held_out_shards"] >= n_shards:
        return 0
    held_out_contexts = n_contexts - (n_shards - point["held_out_shards"]) * per_shard
    return min(held_out_contexts * rows_per_context, point["n_tokens"])


def check_held_out(point: dict) -> None:
    """The held-out shards must hold MIN_HELD_OUT_TOKENS, or every statistic rests on a handful of tokens."""
    if held_out_tokens(point) >= MIN_HELD_OUT_TOKENS:
        return
    needed = point["n_tokens"]
    while held_out_tokens({**point, "n_tokens": needed}) < MIN_HELD_OUT_TOKENS:
        needed += 1024
    raise StudyInputError(
        f"n_tokens {point['n_tokens']} leaves {held_out_tokens(point)} held-out tokens in {point['held_out_shards']} "
        f"shard(s), fewer than {MIN_HELD_OUT_TOKENS}; raise n_tokens to {needed} or more"
    )


def at_bounds(point: dict, space: dict) -> list[dict]:
    """The grid point with each sampled key at its low and at its high bound (choices are already in the grid)."""
    sampled = {
        key: value[next(iter(value))]
        for key, value in space.items()
        if isinstance(value, dict) and next(iter(value)) in SAMPLERS and next(iter(value)) != "choice"
    }
    if not sampled:
        return [point]
    return [{**point, **{key: bounds[side] for key, bounds in sampled.items()}} for side in (0, -1)]


class Resolved(NamedTuple):
    trajectory: Trajectory
    n_layers: int
    d_model: int


def trajectory_spec(point: dict) -> tuple:
    return point["trajectory"], tuple(point["revisions"] or ())


def resolve(point: dict, cache_dir: str | None, resolved: dict[tuple, Resolved]) -> Trajectory:
    """The point's trajectory, resolved once per (spec, revisions), its layer and snapshot count checked."""
    spec = trajectory_spec(point)
    if spec not in resolved:
        trajectory = resolve_trajectory(point["trajectory"], point["revisions"], cache_dir)
        last = trajectory.snapshots[-1]
        with explained_load_errors(last):
            model_config = AutoConfig.from_pretrained(last.source, revision=last.revision)
        resolved[spec] = Resolved(trajectory, model_config.num_hidden_layers, model_config.hidden_size)
    trajectory, n_layers, _ = resolved[spec]
    if point["layer"] > n_layers:
        raise StudyInputError(
            f"layer {point['layer']} is beyond {trajectory.name}, which has layers 0..{n_layers}; choose one of those"
        )
    trajectory.select(point["n_snapshots"], point["snapshot_placement"])  # raises if there are too few snapshots
    return trajectory


def check_dictionary(config: TrialConfig, d_model: int, workers_per_trial: int = 1) -> None:
    """A target L0 must be below n_features; TopK and BatchTopK keep k of n_features: k must be smaller, at the
    model's width, and (as each worker offers its own best k) no more than the features one worker holds."""
    crosscoder = config.crosscoder
    n_features = crosscoder.n_features(d_model)
    if crosscoder.target_l0 is not None and crosscoder.target_l0 >= n_features:
        raise StudyInputError(
            f"target_l0 = {crosscoder.target_l0} is not below n_features = {n_features} (expansion_ratio "
            f"{crosscoder.expansion_ratio} x d_model {d_model}): no dictionary fires that many; lower target_l0"
        )
    if not METHODS[crosscoder.sparsity].uses_k:
        return
    if crosscoder.k >= n_features:
        raise StudyInputError(
            f"k = {crosscoder.k} is not below n_features = {n_features} (expansion_ratio {crosscoder.expansion_ratio} "
            f"x d_model {d_model}) for {crosscoder.sparsity}; lower k or raise expansion_ratio"
        )
    if crosscoder.k > n_features // workers_per_trial:
        raise StudyInputError(
            f"k = {crosscoder.k} is more than the {n_features // workers_per_trial} features each of "
            f"{workers_per_trial} workers holds; lower k or --workers-per-trial"
        )


def plan_sweep(
    axis: str, overrides: list[str], experiment: str | None, cache_dir: str | None, workers_per_trial: int = 1
) -> SweepPlan:
    """Everything that can be wrong is checked here, before anything is written to the MLflow store."""
    space = load_space(axis, overrides)
    trials = grid_points(space)
    configs = []
    for point in trials:
        configs += [(point, TrialConfig.from_flat(bound)) for bound in at_bounds(point, space)]
        check_held_out(point)
    resolved: dict[tuple, Resolved] = {}
    activation_sets = {}
    for point in grid_points(space, ACTIVATION_KEYS):
        trajectory = resolve(point, cache_dir, resolved)
        request = activation_request(point, trajectory)
        request.trajectory.check_files()
        activation_sets[activation_set(point)] = ActivationSet(point, trajectory, request)
    for point, config in configs:
        check_dictionary(config, resolved[trajectory_spec(point)].d_model, workers_per_trial)
    for chosen in activation_sets.values():
        if chosen.point["activation_mode"] == "cache":
            check_space(chosen.request, cache_dir, resolved[trajectory_spec(chosen.point)].d_model)
    name = axis_name(axis)
    experiment = experiment or f"crosscoder-{name}"
    d_models = {key: resolved[trajectory_spec(chosen.point)].d_model for key, chosen in activation_sets.items()}
    return SweepPlan(
        name, space, experiment, sweep_name_of(experiment, name), swept_keys(space), trials, activation_sets, d_models
    )


def describe(plan: SweepPlan, num_samples: int) -> str:
    """The plan as ``--dry-run`` prints it: the trials and the activation sets."""
    sampled = [key for key in plan.swept if next(iter(plan.space[key])) not in ("grid_search", "choice")]
    lines = [
        f"sweep {plan.sweep_name}: axis {plan.axis}, {len(plan.trials) * num_samples} trial(s)"
        + (f" (plus sampled {', '.join(sampled)})" if sampled else "")
    ]
    lines += [
        f"  trial {index}: " + " ".join(f"{key}={trial[key]}" for key in plan.swept)
        for index, trial in enumerate(plan.trials)
    ]
    lines.append(f"{len(plan.activation_sets)} activation set(s), each extracted once:")
    for chosen in plan.activation_sets.values():
        lines.append("  " + " ".join(f"{name}={chosen.point[name]}" for name in ACTIVATION_KEYS))
    return "\n".join(lines)
