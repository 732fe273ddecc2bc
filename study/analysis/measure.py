"""What one trial measures: train a crosscoder on a cached activation set (all shards but the held-out
ones) and measure every claim statistic on the held-out ones. Knows nothing of Tune or MLflow: the sweep's
trial (``study.sweep.trial``) logs what this returns, and ``bench/`` times it bare."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from crosscoder import CrossCoder, CrossCoderConfig, TrainResult, evaluate, fit, loss_drop_last_fifth
from study.activations.cache import ActivationCache
from study.activations.contexts import sample_contexts
from study.activations.extraction import ActivationRequest
from study.activations.streaming import open_activations
from study.analysis.attribution import agreement_task, planted_task
from study.analysis.causal_statistics import causal_statistics
from study.analysis.claim_statistics import ClaimStatistics, claim_statistics
from study.analysis.feature_pages import feature_pages
from study.analysis.planted_recovery import planted_recovery, recovered_by_feature
from study.analysis.splicing import spliced_loss
from study.lm.agreement import agreement_items
from study.lm.planted import planted_truth_of, read_truth
from study.lm.trajectory import Snapshot, load_tokenizer
from study.record import PROGRESS_METRICS, PlantedSummary
from study.trial_config import TrialConfig

SPLICED_CONTEXTS = 32
"""Held-out contexts on which ΔCE is measured."""
CHECKPOINTS_PER_TRIAL = 5
"""Checkpoints a trial writes (fewer when n_steps < 50): restart points, and the progress a scheduler sees."""
MIN_HISTORY_ENTRIES = 20
"""Training-history entries a trial logs at least (more often than log_every in short runs), so that its
convergence figure, read at 80 % and 100 % of the steps, exists."""


class TrialOutcome(NamedTuple):
    """What one trial produced, before anything is logged."""

    result: TrainResult
    statistics: ClaimStatistics
    steps: list[int]
    """The training step of each of the crosscoder's snapshots."""
    planted: PlantedSummary | None
    """The crosscoder against the truth, on a planted trajectory; None elsewhere."""
    pages: dict
    """The feature browser's data of the trial's chosen features (``study.analysis.feature_pages``)."""


class TrialData(NamedTuple):
    """A trial's activation set split into training and held-out shards."""

    cache: ActivationCache
    training_shards: list[int]
    held_out_shards: list[int]
    held_out: torch.Tensor
    """[tokens, S, d_model] float32: the held-out shards' rows."""


def open_trial_data(trial: TrialConfig, activations: str | ActivationRequest, local_cache: str | None) -> TrialData:
    """The trial's activations (the cache's folder or URI, or the request of streamed activations; ``local_cache``:
    stage the files read there, ``ActivationCache``'s ``stage``), its last ``held_out_shards`` held out."""
    cache = open_activations(activations, local_cache)
    held_out_count = trial.held_out_shards
    if held_out_count >= cache.n_shards:
        raise ValueError(
            f"held_out_shards {held_out_count} leaves no training data in {cache.n_shards} shards; raise n_tokens"
        )
    first_held_out = cache.n_shards - held_out_count
    held_out_shards = list(range(first_held_out, cache.n_shards))
    held_out = torch.cat([cache.shard(trial.layer, index) for index in held_out_shards]).float()
    return TrialData(cache, list(range(first_held_out)), held_out_shards, held_out)


def crosscoder_config(trial: TrialConfig, checkpoint_dir: Path) -> CrossCoderConfig:
    """The trial's crosscoder with what the trial decides itself: checkpoints five times a run, at least
    MIN_HISTORY_ENTRIES history entries, the device."""
    n_steps = trial.crosscoder.n_steps
    return replace(
        trial.crosscoder,
        checkpoint_every=max(10, n_steps // CHECKPOINTS_PER_TRIAL),
        checkpoint_dir=str(checkpoint_dir),
        log_every=max(1, min(trial.crosscoder.log_every, n_steps // MIN_HISTORY_ENTRIES)),
        device="auto",
    )


def held_out_contexts(cache: ActivationCache, first_shard: int, tokenizer, count: int) -> torch.Tensor:
    """The first ``count`` contexts of the held-out shards, re-drawn exactly as extraction drew them."""
    manifest = cache.manifest
    rows_per_context = manifest["context_length"] - 1
    contexts = sample_contexts(
        tokenizer, manifest["corpus"], manifest["context_length"], manifest["n_tokens"], manifest["seed"]
    )
    first = sum(manifest["rows_per_shard"][:first_shard]) // rows_per_context
    return contexts[first : first + count]


def train_in_process(
    config: CrossCoderConfig,
    trial: TrialConfig,
    data: TrialData,
    on_checkpoint: Callable[[Path, dict[str, float]], None] | None = None,
    measure_progress: bool = True,
) -> TrainResult:
    """Train on the training shards. ``on_checkpoint`` gets each checkpoint with the crosscoder's
    PROGRESS_METRICS on the held-out shards at that point (nothing with ``measure_progress`` False: an
    evaluation per checkpoint is about 6 % of a large trial)."""

    def measured_checkpoint(path: Path, model: CrossCoder) -> None:
        assert on_checkpoint is not None
        if not measure_progress:
            on_checkpoint(path, {})
            return
        metrics = evaluate(model, data.held_out)
        on_checkpoint(path, {name: getattr(metrics, name) for name in PROGRESS_METRICS})

    batches = data.cache.batches(trial.layer, config.batch_size, config.seed, shards=data.training_shards)
    return fit(
        batches,
        config,
        eval_activations=data.held_out,
        on_checkpoint=measured_checkpoint if on_checkpoint is not None else None,
    )


def measure(trial: TrialConfig, result: TrainResult, data: TrialData, snapshots: list[Snapshot]) -> TrialOutcome:
    """Every claim statistic of a trained crosscoder on the trial's held-out shards, and, on a planted
    trajectory, the crosscoder against the truth."""
    model = result.model.eval()
    device = model.decoder_weight.device
    cache, layer, first_held_out = data.cache, trial.layer, data.held_out_shards[0]
    tokenizer = load_tokenizer(snapshots[-1])
    contexts = held_out_contexts(cache, first_held_out, tokenizer, SPLICED_CONTEXTS)
    spliced = spliced_loss(
        snapshots, contexts, layer, lambda activations: model.reconstruct(activations.to(device)).cpu(), device
    )
    folder = planted_truth_of(snapshots)
    planted_task_truth = read_truth(folder).get("task") if folder is not None else None
    task = (
        planted_task(planted_task_truth, 4 * trial.task_items)
        if planted_task_truth is not None
        else agreement_task(agreement_items(trial.task_items), tokenizer)
    )
    causal = causal_statistics(
        model,
        snapshots,
        layer,
        task,
        trial.attribution_baseline,
        trial.attribution_steps,
        trial.relie_snapshots,
        trial.relie_span,
        trial.crosscoder.seed,
    )
    first_row = sum(cache.manifest["rows_per_shard"][:first_held_out])
    held_out_tokens = torch.from_numpy(cache.token_ids()[first_row:].astype("int64"))
    statistics = claim_statistics(
        model,
        result.initial_model,
        data.held_out,
        held_out_tokens,
        cache.steps,
        result.metrics,
        spliced,
        causal,
        trial.crosscoder.seed,
        loss_drop_last_fifth(result.history),
        result.decoder_records,
    )
    planted, recovered = None, {}
    if folder is not None:
        features = statistics.features
        emergence_step = torch.from_numpy(features["emergence_step"].to_numpy())
        token_entropy = torch.from_numpy(features["token_entropy"].to_numpy())
        recovery = planted_recovery(model.decoder_weight, emergence_step, token_entropy, cache.steps, folder)
        planted, recovered = recovery.summary, recovered_by_feature(recovery, folder, tokenizer)
    pages = feature_pages(
        model,
        data.held_out,
        held_out_tokens,
        torch.from_numpy(cache.positions()[first_row:].astype("int64")),
        tokenizer,
        snapshots,
        cache.steps,
        statistics.features,
        trial.crosscoder.seed,
        recovered,
    )
    return TrialOutcome(result, statistics, cache.steps, planted, pages)


def train_and_measure(
    trial: TrialConfig,
    activations: str | ActivationRequest,
    snapshots: list[Snapshot],
    checkpoint_dir: Path,
    on_checkpoint: Callable[[Path, dict[str, float]], None] | None = None,
    measure_progress: bool = True,
    local_cache: str | None = None,
) -> TrialOutcome:
    """One trial in this process: open its data, train (``train_in_process``), measure (``measure``)."""
    data = open_trial_data(trial, activations, local_cache)
    result = train_in_process(crosscoder_config(trial, checkpoint_dir), trial, data, on_checkpoint, measure_progress)
    return measure(trial, result, data, snapshots)
