"""The controls behind the verdicts, where the answer is known: null twins of a trajectory, the
untrained crosscoder, replicates, too few trials, a task never learned."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from crosscoder import CrossCoder, CrossCoderConfig
from crosscoder.evolution import order_coherence, unresolved
from study.activations.contexts import sample_contexts
from study.activations.direct import direct_activations
from study.analysis.rules import Trials, judge
from study.analysis.verdicts import pairs_differing_in
from study.lm.trajectory import directory_trajectory, load_tokenizer, null_twin, resolve_trajectory
from tests.trial_tables import good_trials


def test_null_twins_keep_the_step_names_and_lose_the_order(tiny_trajectory_folder):
    trajectory = directory_trajectory(tiny_trajectory_folder)
    frozen = resolve_trajectory(f"frozen:{tiny_trajectory_folder}")
    shuffled = resolve_trajectory(f"shuffled:{tiny_trajectory_folder}")
    assert frozen.steps == shuffled.steps == trajectory.steps
    assert {snapshot.source for snapshot in frozen.snapshots} == {trajectory.snapshots[-1].source}
    assert sorted(s.source for s in shuffled.snapshots) == sorted(s.source for s in trajectory.snapshots)
    assert all(a.source != b.source for a, b in zip(shuffled.snapshots, trajectory.snapshots))  # none left in place
    assert null_twin(trajectory, "shuffled", seed=0) == shuffled  # seeded: the same twin every time


def test_order_coherence_tells_a_training_run_from_its_null_twins(tiny_trajectory_folder):
    trajectory = directory_trajectory(tiny_trajectory_folder)
    contexts = sample_contexts(load_tokenizer(trajectory.snapshots[-1]), "embedded", 32, 2000, seed=3)

    def coherence(spec: str) -> float:
        return order_coherence(direct_activations(resolve_trajectory(spec), contexts, layer=1))

    assert coherence(str(tiny_trajectory_folder)) > 0.5  # a model drifts away from where it was
    assert coherence(f"shuffled:{tiny_trajectory_folder}") < 0.5
    assert math.isnan(coherence(f"frozen:{tiny_trajectory_folder}"))  # nothing evolves


def test_an_untrained_decoder_is_unresolved_and_a_moved_one_is_not():
    model = CrossCoder(3, 16, CrossCoderConfig(expansion_ratio=2))
    model.initialize(torch.randn(512, 3, 16), torch.Generator().manual_seed(0))
    initial = model.decoder_weight.detach().clone()
    moved = initial.clone()
    moved[:5, 1] *= 0.2  # five features fade at one snapshot
    assert not unresolved(initial, initial).logical_not().any()
    assert unresolved(moved, initial).logical_not().sum() == 5


def trials(**columns) -> Trials:
    frame = pd.DataFrame({"run_id": [f"r{i}" for i in range(len(next(iter(columns.values()))))], **columns})
    return Trials(frame, ["expansion_ratio"], {run_id: [0, 1, 2, 4, 8, 16] for run_id in frame["run_id"]}, 2)


GOOD = good_trials(2)
NO_PAIRS = pd.DataFrame(columns=["kind", "shared_share", "mean_max_cosine", "top_feature_jaccard"])


def outcomes(**changes) -> dict[str, str]:
    return {v.claim: v.verdict for v in judge(trials(**dict(GOOD, **changes)), NO_PAIRS)}


def test_the_good_table_holds_and_its_null_twins_do_not():
    good = outcomes()
    assert all(
        good[claim] == "holds" for claim in ("transition", "emergence", "quality", "token_specificity", "causal")
    )
    frozen = outcomes(order_coherence=[math.nan, math.nan])
    shuffled = outcomes(order_coherence=[0.05, -0.1])
    for verdicts in (frozen, shuffled):
        assert verdicts["transition"] == verdicts["emergence"] == "inconclusive"


def test_an_untrained_looking_dictionary_and_an_early_turn_fail():
    assert outcomes(unresolved_share=[0.9, 0.95])["emergence"] == "fails"  # nothing moved: nothing to date
    assert outcomes(initial_share=[0.95, 0.99])["emergence"] == "fails"  # nearly what the untrained control gives (1.0)
    assert outcomes(transition_step=[0.0, 0.0])["transition"] == "fails"  # before statistical learning ends (step 2)


def test_one_trial_is_never_a_verdict():
    single = {claim: verdict for claim, verdict in outcomes().items()}
    one = {v.claim: v.verdict for v in judge(trials(**{key: values[:1] for key, values in GOOD.items()}), NO_PAIRS)}
    assert single["quality"] == "holds"
    assert all(verdict == "inconclusive" for verdict in one.values()), one


def test_a_task_never_learned_is_left_out_not_failed():
    verdicts = judge(
        trials(**dict(GOOD, causal_ablate_relative=[0.2, math.nan], causal_keep_relative=[0.95, math.nan])), NO_PAIRS
    )
    causal = next(v for v in verdicts if v.claim == "causal")
    assert causal.verdict == "inconclusive" and "never learn the task" in causal.evidence


@pytest.mark.parametrize(
    "interval, expected", [([0.15, 0.45], "holds"), ([-0.2, 0.3], "inconclusive"), ([-0.3, 0.05], "fails")]
)
def test_token_specificity_reads_its_interval_against_the_smallest_effect(interval, expected):
    low, high = interval
    middle = (low + high) / 2
    columns = dict(
        token_specificity_r=[middle] * 2, token_specificity_r_low=[low] * 2, token_specificity_r_high=[high] * 2
    )
    assert outcomes(**columns)["token_specificity"] == expected  # holds above 0.1, fails below it, else undecided


def test_replicates_are_never_a_seed_pair():
    frame = pd.DataFrame(
        {"run_id": ["a", "b", "c"], "params.seed": ["0", "0", "1"], "params.expansion_ratio": ["8", "8", "8"]}
    )
    assert pairs_differing_in(frame, "seed") == [("a", "c"), ("b", "c")]
    assert pairs_differing_in(frame.iloc[:2], "seed") == []  # --num-samples 2 on one seed: no pair
