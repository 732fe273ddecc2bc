"""The reviewer's counter-examples to the rules, each coming out as its truth says, and the planted cases' stated
truths: noise curves never turn beyond the nominal rate, four snapshots cannot decide a turn, a model running
backwards is not judged, "mostly near the transition" is read on the share of features, features that only fire
more often are not abstract, a time trend is not a proxy, a small dictionary's causal sets stay small."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from crosscoder.evolution import smallest_valley_p, valley_test
from crosscoder.feature_statistics import Interval, bootstrap, pearson, spearman, token_entropy
from crosscoder.probing import within_snapshot_correlation
from study.analysis.causal_statistics import split_prompts
from study.analysis.claim_statistics import near_share, token_specificity
from study.analysis.rules import Trials, against_smallest_effect, judge, judge_sweep
from study.lm.planted import PRESETS, planted_folder, read_truth
from study.record import CUT_OFFS, ablate_count, keep_count
from tests.trial_tables import good_trials

GRID = [0, 1, 2, 4, 8, 16, 32, 64, 128]
TURNING = good_trials(2, transition_step=[16.0, 16.0], task_learned_step=[16.0, 16.0], relie_onset_step=[16.0, 32.0])
NO_PAIRS = pd.DataFrame(columns=["kind", "shared_share", "mean_max_cosine", "top_feature_jaccard"])
ORDER_CLAIMS = ("transition", "emergence", "token_specificity")


def outcomes(grid: list[int] = GRID, learns: bool | None = True, **changes) -> dict[str, str]:
    columns = dict(TURNING, **changes)
    frame = pd.DataFrame({"run_id": ["a", "b"], **columns})
    trials = Trials(frame, ["seed"], {run_id: grid for run_id in frame["run_id"]}, 2, learns)
    return {verdict.claim: verdict.verdict for verdict in judge(trials, NO_PAIRS)}


@pytest.mark.parametrize("n_snapshots", [4, 9])
def test_noise_curves_turn_no_more_often_than_the_nominal_rate(n_snapshots):
    generator = torch.Generator().manual_seed(n_snapshots)
    p_values = [valley_test(torch.randn(n_snapshots, generator=generator), 199, seed).p_value for seed in range(200)]
    false_turns = sum(p <= CUT_OFFS.turn_alpha for p in p_values) / len(p_values)
    # The rate's sampling error over 200 curves is about 1.5 points.
    assert false_turns <= CUT_OFFS.turn_alpha + 0.03, false_turns
    if n_snapshots == 4:
        assert false_turns == 0 and smallest_valley_p(4) == 0.25  # four snapshots can never show a turn at 5 %


def test_a_real_turn_is_found_and_a_monotone_curve_fails():
    valley = [17.0, 17.6, 17.8, 18.0, 18.1, 17.3, 14.2, 7.0, 6.3, 8.4, 18.7, 19.3]  # the planted dictionary's
    rising = [18.1] * 7 + [19.6, 20.7, 21.4, 21.4, 21.4]  # the no_turn case's
    assert valley_test(valley).p_value <= CUT_OFFS.turn_alpha
    # The embedded model's x4 crosscoder: a collapse from initialisation, then a rise of a sixth of the range.
    assert valley_test([46.05, 46.09, 45.95, 26.38, 7.83, 7.57, 9.36, 11.35, 13.49]).p_value <= CUT_OFFS.turn_alpha
    flat = valley_test(rising)
    assert flat.p_value > CUT_OFFS.turn_alpha and flat.valley_fit == 0 and flat.monotone_fit >= 0.99
    assert outcomes()["transition"] == "holds"
    assert outcomes(transition_p_value=[0.01, 0.7], transition_monotone_fit=[0.3, 0.95])["transition"] == "fails"
    # An exchangeable-noise curve has a minimum inside most of the time; it is undecided, not a turn.
    assert outcomes(transition_p_value=[0.4, 0.7], transition_monotone_fit=[0.3, 0.2])["transition"] == "inconclusive"


def test_four_snapshots_cannot_decide_a_turn():
    assert outcomes(grid=[0, 16, 128, 1000])["transition"] == "inconclusive"


def test_a_model_running_backwards_is_not_judged_on_order():
    """The reversed trajectory: its order coherence is a training run's (it reads |i - j|), its held-out loss rises."""
    reversed_run = outcomes(learns=False)
    assert all(reversed_run[claim] == "inconclusive" for claim in ORDER_CLAIMS), reversed_run
    assert all(outcomes()[claim] == "holds" for claim in ORDER_CLAIMS)


def test_a_shuffled_twin_is_not_judged_on_token_specificity():
    """A permutation that leaves early checkpoints early can give positive intervals; the order gate stops it."""
    assert outcomes(order_coherence=[0.1, 0.2])["token_specificity"] == "inconclusive"


def test_emergence_is_read_on_the_share_near_the_transition():
    """40 % of the emergent features at step 2, 20 % at 128, 40 % at 1000: the median is 128, the share near it 0.2."""
    steps = [2] * 4 + [128] * 2 + [1000] * 4
    share = near_share(steps, 128)
    assert share == pytest.approx(0.2)
    assert outcomes(emergence_near_share=[share, share])["emergence"] == "fails"
    assert near_share([64, 128, 256], 128) == 1.0 and math.isnan(near_share(steps, None))
    assert outcomes(transition_p_value=[0.4, 0.7], transition_monotone_fit=[0.9, 0.9])["emergence"] == "fails"


def test_an_underpowered_interval_beside_positive_ones_is_not_a_failure():
    intervals = dict(token_specificity_r_low=[0.54, -0.14], token_specificity_r_high=[0.80, 0.43])
    assert outcomes(**intervals)["token_specificity"] == "holds"


@pytest.fixture(scope="module")
def planted_truths(tmp_path_factory):
    cache = tmp_path_factory.mktemp("planted-cases")
    return {name: read_truth(planted_folder(config, cache)) for name, config in PRESETS.items()}


def test_every_planted_case_states_its_truth_per_claim(planted_truths):
    expected = {
        "default": ("holds", "holds", "holds"),
        "no_turn": ("fails", "fails", "inconclusive"),
        "late_emergence": ("holds", "fails", "holds"),
        "mostly_emergent": ("holds", "holds", "holds"),
        "mostly_initial": ("holds", "holds", "holds"),
        "turn_32": ("holds", "holds", "holds"),
        "turn_512": ("holds", "holds", "holds"),
        "steps_4": ("inconclusive", "inconclusive", "holds"),
        "steps_32": ("holds", "holds", "holds"),
        "task": ("holds", "holds", "holds"),
        "task_dense": ("holds", "holds", "holds"),
    }
    causal = {"task": "holds", "task_dense": "fails"}
    for name, truth in planted_truths.items():
        claims = truth["claims"]
        assert tuple(claims[claim]["verdict"] for claim in ORDER_CLAIMS) == expected[name], (name, claims)
        assert claims["causal"]["verdict"] == causal.get(name, "inconclusive"), (name, claims["causal"])
        if name not in causal:  # no task: nothing to ablate, nothing to date
            assert claims["relie"]["verdict"] == "inconclusive"
        assert truth["turning_step"] == PRESETS[name].turning_step  # the truth turns where it was told to


def test_the_no_turn_case_is_monotone_and_initial_shares_differ(planted_truths):
    dimensionality = planted_truths["no_turn"]["dimensionality_by_step"]
    assert all(later >= earlier - 1e-6 for earlier, later in zip(dimensionality, dimensionality[1:]))
    assert (
        planted_truths["mostly_initial"]["initial_share"]
        > 0.9
        > 0.4
        > planted_truths["mostly_emergent"]["initial_share"]
    )


def test_a_claim_is_judged_per_value_of_the_swept_key_and_across_it():
    from study.analysis.rules import judge_sweep

    frame = pd.DataFrame(
        {
            "run_id": ["a", "b", "c", "d"],
            "params.expansion_ratio": ["4", "4", "16", "16"],
            **{key: values * 2 for key, values in TURNING.items()},
        }
    )
    # x16 has a dimensionality curve a monotone one explains: no turn there, a turn at x4.
    frame.loc[frame["params.expansion_ratio"] == "16", ["transition_p_value", "transition_monotone_fit"]] = [0.6, 0.95]
    trials = Trials(frame, ["expansion_ratio"], {run_id: GRID for run_id in frame["run_id"]}, 2, True)
    verdicts = {verdict.claim: verdict for verdict in judge_sweep(trials, NO_PAIRS)}
    transition = verdicts["transition"]
    assert transition.by_value == (("expansion_ratio=4", "holds"), ("expansion_ratio=16", "fails"))
    assert transition.verdict == "mixed"
    assert verdicts["emergence"].by_value == (("expansion_ratio=4", "holds"), ("expansion_ratio=16", "fails"))
    assert verdicts["quality"].verdict == "holds" and verdicts["stability"].by_value == ()  # pairs: the whole axis
    one_each = Trials(frame.iloc[[0, 2]], ["expansion_ratio"], trials.steps, 2, True)
    single = {verdict.claim: verdict for verdict in judge_sweep(one_each, NO_PAIRS)}
    assert single["transition"].by_value == (("expansion_ratio=4", "holds"), ("expansion_ratio=16", "fails"))


def test_the_planted_task_is_carried_by_its_features_and_the_dense_one_by_none(planted_truths):
    sparse, dense = planted_truths["task"]["task"], planted_truths["task_dense"]["task"]
    assert sparse["ablate_left"] < 0.5 and sparse["keep_recovered"] == pytest.approx(1.0)  # a few features carry it
    assert sorted(sparse["top_features"]) == sparse["features"]  # the planted task features carry it all
    assert dense["features"] == [] and dense["keep_recovered"] < 0.9  # a tenth of the dictionary does not restore it


def test_seeds_must_turn_together_but_another_key_may_move_the_turn():
    apart = dict(transition_step=[2.0, 128.0])
    assert outcomes(**apart)["transition"] == "fails"  # two seeds of one configuration, turning far apart
    frame = pd.DataFrame({"run_id": ["a", "b"], "params.expansion_ratio": ["4", "16"], **dict(TURNING, **apart)})
    trials = Trials(frame, ["expansion_ratio"], {run_id: GRID for run_id in frame["run_id"]}, 2, True)
    assert next(v for v in judge(trials, NO_PAIRS) if v.claim == "transition").verdict == "holds"


def test_features_that_only_fire_more_often_are_not_read_as_abstract():
    generator = torch.Generator().manual_seed(0)
    n_tokens, n_features, n_snapshots = 4000, 48, 8
    token_ids = torch.randint(0, 50, (n_tokens,), generator=generator)
    peak = torch.arange(n_features) % n_snapshots
    # One token distribution for all; the later a feature peaks, the more often it fires.
    firing_rate = 0.01 + 0.04 * peak / n_snapshots
    same_tokens = (torch.rand(n_tokens, n_features, generator=generator) < firing_rate).float()
    assert spearman(peak.float(), token_entropy(same_tokens, token_ids)) > 0.5  # the confound, read on every firing
    confounded = token_specificity(same_tokens, token_ids, peak, n_snapshots, seed=0).r
    assert against_smallest_effect(confounded, CUT_OFFS.token_specificity_r, larger_holds=True) != "holds", confounded
    # The real thing: early features read two token ids, later ones many, at the same firing rate.
    vocabulary = 2 + 6 * peak  # token ids each feature fires on
    reads = (token_ids[:, None] % 50) < vocabulary[None, :]
    specific = (reads & (torch.rand(n_tokens, n_features, generator=generator) < 0.3)).float()
    real = token_specificity(specific, token_ids, peak, n_snapshots, seed=0).r
    assert against_smallest_effect(real, CUT_OFFS.token_specificity_r, larger_holds=True) == "holds", real


def test_a_time_trend_shared_by_probe_errors_and_norms_is_not_a_proxy():
    generator = torch.Generator().manual_seed(1)
    n_features, n_snapshots = 32, 8
    trend = torch.linspace(0, 1, n_snapshots).expand(n_features, n_snapshots)

    def within(errors: torch.Tensor, norms: torch.Tensor) -> Interval:
        return bootstrap(lambda rows: within_snapshot_correlation(errors[rows], norms[rows]), n_features, seed=0)

    # Every feature's probe error falls while every norm grows, with nothing linking the two inside a snapshot.
    norms = 0.2 + 0.8 * trend + 0.05 * torch.randn(n_features, n_snapshots, generator=generator)
    errors = 0.5 - 0.4 * trend + 0.05 * torch.randn(n_features, n_snapshots, generator=generator)
    assert pearson(errors.flatten(), norms.flatten()) < -0.8  # paper 1's pooled figure would call it a proxy
    assert against_smallest_effect(within(errors, norms), CUT_OFFS.norm_proxy_r, larger_holds=False) != "holds"
    # Where a feature's norm says how well a probe finds it, at every snapshot, the proxy holds.
    norms = torch.rand(n_features, n_snapshots, generator=generator)
    errors = 0.5 - 0.4 * norms + 0.03 * torch.randn(n_features, n_snapshots, generator=generator)
    assert against_smallest_effect(within(errors, norms), CUT_OFFS.norm_proxy_r, larger_holds=False) == "holds"


def test_a_small_dictionary_ablates_and_keeps_a_small_share_of_itself():
    assert (ablate_count(98_304), keep_count(98_304)) == (15, 500)  # paper 1's counts in its dictionary
    assert (ablate_count(128), keep_count(128)) == (6, 13)  # not 15 and 20: an eighth and a sixth of 128
    ranking, measuring = split_prompts(8)
    assert ranking.tolist() == [0, 1, 4, 5] and measuring.tolist() == [2, 3, 6, 7]  # both classes in each half


def test_causal_needs_its_intervals_clear_the_random_baseline_beaten_and_attribution_complete():
    assert outcomes()["causal"] == "holds"
    random_as_good = dict(causal_random_ablate_relative=[0.3, 0.35], causal_random_keep_relative=[0.9, 0.95])
    assert outcomes(**random_as_good)["causal"] == "fails"  # any features would do
    straddling = dict(
        causal_ablate_relative=[0.45, 0.55],
        causal_ablate_relative_low=[0.2, 0.3],
        causal_ablate_relative_high=[0.7, 0.8],
    )
    assert outcomes(**straddling)["causal"] == "inconclusive"  # too few prompts to tell
    incomplete = dict(attribution_gap_max=[0.5, 0.6])
    assert outcomes(**incomplete)["causal"] == "inconclusive"  # the ranking explains too little of the metric


def test_a_grid_with_a_failed_value_says_which():
    frame = pd.DataFrame({"run_id": ["a", "b"], "params.expansion_ratio": ["4", "4"], **TURNING})
    holed = Trials(frame, ["expansion_ratio"], {run_id: GRID for run_id in frame["run_id"]}, 2, True)
    holed = holed._replace(unfinished=(("expansion_ratio=16", "FAILED"), ("expansion_ratio=4", "KILLED")))
    transition = next(verdict for verdict in judge_sweep(holed, NO_PAIRS) if verdict.claim == "transition")
    assert transition.by_value == (("expansion_ratio=4", "holds"), ("expansion_ratio=16", "missing: failed"))
    assert transition.verdict == "holds"  # read from what finished, and saying what did not:
    assert "read without 2 trial(s) that did not finish: expansion_ratio=16 (FAILED), expansion_ratio=4 (KILLED)" in (
        transition.evidence
    )


def test_each_verdict_says_whether_its_statistic_had_settled_along_training():
    frame = pd.DataFrame({"run_id": ["a", "b"], **TURNING})
    checkpoints = [200, 400, 600, 800, 1000]

    def evidence(turning_a: list[float], turning_b: list[float]) -> str:
        along = {
            run_id: pd.DataFrame({"step": checkpoints, "transition_step": turning, "initial_share": [0.3] * 5})
            for run_id, turning in (("a", turning_a), ("b", turning_b))
        }
        trials = Trials(frame, ["seed"], {run_id: GRID for run_id in ("a", "b")}, 2, True, along_training=along)
        return next(verdict.evidence for verdict in judge(trials, NO_PAIRS) if verdict.claim == "transition")

    early = evidence([128.0, 16.0, 16.0, 16.0, 16.0], [16.0, 128.0, 16.0, 16.0, 16.0])
    assert "turning step settled since 60% of the training steps in every trial" in early  # the later of the two
    late = evidence([16.0] * 5, [16.0, 16.0, 16.0, 16.0, 128.0])
    assert "still moving at the last checkpoint in 1 of 2 trials: turning step 16 → 128" in late
    assert "not followed along training" in outcomes_evidence()


def outcomes_evidence() -> str:
    frame = pd.DataFrame({"run_id": ["a", "b"], **TURNING})
    trials = Trials(frame, ["seed"], {run_id: GRID for run_id in ("a", "b")}, 2, True)
    return next(verdict.evidence for verdict in judge(trials, NO_PAIRS) if verdict.claim == "emergence")


def test_each_verdict_says_whether_it_would_flip_at_its_cut_offs_neighbours():
    near_the_cut = dict(token_specificity_r=[0.25, 0.25], token_specificity_r_low=[0.13, 0.13])
    frame = pd.DataFrame({"run_id": ["a", "b"], **dict(TURNING, **near_the_cut)})
    trials = Trials(frame, ["seed"], {run_id: GRID for run_id in ("a", "b")}, 2, True)
    verdicts = {verdict.claim: verdict for verdict in judge_sweep(trials, NO_PAIRS)}
    specificity = verdicts["token_specificity"]
    assert specificity.verdict == "holds"  # above 0.1, but not above the next value up:
    assert "would flip at token_specificity_r 0.2 (inconclusive)" in specificity.evidence
    assert verdicts["norm_proxy"].evidence.endswith("the same at the cut-offs' neighbouring values")
