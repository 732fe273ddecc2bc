"""The claim statistics on planted inputs with known answers (no training: each input is built to have one)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from crosscoder.evolution import emergence, feature_dimensionality, turning_point
from crosscoder.feature_statistics import spearman, token_entropy, top_activation_overlap
from crosscoder.matching import decoder_cosines, match_features, stability
from crosscoder.probing import norm_proxy, probe_errors
from crosscoder.trainer import loss_drop_last_fifth
from reports.robustness import trial_flags
from study.analysis.model_curves import NgramStatistics
from study.analysis.rules import Trials, judge
from study.sweep.summary import convergence_warning
from tests.trial_tables import good_trials


def orthonormal(count: int, dimension: int, seed: int = 0) -> torch.Tensor:
    matrix = torch.randn(dimension, dimension, generator=torch.Generator().manual_seed(seed))
    return torch.linalg.qr(matrix).Q[:count]


def shared_directions(n_features: int, n_directions: int, dimension: int, seed: int) -> torch.Tensor:
    """[n_features, d]: n_directions orthonormal directions, each used by n_features / n_directions features."""
    return orthonormal(n_directions, dimension, seed).repeat_interleave(n_features // n_directions, 0)


def test_dimensionality_is_one_over_the_features_sharing_a_direction():
    directions = orthonormal(4, 8)
    decoder = torch.stack([directions[0], directions[1], directions[1], 3 * directions[2], torch.zeros(8)])[:, None, :]
    dimensionality = feature_dimensionality(decoder)[:, 0]
    assert torch.allclose(dimensionality, torch.tensor([1.0, 0.5, 0.5, 1.0, 0.0]), atol=1e-6)


def test_turning_point_is_found_where_it_was_planted():
    # Snapshot s uses m_s orthonormal directions shared evenly by 32 features: total dimensionality m_s.
    planted = [16, 8, 4, 2, 4, 8, 16]
    decoder = torch.stack([shared_directions(32, m, 32, seed=s) for s, m in enumerate(planted)], 1)
    total = feature_dimensionality(decoder).sum(0)
    assert torch.allclose(total, torch.tensor(planted, dtype=torch.float32), atol=1e-4)
    steps = [0, 1, 2, 4, 8, 16, 32]
    assert turning_point(total, steps) == (3, 4)
    noisy = total + 0.1 * torch.randn(7, generator=torch.Generator().manual_seed(0))
    assert turning_point(noisy, steps).step == 4
    assert turning_point([5.0, 4.0, 3.0, 2.0], [0, 1, 2, 3]) == (None, None)  # only falls
    assert turning_point([1.0, 2.0, 3.0], [0, 1, 2]) == (None, None)  # only rises


def test_emergence_steps_and_shares_are_recovered():
    steps = [0, 10, 100, 1000]
    planted_first = torch.tensor([0, 0, 1, 2, 2, 3])
    snapshot = torch.arange(4)
    # Norms grow to the maximum from the planted snapshot on, and sit at 0.2 of it before.
    norms = torch.where(snapshot >= planted_first[:, None], 1.0 + 0.1 * snapshot, 0.2)
    result = emergence(norms, steps)
    assert torch.equal(result.emergence_index, planted_first)
    assert result.initial_share == pytest.approx(2 / 6) and result.emergent_share == pytest.approx(4 / 6)
    assert result.median_emergence_step == 100.0  # emergent steps 10, 100, 100, 1000: lower median
    left_out = emergence(norms, steps, include=planted_first > 0)
    assert left_out.initial_share == 0.0 and left_out.emergence_index[0] == -1
    assert torch.equal(result.peak_index, torch.full((6,), 3))


def test_token_entropy_is_zero_for_one_token_and_log_k_for_k():
    token_ids = torch.tensor([5, 5, 7, 9, 11, 5])
    activations = torch.tensor(
        [
            [2.0, 1.0, 0.0],
            [1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 1.0, 0.0],
            [3.0, 0.0, 0.0],
        ]
    )
    entropy = token_entropy(activations, token_ids)
    assert entropy[0] == 0.0  # fires only on token 5
    assert entropy[1].item() == pytest.approx(math.log(4))  # evenly on 4 token ids
    assert math.isnan(entropy[2])  # never fires


def test_top_activation_overlap():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(200, 2, generator=generator)
    same = torch.stack([base, base + 1e-3 * torch.randn(200, 2, generator=generator)])
    assert torch.equal(top_activation_overlap(same, 10), torch.ones(2, 1))
    disjoint = torch.zeros(2, 200, 1)
    disjoint[0, :10, 0] = 1.0
    disjoint[1, 10:20, 0] = 1.0
    assert top_activation_overlap(disjoint, 10).item() == 0.0


def test_probe_error_is_low_where_the_feature_is_written_and_chance_where_not():
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(4000, 2, 16, generator=generator)
    direction = torch.randn(3, 16, generator=generator)
    # Three features that fire on 10 % of tokens, read from snapshot 0 only.
    projections = activations[:, 0] @ direction.T
    active = projections > projections.quantile(0.9, dim=0)
    errors = probe_errors(activations, active)
    assert (errors[:, 0] < 0.1).all() and ((errors[:, 1] - 0.5).abs() < 0.1).all()
    proxy = norm_proxy(activations, active, torch.tensor([[1.0, 0.1]] * 3))
    assert proxy.correlation < -0.95
    never = probe_errors(activations, torch.zeros(4000, 1, dtype=torch.bool))
    assert never.isnan().all()  # nothing to learn from


def test_stability_identical_random_and_permuted_with_noise():
    generator = torch.Generator().manual_seed(0)
    decoder = torch.randn(64, 3, 32, generator=generator)
    identical = stability(decoder, decoder.clone())
    assert identical.shared_share == 1.0 and identical.mean_max_cosine == pytest.approx(1.0)
    unrelated = stability(decoder, torch.randn(64, 3, 32, generator=generator))
    assert unrelated.shared_share == 0.0 and unrelated.mean_max_cosine < 0.4
    # Half the features permuted with small noise (cosine about 0.99), half replaced by new ones.
    permutation = torch.randperm(64, generator=generator)
    other = decoder[permutation] + 0.1 * torch.randn(64, 3, 32, generator=generator)
    replaced = permutation[:32]
    other[torch.isin(permutation, replaced)] = torch.randn(32, 3, 32, generator=generator)
    assert stability(decoder, other).shared_share == 0.5


def test_ngram_kl_is_zero_for_a_model_that_predicts_the_ngram_statistics():
    zipf = 1 / torch.arange(1.0, 13.0)
    contexts = torch.multinomial(zipf, 300 * 16, replacement=True, generator=torch.Generator().manual_seed(0)).view(
        300, 16
    )
    statistics = NgramStatistics(contexts, vocab_size=12)
    unigram = torch.from_numpy(statistics.unigram).float().log()
    assert statistics.unigram_kl(unigram.expand(40, -1)) == pytest.approx(0.0, abs=1e-6)
    previous = contexts[:3, :-1].flatten()
    bigram_log_probs = torch.full((len(previous), 12), -1e9)
    for row, token in enumerate(previous.tolist()):
        start, end = statistics.row_start[token], statistics.row_start[token + 1]
        bigram_log_probs[row, torch.from_numpy(statistics.following[start:end])] = (
            torch.from_numpy(statistics.conditional[start:end]).float().log()
        )
    kl, entropy = statistics.bigram_kl_and_entropy(bigram_log_probs, previous)
    assert kl == pytest.approx(0.0, abs=1e-5) and 0 < entropy < math.log(12)
    assert statistics.unigram_kl(torch.full((40, 12), -math.log(12))) > 0.1  # a uniform model is off


def test_spearman_of_monotone_and_reversed():
    x = torch.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)


def trials(**columns) -> Trials:
    frame = pd.DataFrame({"run_id": [f"r{i}" for i in range(len(next(iter(columns.values()))))], **columns})
    return Trials(frame, ["expansion_ratio"], {run_id: [0, 1, 2, 4, 8, 16] for run_id in frame["run_id"]})


def verdicts_of(trial_set: Trials, stabilities: pd.DataFrame | None = None) -> dict[str, tuple[str, str]]:
    stabilities = (
        stabilities
        if stabilities is not None
        else pd.DataFrame(columns=["kind", "shared_share", "mean_max_cosine", "top_feature_jaccard"])
    )
    return {v.claim: (v.verdict, v.evidence) for v in judge(trial_set, stabilities)}


# Three trials whose every statistic passes its claim's rule.
GOOD_TRIALS = good_trials(3)


def test_verdicts_follow_their_rules():
    good = GOOD_TRIALS
    verdicts = verdicts_of(trials(**good))
    assert {claim: verdict for claim, (verdict, _) in verdicts.items()} == {
        "transition": "holds",
        "emergence": "holds",
        "norm_proxy": "holds",
        "quality": "holds",
        "stability": "inconclusive",
        "token_specificity": "holds",
        "relie": "holds",
        "causal": "holds",
    }
    bad = dict(
        good,
        transition_step=[1.0, 4.0, 16.0],
        initial_share=[0.1, 0.5, 0.3],
        norm_proxy_r_within=[-0.2, -0.1, -0.3],
        norm_proxy_r_within_low=[-0.35, -0.25, -0.4],
        norm_proxy_r_within_high=[-0.05, 0.05, -0.2],
        dead_fraction=[0.0, 0.3, 0.0],
        token_specificity_r=[-0.2, -0.1, 0.0],
        token_specificity_r_low=[-0.4, -0.3, -0.1],
        token_specificity_r_high=[-0.1, 0.05, 0.08],
        causal_keep_relative=[0.6, 0.5, 0.7],
        causal_keep_relative_low=[0.5, 0.4, 0.6],
        causal_keep_relative_high=[0.7, 0.6, 0.8],
        relie_onset_step=[16.0, 16.0, 16.0],
    )
    verdicts = verdicts_of(trials(**bad))
    assert all(
        verdicts[claim][0] == "fails"
        for claim in ("transition", "emergence", "norm_proxy", "quality", "token_specificity", "causal", "relie")
    )
    assert "2 of 3 trials meet all cut-offs" in verdicts["quality"][1]
    assert "0 of 3 trials' top features start to matter near" in verdicts["relie"][1]
    untrained = verdicts_of(
        trials(**dict(good, causal_ablate_relative=[math.nan] * 3, causal_keep_relative=[math.nan] * 3))
    )
    assert untrained["causal"][0] == "inconclusive"
    only_rising = dict(transition_p_value=[0.01, 0.6, 0.01], transition_monotone_fit=[0.3, 0.95, 0.3])
    missing_turn = verdicts_of(trials(**dict(good, **only_rising, transition_step=[4.0, math.nan, 4.0])))
    assert missing_turn["transition"][0] == "fails"  # a curve a monotone one explains has no turn
    noisy = dict(only_rising, transition_monotone_fit=[0.3, 0.4, 0.3])
    assert verdicts_of(trials(**dict(good, **noisy)))["transition"][0] == "inconclusive"  # neither: undecided
    seeds = pd.DataFrame(
        {
            "kind": ["seed", "seed"],
            "shared_share": [0.4, 0.3],
            "mean_max_cosine": [0.8, 0.7],
            "top_feature_jaccard": [0.6, 0.5],
        }
    )
    assert verdicts_of(trials(**good), seeds)["stability"][0] == "holds"
    assert verdicts_of(trials(**good), seeds.assign(shared_share=[0.1, 0.2]))["stability"][0] == "fails"
    assert "top-feature Jaccard across seeds 0.55" in verdicts_of(trials(**good), seeds)["relie"][1]
    far_from_turn = verdicts_of(trials(**dict(good, emergence_near_share=[0.2, 0.2, 0.2])))
    assert far_from_turn["emergence"][0] == "fails"  # features emerge, but not near the transition
    assert "near the turning step 0.20, 0.20, 0.20" in far_from_turn["emergence"][1]
    never_learned = dict(good, task_learned_step=[math.nan] * 3, task_learned_snapshots=[0.0] * 3)
    assert verdicts_of(trials(**never_learned), seeds)["relie"][0] == "inconclusive"  # no task, nothing to date
    from_the_start = verdicts_of(trials(**dict(good, task_learned_step=[0.0] * 3)))["relie"]
    assert from_the_start[0] == "inconclusive" and "first snapshot" in from_the_start[1]


def test_a_verdict_from_unconverged_trials_says_so_and_keeps_its_outcome():
    judged = dict(
        GOOD_TRIALS,
        norm_proxy_r_within=[-0.2, -0.1, -0.3],
        norm_proxy_r_within_low=[-0.3, -0.2, -0.4],
        norm_proxy_r_within_high=[-0.1, 0.0, -0.2],
    )
    flat = verdicts_of(trials(**judged, loss_drop_last_fifth=[0.01, 0.001, 0.015]))
    moving = verdicts_of(trials(**judged, loss_drop_last_fifth=[0.05, 0.001, 0.08]))
    assert not any("not converged" in evidence for _, evidence in flat.values())
    caveat = "; not converged: 2 of 3 trials (training loss still fell 5.0% to 8.0% over the last fifth"
    for claim, outcome in (("transition", "holds"), ("norm_proxy", "fails")):
        assert flat[claim][0] == moving[claim][0] == outcome
        assert moving[claim][1].startswith(flat[claim][1] + caveat)
    # An inconclusive verdict was not read from the trials' dictionaries: nothing to qualify.
    assert moving["stability"] == flat["stability"] and moving["stability"][0] == "inconclusive"


def exact_stability(decoder_a: torch.Tensor, decoder_b: torch.Tensor, threshold: float = 0.7) -> tuple[float, float]:
    """The reference: Hungarian on the dense cosine matrix."""
    match = match_features(decoder_a, decoder_b)
    cosines = decoder_cosines(decoder_a, decoder_b)
    return float((match.cosines > threshold).double().mean()), float(cosines.max(1).values.mean())


@pytest.mark.parametrize("n_features", [256, 4096])
def test_blocked_sparse_stability_equals_the_dense_hungarian(n_features):
    """Pairs at every cosine, crowded neighbourhoods (several near-copies of one feature, so components
    hold more than one edge) and features with no partner, in a smaller and a larger dictionary."""
    generator = torch.Generator().manual_seed(n_features)
    a = torch.randn(n_features, 4, 24, generator=generator)
    copies = a[torch.randint(0, n_features, (n_features + n_features // 2,), generator=generator)]
    noise = torch.rand(len(copies), 1, 1, generator=generator) * 1.5  # cosines from about 1 down to about 0.5
    b = copies + noise * torch.randn(copies.shape, generator=generator) / 24**0.5 * copies.norm(dim=-1, keepdim=True)
    shared, mean_max = exact_stability(a, b)
    result = stability(a, b)
    assert 0.2 < shared < 0.9  # a test where the threshold matters
    assert result.shared_share == pytest.approx(shared, abs=0.01)
    assert result.mean_max_cosine == pytest.approx(mean_max, abs=1e-4)
    assert (result.match.cosines > 0.7).all() and len(set(result.match.columns.tolist())) == len(result.match.columns)


def test_a_trial_still_learning_or_pinned_at_k_is_flagged():
    falling = [{"step": step, "loss": 1.0 / step} for step in range(100, 1001, 100)]
    flat = [{"step": step, "loss": 0.5 + 1e-4 * (step % 200 == 0)} for step in range(100, 1001, 100)]
    assert loss_drop_last_fifth(falling) == pytest.approx((1 / 800 - 1 / 1000) / (1 / 1000))  # 0.25
    assert abs(loss_drop_last_fifth(flat)) < 1e-3
    assert math.isnan(loss_drop_last_fifth(falling[-1:]))  # one entry tells nothing
    assert "not converged: loss fell 25.0%" in trial_flags({"loss_drop_last_fifth": 0.25, "l0": 40.0})
    assert trial_flags({"loss_drop_last_fifth": 0.001, "l0": 40.0, "params.sparsity": "l1"}) == ""
    pinned = {"loss_drop_last_fifth": 0.0, "l0": 32.0, "params.sparsity": "topk", "params.k": "32"}
    assert trial_flags(pinned).startswith("L0 pinned at k")
    assert trial_flags({**pinned, "l0": 7.5, "params.sparsity": "batchtopk", "params.k": "32"}) == ""
    # The sweep's closing lines say the same for the whole table; nothing when every trial is flat.
    table = pd.DataFrame({"expansion_ratio": [4, 8, 16], "loss_drop_last_fifth": [0.105, 0.001, 0.079]})
    warning = convergence_warning(table)
    assert warning.startswith("not converged: 2 of 3 trials") and "7.9% to 10.5%" in warning
    assert convergence_warning(table.assign(loss_drop_last_fifth=[0.01, 0.001, None])) is None
