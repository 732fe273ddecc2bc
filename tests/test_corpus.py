"""The built-in corpus: Zipfian words, agreement in the text, single-token words; user corpora checked."""

from __future__ import annotations

import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from study.errors import StudyInputError
from study.lm.agreement import agreement_items, encode_items, logit_differences, score_agreement
from study.lm.corpus import generate_documents, read_documents
from study.lm.grammar import NOUNS, SINGULAR, plural_noun, third_person_singular, vocabulary
from study.lm.tokenizer import train_tokenizer
from study.lm.trajectory import directory_trajectory, load_model, load_tokenizer


@pytest.fixture(scope="module")
def documents():
    return generate_documents(3000, seed=0)


def test_word_frequencies_fall_off_like_zipf(documents):
    counts = Counter(word for document in documents for word in document.split())
    noun_counts = [counts[noun] + counts[plural_noun(noun)] for noun in NOUNS]
    # Rank 1 against rank 10 under Zipf with exponent 1.1: 10 ** 1.1 = 12.6; nouns also appear as objects.
    assert 5 < noun_counts[0] / noun_counts[9] < 25


def test_copula_agrees_with_the_subject_across_a_prepositional_phrase(documents):
    singular_nouns = {noun for noun in NOUNS if plural_noun(noun) != noun}
    plural_nouns = {plural_noun(noun) for noun in singular_nouns}
    pattern = re.compile(r"(?:^|\. )\w+ (\w+) (?:near|behind|beside|with|above|under|beyond) \w+ \w+ (is|are) ")
    pairs = [match.groups() for document in documents for match in pattern.finditer(document)]
    checked = [(noun, verb) for noun, verb in pairs if noun in singular_nouns | plural_nouns]
    assert len(checked) > 20
    assert all((verb == "is") == (noun in singular_nouns) for noun, verb in checked)


def test_tokenizer_keeps_every_grammar_word_whole(documents):
    tokenizer = train_tokenizer(documents, vocab_size=1280)
    split = [word for word in vocabulary() if len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) != 1]
    assert split == []


def test_agreement_items_cover_four_balanced_conditions():
    items = agreement_items(10)
    assert len(items) == 40
    for item in items:
        singular = item.subject_number == SINGULAR
        assert (item.correct_verb, item.wrong_verb) == (
            (third_person_singular(item.wrong_verb), item.wrong_verb)
            if singular
            else (item.correct_verb, third_person_singular(item.correct_verb))
        )
    assert sum(item.has_attractor for item in items) == 20


def test_batched_scoring_matches_one_prompt_at_a_time(tiny_trajectory_folder):
    snapshot = directory_trajectory(tiny_trajectory_folder).snapshots[-1]
    model, tokenizer = load_model(snapshot), load_tokenizer(snapshot)
    items = agreement_items(3)
    batched = logit_differences(model, encode_items(items, tokenizer))
    alone = [logit_differences(model, encode_items([item], tokenizer)).item() for item in items]
    assert batched.tolist() == pytest.approx(alone, abs=1e-4)
    score = score_agreement(model, tokenizer, items)
    assert score.accuracy == pytest.approx((batched > 0).float().mean().item())
    assert set(score.by_condition) == {"sg", "sg+attractor", "pl", "pl+attractor"}


def test_empty_or_missing_corpus_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(StudyInputError, match="holds no text"):
        read_documents(empty)
    with pytest.raises(StudyInputError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(StudyInputError, match="broken.jsonl:2"):
        read_documents(broken)
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_documents(good) == ["one", "two"]
    pq.write_table(pa.table({"text": ["three", "", None, "four"]}), tmp_path / "good.parquet")
    assert read_documents(tmp_path / "good.parquet") == ["three", "four"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "wrong.parquet")
    with pytest.raises(StudyInputError, match="no 'text' column"):
        read_documents(tmp_path / "wrong.parquet")
