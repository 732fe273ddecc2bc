"""Model-level curves over a trajectory (paper 1's statistical-learning phase): per snapshot, the KL
divergence of the corpus's unigram and bigram statistics from the model's next-token distribution,
the language-model loss, and the agreement task. Computed once per trajectory and corpus, cached."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from study.activations.contexts import corpus_fingerprint, sample_contexts
from study.errors import StudyInputError
from study.lm.agreement import agreement_items, encode_items, logit_differences
from study.lm.trajectory import Trajectory, load_model, load_tokenizer
from study.paths import cache_root

CURVES_VERSION = 2
"""Part of the cache key: raise it when the computation changes."""
NGRAM_TOKENS = 400_000
"""Corpus tokens counted for the unigram and bigram statistics."""
EVALUATION_TOKENS = 8_192
"""Tokens at which the model's predictions are compared with them."""
CONTEXT_LENGTH = 64
NGRAM_SEED, EVALUATION_SEED = 7_001, 7_002
"""Token samples apart from the activation caches' (which use the sweep's data_seed, 0 by default)."""
AGREEMENT_ITEMS = 32
"""Prompts per agreement condition."""


class NgramStatistics:
    """Unigram and bigram distributions counted on a token sample; bigrams never cross a context boundary."""

    def __init__(self, contexts: torch.Tensor, vocab_size: int):
        tokens = contexts.numpy().astype(np.int64)
        self.unigram = np.bincount(tokens.ravel(), minlength=vocab_size).astype(np.float64)
        self.unigram /= self.unigram.sum()
        pairs, counts = np.unique((tokens[:, :-1] * vocab_size + tokens[:, 1:]).ravel(), return_counts=True)
        self.previous, self.following = pairs // vocab_size, pairs % vocab_size
        totals = np.bincount(self.previous, weights=counts, minlength=vocab_size)
        self.conditional = counts / totals[self.previous]  # p(following | previous), sorted by previous
        self.row_start = np.searchsorted(self.previous, np.arange(vocab_size + 1))

    def unigram_entropy(self) -> float:
        p = self.unigram[self.unigram > 0]
        return float(-(p * np.log(p)).sum())

    def unigram_kl(self, log_probs: torch.Tensor) -> float:
        """Mean over positions of KL(unigram || model); ``log_probs`` [positions, vocab]."""
        support = np.flatnonzero(self.unigram)
        p = torch.from_numpy(self.unigram[support])
        return float((p * (p.log() - log_probs[:, support].double())).sum(-1).mean())

    def bigram_kl_and_entropy(self, log_probs: torch.Tensor, previous_tokens: torch.Tensor) -> tuple[float, float]:
        """Mean over positions (whose previous token was seen in the count) of KL(bigram(.|previous) || model),
        and the mean entropy of those bigram rows."""
        kl_sum, entropy_sum, count = 0.0, 0.0, 0
        for token in previous_tokens.unique().tolist():
            start, end = self.row_start[token], self.row_start[token + 1]
            if start == end:
                continue
            rows = (previous_tokens == token).nonzero().squeeze(1)
            p = torch.from_numpy(self.conditional[start:end])
            following = torch.from_numpy(self.following[start:end])
            kl_sum += float((p * (p.log() - log_probs[rows][:, following].double())).sum())
            entropy_sum += float(-(p * p.log()).sum()) * len(rows)
            count += len(rows)
        return kl_sum / max(count, 1), entropy_sum / max(count, 1)


def curves_key(trajectory: Trajectory, corpus: str) -> str:
    fields = {
        "snapshots": [str(s) for s in trajectory.snapshots],
        "corpus": corpus_fingerprint(corpus),
        "version": CURVES_VERSION,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def compute_model_curves(trajectory: Trajectory, corpus: str, device: str | torch.device = "cpu") -> pd.DataFrame:
    """One row per snapshot: step, lm_loss, unigram_kl, bigram_kl, agreement_accuracy,
    agreement_logit_difference, and the n-gram entropies as reference levels."""
    tokenizer = load_tokenizer(trajectory.snapshots[-1])
    ngram_contexts = sample_contexts(tokenizer, corpus, CONTEXT_LENGTH, NGRAM_TOKENS, NGRAM_SEED)
    evaluation = sample_contexts(tokenizer, corpus, CONTEXT_LENGTH, EVALUATION_TOKENS, EVALUATION_SEED)
    try:
        agreement = encode_items(agreement_items(AGREEMENT_ITEMS), tokenizer)
    except StudyInputError:
        agreement = None  # a tokenizer that splits the grammar's verbs: no agreement curve
    statistics = None
    rows = []
    for snapshot in trajectory.snapshots:
        model = load_model(snapshot, device=device)
        if statistics is None:
            statistics = NgramStatistics(ngram_contexts, model.config.vocab_size)
        sums = np.zeros(4)  # unigram KL, bigram KL, loss, bigram entropy, each weighted by positions
        count = 0
        for batch in evaluation.split(16):
            log_probs = model(input_ids=batch.to(device)).logits[:, :-1].float().log_softmax(-1).cpu().flatten(0, 1)
            bigram_kl, bigram_entropy = statistics.bigram_kl_and_entropy(log_probs, batch[:, :-1].flatten())
            loss = float(-log_probs.gather(1, batch[:, 1:].reshape(-1, 1)).mean())
            sums += len(log_probs) * np.array([statistics.unigram_kl(log_probs), bigram_kl, loss, bigram_entropy])
            count += len(log_probs)
        unigram_kl, bigram_kl, lm_loss, bigram_entropy = sums / count
        differences = logit_differences(model, agreement) if agreement is not None else torch.tensor([float("nan")])
        rows.append(
            {
                "step": snapshot.step,
                "lm_loss": lm_loss,
                "unigram_kl": unigram_kl,
                "bigram_kl": bigram_kl,
                "agreement_accuracy": float((differences > 0).float().mean())
                if agreement is not None
                else float("nan"),
                "agreement_logit_difference": float(differences.mean()),
                "unigram_entropy": statistics.unigram_entropy(),
                "bigram_entropy": bigram_entropy,
            }
        )
    return pd.DataFrame(rows)


def model_curves(
    trajectory: Trajectory, corpus: str, cache_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> pd.DataFrame:
    """``compute_model_curves``, cached under ``<cache>/model_curves/`` by trajectory and corpus."""
    folder = cache_root(cache_dir) / "model_curves"
    path = folder / f"{curves_key(trajectory, corpus)}.parquet"
    if path.is_file():
        return pd.read_parquet(path)
    curves = compute_model_curves(trajectory, corpus, device)
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    curves.to_parquet(partial, index=False)
    os.replace(partial, path)  # readers see the whole file or none
    return curves
