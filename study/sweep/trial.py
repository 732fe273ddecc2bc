"""The Tune entry point of one trial: find or open its MLflow run, train (in the trial's process or on Ray
Train workers) and measure (``study.analysis.measure``), log (``study.sweep.log_trial``), and hand every
checkpoint to Tune."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import mlflow
import pyarrow.fs as pafs
import ray
from mlflow.tracking import MlflowClient
from ray import tune

from crosscoder import evaluate
from study.activations.extraction import ActivationRequest
from study.analysis.measure import crosscoder_config, measure, open_trial_data, train_and_measure
from study.lm.trajectory import Snapshot, damaged_weight_file
from study.record import ERROR_ARTIFACT, TAG, TRIAL_RESULT
from study.sweep.log_trial import log_outcome
from study.sweep.search_space import activation_set
from study.sweep.workers import TrainingData, WorkerPlan, train_on_workers
from study.tracking import child_run, run_name
from study.trial_config import TrialConfig


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
    """Whether a searcher or scheduler reads the record's PROGRESS_METRICS at every checkpoint; when not (grid search,
    fifo), checkpoints carry their step alone and the trial skips those held-out evaluations."""
    workers: WorkerPlan | None = None
    """Split each trial's crosscoder over several Ray Train workers; None trains it in the trial's process."""
    local_cache: str | None = None
    """A folder on each node where trials keep copies of the cache files they read (None: read the cache)."""
    axis: str = ""
    """The sweep's axis: a trial's run is named by its value where no key varies (a one-value axis)."""
    tracking_environment: dict[str, str] = {}
    """MLflow's retry settings, user and password (``study.tracking.tracking_environment``), set in each trial's
    environment: a trial on another node has no other way to them that Ray's dashboard would not show."""


def report_checkpoint(path: Path, progress: dict[str, float]) -> None:
    """Hand the crosscoder checkpoint to Tune, which copies it to the sweep's storage: a trial
    restarted on another node (its own lost) or by a resumed sweep continues from there. The held-out
    ``progress`` metrics go with it, for Optuna's and ASHA's judgement."""
    tune.report(
        {TRIAL_RESULT.training_step: int(path.stem.removeprefix("step")), **progress},
        checkpoint=tune.Checkpoint.from_directory(str(path.parent)),
    )


class Restored(NamedTuple):
    step: int | None
    """The step of the checkpoint restored (None: none, the trial starts from step 0)."""
    skipped: list[str]
    """Newer checkpoints that could not be read, each with why."""


def restore_checkpoint(folder: Path) -> Restored:
    """Copy the newest readable checkpoint Tune keeps of this trial into ``folder``: Tune's latest, or, where its
    crosscoder file is damaged (cut short, overwritten), the one before it, and so on."""
    latest = tune.get_checkpoint()
    if latest is None:
        return Restored(None, [])
    # Tune keeps every checkpoint a trial reported, side by side in the trial's folder of the storage.
    trial_folder = latest.path.rstrip("/").rsplit("/", 1)[0]
    listing = latest.filesystem.get_file_info(pafs.FileSelector(trial_folder))
    kept = sorted((info.path for info in listing if info.base_name.startswith("checkpoint_")), reverse=True)
    skipped: list[str] = []
    for path in kept if latest.path.rstrip("/") in kept else [latest.path]:
        shutil.rmtree(folder, ignore_errors=True)
        tune.Checkpoint(path, filesystem=latest.filesystem).to_directory(str(folder))
        files = sorted(folder.glob("step*.safetensors"))
        reasons = [reason for file in files if (reason := damaged_weight_file(file)) is not None]
        if files and not reasons:
            return Restored(max(int(file.stem.removeprefix("step")) for file in files), skipped)
        skipped.append(f"{path.rsplit('/', 1)[-1]}: {reasons[0] if reasons else 'no crosscoder file'}")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return Restored(None, skipped)


def measured_on_workers(
    trial: TrialConfig,
    activations: str | ActivationRequest,
    snapshots: list[Snapshot],
    checkpoints: Path,
    sweep: SweepContext,
):
    """The trial's crosscoder split over Ray Train workers (they report to Tune themselves), then measured here."""
    assert sweep.workers is not None
    data = open_trial_data(trial, activations, sweep.local_cache)
    shards = TrainingData(activations, trial.layer, data.training_shards, data.held_out_shards, sweep.local_cache)
    config = crosscoder_config(trial, checkpoints)
    result = train_on_workers(
        config, shards, sweep.workers, tune.get_context().get_trial_id(), sweep.judged_while_training
    )
    return measure(trial, result._replace(metrics=evaluate(result.model, data.held_out)), data, snapshots)


def tag_resources(context, workers: int) -> None:
    """Where the trial runs: its node, the GPU share Tune granted it, which GPUs Ray gave it (none on CPU), and
    the Ray Train workers its crosscoder is split over (1: trained in the trial's own process)."""
    mlflow.set_tag(TAG.ray_node_id, ray.get_runtime_context().get_node_id())
    mlflow.set_tags(
        {TAG.gpu_share: str(context.get_trial_resources().required_resources.get("GPU", 0.0))}
        | {TAG.ray_gpu_ids: ",".join(str(gpu) for gpu in ray.get_gpu_ids())}
        | {TAG.trial_workers: str(workers)}
    )


def run_trial(config: dict, sweep: SweepContext) -> None:
    """Tune trainable (bound to the sweep's context by ``tune.with_parameters``); ``config`` is the
    trial's flat key -> value mapping. Crosscoder checkpoints are written on the node's own disk and
    reported to Tune, which keeps them in the sweep's storage."""
    trial = TrialConfig.from_flat(config)
    context = tune.get_context()
    os.environ.update(sweep.tracking_environment)
    mlflow.set_tracking_uri(sweep.tracking_uri)
    name = (
        run_name(config, sweep.swept)
        or run_name(config, (sweep.axis,) if sweep.axis in config else ())
        or f"{sweep.axis} trial {int(context.get_trial_id().rsplit('_', 1)[-1])}"
    )
    run_id = child_run(sweep.experiment_id, sweep.parent_run_id, context.get_trial_id(), name)
    existing = MlflowClient().get_run(run_id)
    if existing.info.status == "FINISHED":
        # Tune saves its state every few seconds, so a killed sweep can forget a trial it finished;
        # MLflow remembers, and the trial is reported again, not trained again.
        tune.report({**existing.data.metrics, TRIAL_RESULT.seconds: 0.0, TRIAL_RESULT.mlflow_run_id: run_id})
        return
    started = time.perf_counter()
    checkpoints = Path(tempfile.gettempdir()) / "crosscoder-study-checkpoints" / context.get_trial_id()
    shutil.rmtree(checkpoints, ignore_errors=True)  # a stale copy from an earlier attempt on this node
    checkpoints.mkdir(parents=True)
    with mlflow.start_run(run_id=run_id) as run:
        try:
            mlflow.log_params({key: str(value) for key, value in config.items()})
            tag_resources(context, sweep.workers.count if sweep.workers is not None else 1)
            resumed_from, skipped = restore_checkpoint(checkpoints)
            if resumed_from is not None:
                mlflow.set_tag(TAG.resumed_from_step, str(resumed_from))
            if skipped:  # the run says which checkpoints it could not use, and why
                mlflow.set_tag(TAG.skipped_checkpoints, "; ".join(skipped)[:5000])
            key = activation_set(config)
            if sweep.workers is not None:
                outcome = measured_on_workers(trial, sweep.caches[key], sweep.snapshots[key], checkpoints, sweep)
            else:
                outcome = train_and_measure(
                    trial,
                    sweep.caches[key],
                    sweep.snapshots[key],
                    checkpoints,
                    on_checkpoint=report_checkpoint,
                    measure_progress=sweep.judged_while_training,
                    local_cache=sweep.local_cache,
                )
            log_outcome(outcome)
        except Exception as error:
            mlflow.set_tag(TAG.error, f"{type(error).__name__}: {error}"[:5000])
            mlflow.log_text(traceback.format_exc(), ERROR_ARTIFACT)
            mlflow.end_run(status="FAILED")
            raise
        except BaseException:  # stopped from outside (Ctrl-C, a scheduler's stop): killed, not failed
            mlflow.end_run(status="KILLED")
            raise
        finally:
            shutil.rmtree(checkpoints, ignore_errors=True)
    tune.report(
        {
            **outcome.statistics.summary._asdict(),
            TRIAL_RESULT.seconds: time.perf_counter() - started,
            TRIAL_RESULT.mlflow_run_id: run.info.run_id,
        }
    )
