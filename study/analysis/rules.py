"""The verdict rules: one function per claim, from the sweep's finished trials and their feature
stability. The thresholds and the rule texts are in ``study.record``; the rules shared by every
claim are here once: no verdict from fewer than two comparable trials, no evolution claim from
snapshots that show no ordered evolution (a frozen or shuffled trajectory), and no verdict read from
unconverged trials without saying so.

Over 300 lines for now: one verdict function per claim; the verdict issue rewrites them per axis value.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import pandas as pd

from study.record import (
    ABLATE_K,
    ABLATE_LEFT_BELOW,
    CLAIM,
    EMERGENCE_SHARE_RANGE,
    KEEP_RECOVERS_ABOVE,
    METRIC,
    MIN_COMPARABLE_TRIALS,
    MIN_ORDER_COHERENCE,
    MIN_RESOLVED_SHARE,
    NORM_PROXY_R,
    QUALITY_MAX_DEAD,
    QUALITY_MAX_DELTA_CE,
    QUALITY_MAX_L0,
    QUALITY_MIN_EV,
    RELIE_JACCARD,
    RULES,
    SAE_SHARED_LOW,
    TASK_LEARNED_ACCURACY,
    TOP_FEATURES,
    UNCONVERGED_LOSS_DROP,
)


class Verdict(NamedTuple):
    claim: str
    verdict: str
    """holds, fails, inconclusive or not measured."""
    rule: str
    evidence: str


class Trials(NamedTuple):
    """The sweep's finished trials as MLflow holds them."""

    frame: pd.DataFrame
    """One row per trial: run_id, params (as logged, strings), summary metrics."""
    swept: list[str]
    """Params that differ between trials."""
    steps: dict[str, list[int]]
    """run_id -> the snapshot steps its crosscoder spans."""
    statistical_end: int | None = None
    """The snapshot step where the model's unigram KL reaches its floor (None: no single model curve)."""


def verdict(claim: str, outcome: str, evidence: str) -> Verdict:
    return Verdict(claim, outcome, RULES[claim], evidence)


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name].dropna() if name in frame else pd.Series(dtype=float)


def too_few(claim: str, count: int, what: str) -> Verdict | None:
    """The shared rule: a verdict compares at least MIN_COMPARABLE_TRIALS trials."""
    if count >= MIN_COMPARABLE_TRIALS:
        return None
    return verdict(claim, "inconclusive", f"{count} trial(s) give {what}: a verdict needs {MIN_COMPARABLE_TRIALS}")


def unordered(claim: str, frame: pd.DataFrame) -> Verdict | None:
    """The shared rule of the evolution claims: the snapshots must evolve in their order in every trial."""
    coherence = (
        frame[METRIC.order_coherence] if METRIC.order_coherence in frame else pd.Series([float("nan")] * len(frame))
    )
    if len(coherence) and (coherence.fillna(-1.0) >= MIN_ORDER_COHERENCE).all():
        return None
    listed = ", ".join(f"{value:.2f}" for value in coherence)
    return verdict(
        claim,
        "inconclusive",
        f"the snapshots show no ordered evolution (order coherence {listed or 'none'}; nan: frozen)",
    )


def unconverged(frame: pd.DataFrame) -> str | None:
    """How many of the trials had not converged (training loss still falling by more than UNCONVERGED_LOSS_DROP
    over the last fifth of the steps) and how far their loss still fell; None when every trial had."""
    drops = pd.to_numeric(frame.get(METRIC.loss_drop_last_fifth, pd.Series(dtype=float)), errors="coerce").dropna()
    moving = drops[drops > UNCONVERGED_LOSS_DROP]
    if moving.empty:
        return None
    return (
        f"{len(moving)} of {len(drops)} trials (training loss still fell {moving.min():.1%} to {moving.max():.1%} "
        f"over the last fifth of the steps, above {UNCONVERGED_LOSS_DROP:.0%})"
    )


def grid_interval_spread(steps_found: list[float], grid: list[int]) -> int:
    """How many intervals of ``grid`` separate the smallest and largest of ``steps_found``."""
    positions = [bisect.bisect_left(grid, step) for step in steps_found]
    return max(positions) - min(positions)


def coarsest_grid(trials: Trials) -> list[int]:
    return min(trials.steps.values(), key=len) if trials.steps else []


def in_every_trial(frame: pd.DataFrame, claim: str, statistic: str, passes, condition: str) -> Verdict:
    values = column(frame, statistic)
    found = too_few(claim, len(values), statistic)
    if found:
        return found
    passing = int(values.map(passes).sum())
    listed = ", ".join(f"{value:.3g}" for value in values)
    outcome = "holds" if passing == len(values) else "fails"
    return verdict(claim, outcome, f"{condition} in {passing} of {len(values)} trials ({statistic}: {listed})")


def transition_verdict(trials: Trials) -> Verdict:
    frame = trials.frame
    found, turning = column(frame, METRIC.transition_found), column(frame, METRIC.transition_step)
    blocked = too_few(CLAIM.transition, len(found), "a dimensionality curve") or unordered(CLAIM.transition, frame)
    if blocked:
        return blocked
    if (found < 1).any():
        return verdict(CLAIM.transition, "fails", f"{int(found.sum())} of {len(found)} trials find a turning point")
    grid = coarsest_grid(trials)
    spread = grid_interval_spread(turning.tolist(), grid)
    evidence = f"turning steps {sorted({int(step) for step in turning})}, {spread} interval(s) apart on the grid {grid}"
    after_statistics = True
    if trials.statistical_end is not None:
        after_statistics = bool((turning >= trials.statistical_end).all())
        evidence += f"; statistical learning ends at step {trials.statistical_end} (unigram KL at its floor)"
    return verdict(CLAIM.transition, "holds" if spread <= 1 and after_statistics else "fails", evidence)


def emergence_verdict(trials: Trials) -> Verdict:
    frame = trials.frame
    shares, medians = column(frame, METRIC.initial_share), column(frame, METRIC.median_emergence_step)
    blocked = too_few(CLAIM.emergence, len(shares), "an emergence share") or unordered(CLAIM.emergence, frame)
    if blocked:
        return blocked
    resolved = 1 - column(frame, METRIC.unresolved_share)
    control = column(frame, METRIC.control_initial_share)
    grid = coarsest_grid(trials)
    median_spread = grid_interval_spread(medians.tolist(), grid) if len(medians) else 0
    turning = (
        frame[METRIC.transition_step] if METRIC.transition_step in frame else pd.Series([float("nan")] * len(frame))
    )
    median_steps = (
        frame[METRIC.median_emergence_step] if METRIC.median_emergence_step in frame else turning * float("nan")
    )
    # Paper 1: features emerge mostly near the transition; a trial without either step is not near it.
    near_transition = all(
        median == median and turn == turn and grid_interval_spread([median, turn], grid) <= 1
        for median, turn in zip(median_steps, turning)
    )
    evidence = (
        f"initialization-dependent share {shares.min():.2f} to {shares.max():.2f} of resolved features "
        f"(untrained control: {control.min():.2f} to {control.max():.2f}); resolved share "
        f"{resolved.min():.2f} to {resolved.max():.2f}; median emergence steps {sorted({int(m) for m in medians})} "
        f"against turning steps {sorted({int(t) for t in turning.dropna()})}"
    )
    # A share the untrained crosscoder reaches by construction (1: every decoder starts flat) says nothing.
    apart_from_control = len(control) == len(shares) and bool(((shares - control).abs() > EMERGENCE_SHARE_RANGE).all())
    holds = (
        apart_from_control
        and len(resolved) == len(shares)
        and (resolved >= MIN_RESOLVED_SHARE).all()
        and float(shares.max() - shares.min()) <= EMERGENCE_SHARE_RANGE
        and median_spread <= 1
        and near_transition
    )
    return verdict(CLAIM.emergence, "holds" if holds else "fails", evidence)


def quality_verdict(trials: Trials) -> Verdict:
    frame = trials.frame
    blocked = too_few(CLAIM.quality, len(frame), "quality metrics")
    if blocked:
        return blocked
    meets = (
        (frame[METRIC.explained_variance] >= QUALITY_MIN_EV)
        & (frame[METRIC.l0] < QUALITY_MAX_L0)
        & (frame[METRIC.delta_ce_max] < QUALITY_MAX_DELTA_CE)
        & (frame[METRIC.dead_fraction] <= QUALITY_MAX_DEAD)
    )
    listed = "; ".join(
        f"EV {row.explained_variance:.3f}, L0 {row.l0:.1f}, max ΔCE {row.delta_ce_max:.3f}, dead {row.dead_fraction:.2f}"
        for row in frame.itertuples()
    )
    outcome = "holds" if meets.all() else "fails"
    return verdict(CLAIM.quality, outcome, f"{int(meets.sum())} of {len(frame)} trials meet all thresholds ({listed})")


def token_specificity_verdict(trials: Trials) -> Verdict:
    frame = trials.frame
    low, high = column(frame, METRIC.token_specificity_r_low), column(frame, METRIC.token_specificity_r_high)
    blocked = too_few(CLAIM.token_specificity, min(len(low), len(high)), "a bootstrap interval")
    if blocked:
        return blocked
    intervals = ", ".join(f"[{a:.2f}, {b:.2f}]" for a, b in zip(low, high))
    evidence = f"95 % intervals of Spearman r: {intervals}"
    if (low > 0).all():
        return verdict(CLAIM.token_specificity, "holds", evidence)
    if (high < 0).any() or (low > 0).any():
        return verdict(CLAIM.token_specificity, "fails", evidence)
    return verdict(CLAIM.token_specificity, "inconclusive", evidence + "; every interval holds 0")


def pairs_of_kind(stabilities: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(seed pairs, expansion-ratio pairs) of the stability table."""
    return stabilities[stabilities["kind"] == "seed"], stabilities[stabilities["kind"] == "expansion_ratio"]


def stability_verdict(stabilities: pd.DataFrame) -> Verdict:
    seeds, ratios = pairs_of_kind(stabilities)
    across_ratios = (
        f"; across expansion ratios {ratios['shared_share'].mean():.2f} of the smaller dictionary's features "
        f"have a partner in the larger ({len(ratios)} pair(s))"
        if len(ratios)
        else ""
    )
    if seeds.empty:
        return verdict(CLAIM.stability, "inconclusive", "no two trials differ only in seed" + across_ratios)
    mean_share = float(seeds[METRIC.shared_share].mean())
    evidence = (
        f"shared share {mean_share:.2f} (range {seeds['shared_share'].min():.2f} to "
        f"{seeds['shared_share'].max():.2f}) over {len(seeds)} seed pair(s); "
        f"mean max cosine {seeds['mean_max_cosine'].mean():.2f}{across_ratios}"
    )
    return verdict(CLAIM.stability, "holds" if mean_share >= SAE_SHARED_LOW else "fails", evidence)


def relie_verdict(frame: pd.DataFrame, stabilities: pd.DataFrame) -> Verdict:
    seeds, ratios = pairs_of_kind(stabilities)
    context = f"mean RelIE of the top {TOP_FEATURES} features at the last snapshot: " + (
        ", ".join(f"{value:.2f}" for value in column(frame, METRIC.relie_top_mean)) or "none"
    )
    if len(ratios):
        context += (
            f"; across expansion ratios the top features' Jaccard index is "
            f"{ratios['top_feature_jaccard'].mean():.2f} ({len(ratios)} pair(s))"
        )
    if seeds.empty:
        return verdict(CLAIM.relie, "inconclusive", "no two trials differ only in seed; " + context)
    if (column(frame, METRIC.task_learned_snapshots) == 0).all():
        # RelIE is each feature's share of the task's indirect effect: with no task, no effect to share.
        return verdict(
            CLAIM.relie, "inconclusive", f"no trial learns the task (accuracy < {TASK_LEARNED_ACCURACY}); {context}"
        )
    jaccard = float(seeds[METRIC.top_feature_jaccard].mean())
    evidence = (
        f"top-feature Jaccard {jaccard:.2f} (range {seeds['top_feature_jaccard'].min():.2f} to "
        f"{seeds['top_feature_jaccard'].max():.2f}) over {len(seeds)} seed pair(s); {context}"
    )
    return verdict(CLAIM.relie, "holds" if jaccard >= RELIE_JACCARD else "fails", evidence)


def causal_verdict(frame: pd.DataFrame) -> Verdict:
    learned = frame.dropna(
        subset=[name for name in (METRIC.causal_ablate_relative, METRIC.causal_keep_relative) if name in frame]
    )
    if METRIC.causal_ablate_relative not in frame or METRIC.causal_keep_relative not in frame:
        learned = frame.iloc[0:0]
    unlearned = len(frame) - len(learned)
    note = (
        f"; {unlearned} trial(s) never learn the task (accuracy < {TASK_LEARNED_ACCURACY}), left out"
        if unlearned
        else ""
    )
    blocked = too_few(CLAIM.causal, len(learned), "a snapshot where the task is learned")
    if blocked:
        return blocked._replace(evidence=blocked.evidence + note)
    meets = (learned[METRIC.causal_ablate_relative] < ABLATE_LEFT_BELOW) & (
        learned[METRIC.causal_keep_relative] > KEEP_RECOVERS_ABOVE
    )
    listed = "; ".join(
        f"top {ABLATE_K} ablated {a:.2f}, top {int(k) if k == k else '?'} kept {b:.2f}"
        for a, b, k in zip(
            learned[METRIC.causal_ablate_relative],
            learned[METRIC.causal_keep_relative],
            learned.get(METRIC.causal_keep_k, pd.Series([float("nan")] * len(learned))),
        )
    )
    evidence = f"{int(meets.sum())} of {len(learned)} trials meet both thresholds (share of the clean-baseline gap: {listed}){note}"
    return verdict(CLAIM.causal, "holds" if meets.all() else "fails", evidence)


def judge(trials: Trials, stabilities: pd.DataFrame) -> list[Verdict]:
    """A verdict per claim of ``study.record.CLAIMS``, in their order. A verdict judged from unconverged trials
    keeps its outcome (the 2 % line is a heuristic, and float rounding alone moves a trial's figure by a third)
    and carries the count in its evidence, where a reader of the verdicts alone sees it."""
    frame = trials.frame
    verdicts = [
        transition_verdict(trials),
        emergence_verdict(trials),
        in_every_trial(frame, CLAIM.norm_proxy, METRIC.norm_proxy_r, lambda r: r < NORM_PROXY_R, f"r < {NORM_PROXY_R}"),
        quality_verdict(trials),
        stability_verdict(stabilities),
        token_specificity_verdict(trials),
        relie_verdict(frame, stabilities),
        causal_verdict(frame),
    ]
    moving = unconverged(frame)
    if moving is None:
        return verdicts
    return [
        judged._replace(evidence=f"{judged.evidence}; not converged: {moving}")
        if judged.verdict in ("holds", "fails")
        else judged
        for judged in verdicts
    ]
