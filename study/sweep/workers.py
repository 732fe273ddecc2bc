"""One trial's crosscoder trained by several Ray Train workers (``--workers-per-trial N``).

The Tune trial becomes the driver of a ``TorchTrainer``: N workers (one GPU each, NCCL; or one CPU
each, gloo) each hold a slice of the features (``crosscoder.sharded``), read the same batches (from
the activation cache, or streamed: each worker computes its share of the snapshots and they gather
the rest), and sum their reconstructions every step. Every checkpoint is sharded: each
worker reports its own file, and Ray Train gathers them into one folder of the sweep's storage, so a
lost worker (Ray Train restarts the group) or a lost trial (Tune restarts it, and the trainer of the
same name restores from its storage) resumes from the newest step every worker wrote. At the end the
first worker reports the whole crosscoder, its untrained twin and the training curve; the trial
measures and logs them exactly as for a crosscoder trained in one process.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from pyarrow import fs

from crosscoder import CrossCoder, CrossCoderConfig, TrainResult, evaluate, fit
from crosscoder.sharded import gather_model
from study.activations.extraction import ActivationRequest
from study.record import PROGRESS_METRICS, TRIAL_RESULT

FINAL_CHECKPOINT = "final"
"""Name of the checkpoint holding the assembled crosscoder (the others are ``step<N>``)."""
FINAL_FILES = ("crosscoder.safetensors", "initial.safetensors", "history.json")


class WorkerPlan(NamedTuple):
    """How a trial's crosscoder is split over workers."""

    count: int  # type: ignore[assignment]  # a field, shadowing tuple.count on purpose
    """Workers per trial; each holds 1/count of the features."""
    use_gpu: bool
    """One GPU per worker (NCCL) rather than one CPU (gloo)."""
    storage: str
    """Folder or URI under which each trial's Ray Train run keeps its sharded checkpoints."""


class TrainingData(NamedTuple):
    """What every worker reads: the same batches, so that their summed reconstructions are one crosscoder's."""

    cache: str | ActivationRequest
    """The activation cache's folder or URI, or the request of streamed activations."""
    layer: int
    shards: list[int]
    """The training shards (the held-out ones excluded)."""
    held_out: list[int]
    """The held-out shards, on which progress is measured when a searcher or scheduler reads it."""
    stage: str | None = None
    """A folder on each node where the cache files read are kept (``--local-cache``)."""


def restore_own_shard(checkpoint_dir: Path) -> None:
    """Copy this worker's file of Ray Train's newest checkpoint (if any) into ``checkpoint_dir``: a
    worker downloads its own slice, not the whole crosscoder."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    suffix = f".rank{dist.get_rank()}.safetensors"
    files = checkpoint.filesystem.get_file_info(fs.FileSelector(checkpoint.path))
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for info in files:
        if info.base_name.endswith(suffix):
            fs.copy_files(
                info.path,
                str(checkpoint_dir / info.base_name),
                source_filesystem=checkpoint.filesystem,
                destination_filesystem=fs.LocalFileSystem(),
            )


def train_worker(loop_config: dict) -> None:
    """Each Ray Train worker: train this rank's features, report every sharded checkpoint, and (the
    first worker) the assembled result."""
    import ray.train

    from study.activations.streaming import StreamedActivations, open_activations

    rank = dist.get_rank()
    data = TrainingData(**loop_config["data"])
    measure_progress = loop_config["measure_progress"]
    local = Path(tempfile.mkdtemp(prefix="crosscoder-shard-"))
    config = replace(CrossCoderConfig.from_dict(loop_config["crosscoder"]), checkpoint_dir=str(local / "checkpoints"))
    restore_own_shard(local / "checkpoints")
    cache = open_activations(data.cache, data.stage, dist.group.WORLD)
    # Only the first rank measures; streamed, every rank reads too, since each read is a collective.
    reads_held_out = measure_progress and (rank == 0 or isinstance(cache, StreamedActivations))
    held_out = (
        torch.cat([cache.shard(data.layer, index) for index in data.held_out]).float() if reads_held_out else None
    )

    def report(path: Path, shard: CrossCoder) -> None:
        step = path.name.split(".")[0]
        metrics = {TRIAL_RESULT.training_step: int(step.removeprefix("step"))}
        if measure_progress:
            whole = gather_model(shard)  # collective: every worker takes part, the first measures
            if rank == 0:
                assert held_out is not None  # the first rank reads it whenever progress is measured
                measured = evaluate(whole, held_out)
                metrics.update({name: getattr(measured, name) for name in PROGRESS_METRICS})
        with tempfile.TemporaryDirectory() as folder:
            shutil.copy(path, folder)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=step)

    batches = cache.batches(data.layer, config.batch_size, config.seed, shards=data.shards)
    result = fit(batches, config, on_checkpoint=report, process_group=dist.group.WORLD)
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            result.model.save(Path(folder) / FINAL_FILES[0])
            result.initial_model.save(Path(folder) / FINAL_FILES[1])
            (Path(folder) / FINAL_FILES[2]).write_text(json.dumps(result.history))
        ray.train.report(
            {TRIAL_RESULT.training_step: config.n_steps},
            checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
            checkpoint_dir_name=FINAL_CHECKPOINT,
        )
    shutil.rmtree(local, ignore_errors=True)


def train_on_workers(
    config: CrossCoderConfig, data: TrainingData, plan: WorkerPlan, run_name: str, measure_progress: bool
) -> TrainResult:
    """Train one crosscoder over ``plan.count`` workers from inside a Tune trial (whose reports the
    workers' reach through Tune's callback); the trial's result as ``crosscoder.fit`` gives it, with
    metrics left for the caller to measure on its held-out tokens (``metrics`` is None)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "crosscoder": config.to_dict(),
            "data": data._asdict(),
            "measure_progress": measure_progress,
        },
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=plan.count, use_gpu=plan.use_gpu),
        run_config=RunConfig(
            name=run_name,
            storage_path=plan.storage,
            # A lost worker: the group restarts from the newest sharded checkpoint.
            failure_config=FailureConfig(max_failures=2),
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # Ray Tune's callback, typed as Train's
        ),
    )
    checkpoint = trainer.fit().checkpoint
    assert checkpoint is not None  # the first worker always reports the final one
    with checkpoint.as_directory() as folder:
        model = CrossCoder.load(Path(folder) / FINAL_FILES[0])
        initial_model = CrossCoder.load(Path(folder) / FINAL_FILES[1])
        history = json.loads((Path(folder) / FINAL_FILES[2]).read_text())
    # The held-out metrics are measured by the trial, which holds the held-out shards.
    return TrainResult(model, None, history, initial_model)  # type: ignore[arg-type]
