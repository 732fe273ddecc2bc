"""One Tune trial: train a crosscoder on a cached activation set, measure its claim statistics, log them to MLflow, report to Tune."""

from __future__ import annotations

import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from ray import tune  # noqa: E402

from crosscoder import CrossCoder, CrossCoderConfig, TrainResult, evaluate, fit, loss_drop_last_fifth  # noqa: E402
from study.activations.cache import ActivationCache  # noqa: E402
from study.activations.contexts import sample_contexts  # noqa: E402
from study.activations.extraction import ActivationRequest  # noqa: E402
from study.activations.streaming import open_activations  # noqa: E402
from study.analysis.attribution import agreement_task  # noqa: E402
from study.analysis.causal_statistics import causal_statistics  # noqa: E402
from study.analysis.claim_statistics import ClaimStatistics, claim_statistics  # noqa: E402
from study.analysis.planted_recovery import planted_recovery  # noqa: E402
from study.analysis.splicing import spliced_loss  # noqa: E402
from study.lm.agreement import agreement_items  # noqa: E402
from study.lm.planted import planted_truth_of  # noqa: E402
from study.lm.trajectory import Snapshot, load_tokenizer  # noqa: E402
from study.record import (  # noqa: E402
    ABLATION_CURVES_ARTIFACT,
    CROSSCODER_ARTIFACT,
    DECODER_NORMS_ARTIFACT,
    DECODER_NORMS_FIGURE,
    FEATURES_ARTIFACT,
    TRAINING_PREFIX,
    PlantedSummary,
)
from study.sweep.search_space import activation_set  # noqa: E402
from study.sweep.trial_config import TrialConfig  # noqa: E402
from study.sweep.workers import TrainingData, WorkerPlan, train_on_workers  # noqa: E402
from study.tracking import child_run  # noqa: E402

SPLICED_CONTEXTS = 32
"""Held-out contexts on which ΔCE is measured."""
CHECKPOINTS_PER_TRIAL = 5
"""Checkpoints a trial writes (fewer when n_steps < 50): restart points, and the progress a scheduler sees."""
MIN_HISTORY_ENTRIES = 20
"""Training-history entries a trial logs at least (more often than log_every in short runs), so that its
convergence figure, read at 80 % and 100 % of the steps, exists."""
PROGRESS_METRICS = ("explained_variance", "l0", "dead_fraction")
"""Held-out metrics reported with every checkpoint, so a searcher or scheduler can judge a trial while it trains."""


class SweepContext(NamedTuple):
    """What the sweep hands every trial besides its configuration (through ``tune.with_parameters``)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    caches: dict[str, str | ActivationRequest]
    """Activation set (``search_space.activation_set``) -> its cache folder or URI, or its request where
    the set is streamed (``activation_mode: stream``)."""
    snapshots: dict[str, list[Snapshot]]
    """Activation set -> the snapshots its crosscoder spans."""
    swept: tuple[str, ...] = ()
    """The keys that vary across trials: a trial's run is named by its values of them."""
    judged_while_training: bool = True
    """Whether a searcher or scheduler reads PROGRESS_METRICS at every checkpoint; when not (grid search,
    fifo), checkpoints carry their step alone and the trial skips those held-out evaluations."""
    workers: WorkerPlan | None = None
    """Split each trial's crosscoder over several Ray Train workers; None trains it in the trial's process."""
    local_cache: str | None = None
    """A folder on each node where trials keep copies of the cache files they read (None: read the cache)."""


def run_name(config: dict, swept: tuple[str, ...]) -> str | None:
    """``expansion_ratio=16``, ``seed=1 · layer=2``: what tells a trial from the others; None when nothing varies."""

    def shown(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return " · ".join(f"{key}={shown(config[key])}" for key in swept) or None


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


def decoder_norm_figure(decoder_norms: torch.Tensor, steps: list[int]):
    figure, axis = plt.subplots(figsize=(6, 4))
    order = decoder_norms.argmax(1).argsort()
    image = axis.imshow(decoder_norms[order].numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    axis.set_xticks(range(len(steps)), [str(step) for step in steps], rotation=60, fontsize=7)
    axis.set_xlabel("snapshot (training step)")
    axis.set_ylabel("feature (sorted by peak snapshot)")
    figure.colorbar(image, label="decoder norm")
    figure.tight_layout()
    return figure


def held_out_contexts(cache: ActivationCache, first_shard: int, tokenizer, count: int) -> torch.Tensor:
    """The first ``count`` contexts of the held-out shards, re-drawn exactly as extraction drew them."""
    manifest = cache.manifest
    rows_per_context = manifest["context_length"] - 1
    contexts = sample_contexts(
        tokenizer, manifest["corpus"], manifest["context_length"], manifest["n_tokens"], manifest["seed"]
    )
    first = sum(manifest["rows_per_shard"][:first_shard]) // rows_per_context
    return contexts[first : first + count]


def log_statistics(statistics: ClaimStatistics, steps: list[int]) -> None:
    mlflow.log_metrics(statistics.summary._asdict())
    # Curves over snapshots use the snapshot's training step as MLflow's step; adjacent-pair curves
    # sit at the later snapshot of each pair. One call per snapshot: each call is a store write.
    by_step: dict[int, dict[str, float]] = {step: {} for step in steps}
    for name, values in statistics.by_snapshot._asdict().items():
        for snapshot_step, value in zip(steps[len(steps) - len(values) :], values):
            by_step[snapshot_step][name] = value
    for snapshot_step, values in by_step.items():
        mlflow.log_metrics(values, step=snapshot_step)


def log_table(frame: pd.DataFrame, name: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        frame.to_parquet(Path(folder) / name, index=False)
        mlflow.log_artifact(str(Path(folder) / name))


class TrialOutcome(NamedTuple):
    """What one trial produced, before anything is logged."""

    result: TrainResult
    statistics: ClaimStatistics
    steps: list[int]
    """The training step of each of the crosscoder's snapshots."""
    planted: PlantedSummary | None
    """The crosscoder against the truth, on a planted trajectory; None elsewhere."""


def train_and_measure(
    trial: TrialConfig,
    activations: str | ActivationRequest,
    snapshots: list[Snapshot],
    checkpoint_dir: Path,
    on_checkpoint: Callable[[Path, dict[str, float]], None] | None = None,
    measure_progress: bool = True,
    workers: WorkerPlan | None = None,
    run_name: str = "",
    local_cache: str | None = None,
) -> TrialOutcome:
    """Train on the trial's activation set (all shards but the held-out ones) and measure every claim
    statistic on the held-out ones (``activations``: the cache's folder or URI, or the request of
    streamed activations). ``on_checkpoint`` gets each checkpoint with the crosscoder's
    PROGRESS_METRICS on the held-out shards at that point (nothing with ``measure_progress`` False: an
    evaluation per checkpoint is about 6 % of a large trial). With ``workers``, the crosscoder is split
    over that many Ray Train workers (Ray Train run ``run_name``; they report to Tune themselves).
    Otherwise knows nothing of Tune or MLflow (``bench/`` times it bare). ``local_cache``: stage the
    files read there (``ActivationCache``'s ``stage``)."""
    cache = open_activations(activations, local_cache)
    layer, held_out_count = trial.layer, trial.held_out_shards
    if held_out_count >= cache.n_shards:
        raise ValueError(
            f"held_out_shards {held_out_count} leaves no training data in {cache.n_shards} shards; raise n_tokens"
        )
    first_held_out = cache.n_shards - held_out_count
    held_out = torch.cat([cache.shard(layer, index) for index in range(first_held_out, cache.n_shards)]).float()
    config = crosscoder_config(trial, checkpoint_dir)

    if workers is not None:
        data = TrainingData(
            activations, layer, list(range(first_held_out)), list(range(first_held_out, cache.n_shards)), local_cache
        )
        result = train_on_workers(config, data, workers, run_name, measure_progress)
        result = result._replace(metrics=evaluate(result.model, held_out))
    else:

        def measured_checkpoint(path: Path, model: CrossCoder) -> None:
            if not measure_progress:
                on_checkpoint(path, {})
                return
            metrics = evaluate(model, held_out)
            on_checkpoint(path, {name: getattr(metrics, name) for name in PROGRESS_METRICS})

        batches = cache.batches(layer, config.batch_size, config.seed, shards=list(range(first_held_out)))
        result = fit(
            batches,
            config,
            eval_activations=held_out,
            on_checkpoint=measured_checkpoint if on_checkpoint is not None else None,
        )

    model = result.model.eval()
    device = model.decoder_weight.device
    tokenizer = load_tokenizer(snapshots[-1])
    contexts = held_out_contexts(cache, first_held_out, tokenizer, SPLICED_CONTEXTS)
    spliced = spliced_loss(
        snapshots, contexts, layer, lambda activations: model.reconstruct(activations.to(device)).cpu(), device
    )
    task = agreement_task(agreement_items(trial.task_items), tokenizer)
    causal = causal_statistics(
        model,
        snapshots,
        layer,
        task,
        trial.attribution_baseline,
        trial.attribution_steps,
        trial.relie_snapshots,
        trial.relie_span,
    )
    held_out_tokens = torch.from_numpy(
        cache.token_ids()[sum(cache.manifest["rows_per_shard"][:first_held_out]) :].astype("int64")
    )
    statistics = claim_statistics(
        model,
        result.initial_model,
        held_out,
        held_out_tokens,
        cache.steps,
        result.metrics,
        spliced,
        causal,
        trial.crosscoder.seed,
        loss_drop_last_fifth(result.history),
    )
    folder = planted_truth_of(snapshots)
    planted = None
    if folder is not None:
        features = statistics.features
        emergence_step = torch.from_numpy(features["emergence_step"].to_numpy())
        token_entropy = torch.from_numpy(features["token_entropy"].to_numpy())
        planted = planted_recovery(model.decoder_weight, emergence_step, token_entropy, cache.steps, folder).summary
    return TrialOutcome(result, statistics, cache.steps, planted)


def log_outcome(outcome: TrialOutcome) -> None:
    """Everything a trial produced, into the active MLflow run."""
    result, statistics, steps, planted = outcome
    if planted is not None:
        mlflow.log_metrics(planted._asdict())
    for entry in result.history:
        mlflow.log_metrics(
            {f"{TRAINING_PREFIX}{key}": value for key, value in entry.items() if key != "step"}, step=entry["step"]
        )
    log_statistics(statistics, steps)
    log_table(statistics.features, FEATURES_ARTIFACT)
    log_table(statistics.ablation_curves, ABLATION_CURVES_ARTIFACT)
    log_table(
        pd.DataFrame(result.metrics.decoder_norms.numpy(), columns=[f"step{step}" for step in steps]),
        DECODER_NORMS_ARTIFACT,
    )
    with tempfile.TemporaryDirectory() as folder:
        result.model.save(Path(folder) / CROSSCODER_ARTIFACT)  # the sweep's stability analysis matches these decoders
        mlflow.log_artifact(str(Path(folder) / CROSSCODER_ARTIFACT))
    figure = decoder_norm_figure(result.metrics.decoder_norms, steps)
    mlflow.log_figure(figure, DECODER_NORMS_FIGURE)
    plt.close(figure)


def report_checkpoint(path: Path, progress: dict[str, float]) -> None:
    """Hand the crosscoder checkpoint to Tune, which copies it to the sweep's storage: a trial
    restarted on another node (its own lost) or by a resumed sweep continues from there. The held-out
    ``progress`` metrics go with it, for Optuna's and ASHA's judgement."""
    tune.report(
        {"training_step": int(path.stem.removeprefix("step")), **progress},
        checkpoint=tune.Checkpoint.from_directory(str(path.parent)),
    )


def restore_checkpoint(folder: Path) -> int | None:
    """Copy Tune's latest checkpoint of this trial (if any) into ``folder``; the step it holds."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    checkpoint.to_directory(str(folder))
    steps = [int(path.stem.removeprefix("step")) for path in folder.glob("step*.safetensors")]
    return max(steps) if steps else None


def run_trial(config: dict, sweep: SweepContext) -> None:
    """Tune trainable (bound to the sweep's context by ``tune.with_parameters``); ``config`` is the
    trial's flat key -> value mapping. Crosscoder checkpoints are written on the node's own disk and
    reported to Tune, which keeps them in the sweep's storage."""
    trial = TrialConfig.from_flat(config)
    context = tune.get_context()
    mlflow.set_tracking_uri(sweep.tracking_uri)
    name = run_name(config, sweep.swept) or context.get_trial_name()
    run_id = child_run(sweep.experiment_id, sweep.parent_run_id, context.get_trial_id(), name)
    existing = MlflowClient().get_run(run_id)
    if existing.info.status == "FINISHED":
        # Tune saves its state every few seconds, so a killed sweep can forget a trial it finished;
        # MLflow remembers, and the trial is reported again, not trained again.
        tune.report({**existing.data.metrics, "seconds": 0.0, "mlflow_run_id": run_id})
        return
    started = time.perf_counter()
    checkpoints = Path(tempfile.gettempdir()) / "crosscoder-study-checkpoints" / context.get_trial_id()
    shutil.rmtree(checkpoints, ignore_errors=True)  # a stale copy from an earlier attempt on this node
    checkpoints.mkdir(parents=True)
    with mlflow.start_run(run_id=run_id) as run:
        try:
            mlflow.log_params({key: str(value) for key, value in config.items()})
            mlflow.set_tag("ray_node_id", ray.get_runtime_context().get_node_id())
            # The GPU share Tune granted the trial, and which GPUs Ray gave it (an empty list on CPU).
            mlflow.set_tags(
                {"gpu_share": str(context.get_trial_resources().required_resources.get("GPU", 0.0))}
                | {"ray_gpu_ids": ",".join(str(gpu) for gpu in ray.get_gpu_ids())}
            )
            resumed_from = restore_checkpoint(checkpoints)
            if resumed_from is not None:
                mlflow.set_tag("resumed_from_step", str(resumed_from))
            key = activation_set(config)
            outcome = train_and_measure(
                trial,
                sweep.caches[key],
                sweep.snapshots[key],
                checkpoints,
                on_checkpoint=report_checkpoint,
                measure_progress=sweep.judged_while_training,
                workers=sweep.workers,
                run_name=context.get_trial_id(),
                local_cache=sweep.local_cache,
            )
            log_outcome(outcome)
        except Exception as error:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
            mlflow.log_text(traceback.format_exc(), "error.txt")
            mlflow.end_run(status="FAILED")
            raise
        finally:
            shutil.rmtree(checkpoints, ignore_errors=True)
    tune.report(
        {
            **outcome.statistics.summary._asdict(),
            "seconds": time.perf_counter() - started,
            "mlflow_run_id": run.info.run_id,
        }
    )
