"""The feature browser's data (study.analysis.feature_pages) and page (reports.features), on hand-made tables and
the tiny trajectory's real models. The page opened in a real browser is tested in test_sweep.py."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch

from crosscoder import CrossCoder, CrossCoderConfig
from reports.features import browser_html, browser_name, trial_partners
from study.analysis import feature_pages as pages
from study.analysis.feature_pages import chosen_features, context_window, feature_pages, token_distribution
from study.lm.trajectory import directory_trajectory, load_model, load_tokenizer
from study.record import PARTNER_COLUMNS

STEPS = [0, 16, 128, 1000]


def feature_table(count: int, **columns) -> pd.DataFrame:
    """A trial's per-feature table: every feature alive, resolved and present from step 0, unless ``columns`` say."""
    table = pd.DataFrame(
        {
            "feature": range(count),
            "activation_frequency": 0.01,
            "alive": True,
            "unresolved": False,
            "emergence_step": 0.0,
            "peak_step": 1000.0,
            "token_entropy": 1.0,
        }
    )
    for name, values in columns.items():
        table[name] = values
    return table


class Decoded:
    """A tokenizer stand-in whose tokens read as their ids (``<7>``)."""

    def decode(self, ids: list[int]) -> str:
        return f"<{ids[0]}>"


def test_chosen_features_put_the_top_by_effect_first_then_both_ends_of_emergence_and_a_sample():
    emergence = [0.0] * 40 + [16.0] * 10 + [128.0] * 10 + [1000.0] * 10
    emergence[3] = 16.0
    effect = [0.0] * 70
    effect[60:69] = [1.0] * 9
    effect[65], effect[3], effect[50] = 3.0, 2.0, -5.0  # the most negative is not a top feature by effect
    table = feature_table(70, emergence_step=emergence, ie_step1000=effect)
    table.loc[69, "alive"] = False
    chosen = chosen_features(table, STEPS, seed=0, planted={})
    top = chosen[: pages.TOP_BY_EFFECT]
    assert top[:2] == [65, 3] and set(top) == {3, *range(60, 69)} and 50 not in top
    emergent = chosen[pages.TOP_BY_EFFECT : pages.TOP_BY_EFFECT + pages.EMERGENT_EACH_END - 1]
    assert emergent == list(range(40, 40 + pages.EMERGENT_EACH_END - 1))  # the earliest after 3, already shown
    assert 69 not in chosen and len(chosen) == len(set(chosen)) <= pages.MAX_FEATURES
    initial = [feature for feature in chosen if feature < 40 and feature != 3]
    assert len(initial) == pages.INITIAL_SAMPLE and initial != sorted(initial)  # drawn, not the first ids
    assert chosen_features(table, STEPS, seed=0, planted={}) == chosen  # the same seed, the same features


def test_chosen_features_show_recovered_token_specific_planted_features_first():
    table = feature_table(200)
    planted = {feature: {"kind": "shared"} for feature in range(100, 120)} | {150: {"kind": "specific"}}
    chosen = chosen_features(table, STEPS, seed=0, planted=planted)
    recovered = [feature for feature in chosen if feature in planted]
    assert recovered[0] == 150 and len(recovered) == pages.PLANTED_SHOWN


def test_a_context_window_stays_inside_its_context():
    positions = torch.tensor([1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6, 7])  # two contexts of 7 rows
    token_ids = torch.arange(14)
    start = context_window(8, token_ids, positions, Decoded())  # the second context's second row
    assert start == {"tokens": [f"<{i}>" for i in range(7, 14)], "at": 1}
    end = context_window(5, token_ids, positions, Decoded())
    assert end == {"tokens": [f"<{i}>" for i in range(0, 7)], "at": 5}


def test_the_token_distribution_of_a_token_specific_feature_is_its_token():
    token_ids = torch.tensor([4, 9, 4, 2, 4, 9, 7, 4])
    assert token_distribution(token_ids == 4, token_ids, Decoded()) == [["<4>", 1.0]]
    spread = token_distribution(torch.ones(8, dtype=torch.bool), token_ids, Decoded())
    assert spread[0] == ["<4>", 0.5] and sorted(share for _, share in spread) == [0.125, 0.125, 0.25, 0.5]
    assert token_distribution(torch.zeros(8, dtype=torch.bool), token_ids, Decoded()) == []


def test_pages_on_the_tiny_trajectory_show_profiles_contexts_and_the_direct_logit_path(tiny_trajectory_folder):
    snapshots = list(directory_trajectory(tiny_trajectory_folder).select(3, "log").snapshots)
    steps = [snapshot.step for snapshot in snapshots]
    tokenizer = load_tokenizer(snapshots[-1])
    language_model = load_model(snapshots[-1])
    unembedding = language_model.get_output_embeddings().weight.detach()
    d_model = unembedding.shape[1]
    generator = torch.Generator().manual_seed(0)
    crosscoder = CrossCoder(len(snapshots), d_model, CrossCoderConfig(expansion_ratio=2, sparsity="jumprelu"))
    held_out = torch.randn(600, len(snapshots), d_model, generator=generator)
    crosscoder.initialize(held_out, generator)
    # Feature 0's last decoder, read through the final norm's gain, is the unembedding row of the token whose row is
    # longest: no other row has a larger dot product with it, so that token is the one it promotes most.
    token = int(unembedding.norm(dim=1).argmax())
    gain = pages.final_norm_gain(language_model)
    with torch.no_grad():
        crosscoder.decoder_weight[0, -1] = unembedding[token] / gain
    n_features = crosscoder.decoder_weight.shape[0]
    table = feature_table(
        n_features,
        emergence_step=[float(steps[1])] * n_features,
        **{f"ie_step{step}": torch.linspace(1, 0, n_features).tolist() for step in steps},
    )
    token_ids = torch.randint(0, len(tokenizer), (600,), generator=generator)
    positions = torch.arange(1, 31).repeat(20)
    result = feature_pages(crosscoder, held_out, token_ids, positions, tokenizer, snapshots, steps, table, seed=0)
    assert result["steps"] == steps and result["method"] == "jumprelu"
    first = result["features"][0]
    assert first["feature"] == 0 and first["kind"] == "emergent"
    assert len(first["decoder_norms"]) == len(steps) and first["cosine_to_last"][-1] == pytest.approx(1.0)
    assert set(first["top_contexts"]) == {str(step) for step in steps}  # JumpReLU gates each snapshot apart
    for top in first["top_contexts"].values():
        activations = [activation for _, activation in top]
        assert activations == sorted(activations, reverse=True) and all(value > 0 for value in activations)
        for index, _ in top:
            context = first["contexts"][index]
            assert 1 <= len(context["tokens"]) <= 2 * pages.CONTEXT_SIDE + 1
    last = first["logit_effects"][str(steps[-1])]
    assert last["promoted"][0][0] == tokenizer.decode([token])
    assert set(first["logit_effects"]) == {str(steps[0]), str(steps[1]), str(steps[-1])}
    json.dumps(result, allow_nan=False)  # the artifact is plain JSON


def test_partners_are_read_in_both_directions_of_the_matching():
    partners = pd.DataFrame(
        [("run-a", 3, "run-b", 7, 0.91), ("run-c", 5, "run-a", 3, 0.8), ("run-b", 1, "run-c", 2, 0.75)],
        columns=PARTNER_COLUMNS,
    )
    found = trial_partners(partners, "run-a", {"run-b": "seed=1", "run-c": "seed=2"})
    assert [(p["trial"], p["feature"], p["cosine"]) for p in found["3"]] == [("seed=1", 7, 0.91), ("seed=2", 5, 0.8)]
    assert set(found) == {"3"}


def test_the_page_keeps_hostile_tokens_inside_its_data():
    hostile = "</script><script>alert(1)</script>"
    data = {"steps": [0, 1], "method": "l1", "features": [{"feature": 0, "top_tokens": [[hostile, 1.0]]}]}
    page = browser_html("t", data, {}, {}, "")
    assert hostile not in page
    payload = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(payload)["features"][0]["top_tokens"][0][0] == hostile
    assert browser_name("expansion_ratio=4 seed/1") == "expansion_ratio=4_seed_1.html"
