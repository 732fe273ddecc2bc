"""Attribution, ablation curves and RelIE: a planted task feature on a hand-built GPT-NeoX, and
integrated-gradient completeness on the tiny trajectory."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from crosscoder import CrossCoder, CrossCoderConfig
from crosscoder.matching import match_features, matched_jaccard
from study.activations.contexts import sample_contexts
from study.activations.direct import direct_activations
from study.analysis.attribution import SnapshotModel, Task, Terms, agreement_task, relative_indirect_effect
from study.analysis.causal_statistics import causal_statistics, snapshot_terms
from study.lm.agreement import agreement_items
from study.lm.grammar import flip_subject_number
from study.lm.planted import silence_blocks
from study.lm.trajectory import Snapshot, directory_trajectory, load_model, load_tokenizer

D_MODEL = 16
SINGULAR_SUBJECT, PLURAL_SUBJECT, SINGULAR_VERB, PLURAL_VERB = 10, 11, 12, 13


def orthonormal_mean_free(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` orthonormal vectors of R^d, each orthogonal to the all-ones vector (so LayerNorm's
    centring leaves them alone)."""
    vectors = torch.randn(D_MODEL, count + 1, generator=generator)
    vectors[:, 0] = 1.0
    basis, _ = torch.linalg.qr(vectors)
    return basis[:, 1:].T


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Two snapshots of a GPT-NeoX whose blocks add nothing (output projections zeroed), so the logits
    at a position read only that position's embedding. The subject token writes +-2 along direction
    ``task`` and 1 along ``distractor``; at step 1 the verb logits read ``task``, at step 0 they do not."""
    generator = torch.Generator().manual_seed(0)
    base, task, distractor = orthonormal_mean_free(3, generator)
    folder = tmp_path_factory.mktemp("planted")
    snapshots = []
    for step, reads_task in ((0, False), (1, True)):
        config = GPTNeoXConfig(
            vocab_size=16,
            hidden_size=D_MODEL,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
        )
        model = GPTNeoXForCausalLM(config)
        silence_blocks(model)
        with torch.no_grad():
            embedding = model.get_input_embeddings().weight
            embedding.copy_(torch.randn(embedding.shape, generator=generator) * 0.3 + 3 * base)
            embedding[SINGULAR_SUBJECT] = 3 * base + 2 * task + distractor
            embedding[PLURAL_SUBJECT] = 3 * base - 2 * task + distractor
            unembedding = model.get_output_embeddings().weight
            unembedding.copy_(torch.randn(unembedding.shape, generator=generator) * 0.1)
            unembedding[SINGULAR_VERB] = 3 * task if reads_task else 0
            unembedding[PLURAL_VERB] = -3 * task if reads_task else 0
        model.save_pretrained(folder / f"step{step}")
        snapshots.append(Snapshot(step, str(folder / f"step{step}")))

    prompts = torch.tensor(
        [[0, 1, 2, SINGULAR_SUBJECT], [0, 5, 6, PLURAL_SUBJECT], [0, 3, 4, SINGULAR_SUBJECT], [0, 7, 8, PLURAL_SUBJECT]]
    )  # each half of the prompts (ranking: the first two, measuring: the last two) holds both numbers
    corrupted = prompts.clone()
    corrupted[:, -1] = torch.where(prompts[:, -1] == SINGULAR_SUBJECT, PLURAL_SUBJECT, SINGULAR_SUBJECT)
    correct = torch.where(prompts[:, -1] == SINGULAR_SUBJECT, SINGULAR_VERB, PLURAL_VERB)
    wrong = SINGULAR_VERB + PLURAL_VERB - correct
    rows = torch.arange(len(prompts))

    def logit_difference(logits: torch.Tensor) -> torch.Tensor:
        return logits[rows, -1, correct] - logits[rows, -1, wrong]

    # Features 0 / 1 read and write +task / -task, feature 2 the distractor; the rest never fire.
    crosscoder = CrossCoder(2, D_MODEL, CrossCoderConfig(expansion_ratio=1, sparsity="l1"))
    with torch.no_grad():
        for feature, direction in enumerate((task, -task, distractor)):
            crosscoder.encoder_weight[feature] = direction.repeat(2) / 2  # the pre-activation sums both snapshots
            crosscoder.decoder_weight[feature] = direction
        crosscoder.decoder_bias[:] = 3 * base
    return snapshots, Task(prompts, corrupted, logit_difference), crosscoder


def test_planted_task_feature_carries_the_task(planted):
    snapshots, task, crosscoder = planted
    statistics = causal_statistics(crosscoder, snapshots, 2, task, "zero", 32, 2)
    effects = statistics.features.set_index("feature")
    # Ranked first: the two planted directions (each carries half the items); the distractor hurts.
    assert set(effects["ie_step1"].nlargest(2).index) == {0, 1}
    assert effects.loc[2, "ie_step1"] < 0
    curves = statistics.curves[statistics.curves["step"] == 1].set_index("k")
    assert curves.loc[1, "clean"] > 1.0
    assert abs(curves.loc[2, "ablated_relative"]) < 0.02  # ablating the planted features destroys the metric
    assert curves.loc[1, "ablated_relative"] == pytest.approx(0.5, abs=0.02)  # one of two: half the items
    assert curves.loc[2, "kept_relative"] == pytest.approx(1.0, abs=0.1)  # keeping only them restores it
    assert statistics.summary.task_learned_snapshots == 1.0
    # The task exists only at step 1: there the planted features' whole effect lies.
    assert effects.loc[0, "relie_step1"] == pytest.approx(1.0) and effects.loc[0, "relie_step0"] == pytest.approx(0.0)
    assert effects.loc[7, "relie_step1"] == 0.5  # a feature that never fires: no effect at either snapshot


def test_corrupted_baseline_flips_the_planted_answer(planted):
    snapshots, task, crosscoder = planted
    statistics = causal_statistics(crosscoder, snapshots, 2, task, "corrupted", 16, 2)
    curves = statistics.curves[statistics.curves["step"] == 1].set_index("k")
    assert curves.loc[2, "ablated_relative"] == pytest.approx(0.0, abs=1e-4)  # the corrupted metric: none of the gap
    assert curves.loc[2, "kept_relative"] == pytest.approx(1.0, abs=1e-4)  # the distractor is the same in both


@pytest.mark.parametrize("baseline", ["zero", "corrupted"])
def test_integrated_gradients_are_complete(tiny_trajectory_folder, baseline):
    """Feature effects plus the error effect equal metric(clean) - metric(baseline), on a real model
    and a crosscoder whose error term is large (only initialised)."""
    snapshots = directory_trajectory(tiny_trajectory_folder).select(3, "log").snapshots
    tokenizer = load_tokenizer(snapshots[-1])
    layer = 1
    sample = direct_activations(snapshots, sample_contexts(tokenizer, "embedded", 32, 2000, seed=1), layer)
    crosscoder = CrossCoder(len(snapshots), sample.shape[-1], CrossCoderConfig(expansion_ratio=4, sparsity="jumprelu"))
    crosscoder.initialize(sample, torch.Generator().manual_seed(0))
    task = agreement_task(agreement_items(4), tokenizer)
    terms = snapshot_terms(crosscoder, direct_activations(snapshots, task.input_ids, layer), len(task.input_ids))
    corrupted = snapshot_terms(
        crosscoder, direct_activations(snapshots, task.corrupted_ids, layer), len(task.corrupted_ids)
    )
    for index, snapshot in enumerate(snapshots):
        clean, decoder, bias = terms[index]
        reference = (
            corrupted[index][0]
            if baseline == "corrupted"
            else Terms(torch.zeros_like(clean.codes), torch.zeros_like(clean.error))
        )
        attribution = SnapshotModel(load_model(snapshot), layer, task, decoder, bias).integrated_gradients(
            clean, reference, 64
        )
        difference = attribution.clean_metric - attribution.baseline_metric
        total = float(attribution.feature_effects.sum()) + attribution.error_effect
        assert abs(difference) > 1e-3
        assert total == pytest.approx(difference, rel=0.02, abs=1e-4)
        assert attribution.error_effect != 0.0


def test_relie_follows_its_formula():
    effects = torch.tensor([[0.0, 2.0], [1.0, -3.0], [0.0, 0.0], [1.0, 1.0]])
    assert relative_indirect_effect(effects)[:, 1].tolist() == pytest.approx([1.0, 0.75, 0.5, 0.5])
    three = relative_indirect_effect(torch.tensor([[1.0, -1.0, 2.0], [0.0, 0.0, 0.0]]))
    assert three[0].tolist() == pytest.approx([0.25, 0.25, 0.5]) and three[1].tolist() == pytest.approx([1 / 3] * 3)


def test_top_feature_jaccard_after_matching():
    generator = torch.Generator().manual_seed(3)
    decoder = torch.randn(40, 2, 8, generator=generator)
    permutation = torch.randperm(40, generator=generator)
    match = match_features(decoder, decoder[permutation])
    top = torch.arange(10)
    inverse = permutation.argsort()
    assert matched_jaccard(match, top, inverse[top]) == 1.0  # the same features under other names
    assert matched_jaccard(
        match, top, inverse[top[:5]].tolist() + inverse[torch.arange(20, 25)].tolist()
    ) == pytest.approx(5 / 15)


def test_corrupted_agreement_prompt_flips_the_subject_number_only():
    for item in agreement_items(5):
        flipped = flip_subject_number(item)
        assert len(flipped.prompt.split()) == len(item.prompt.split())
        assert (flipped.correct_verb, flipped.wrong_verb) == (item.wrong_verb, item.correct_verb)
        assert flipped.subject_number != item.subject_number and flip_subject_number(flipped) == item
