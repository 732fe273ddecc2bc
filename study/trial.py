"""One Tune trial: train a crosscoder on a cached activation set, log it to MLflow, report to Tune."""

from __future__ import annotations

import tempfile
import time
import traceback
from dataclasses import fields
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402

from crosscoder import CrossCoderConfig, fit  # noqa: E402
from study.activation_cache import ActivationCache  # noqa: E402
from study.search_space import activation_set  # noqa: E402
from study.tracking import child_run  # noqa: E402

CROSSCODER_KEYS = {field.name for field in fields(CrossCoderConfig)}
SWEEP = "_sweep"


def crosscoder_config(config: dict, checkpoint_dir: Path) -> CrossCoderConfig:
    values = {key: value for key, value in config.items() if key in CROSSCODER_KEYS}
    checkpoint_every = max(10, config["n_steps"] // 5)
    return CrossCoderConfig(**values, checkpoint_every=checkpoint_every, checkpoint_dir=str(checkpoint_dir), device="auto")


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


def run_trial(config: dict) -> None:
    """Tune trainable. ``config[_sweep]`` holds the sweep's MLflow ids, the activation cache folder
    of each activation set, and the folder of crosscoder checkpoints."""
    sweep = config[SWEEP]
    params = {key: value for key, value in config.items() if key != SWEEP}
    context = tune.get_context()
    mlflow.set_tracking_uri(sweep["tracking_uri"])
    run_id = child_run(sweep["experiment_id"], sweep["parent_run_id"], context.get_trial_id(), context.get_trial_name())
    existing = MlflowClient().get_run(run_id)
    if existing.info.status == "FINISHED":
        # Tune saves its state every few seconds, so a killed sweep can forget a trial it finished;
        # MLflow remembers, and the trial is reported again, not trained again.
        tune.report({**existing.data.metrics, "seconds": 0.0, "mlflow_run_id": run_id})
        return
    started = time.perf_counter()
    with mlflow.start_run(run_id=run_id) as run:
        try:
            mlflow.log_params({key: str(value) for key, value in params.items()})
            cache = ActivationCache(sweep["caches"][activation_set(params)])
            layer = params["layer"]
            held_out_count = params["held_out_shards"]
            if held_out_count >= cache.n_shards:
                raise ValueError(f"held_out_shards {held_out_count} leaves no training data in {cache.n_shards} shards; raise n_tokens")
            training_shards = list(range(cache.n_shards - held_out_count))
            held_out = torch.cat([cache.shard(layer, index) for index in range(cache.n_shards - held_out_count, cache.n_shards)]).float()
            batches = cache.batches(layer, params["batch_size"], params["seed"], shards=training_shards)
            result = fit(batches, crosscoder_config(params, Path(sweep["checkpoint_root"]) / context.get_trial_id()), eval_activations=held_out)
            metrics = result.metrics
            for entry in result.history:
                mlflow.log_metrics({f"train/{key}": value for key, value in entry.items() if key != "step"}, step=entry["step"])
            for snapshot_step, value in zip(cache.steps, metrics.explained_variance_per_snapshot):
                mlflow.log_metric("explained_variance_by_snapshot", value, step=snapshot_step)
            for snapshot_step, value in zip(cache.steps, metrics.decoder_norms.mean(0).tolist()):
                mlflow.log_metric("mean_decoder_norm_by_snapshot", value, step=snapshot_step)
            summary = {"explained_variance": metrics.explained_variance, "l0": metrics.l0, "dead_fraction": metrics.dead_fraction, "mse": metrics.mse}
            mlflow.log_metrics(summary)
            with tempfile.TemporaryDirectory() as folder:
                norms = pd.DataFrame(metrics.decoder_norms.numpy(), columns=[f"step{step}" for step in cache.steps])
                norms.to_parquet(Path(folder) / "decoder_norms.parquet")
                mlflow.log_artifact(str(Path(folder) / "decoder_norms.parquet"))
            figure = decoder_norm_figure(metrics.decoder_norms, cache.steps)
            mlflow.log_figure(figure, "decoder_norms.png")
            plt.close(figure)
        except Exception as error:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
            mlflow.log_text(traceback.format_exc(), "error.txt")
            mlflow.end_run(status="FAILED")
            raise
    tune.report({**summary, "seconds": time.perf_counter() - started, "mlflow_run_id": run.info.run_id})
