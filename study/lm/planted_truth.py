"""What a right verdict is on a planted trajectory, per claim, read from what was planted (``truth.json``).

Each expected verdict is ``holds``, ``fails`` or ``inconclusive`` with its reason; ``not holds`` (fails or
inconclusive are both right) is the truth of the evolution claims on a null twin, whose snapshots carry no
order. Claims about the crosscoder rather than the trajectory (quality, stability, norm_proxy) have no
planted answer and are left out.
"""

from __future__ import annotations

import math

from crosscoder.evolution import smallest_valley_p
from study.record import CLAIM, CUT_OFFS, near

NOT_HOLDS = "not holds"
"""The expected verdict where fails and inconclusive are both right."""
TOKEN_ORDER_R = 0.3
"""Token specificity holds (fails) where the planted features' Spearman r between peak step and token entropy
is above this (below its negative); between, the planted dictionary itself does not decide."""


def expected(verdict: str, reason: str) -> dict[str, str]:
    return {"verdict": verdict, "reason": reason}


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties given their mean rank."""
    order = sorted(range(len(values)), key=lambda index: values[index])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(first: list[float], second: list[float]) -> float:
    a, b = ranks(first), ranks(second)
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    covariance = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    spread = math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))
    return covariance / spread if spread > 0 else math.nan


def transition_truth(truth: dict) -> dict[str, str]:
    turning, end, count = truth["turning_step"], truth["statistical_end"], len(truth["steps"])
    if smallest_valley_p(count) > CUT_OFFS.turn_alpha:
        return expected(
            "inconclusive", f"{count} snapshots cannot show a turn at {CUT_OFFS.turn_alpha:.0%}, whatever the curve"
        )
    if turning is None:
        return expected("fails", "the planted dimensionality never turns: it does not fall and rise again")
    if turning < end:
        return expected("fails", f"it turns at step {turning}, before statistical learning ends at {end}")
    return expected("holds", f"the planted dimensionality turns at step {turning}, after statistical learning ends")


def emergence_truth(truth: dict) -> dict[str, str]:
    turning = truth["turning_step"]
    transition = transition_truth(truth)
    if transition["verdict"] == "inconclusive":
        return expected("inconclusive", "near a transition the budget cannot decide: " + transition["reason"])
    emergent = [feature["emergence_step"] for feature in truth["features"] if feature["emergence_step"] > 0]
    if not emergent:
        return expected("fails", "every planted feature is present from initialization")
    if turning is None:
        return expected("fails", "features emerge, but there is no transition for them to emerge near")
    share = sum(near(step, turning) for step in emergent) / len(emergent)
    verdict = "holds" if share >= CUT_OFFS.near_share else "fails"
    return expected(verdict, f"{share:.0%} of the {len(emergent)} emergent features emerge near step {turning}")


def token_specificity_truth(truth: dict) -> dict[str, str]:
    features = truth["features"]
    peaks = [float(feature["peak_step"]) for feature in features]
    entropies = [math.log(len(feature["tokens"])) for feature in features]  # tokens carry a feature about equally
    r = spearman(peaks, entropies)
    if math.isnan(r):
        return expected("inconclusive", "every planted feature peaks at the same snapshot (or has the same entropy)")
    if r > TOKEN_ORDER_R:
        return expected("holds", f"planted r(peak step, token entropy) = {r:.2f}: token-specific features peak first")
    if r < -TOKEN_ORDER_R:
        return expected("fails", f"planted r(peak step, token entropy) = {r:.2f}: abstract features peak first")
    return expected("inconclusive", f"planted r(peak step, token entropy) = {r:.2f}, near 0")


def expected_verdicts(truth: dict) -> dict[str, dict[str, str]]:
    """Claim id -> the right verdict on the planted trajectory whose ``truth`` this is."""
    verdicts = {
        CLAIM.transition: transition_truth(truth),
        CLAIM.emergence: emergence_truth(truth),
        CLAIM.token_specificity: token_specificity_truth(truth),
    }
    task = truth.get("task")
    if task is None:
        no_task = expected("inconclusive", "the planted model learns no task: its logits read no input")
        return verdicts | {CLAIM.causal: no_task, CLAIM.relie: no_task}
    shares = f"the top planted features ablated leave {task['ablate_left']:.2f}, kept alone recover {task['keep_recovered']:.2f}"
    if task["carried_by_few"]:
        verdicts[CLAIM.causal] = expected("holds", f"{len(task['features'])} planted features carry the task: {shares}")
        verdicts[CLAIM.relie] = expected(
            "holds", f"the same {len(task['features'])} features start to matter at step {task['onset']} in every seed"
        )
    else:
        verdicts[CLAIM.causal] = expected("fails", f"a mixture of every shared feature carries the task: {shares}")
    return verdicts


def null_twin_verdicts() -> dict[str, dict[str, str]]:
    """Claim id -> the right verdict on a null twin (frozen, shuffled, reversed): the evolution claims must not
    hold, since its snapshots' order means nothing or runs backwards."""
    reason = "a null twin: its snapshots do not run forward in training"
    return {
        claim: expected(NOT_HOLDS, reason) for claim in (CLAIM.transition, CLAIM.emergence, CLAIM.token_specificity)
    }
