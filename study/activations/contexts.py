"""The tokens whose activations are extracted: contexts packed from a seeded stream of documents."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from study.errors import StudyInputError
from study.lm.corpus import pack_contexts, read_documents
from study.lm.grammar import Grammar
from study.lm.pretrain_config import CORPUS_VERSION

DOCUMENTS_PER_CHUNK = 256


def document_stream(corpus: str, seed: int) -> Iterator[str]:
    """``embedded``: fresh documents from the built-in grammar under ``seed`` (text the embedded model
    never saw, from the distribution it learned); a file: its documents in a seeded order."""
    if corpus == "embedded":
        grammar = Grammar(seed=1_000_003 + seed)  # apart from the pre-training corpus's seeds
        while True:
            yield grammar.document()
    documents = read_documents(corpus)
    random.Random(seed).shuffle(documents)
    yield from documents


def corpus_fingerprint(corpus: str) -> str:
    """Identifies the corpus in cache keys: the grammar's version for ``embedded``, else the file's content digest."""
    if corpus == "embedded":
        return f"embedded-{CORPUS_VERSION}"
    path = Path(corpus)
    if not path.is_file():
        raise StudyInputError(
            f"corpus file {path} does not exist; pass an existing .txt, .jsonl or .parquet file or 'embedded'"
        )
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{path.name}-{digest.hexdigest()[:16]}"


def sample_contexts(
    tokenizer: PreTrainedTokenizerBase, corpus: str, context_length: int, n_tokens: int, seed: int
) -> torch.Tensor:
    """[n, context_length] contexts packed from the seeded document stream, enough for ``n_tokens`` rows.

    Each context contributes context_length - 1 rows: its first position is left out of the
    activations. Packing leaves no padding. Only as many documents as needed are tokenised.
    """
    if context_length < 2:
        raise StudyInputError(
            f"context_length must be at least 2 (the first position is dropped), got {context_length}"
        )
    needed = -(-n_tokens // (context_length - 1))
    stream, chunks, have = document_stream(corpus, seed), [], 0
    while have < needed:
        documents = [document for _, document in zip(range(DOCUMENTS_PER_CHUNK), stream)]
        if not documents:
            raise StudyInputError(
                f"the corpus yields {have * (context_length - 1)} tokens, fewer than the {n_tokens} asked for; lower the token budget or add text"
            )
        try:
            chunks.append(pack_contexts(tokenizer, documents, context_length))
        except StudyInputError:
            continue  # a chunk shorter than one context adds nothing
        have += len(chunks[-1])
    return torch.cat(chunks)[:needed]
