"""Training: seeded initialisation and data order, Adam with warm-up and cool-down, checkpoints, resume.

Over 300 lines on purpose: the loop and the checkpoints it writes and resumes from belong together.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from crosscoder.config import CrossCoderConfig, InputError, TrainingError
from crosscoder.cpu_memory import reuse_freed_memory
from crosscoder.data import Activations, array_batches, as_tensor, iterable_batches, take_sample
from crosscoder.evolution import feature_dimensionality
from crosscoder.metrics import CrossCoderMetrics, evaluate
from crosscoder.model import CrossCoder
from crosscoder.resampling import resample_dead
from crosscoder.sharded import gather_model, shard_of, total, whole_reconstruction
from crosscoder.sparsity_control import adapt, coefficient_of

# step<N>.safetensors, or step<N>.rank<R>.safetensors for one shard of a crosscoder split over ranks.
CHECKPOINT_NAME = re.compile(r"^step(\d+)(?:\.rank(\d+))?\.safetensors$")


class DecoderRecord(NamedTuple):
    """The decoder as it stood at a checkpoint, in the forms the evolution statistics read (``crosscoder.evolution``)."""

    step: int
    decoder_norms: torch.Tensor
    """[F, S]"""
    dimensionality: torch.Tensor
    """[F, S] ``feature_dimensionality``"""


class TrainResult(NamedTuple):
    """A trained crosscoder, its metrics, and the training curve."""

    model: CrossCoder
    metrics: CrossCoderMetrics
    """Measured on the evaluation activations when given, else on a training sample."""
    history: list[dict[str, float]]
    """Every ``log_every`` steps: step, loss, mse, sparsity penalty, l0, learning rate, coefficient, dead share."""
    initial_model: CrossCoder
    """The same crosscoder as initialised, before any step: the untrained control of every statistic."""
    decoder_records: tuple[DecoderRecord, ...] = ()
    """At every checkpoint written in this run (none for a crosscoder split over ranks): whether a statistic read
    from the decoders had settled before the end of training, or was still moving."""


def loss_drop_last_fifth(history: list[dict[str, float]]) -> float:
    """How much the training loss still fell over the last fifth of the steps, relative to the final loss:
    (loss at 80 % of the steps - final loss) / final loss, from the logged entries nearest those steps
    (each the mean loss over its ``log_every`` steps).
    Near 0 for a run that reached a flat loss; nan when the history is too short to tell."""
    if len(history) < 2:
        return float("nan")
    last_step = history[-1]["step"]
    start = min(history, key=lambda entry: abs(entry["step"] - 0.8 * last_step))
    if start is history[-1]:
        return float("nan")
    return (start["loss"] - history[-1]["loss"]) / abs(history[-1]["loss"])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{name}' asked for but CUDA is not available; use device='cpu' or 'auto'")
    return device


def schedule_factor(step: int, config: CrossCoderConfig) -> float:
    """Learning-rate multiplier: linear warm-up, flat, linear cool-down to zero."""
    warmup = config.lr_warmup_fraction * config.n_steps
    cooldown = config.lr_cooldown_fraction * config.n_steps
    if step < warmup:
        return (step + 1) / warmup
    if step >= config.n_steps - cooldown:
        return max(0.0, (config.n_steps - step) / cooldown)
    return 1.0


def sparsity_factor(step: int, config: CrossCoderConfig) -> float:
    warmup = config.sparsity_warmup_fraction * config.n_steps
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def resamples_at(step: int, config: CrossCoderConfig) -> bool:
    """Whether dead features are resampled after ``step``: every ``resample_dead_every`` steps, and neither in
    the learning rate's cool-down nor in the last two fifths of the steps (the last half for JumpReLU with a
    ``target_l0``). A re-aimed feature needs time to settle, and the last fifth is where ``loss_drop_last_fifth``
    reads whether the loss has flattened: a resampling just before it measured the recovery from the resampling
    instead. Resampled features fire in a burst that the L0 controller answers by raising the coefficient, and
    JumpReLU's L0 follows its coefficient hundreds of steps late (l1's within tens): resampled at 500 of 1,000
    steps, an x16 JumpReLU crosscoder ended 12 % above its target on held-out data, at 250 only 2 % below it
    (bench/README.md)."""
    every = config.resample_dead_every
    settling = 0.5 if config.target_l0 is not None and config.sparsity == "jumprelu" else 0.6
    last_resampling = config.n_steps * min(1 - config.lr_cooldown_fraction, settling)
    return every is not None and (step + 1) % every == 0 and step + 1 < last_resampling


def checkpoint_rank(model: CrossCoder) -> int | None:
    """The rank whose shard ``model`` is, or None for a whole crosscoder."""
    return None if model.process_group is None else dist.get_rank(model.process_group)


def checkpoints(folder: str | Path | None, rank: int | None = None) -> dict[int, Path]:
    """This rank's checkpoint files in ``folder`` (a whole crosscoder's when ``rank`` is None), by step."""
    if not folder or not Path(folder).is_dir():
        return {}
    found = {}
    for path in Path(folder).iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and (None if match.group(2) is None else int(match.group(2))) == rank:
            found[int(match.group(1))] = path
    return found


def resumable_checkpoint(folder: str | Path | None, model: CrossCoder) -> Path | None:
    """The newest checkpoint to resume from; for a shard, the newest step every rank wrote."""
    rank = checkpoint_rank(model)
    found = checkpoints(folder, rank)
    step = max(found, default=-1)
    if rank is not None:
        newest = torch.tensor(step)
        dist.all_reduce(newest, op=dist.ReduceOp.MIN, group=model.process_group)
        step = int(newest)
    return found.get(step)


def save_checkpoint(
    folder: Path,
    step: int,
    model: CrossCoder,
    optimizer: torch.optim.Adam,
    tokens_since_fired: torch.Tensor,
    history: list,
) -> Path:
    """Weights, Adam's moments and the dead-feature counters at ``step``, written atomically (one file
    per rank for a shard). Older checkpoints stay until ``remove_older_checkpoints``."""
    tensors = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    for index, parameter in enumerate(optimizer_parameters(optimizer)):
        state = optimizer.state.get(parameter)
        if state:
            tensors[f"adam.{index}.exp_avg"] = state["exp_avg"]
            tensors[f"adam.{index}.exp_avg_sq"] = state["exp_avg_sq"]
    tensors["tokens_since_fired"] = tokens_since_fired
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    metadata = {"step": str(step), "config": json.dumps(model.config.to_dict()), "history": json.dumps(history)}
    folder.mkdir(parents=True, exist_ok=True)
    rank = checkpoint_rank(model)
    name = f"step{step}" if rank is None else f"step{step}.rank{rank}"
    path = folder / f"{name}.safetensors"
    partial = folder / f".{name}.partial"
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)
    return path


def remove_older_checkpoints(path: Path, model: CrossCoder) -> None:
    """Delete this rank's checkpoints older than ``path``; for a shard, only once every rank has written
    its own, so that a crash in between still leaves one step all ranks can resume from."""
    rank = checkpoint_rank(model)
    if rank is not None:
        dist.barrier(group=model.process_group)
    for older in checkpoints(path.parent, rank).values():
        if older != path:
            older.unlink()


def load_checkpoint(
    path: Path, model: CrossCoder, optimizer: torch.optim.Adam, device: torch.device
) -> tuple[int, torch.Tensor, list]:
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    saved_config = CrossCoderConfig.from_dict(json.loads(metadata["config"]))
    if saved_config != model.config:
        raise InputError(
            f"checkpoint {path} was written by another configuration; point checkpoint_dir at a fresh folder"
        )
    model.load_state_dict(
        {name[len("model.") :]: tensor for name, tensor in tensors.items() if name.startswith("model.")}
    )
    step = int(metadata["step"])
    for index, parameter in enumerate(optimizer_parameters(optimizer)):
        if f"adam.{index}.exp_avg" in tensors:
            optimizer.state[parameter] = {
                "step": torch.tensor(float(step)),
                "exp_avg": tensors[f"adam.{index}.exp_avg"],
                "exp_avg_sq": tensors[f"adam.{index}.exp_avg_sq"],
            }
    return step, tensors["tokens_since_fired"], json.loads(metadata["history"])


def make_optimizer(model: CrossCoder) -> torch.optim.Adam:
    """Adam over all weights; the JumpReLU threshold in its own group at a reduced learning rate."""
    config = model.config
    others = [parameter for parameter in model.parameters() if parameter is not model.log_threshold]
    groups = [{"params": others, "lr_scale": 1.0}]
    if model.log_threshold is not None:
        groups.append({"params": [model.log_threshold], "lr_scale": config.threshold_lr_multiplier})
    # The fused kernel updates each weight in one pass; the default takes about ten, a quarter of a large step.
    return torch.optim.Adam(groups, lr=config.learning_rate, betas=config.adam_betas, fused=True)


class StepResult(NamedTuple):
    """Detached results of one optimizer step."""

    loss: torch.Tensor
    mse: torch.Tensor
    sparsity_penalty: torch.Tensor
    active: torch.Tensor
    """[B, F] bool: features that fired on each token of the batch."""


def sparsity_coefficient(model: CrossCoder) -> float:
    """The coefficient in force before its warm-up factor: the controller's where it holds a target L0."""
    if model.sparsity_control is not None:
        return coefficient_of(model.sparsity_control)
    return model.config.lambda_


def training_step(model: CrossCoder, optimizer: torch.optim.Adam, batch: torch.Tensor, step: int) -> StepResult:
    """Schedules for ``step``, forward, loss, backward and Adam update on one batch [B, S, d].

    For a shard (``crosscoder.sharded``) the reconstruction is summed over ranks, and the loss, its
    penalty and the returned figures are the whole crosscoder's; ``active`` is this shard's features."""
    config = model.config
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate * group["lr_scale"] * schedule_factor(step, config)
    coefficient = sparsity_coefficient(model) * sparsity_factor(step, config)
    autocast = torch.autocast(batch.device.type, dtype=torch.bfloat16) if config.autocast_bf16 else nullcontext()
    with autocast:
        output = model(batch)
        reconstruction = whole_reconstruction(model, output.reconstruction.float())
        mse = (reconstruction - model.normalise(batch)).square().sum(-1).mean() / model.d_model
        # Each rank's penalty is over its own features; their sum is the whole crosscoder's.
        local_loss = mse + coefficient * output.sparsity_penalty.float()
    optimizer.zero_grad(set_to_none=True)
    local_loss.backward()
    sparsity_penalty = total(output.sparsity_penalty.detach().float(), model.process_group)
    loss = mse.detach() + coefficient * sparsity_penalty
    if config.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
    if torch.isfinite(loss):  # a step on a non-finite loss would spoil the weights the caller may still save
        optimizer.step()
    return StepResult(loss, mse.detach(), sparsity_penalty, output.active)


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [parameter for group in optimizer.param_groups for parameter in group["params"]]


# Over 60 lines on purpose: the training loop reads top to bottom in one place (warm-up, step, resampling,
# logging, checkpoints); split into helpers, its order of operations, which resuming relies on, would scatter.
def fit(
    activations: Activations | Iterable,
    config: CrossCoderConfig | None = None,
    eval_activations: Activations | None = None,
    progress: bool = False,
    on_checkpoint: Callable[[Path, CrossCoder], None] | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> TrainResult:
    """Train a crosscoder on [tokens, S, d_model] activations (an array, or an iterable of batches).

    Resumes from the newest checkpoint in ``config.checkpoint_dir`` when one is there;
    ``on_checkpoint`` gets each checkpoint file as it is written (to copy it somewhere safer) and the
    model as it stands (to measure progress).

    With a ``process_group``, every rank of it calls ``fit`` with the same data and configuration
    and trains one shard of the features (``crosscoder.sharded``); each writes its own checkpoint
    files, and each gets the whole trained crosscoder back, assembled at the end. The whole model is
    initialised on every rank before it is split, so that the shards start exactly where one
    process would.
    """
    config = config or CrossCoderConfig()
    device = resolve_device(config.device)
    if device.type == "cpu":
        reuse_freed_memory()
    sample, data = take_sample(activations, config.normalisation_tokens, config.seed)
    n_snapshots, d_model = sample.shape[1:]
    if eval_activations is not None:
        eval_activations = as_tensor(eval_activations)
        if tuple(eval_activations.shape[1:]) != (n_snapshots, d_model):
            raise InputError(
                f"eval_activations are [*, {eval_activations.shape[1]}, {eval_activations.shape[2]}], training data [*, {n_snapshots}, {d_model}]"
            )

    if process_group is not None and config.grad_clip_norm is not None:
        raise InputError("grad_clip_norm is not supported for a crosscoder split over ranks; set it to None")

    model = CrossCoder(n_snapshots, d_model, config)
    model.initialize(sample, torch.Generator().manual_seed(config.seed))
    initial_model = copy.deepcopy(model).eval()
    if process_group is not None:
        model = shard_of(model, process_group)
    model.to(device)
    optimizer = make_optimizer(model)

    history: list[dict[str, float]] = []
    records: list[DecoderRecord] = []
    start_step, tokens_since_fired = 0, torch.zeros(model.n_features, device=device)
    last_checkpoint = resumable_checkpoint(config.checkpoint_dir, model)
    if last_checkpoint is not None:
        start_step, tokens_since_fired, history = load_checkpoint(last_checkpoint, model, optimizer, device)

    if isinstance(data, torch.Tensor):
        batches = array_batches(data, config.batch_size, config.seed, start_step)
    else:
        batches = iterable_batches(data, start_step)
    bar = tqdm(
        range(start_step, config.n_steps),
        desc="crosscoder",
        unit="step",
        disable=not progress,
        initial=start_step,
        total=config.n_steps,
    )
    window_sums, window_steps = torch.zeros(3, device=device), 0
    for step in bar:
        try:
            batch = next(batches).to(device, non_blocking=True).float()
        except StopIteration:
            break
        result = training_step(model, optimizer, batch, step)
        window_sums += torch.stack([result.loss, result.mse, result.sparsity_penalty]).detach()
        window_steps += 1
        if not torch.isfinite(result.loss):
            where = (
                f"last good checkpoint: {last_checkpoint}"
                if last_checkpoint
                else "no checkpoint was written (set checkpoint_every)"
            )
            raise TrainingError(
                f"loss became {result.loss.item()} at step {step}; {where}; lower learning_rate or sparsity_coefficient"
            )
        tokens_since_fired = torch.where(result.active.any(0), 0.0, tokens_since_fired + batch.shape[0])
        if model.sparsity_control is not None:
            assert config.target_l0 is not None  # the control exists for a target
            batch_l0 = total(result.active.float().sum(-1).mean(), model.process_group).item()
            adapt(model.sparsity_control, batch_l0, config.target_l0, adapting=sparsity_factor(step, config) >= 1)
        if resamples_at(step, config):
            assert config.resample_dead_every is not None  # resamples_at says so
            dead = tokens_since_fired >= config.resample_dead_every * config.batch_size
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            if resample_dead(model, optimizer, batch, dead, generator):
                tokens_since_fired = torch.where(dead, 0.0, tokens_since_fired)
        if (step + 1) % config.log_every == 0 or step + 1 == config.n_steps:
            # Means over the steps since the last entry: one batch's loss varies by a few per cent, more
            # than the convergence figure (loss_drop_last_fifth) it would be read for.
            loss, mse, sparsity_penalty = (window_sums / window_steps).tolist()
            window_sums, window_steps = torch.zeros_like(window_sums), 0
            history.append(
                {
                    "step": step + 1,
                    "loss": loss,
                    "mse": mse,
                    "sparsity_penalty": sparsity_penalty,
                    "l0": total(result.active.float().sum(-1).mean(), model.process_group).item(),
                    "learning_rate": config.learning_rate * schedule_factor(step, config),
                    "sparsity_coefficient": sparsity_coefficient(model) * sparsity_factor(step, config),
                    "dead_fraction": total(
                        (tokens_since_fired >= config.dead_window_tokens).float().sum(), model.process_group
                    ).item()
                    / model.total_features,
                }
            )
            bar.set_postfix(mse=f"{history[-1]['mse']:.4f}", l0=f"{history[-1]['l0']:.0f}")
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            assert config.checkpoint_dir is not None  # CrossCoderConfig checks it
            last_checkpoint = save_checkpoint(
                Path(config.checkpoint_dir), step + 1, model, optimizer, tokens_since_fired, history
            )
            remove_older_checkpoints(last_checkpoint, model)
            if model.process_group is None:
                decoder = model.decoder_weight.detach().float().cpu()
                records.append(DecoderRecord(step + 1, decoder.norm(dim=-1), feature_dimensionality(decoder)))
            if on_checkpoint is not None:
                on_checkpoint(last_checkpoint, model)

    if model.process_group is not None:
        model = gather_model(model)
    model.eval()
    metrics = evaluate(model, eval_activations if eval_activations is not None else sample)
    return TrainResult(model, metrics, history, initial_model.to(device), tuple(records))
