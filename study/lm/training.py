"""The pre-training loop of the embedded trajectory (see ``study.lm.pretrain`` for the cached entry point)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.utils import logging as transformers_logging

from study.lm.agreement import agreement_items, encode_items, logit_differences
from study.lm.corpus import generate_documents, pack_contexts
from study.lm.pretrain_config import MANIFEST, PretrainConfig
from study.lm.tokenizer import train_tokenizer

HELD_OUT_SHARE = 0.02


def learning_rate_factor(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def held_out_loss(model: GPTNeoXForCausalLM, contexts: torch.Tensor) -> float:
    model.eval()
    loss = model(input_ids=contexts, labels=contexts).loss.item()
    model.train()
    return loss


# Over 60 lines on purpose: one pre-training loop with its checkpoint schedule and per-checkpoint scores, in order.
def pretrain(config: PretrainConfig, out: Path, progress: bool = True) -> None:
    """Train from ``config.seed`` and write checkpoints, corpus and manifest into ``out``."""
    started = time.perf_counter()
    out.mkdir(parents=True)
    documents = generate_documents(config.n_documents, config.seed)
    (out / "corpus.txt").write_text("\n".join(documents) + "\n")
    n_held_out = max(1, int(len(documents) * HELD_OUT_SHARE))
    tokenizer = train_tokenizer(documents, config.vocab_size)
    train_contexts = pack_contexts(tokenizer, documents[:-n_held_out], config.context_length)
    eval_contexts = pack_contexts(tokenizer, documents[-n_held_out:], config.context_length)[: config.eval_contexts]
    agreement_batch = encode_items(agreement_items(config.agreement_items, seed=config.seed + 1), tokenizer)

    torch.manual_seed(config.seed)
    model = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            num_hidden_layers=config.n_layers,
            num_attention_heads=config.n_heads,
            intermediate_size=4 * config.hidden_size,
            max_position_embeddings=config.context_length,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config))
    data_order = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(train_contexts), generator=data_order)
    position = 0

    checkpoint_steps = config.checkpoint_steps()
    records: list[dict] = []
    interval_losses: list[float] = []

    def save_checkpoint(step: int) -> None:
        model.save_pretrained(out / f"step{step}")
        tokenizer.save_pretrained(out / f"step{step}")
        model.eval()
        differences = logit_differences(model, agreement_batch)
        model.train()
        records.append(
            {
                "step": step,
                "train_loss": float(np.mean(interval_losses)) if interval_losses else None,
                "eval_loss": held_out_loss(model, eval_contexts),
                "agreement_accuracy": (differences > 0).float().mean().item(),
                "agreement_logit_difference": differences.mean().item(),
            }
        )
        interval_losses.clear()

    # One bar for the run, not one per checkpoint written.
    transformers_logging.disable_progress_bar()
    model.train()
    save_checkpoint(0)
    bar = tqdm(range(1, config.total_steps + 1), desc="pre-training", unit="step", disable=not progress)
    for step in bar:
        if position + config.batch_size > len(order):
            order, position = torch.randperm(len(train_contexts), generator=data_order), 0
        batch = train_contexts[order[position : position + config.batch_size]]
        position += config.batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        interval_losses.append(loss.item())
        if step in checkpoint_steps:
            save_checkpoint(step)
            bar.set_postfix(
                loss=f"{records[-1]['eval_loss']:.3f}", agreement=f"{records[-1]['agreement_accuracy']:.2f}"
            )

    transformers_logging.enable_progress_bar()
    manifest = {
        "config": asdict(config),
        "cache_key": config.cache_key(),
        "n_documents": len(documents),
        "n_held_out_documents": n_held_out,
        "train_tokens_seen": config.total_steps * config.batch_size * config.context_length,
        "checkpoints": records,
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    # Written last: a folder with a manifest is a complete trajectory.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
