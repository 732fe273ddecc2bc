"""The verdict rules: one function per claim, from the sweep's finished trials and their feature
stability. The thresholds and the rule texts are in ``study.record``; the rules shared by every
claim are here once: no verdict from fewer than two comparable trials, no evolution claim from
snapshots that show no ordered evolution (a frozen or shuffled trajectory), and no verdict read from
unconverged trials without saying so.

Over 300 lines for now: one verdict function per claim; the verdict issue rewrites them per axis value.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np
import pandas as pd

from crosscoder.evolution import smallest_valley_p
from crosscoder.feature_statistics import Interval
from study.record import (
    CLAIM,
    CUT_OFFS,
    METRIC,
    MIN_COMPARABLE_TRIALS,
    NEIGHBOURS,
    RULES,
    SETTLED_SHARE,
    TASK_LEARNED_ACCURACY,
    UNCONVERGED_LOSS_DROP,
    CutOffs,
    natural_order,
    near,
)


class Verdict(NamedTuple):
    claim: str
    verdict: str
    """holds, fails, mixed (holds at some values of the swept key, fails at others), inconclusive or not measured."""
    rule: str
    evidence: str
    by_value: tuple[tuple[str, str], ...] = ()
    """(value of the swept key, its verdict) per value, its seeds pooled; empty for the claims judged on pairs of
    trials (stability, relie), which the whole axis judges."""


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
    learns: bool | None = None
    """Whether the model's held-out loss falls from the first snapshot to the last (None: no single model curve)."""
    min_trials: int = MIN_COMPARABLE_TRIALS
    """Fewest trials a verdict is read from: 1 for one value of the swept key, whose claims are judged on each
    trial's own statistic against its own null or interval."""
    unfinished: tuple[tuple[str, str], ...] = ()
    """(axis value, MLflow status) of each trial of the sweep that did not finish: failed, killed or still running."""
    along_training: dict[str, pd.DataFrame] = {}
    """run_id -> its order statistics at each checkpoint (``study.record.AlongTraining``, a ``step`` column)."""
    cut_offs: CutOffs = CUT_OFFS
    """The cut-offs the rules read (``judge_sweep`` also judges at their NEIGHBOURS)."""


def verdict(claim: str, outcome: str, evidence: str) -> Verdict:
    return Verdict(claim, outcome, RULES[claim], evidence)


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name].dropna() if name in frame else pd.Series(dtype=float)


def numeric(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column as numbers, nan where the trial did not log it (an older run, or a statistic that does not exist)."""
    return pd.to_numeric(frame[name], errors="coerce") if name in frame else pd.Series(np.nan, index=frame.index)


def too_few(claim: str, count: int, what: str, minimum: int = MIN_COMPARABLE_TRIALS) -> Verdict | None:
    """The shared rule: a verdict compares at least MIN_COMPARABLE_TRIALS trials (``minimum`` for one axis value)."""
    if count >= minimum:
        return None
    return verdict(claim, "inconclusive", f"{count} trial(s) give {what}: a verdict needs {minimum}")


def unordered(claim: str, trials: Trials) -> Verdict | None:
    """The shared rule of the order claims (transition, emergence, token_specificity): the snapshots must evolve
    in their order in every trial, and forward: a model whose held-out loss rises from its first snapshot to its
    last runs backwards (checkpoints in reverse), and order coherence, which reads only how far apart
    snapshots are, cannot tell."""
    frame = trials.frame
    coherence = (
        frame[METRIC.order_coherence] if METRIC.order_coherence in frame else pd.Series([float("nan")] * len(frame))
    )
    if trials.learns is False:
        return verdict(
            claim,
            "inconclusive",
            "the model's held-out loss rises from the first snapshot to the last: not a training run",
        )
    if len(coherence) and (coherence.fillna(-1.0) >= trials.cut_offs.min_order_coherence).all():
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


def coarsest_grid(trials: Trials) -> list[int]:
    return min(trials.steps.values(), key=len) if trials.steps else []


def pooled(frame: pd.DataFrame, name: str) -> Interval:
    """The trials' effect ``name`` pooled (its interval logged as ``name``_low and _high): their mean effect, and a
    95 % interval from the mean's standard error, the larger of the one their own intervals give (read as normal)
    and the one their spread gives."""
    values, lows, highs = (
        numeric(frame, column).to_numpy(dtype=float) for column in (name, f"{name}_low", f"{name}_high")
    )
    keep = ~(np.isnan(values) | np.isnan(lows) | np.isnan(highs))
    values, lows, highs = values[keep], lows[keep], highs[keep]
    if len(values) == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    own = float(np.sqrt(np.sum(((highs - lows) / (2 * 1.96)) ** 2))) / len(values)
    spread = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    mean, error = float(np.mean(values)), max(own, spread)
    return Interval(mean, mean - 1.96 * error, mean + 1.96 * error)


def against_smallest_effect(effect: Interval, smallest: float, larger_holds: bool) -> str:
    """holds where the interval lies beyond the smallest effect of interest, fails where it lies on the null's
    side of it, inconclusive where it holds it (too little power is not evidence either way)."""
    if np.isnan(effect.low) or np.isnan(effect.high):
        return "inconclusive"
    low, high = (effect.low, effect.high) if larger_holds else (-effect.high, -effect.low)
    smallest = smallest if larger_holds else -smallest
    return "holds" if low > smallest else "fails" if high < smallest else "inconclusive"


def interval_text(effect: Interval) -> str:
    return f"{effect.value:.2f} [{effect.low:.2f}, {effect.high:.2f}]"


def interval_verdict(trials: Trials, claim: str, name: str, smallest: float, larger_holds: bool, what: str) -> Verdict:
    """A claim read as one effect with its interval (``pooled``), pooled over the trials and held against its
    smallest effect of interest."""
    frame = trials.frame
    values = column(frame, name)
    found = too_few(claim, len(values), name, trials.min_trials)
    if found:
        return found
    names = [name, f"{name}_low", f"{name}_high"]
    per_trial = ", ".join(interval_text(Interval(*row)) for row in frame[names].dropna().itertuples(index=False))
    effect = pooled(frame, name)
    sign = ">" if larger_holds else "<"
    evidence = f"{what} {interval_text(effect)} pooled over {len(values)} trial(s) (each: {per_trial}); holds {sign} {smallest}"
    return verdict(claim, against_smallest_effect(effect, smallest, larger_holds), evidence)


def settled_since(values: pd.Series, same) -> float | None:
    """The first training step from which every later checkpoint's value agrees (``same``) with the last one;
    None with fewer than two checkpoints."""
    if len(values) < 2:
        return None
    last, since = values.iloc[-1], values.index[-1]
    for step, value in zip(values.index[::-1], values.iloc[::-1]):
        if not same(value, last):
            break
        since = step
    return since


def settled(trials: Trials, frame: pd.DataFrame, name: str, same, what: str) -> str:
    """Whether the statistic ``name`` had settled in the trials of ``frame`` before their training ended: "settled
    since 40 % of the steps" (the latest over the trials), or "still moving" with the last two checkpoints' values
    of the trials where it moved at the last checkpoint."""
    moving, since_shares = [], []
    for run_id in frame.get(METRIC.run_id, pd.Series(dtype=str)):
        along = trials.along_training.get(run_id)
        if along is None or name not in along or len(along) < 2:
            continue
        values = along.set_index("step")[name]
        since = settled_since(values, same)
        if since is None:
            continue
        if since == values.index[-1]:
            moving.append(f"{what} {values.iloc[-2]:.3g} → {values.iloc[-1]:.3g}")
        since_shares.append(since / values.index[-1])
    if not since_shares:
        return "not followed along training"
    if moving:
        return (
            f"still moving at the last checkpoint in {len(moving)} of {len(since_shares)} trials: {'; '.join(moving)}"
        )
    return f"settled since {max(since_shares):.0%} of the training steps in every trial"


def same_turn(first: float, second: float) -> bool:
    return (np.isnan(first) and np.isnan(second)) or (not np.isnan(first + second) and near(first, second))


def same_share(first: float, second: float) -> bool:
    return abs(first - second) <= SETTLED_SHARE


def transition_verdict(trials: Trials) -> Verdict:
    frame = trials.frame
    p_values, turning = column(frame, METRIC.transition_p_value), column(frame, METRIC.transition_step)
    monotone = column(frame, METRIC.transition_monotone_fit)
    blocked = too_few(CLAIM.transition, len(p_values), "a dimensionality curve", trials.min_trials) or unordered(
        CLAIM.transition, trials
    )
    if blocked:
        return blocked
    grid = coarsest_grid(trials)
    evidence = (
        f"turn p-values {', '.join(f'{p:.3f}' for p in p_values)} (random snapshot orders as the null), monotone fit "
        f"{', '.join(f'{fit:.2f}' for fit in monotone)}; turning steps {sorted({int(step) for step in turning})}"
    )
    if smallest_valley_p(len(grid)) > trials.cut_offs.turn_alpha:
        return verdict(
            CLAIM.transition,
            "inconclusive",
            f"{len(grid)} snapshots cannot tell a turn from noise at {trials.cut_offs.turn_alpha:.0%} (smallest possible p "
            f"{smallest_valley_p(len(grid)):.2f}); {evidence}",
        )
    if trials.statistical_end is not None:
        evidence += f"; statistical learning ends at step {trials.statistical_end} (unigram KL at its floor)"
    turns = p_values <= trials.cut_offs.turn_alpha
    if not turns.all():
        # A curve a monotone one explains is a curve without a turn; one that is neither is noise: undecided.
        flat_or_monotone = (~turns & (monotone.reindex(p_values.index) >= trials.cut_offs.monotone_fit)).any()
        return verdict(CLAIM.transition, "fails" if flat_or_monotone else "inconclusive", evidence)
    # Seeds of one configuration must turn at about the same step; another swept key may move it (the evidence
    # lists the steps, and the per-value verdicts judge each value on its own).
    configuration = [f"params.{key}" for key in trials.swept if key != "seed" and f"params.{key}" in frame]
    groups = [group for _, group in frame.groupby(configuration)] if configuration else [frame]
    together = all(
        near(first, second)
        for group in groups
        for first in column(group, METRIC.transition_step)
        for second in column(group, METRIC.transition_step)
    )
    after_statistics = trials.statistical_end is None or bool(
        all(step >= trials.statistical_end or near(step, trials.statistical_end) for step in turning)
    )
    return verdict(CLAIM.transition, "holds" if together and after_statistics else "fails", evidence)


def emergence_verdict(trials: Trials, transition: Verdict) -> Verdict:
    """Emergence near the transition needs the transition: it fails where the transition fails, and waits where
    the transition is undecided."""
    frame = trials.frame
    shares, near_shares = column(frame, METRIC.initial_share), column(frame, METRIC.emergence_near_share)
    blocked = too_few(CLAIM.emergence, len(shares), "an emergence share", trials.min_trials) or unordered(
        CLAIM.emergence, trials
    )
    if blocked:
        return blocked
    resolved = 1 - column(frame, METRIC.unresolved_share)
    evidence = (
        f"initialization-dependent share {shares.min():.2f} to {shares.max():.2f} of resolved features; resolved "
        f"share {resolved.min():.2f} to {resolved.max():.2f}; share of emergent features near the turning step "
        f"{', '.join(f'{share:.2f}' for share in near_shares) or 'none'}"
    )
    if transition.verdict != "holds":
        outcome = "fails" if transition.verdict == "fails" else "inconclusive"
        return verdict(CLAIM.emergence, outcome, f"the transition {transition.verdict}; {evidence}")
    holds = (
        len(resolved) == len(shares)
        and bool((resolved >= trials.cut_offs.min_resolved_share).all())
        and bool((1 - shares >= trials.cut_offs.min_emergent_share).all())
        and len(near_shares) == len(shares)
        and bool((near_shares >= trials.cut_offs.near_share).all())
    )
    return verdict(CLAIM.emergence, "holds" if holds else "fails", evidence)


def quality_verdict(trials: Trials) -> Verdict:
    """Each trial at its worst snapshot, in units of the model and the dictionary: explained variance (against the
    mean, and above the untrained control's), loss recovered (against mean ablation), L0 per dimension, dead share."""
    frame, cut = trials.frame, trials.cut_offs
    blocked = too_few(CLAIM.quality, len(frame), "quality metrics", trials.min_trials)
    if blocked:
        return blocked

    worst_ev, recovered = (
        numeric(frame, METRIC.min_explained_variance_by_snapshot),
        numeric(frame, METRIC.min_loss_recovered_by_snapshot),
    )
    per_dimension, dead = numeric(frame, METRIC.l0_per_dimension), numeric(frame, METRIC.dead_fraction)
    control = numeric(frame, METRIC.control_explained_variance)
    meets = (
        (worst_ev >= cut.quality_min_ev)
        & ~(worst_ev <= control)
        # nan: replacing the layer by its mean costs no loss (a model whose logits barely read it), nothing to recover
        & ((recovered >= cut.quality_min_loss_recovered) | recovered.isna())
        & (per_dimension <= cut.quality_max_l0_per_dimension)
        & (dead <= cut.quality_max_dead)
    )
    listed = "; ".join(
        f"worst EV {ev:.3f}, worst loss recovered {rec:.2f}, L0/d_model {dim:.3f}, dead {gone:.2f}"
        for ev, rec, dim, gone in zip(worst_ev, recovered, per_dimension, dead)
    )
    outcome = "holds" if meets.all() else "fails"
    return verdict(CLAIM.quality, outcome, f"{int(meets.sum())} of {len(frame)} trials meet all cut-offs ({listed})")


def token_specificity_verdict(trials: Trials) -> Verdict:
    blocked = unordered(CLAIM.token_specificity, trials)
    if blocked:
        return blocked
    return interval_verdict(
        trials,
        CLAIM.token_specificity,
        METRIC.token_specificity_r,
        trials.cut_offs.token_specificity_r,
        True,
        "Spearman r(peak snapshot, token entropy)",
    )


def norm_proxy_verdict(trials: Trials) -> Verdict:
    judged = interval_verdict(
        trials,
        CLAIM.norm_proxy,
        METRIC.norm_proxy_r_within,
        trials.cut_offs.norm_proxy_r,
        False,
        "within-snapshot r(probe error, decoder norm)",
    )
    pooled_r = ", ".join(f"{r:.2f}" for r in column(trials.frame, METRIC.norm_proxy_r))
    return judged._replace(
        evidence=f"{judged.evidence}; r pooled over snapshots as paper 1 reports it: {pooled_r or 'none'}"
    )


def pairs_of_kind(stabilities: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(seed pairs, expansion-ratio pairs) of the stability table."""
    return stabilities[stabilities["kind"] == "seed"], stabilities[stabilities["kind"] == "expansion_ratio"]


def stability_verdict(stabilities: pd.DataFrame, cut_offs: CutOffs = CUT_OFFS) -> Verdict:
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
    return verdict(CLAIM.stability, "holds" if mean_share >= cut_offs.shared_share_low else "fails", evidence)


def relie_verdict(trials: Trials, stabilities: pd.DataFrame) -> Verdict:
    """RelIE as paper 2 uses it, to date when features start to matter: per trial, the onset of the top task
    features' RelIE against the step where the task is learned. Holds where every trial's onset is near it, fails
    where most are not; the seed pairs' top-feature overlap is a stability figure in the evidence."""
    frame = trials.frame
    seeds, _ = pairs_of_kind(stabilities)
    overlap = (
        f"; top-feature Jaccard across seeds {seeds['top_feature_jaccard'].mean():.2f} ({len(seeds)} pair(s))"
        if len(seeds)
        else ""
    )
    blocked = too_few(CLAIM.relie, len(frame), "a task attribution", trials.min_trials)
    if blocked:
        return blocked._replace(evidence=blocked.evidence + overlap)
    learned = frame.dropna(subset=[name for name in (METRIC.task_learned_step,) if name in frame])
    if METRIC.task_learned_step not in frame or learned.empty:
        return verdict(
            CLAIM.relie, "inconclusive", f"no trial learns the task (accuracy >= {TASK_LEARNED_ACCURACY}){overlap}"
        )
    first_steps = {run_id: steps[0] for run_id, steps in trials.steps.items() if steps}
    learned_steps = learned[METRIC.task_learned_step]
    dated = learned[[step > first_steps.get(run_id, -1) for run_id, step in zip(learned["run_id"], learned_steps)]]
    if dated.empty:
        return verdict(
            CLAIM.relie, "inconclusive", f"the task is learned at the first snapshot: no onset can be dated{overlap}"
        )
    onsets = pd.to_numeric(dated.get(METRIC.relie_onset_step, pd.Series(np.nan, index=dated.index)), errors="coerce")
    close = [
        onset == onset and near(onset, learned_step)
        for onset, learned_step in zip(onsets, dated[METRIC.task_learned_step])
    ]
    listed = "; ".join(
        f"onset {onset:g} vs learned {learned_step:g}"
        for onset, learned_step in zip(onsets, dated[METRIC.task_learned_step])
    )
    evidence = f"{sum(close)} of {len(close)} trials' top features start to matter near where the task is learned ({listed}){overlap}"
    outcome = "holds" if all(close) else "fails" if 2 * sum(close) < len(close) else "inconclusive"
    return verdict(CLAIM.relie, outcome, evidence)


def causal_verdict(trials: Trials) -> Verdict:
    """Features ranked on half the prompts, measured on the other half, against as many random features: holds
    where ablating the top ones leaves under ablate_left_below and keeping them recovers over keep_recovers_above
    (each interval clear of its cut-off) while random ones do neither; judged only where attribution accounts for
    the metric."""
    frame, cut = trials.frame, trials.cut_offs
    names = (METRIC.causal_ablate_relative, METRIC.causal_keep_relative)
    learned = frame.dropna(subset=list(names)) if all(name in frame for name in names) else frame.iloc[0:0]
    unlearned = len(frame) - len(learned)
    note = (
        f"; {unlearned} trial(s) never learn the task (accuracy < {TASK_LEARNED_ACCURACY}), left out"
        if unlearned
        else ""
    )
    blocked = too_few(CLAIM.causal, len(learned), "a snapshot where the task is learned", trials.min_trials)
    if blocked:
        return blocked._replace(evidence=blocked.evidence + note)

    gap, error_share = (
        numeric(learned, METRIC.attribution_gap_max).max(),
        numeric(learned, METRIC.error_effect_share_max).max(),
    )
    ablate, keep = pooled(learned, METRIC.causal_ablate_relative), pooled(learned, METRIC.causal_keep_relative)
    random_ablate = numeric(learned, METRIC.causal_random_ablate_relative).mean()
    random_keep = numeric(learned, METRIC.causal_random_keep_relative).mean()
    counts = f"{numeric(learned, METRIC.causal_ablate_k).max():.0f} ablated, {numeric(learned, METRIC.causal_keep_k).max():.0f} kept"
    evidence = (
        f"top features ablated leave {interval_text(ablate)}, kept alone recover {interval_text(keep)}; as many random "
        f"features leave {random_ablate:.2f} and recover {random_keep:.2f} ({counts}; ranked and measured on "
        f"separate halves of the prompts; attribution gap {gap:.2f}, error share {error_share:.2f}){note}"
    )
    if not (gap <= cut.attribution_gap_max and error_share <= cut.error_share_max):
        return verdict(
            CLAIM.causal,
            "inconclusive",
            f"attribution does not account for the metric (gap above {cut.attribution_gap_max} or error share above "
            f"{cut.error_share_max}): the ranking ranks little; {evidence}",
        )
    breaks = against_smallest_effect(ablate, cut.ablate_left_below, larger_holds=False)
    restores = against_smallest_effect(keep, cut.keep_recovers_above, larger_holds=True)
    beats_random = random_ablate >= cut.ablate_left_below and random_keep <= cut.keep_recovers_above
    if "fails" in (breaks, restores) or not beats_random:
        return verdict(CLAIM.causal, "fails", evidence)
    return verdict(CLAIM.causal, "holds" if breaks == restores == "holds" else "inconclusive", evidence)


def judge(trials: Trials, stabilities: pd.DataFrame) -> list[Verdict]:
    """A verdict per claim of ``study.record.CLAIMS``, in their order. A verdict judged from unconverged trials
    keeps its outcome (the 2 % line is a heuristic, and float rounding alone moves a trial's figure by a third)
    and carries the count in its evidence, where a reader of the verdicts alone sees it."""
    frame = trials.frame
    transition = transition_verdict(trials)
    emergence = emergence_verdict(trials, transition)
    verdicts = [
        transition._replace(
            evidence=f"{transition.evidence}; turning step "
            + settled(trials, frame, METRIC.transition_step, same_turn, "turning step")
        ),
        emergence._replace(
            evidence=f"{emergence.evidence}; initialization-dependent share "
            + settled(trials, frame, METRIC.initial_share, same_share, "share")
        ),
        norm_proxy_verdict(trials),
        quality_verdict(trials),
        stability_verdict(stabilities, trials.cut_offs),
        token_specificity_verdict(trials),
        relie_verdict(trials, stabilities),
        causal_verdict(trials),
    ]
    sparsity = sparsity_of(frame)
    verdicts = (
        [judged._replace(evidence=f"{judged.evidence}; {sparsity}") for judged in verdicts] if sparsity else verdicts
    )
    moving = unconverged(frame)
    if moving is None:
        return verdicts
    return [
        judged._replace(evidence=f"{judged.evidence}; not converged: {moving}")
        if judged.verdict in ("holds", "fails")
        else judged
        for judged in verdicts
    ]


def sparsity_of(frame: pd.DataFrame) -> str | None:
    """The held-out L0 of the trials a verdict reads (and their target): a claim about dictionaries is a claim at
    some sparsity. None where no trial logged one."""
    l0 = column(frame, METRIC.l0)
    if l0.empty:
        return None
    targets = sorted(
        set(pd.to_numeric(frame.get("params.target_l0", pd.Series(dtype=float)), errors="coerce").dropna())
    )
    target = f" (target_l0 {', '.join(f'{value:g}' for value in targets)})" if targets else ""
    return f"trials at held-out L0 {l0.min():.1f} to {l0.max():.1f}{target}"


PAIR_CLAIMS = (CLAIM.stability,)
"""Claims judged on pairs of trials across the whole axis, never per value."""


def axis_keys(swept: list[str]) -> list[str]:
    """The keys that name an axis value: the swept ones, seeds aside unless the seed is the axis."""
    return [key for key in swept if key != "seed"] or swept


def across_values(outcomes: list[str]) -> str:
    """The overall outcome of per-value verdicts: the one they agree on where decided, mixed where some hold and
    some fail, inconclusive where none decides."""
    decided = {outcome for outcome in outcomes if outcome in ("holds", "fails")}
    if len(decided) == 2:
        return "mixed"
    return decided.pop() if decided else "inconclusive"


def value_label(keys: list[str], values) -> str:
    """An axis value as the report prints it: ``key=value`` per swept key."""
    return " · ".join(f"{key.removeprefix('params.')}={item}" for key, item in zip(keys, values))


def without_unfinished(verdicts: list[Verdict], trials: Trials) -> list[Verdict]:
    """Verdicts read from a grid with holes say so: the values left without a finished trial appear as missing
    in the per-value verdicts, and every decided verdict names the trials it was read without."""
    if not trials.unfinished:
        return verdicts
    listed = ", ".join(f"{label or 'trial'} ({status})" for label, status in trials.unfinished)
    judged_values = {label for judged in verdicts for label, _ in judged.by_value}
    missing = tuple(
        dict.fromkeys(
            (label, f"missing: {status.lower()}")
            for label, status in trials.unfinished
            if label and label not in judged_values
        )
    )
    return [
        judged._replace(
            evidence=f"{judged.evidence}; read without {len(trials.unfinished)} trial(s) that did not finish: {listed}",
            by_value=judged.by_value + missing if judged.by_value else judged.by_value,
        )
        for judged in verdicts
    ]


def judge_sweep(trials: Trials, stabilities: pd.DataFrame) -> list[Verdict]:
    """``judge_values``, each verdict's evidence ending with whether it would flip at the neighbouring values of
    the cut-offs it reads (``study.record.NEIGHBOURS``): a verdict that flips there rests on the cut-off's choice."""
    verdicts = judge_values(trials, stabilities)
    flips: dict[str, list[str]] = {judged.claim: [] for judged in verdicts}
    for name, neighbours in NEIGHBOURS.items():
        for value in neighbours:
            moved = trials._replace(cut_offs=replace(trials.cut_offs, **{name: value}))
            for judged, other in zip(verdicts, judge_values(moved, stabilities)):
                if other.verdict != judged.verdict:
                    flips[judged.claim].append(f"{name} {value:g} ({other.verdict})")
    return [
        judged._replace(
            evidence=f"{judged.evidence}; would flip at "
            + ", ".join(flips[judged.claim])
            + " of the cut-offs' neighbouring values"
            if flips[judged.claim]
            else f"{judged.evidence}; the same at the cut-offs' neighbouring values"
        )
        for judged in verdicts
    ]


def judge_values(trials: Trials, stabilities: pd.DataFrame) -> list[Verdict]:
    """A verdict per claim for the whole sweep, with one per value of the swept key (its seeds pooled, each trial
    judged on its own statistic's null or interval, so one trial suffices). A claim that paper 1 expects to
    change along the axis is judged at each value, not failed for changing. The overall outcome combines the
    per-value ones (``across_values``); the evidence is the whole axis's; the pair claims come from the whole axis."""
    pooled = judge(trials, stabilities)
    # Seeds are replicates of one value, never values: a seed sweep is one value, its seeds pooled.
    keys = [f"params.{key}" for key in trials.swept if key != "seed" and f"params.{key}" in trials.frame]
    if not keys or trials.frame.empty:
        return without_unfinished(pooled, trials)
    by_value: dict[str, list[tuple[str, str]]] = {}
    for value, group in sorted(trials.frame.groupby(keys, sort=False), key=lambda item: natural_order(item[0])):
        label = value_label(keys, value if isinstance(value, tuple) else (value,))
        for judged in judge(trials._replace(frame=group, min_trials=1), stabilities.iloc[0:0]):
            by_value.setdefault(judged.claim, []).append((label, judged.verdict))
    per_value = [
        judged
        if judged.claim in PAIR_CLAIMS
        else judged._replace(
            verdict=across_values([outcome for _, outcome in by_value[judged.claim]]),
            by_value=tuple(by_value[judged.claim]),
        )
        for judged in pooled
    ]
    return without_unfinished(per_value, trials)
