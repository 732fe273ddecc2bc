"""Corpora as lists of documents: the built-in grammar, or a user's text / JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerBase

from study.errors import StudyInputError
from study.lm.grammar import Grammar


def generate_documents(n_documents: int, seed: int) -> list[str]:
    """The embedded corpus: ``n_documents`` documents of 3-8 sentences from the seeded grammar."""
    grammar = Grammar(seed)
    return [grammar.document() for _ in range(n_documents)]


def read_documents(path: str | Path) -> list[str]:
    """Documents from a ``.txt`` file (one per line), a ``.jsonl`` file (a ``text`` field per line)
    or a ``.parquet`` file (a ``text`` column)."""
    path = Path(path)
    if not path.is_file():
        raise StudyInputError(
            f"corpus file {path} does not exist; pass an existing .txt, .jsonl or .parquet file or 'embedded'"
        )
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise StudyInputError(
                f"{path} has no 'text' column (columns: {', '.join(table.column_names)}); name the text column 'text'"
            )
        documents = [str(text) for text in table.column("text").to_pylist() if text is not None]
    elif path.suffix == ".jsonl":
        documents = []
        for line_number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                documents.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise StudyInputError(
                    f"{path}:{line_number} is not a JSON object with a 'text' field ({error}); fix or remove that line"
                ) from None
    elif path.suffix == ".txt":
        documents = path.read_text().splitlines()
    else:
        raise StudyInputError(
            f"corpus file {path} has suffix '{path.suffix}'; use .txt (one document per line), .jsonl or .parquet"
        )
    documents = [document for document in documents if document.strip()]
    if not documents:
        raise StudyInputError(f"corpus {path} holds no text; point to a file with at least one non-empty document")
    return documents


def pack_contexts(tokenizer: PreTrainedTokenizerBase, documents: list[str], context_length: int) -> torch.Tensor:
    """[contexts, context_length] token ids: documents joined by end-of-text, cut into equal pieces."""
    stream = []
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        stream.append(tokenizer.eos_token_id)
        stream.extend(ids)
    usable = len(stream) // context_length * context_length
    if usable == 0:
        raise StudyInputError(f"the corpus holds {len(stream)} tokens, fewer than one context of {context_length}")
    return torch.from_numpy(np.asarray(stream[:usable], dtype=np.int64)).view(-1, context_length)
