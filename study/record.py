"""The record: every name a trial or a sweep logs to MLflow, its label in plots, and each claim's
thresholds and rule. Trials write through these names, the verdicts and the report read through
them; nothing else spells them, so adding a statistic is one field here and one value where it is
computed.

Over 300 lines on purpose: the record is the one place a logged name, label, cut-off or rule is spelt.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from crosscoder.evolution import VALLEY_MIN_DEPTH


class Names:
    """Logged names as attributes, ``METRIC.l0 == "l0"``: code that reads or writes a name spells it through
    the record, so a name the record does not hold fails where it is used, not as a missing column later."""

    def __init__(self, names: Iterable[str]):
        self._names = frozenset(names)

    def __getattr__(self, name: str) -> str:
        if name.startswith("_") or name not in self._names:
            raise AttributeError(f"the record logs no name {name!r}")
        return name

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names))


# --- per-trial scalars (MLflow metrics without a step)


class CausalSummary(NamedTuple):
    """The causal analyses' scalars (``study.analysis.causal_statistics``); features are ranked on half the task's
    prompts and every ablation is measured on the other half, averaged over the snapshots where the task is learned."""

    task_learned_snapshots: float
    """Snapshots whose clean task accuracy reaches TASK_LEARNED_ACCURACY."""
    task_learned_step: float
    """The first of them (nan: never learned)."""
    causal_ablate_relative: float
    """Task metric left with the top causal_ablate_k features ablated, as a share of clean minus baseline."""
    causal_ablate_relative_low: float
    """Low end of its 95 % bootstrap interval over the measuring prompts."""
    causal_ablate_relative_high: float
    """High end."""
    causal_keep_relative: float
    """Task metric with only the top causal_keep_k features kept (errors kept), the same share."""
    causal_keep_relative_low: float
    """Low end of its 95 % bootstrap interval over the measuring prompts."""
    causal_keep_relative_high: float
    """High end."""
    causal_random_ablate_relative: float
    """The same with as many random features ablated: the baseline the top features must beat."""
    causal_random_keep_relative: float
    """The same with only as many random features kept."""
    causal_ablate_k: float
    """Features ablated (``ablate_count``)."""
    causal_keep_k: float
    """Features kept (``keep_count``)."""
    attribution_gap_max: float
    """Largest relative shortfall of integrated gradients' completeness over the learned snapshots."""
    error_effect_share_max: float
    """Largest share of the attributed effect that goes through the reconstruction error, same snapshots."""
    relie_top_mean: float
    """Mean RelIE at the last RelIE snapshot of its TOP_FEATURES features by indirect effect."""
    relie_onset_step: float
    """First step where the TOP_FEATURES features by indirect effect at the last snapshot start to matter: their
    pooled RelIE against the last snapshot reaches RELIE_ONSET (nan: never)."""


class PlantedSummary(NamedTuple):
    """Logged by trials on a planted trajectory (``study.analysis.planted_recovery``): the crosscoder against the truth."""

    planted_recovered_share: float
    """Share of the planted features some crosscoder feature recovers (decoder cosine >= RECOVERED_COSINE)."""
    planted_emergence_agreement: float
    """Share of the recovered features whose emergence step is the planted one."""
    planted_token_kind_agreement: float
    """Share of the recovered features found token-specific (token entropy < 0.5 nats) exactly when planted so."""
    planted_initial_share: float
    """The planted features' initialization-dependent share at the trial's snapshots: what initial_share should read."""
    planted_turning_step: float
    """The planted dictionary's turning step at the trial's snapshots: what transition_step should read."""


class TrialSummary(NamedTuple):
    """One trial's scalars: quality, the claim statistics (nan where one does not exist), the causal part."""

    explained_variance: float
    """Explained variance of the held-out activations, over all snapshots."""
    min_explained_variance_by_snapshot: float
    """The lowest per-snapshot explained variance."""
    l0: float
    """Mean active features per token."""
    l0_per_dimension: float
    """L0 as a share of the activations' dimension (d_model): sparsity in the model's own units."""
    dead_fraction: float
    """Share of features that never fire on held-out tokens."""
    live_features: float
    """Features that fire on some held-out token: what a larger dictionary really adds."""
    l0_per_snapshot: float
    """Mean over snapshots of the active codes per token at each snapshot (JumpReLU gates each snapshot apart,
    so a feature active at some snapshot, which l0 counts, may be silent at others)."""
    l0_target_gap: float
    """(l0 - target_l0) / target_l0 on held-out tokens (nan without a target)."""
    sparsity_coefficient_reached: float
    """The sparsity coefficient the trial ended with: the controller's where it held a target L0, else the set one
    (0 for topk and batchtopk, which have none)."""
    mse: float
    """Reconstruction loss in the trainer's units."""
    loss_drop_last_fifth: float
    """Relative fall of the training loss over the last fifth of the steps: above UNCONVERGED_LOSS_DROP, not flat yet."""
    transition_step: float
    """Snapshot step where total feature dimensionality turns (nan without a turning point)."""
    transition_found: float
    """1 where the dimensionality curve has an inner minimum, else 0."""
    transition_p_value: float
    """Share of random snapshot orders of the same dimensionality values that turn at least as clearly
    (``crosscoder.evolution.valley_test``): the chance of this turn in a curve whose order means nothing."""
    transition_monotone_fit: float
    """Share of the dimensionality curve's variance a monotone curve explains (near 1: it only rises or falls)."""
    initial_share: float
    """Share of live features present (decoder norm at half its maximum) at the first snapshot."""
    emergent_share: float
    """Share of live features that reach half their maximum decoder norm later."""
    median_emergence_step: float
    """Median emergence step of the emergent features."""
    emergence_near_share: float
    """Share of the emergent features that emerge near the trial's turning step (``near``; nan without one)."""
    unresolved_share: float
    """Share of live features whose decoder never moved measurably from its initial value (left out of emergence)."""
    order_coherence: float
    """How well the snapshot order explains the activations' distances (1: a training run; ~0: shuffled; nan: frozen)."""
    norm_proxy_r: float
    """Pearson r between probe error and relative decoder norm over sampled features and snapshots (paper 1's)."""
    norm_proxy_r_within: float
    """The same with each snapshot's mean taken out of both (a time trend they share does not count)."""
    norm_proxy_r_within_low: float
    """Low end of its 95 % bootstrap interval over the sampled features."""
    norm_proxy_r_within_high: float
    """High end of that interval."""
    delta_ce_mean: float
    """Mean over snapshots of the next-token loss increase with the reconstruction spliced in (nats)."""
    delta_ce_max: float
    """Largest such increase over snapshots (nats)."""
    min_loss_recovered_by_snapshot: float
    """The lowest per-snapshot share of the mean-ablation loss increase the reconstruction avoids."""
    token_specificity_r: float
    """Spearman r between a feature's peak snapshot and the entropy of its token ids, on equal counts of firings."""
    token_specificity_r_low: float
    """Low end of its 95 % bootstrap interval over features."""
    token_specificity_r_high: float
    """High end of that interval."""
    alignment_overlap: float
    """Share of top-activating tokens shared by adjacent snapshots where the feature is present."""
    sampled_features: float
    """Features sampled for the probe and alignment analyses."""
    control_explained_variance: float
    """The untrained control (the crosscoder as initialised): explained variance..."""
    control_l0: float
    """...L0..."""
    control_initial_share: float
    """...the initialization-dependent share of its live features..."""
    control_transition_found: float
    """...and whether its dimensionality curve turns."""
    task_learned_snapshots: float
    task_learned_step: float
    causal_ablate_relative: float
    causal_ablate_relative_low: float
    causal_ablate_relative_high: float
    causal_keep_relative: float
    causal_keep_relative_low: float
    causal_keep_relative_high: float
    causal_random_ablate_relative: float
    causal_random_keep_relative: float
    causal_ablate_k: float
    causal_keep_k: float
    attribution_gap_max: float
    error_effect_share_max: float
    relie_top_mean: float
    relie_onset_step: float


# --- per-trial curves over snapshots (MLflow metrics, step = the snapshot's training step)


class CausalCurves(NamedTuple):
    """The causal analyses' curves over snapshots."""

    task_logit_difference_by_snapshot: list[float]
    task_accuracy_by_snapshot: list[float]
    error_effect_share_by_snapshot: list[float]
    attribution_gap_by_snapshot: list[float]
    ablate_top_relative_by_snapshot: list[float]
    keep_top_relative_by_snapshot: list[float]
    relie_top_by_snapshot: list[float]
    """The top features' pooled RelIE at each snapshot against the last (``relie_onset_step``)."""


class TrialCurves(NamedTuple):
    """One trial's curves over its snapshots, in snapshot order (alignment: S - 1 values, at the later snapshot)."""

    explained_variance_by_snapshot: list[float]
    l0_by_snapshot: list[float]
    mean_decoder_norm_by_snapshot: list[float]
    feature_dimensionality_by_snapshot: list[float]
    clean_loss_by_snapshot: list[float]
    delta_ce_by_snapshot: list[float]
    loss_recovered_by_snapshot: list[float]
    probe_error_by_snapshot: list[float]
    token_entropy_by_peak_snapshot: list[float]
    alignment_overlap_by_snapshot: list[float]
    task_logit_difference_by_snapshot: list[float]
    task_accuracy_by_snapshot: list[float]
    error_effect_share_by_snapshot: list[float]
    attribution_gap_by_snapshot: list[float]
    ablate_top_relative_by_snapshot: list[float]
    keep_top_relative_by_snapshot: list[float]
    relie_top_by_snapshot: list[float]


class AlongTraining(NamedTuple):
    """The order statistics at each checkpoint of a trial's training (MLflow metrics ALONG_TRAINING_PREFIX + name,
    step = the training step), read over the features live and resolved at the end."""

    transition_step: float
    transition_p_value: float
    initial_share: float
    emergence_near_share: float


ALONG_TRAINING_PREFIX = "along_training/"
"""Prefix of the AlongTraining curves."""
SETTLED_SHARE = 0.05
"""A share (initial_share) has settled where every later checkpoint reads it within this of the end's value (a
turning step where every later one is near it, ``near``, or none turns)."""

STEPS_CURVE = "explained_variance_by_snapshot"
"""The curve whose MLflow steps tell which snapshots a trial's crosscoder spans."""
TRAINING_PREFIX = "train/"
"""Training-curve metrics (step = optimizer step)."""
MODEL_PREFIX = "model/"
"""The parent run's model-level curves (step = snapshot step)."""
MODEL_CURVES = (
    "lm_loss",
    "unigram_kl",
    "bigram_kl",
    "agreement_accuracy",
    "agreement_logit_difference",
    "unigram_entropy",
    "bigram_entropy",
)
"""The model-level curves, logged as MODEL_PREFIX + name."""

# --- what the report and the sweep analysis compare, and how they label it

COMPARED = (
    "explained_variance",
    "control_explained_variance",
    "min_explained_variance_by_snapshot",
    "l0",
    "control_l0",
    "dead_fraction",
    "live_features",
    "l0_target_gap",
    "sparsity_coefficient_reached",
    "loss_drop_last_fifth",
    "delta_ce_max",
    "min_loss_recovered_by_snapshot",
    "l0_per_dimension",
    "transition_step",
    "control_transition_found",
    "planted_turning_step",
    "initial_share",
    "planted_initial_share",
    "control_initial_share",
    "planted_recovered_share",
    "planted_emergence_agreement",
    "planted_token_kind_agreement",
    "unresolved_share",
    "median_emergence_step",
    "order_coherence",
    "norm_proxy_r",
    "norm_proxy_r_within",
    "token_specificity_r",
    "token_specificity_r_low",
    "alignment_overlap",
    "causal_ablate_relative",
    "causal_random_ablate_relative",
    "causal_keep_relative",
    "task_learned_step",
    "relie_onset_step",
    "relie_top_mean",
)
"""Trial scalars summarised per axis value (mean and spread over seeds) and listed per trial in the report;
the planted_ ones exist only on a planted trajectory, each beside the statistic it is the answer for."""
PLOTTED_CURVES = (
    "feature_dimensionality_by_snapshot",
    "explained_variance_by_snapshot",
    "delta_ce_by_snapshot",
    "loss_recovered_by_snapshot",
    "probe_error_by_snapshot",
    "token_entropy_by_peak_snapshot",
    "alignment_overlap_by_snapshot",
    "ablate_top_relative_by_snapshot",
    "keep_top_relative_by_snapshot",
    "relie_top_by_snapshot",
)
"""Trial curves the report reads and plots."""


ABLATE_K = 15
"""Paper 1: ablating the top 15 of its 98,304 features lowers the task metric by more than half..."""
KEEP_SHARE = 500 / 98_304
"""...and keeping only the top 500 recovers more than 90 % of it: kept as a share."""
KEEP_MIN = 20
"""Fewest features kept, for dictionaries where that share is a handful."""
ABLATE_MAX_SHARE, KEEP_MAX_SHARE = 0.05, 0.10
"""The most of the dictionary ablated and kept: paper 1's counts are a small set only in a large dictionary (15 of
128 features is an eighth of it), so in a small one the counts shrink to stay a small share."""
L0_TARGET_TOLERANCE = 0.1
"""A trial's held-out L0 within this share of its target_l0 is on target; outside, its run is tagged l0_target_missed."""
UNCONVERGED_LOSS_DROP = 0.02
"""A trial whose training loss still fell by more than this share over its last fifth had not converged:
its statistics describe a dictionary still moving, and the report flags it."""


def ablate_count(n_features: int) -> int:
    """Features the causal claim ablates: paper 1's ABLATE_K, at most ABLATE_MAX_SHARE of the dictionary, at least 1."""
    return max(1, min(ABLATE_K, round(ABLATE_MAX_SHARE * n_features)))


def keep_count(n_features: int) -> int:
    """Features it keeps: KEEP_SHARE of the dictionary, at least KEEP_MIN, at most KEEP_MAX_SHARE of it, at least 1."""
    return max(1, min(max(KEEP_MIN, round(KEEP_SHARE * n_features)), round(KEEP_MAX_SHARE * n_features)))


LABELS = {
    "planted_turning_step": "planted turning step (truth)",
    "planted_initial_share": "planted init.-dependent share (truth)",
    "planted_recovered_share": "planted features recovered",
    "planted_emergence_agreement": "recovered features dated as planted",
    "planted_token_kind_agreement": "recovered features token-specific as planted",
    "explained_variance": "explained variance",
    "min_explained_variance_by_snapshot": "lowest EV over snapshots",
    "l0": "L0",
    "dead_fraction": "dead share",
    "live_features": "live features",
    "l0_target_gap": "L0 off its target (share)",
    "sparsity_coefficient_reached": "sparsity coefficient reached",
    "delta_ce_max": "largest ΔCE (nats)",
    "transition_step": "turning step",
    "initial_share": "init.-dependent share",
    "control_initial_share": "init.-dependent share, untrained control",
    "control_explained_variance": "explained variance, untrained control",
    "loss_drop_last_fifth": "training loss drop over the last fifth",
    "control_l0": "L0, untrained control",
    "control_transition_found": "turning point found, untrained control",
    "unresolved_share": "unresolved share (decoder never moved)",
    "order_coherence": "order coherence of the snapshots",
    "token_specificity_r_low": "r(peak, entropy), 95 % low end",
    "median_emergence_step": "median emergence step",
    "norm_proxy_r": "r(probe error, norm)",
    "token_specificity_r": "r(peak snapshot, entropy)",
    "alignment_overlap": "top-10 overlap",
    "causal_ablate_relative": "metric left, top features ablated",
    "causal_random_ablate_relative": "metric left, as many random features ablated",
    "norm_proxy_r_within": "r(probe error, norm) within snapshots",
    "min_loss_recovered_by_snapshot": "lowest loss recovered over snapshots",
    "l0_per_dimension": "L0 / d_model",
    "relie_onset_step": "top features' RelIE onset step",
    "task_learned_step": "task learned at step",
    "loss_recovered_by_snapshot": "loss recovered (vs mean ablation)",
    "relie_top_by_snapshot": "top features' RelIE vs last snapshot",
    "causal_keep_relative": "metric kept, top features only",
    "relie_top_mean": "RelIE of top features, last snapshot",
    "feature_dimensionality_by_snapshot": "total feature dimensionality",
    "explained_variance_by_snapshot": "explained variance",
    "delta_ce_by_snapshot": "ΔCE (nats)",
    "probe_error_by_snapshot": "probe balanced error",
    "token_entropy_by_peak_snapshot": "token entropy (nats), by peak snapshot",
    "alignment_overlap_by_snapshot": "top-10 overlap with previous snapshot",
    "ablate_top_relative_by_snapshot": "top features ablated",
    "keep_top_relative_by_snapshot": "top features kept",
}
"""Plot and table labels of the compared statistics and plotted curves."""

# --- artifacts

CROSSCODER_ARTIFACT = "crosscoder.safetensors"
"""The trained crosscoder; the stability analysis matches these decoders across trials."""
FEATURES_ARTIFACT = "features.parquet"
"""One row per feature: frequency, alive, emergence and peak step, token entropy, ie_step<N>, relie_step<N>."""
ABLATION_CURVES_ARTIFACT = "ablation_curves.parquet"
"""The task metric with the top-k features ablated or kept, per snapshot step and k."""
DECODER_NORMS_ARTIFACT = "decoder_norms.parquet"
"""[features, snapshots] decoder norms, columns step<N>."""
FEATURE_PAGES_ARTIFACT = "feature_pages.json"
"""The feature browser's data of a trial's chosen features: profiles, contexts, tokens, logit and indirect effects."""
FEATURE_BROWSER = "features.html"
"""A trial's feature browser, written with the report (in the trial's run, and report/features/ of the parent)."""
DECODER_NORMS_FIGURE = "decoder_norms.png"
"""The trial's decoder-norm heatmap."""
IE_COLUMN = "ie_step"
"""Prefix of the features table's indirect-effect columns (then the snapshot step)."""
RELIE_COLUMN = "relie_step"
"""Prefix of the features table's RelIE columns (then the snapshot step)."""
MODEL_CURVES_ARTIFACT = "model_curves.parquet"
"""The parent run's model-level curves."""
TRIALS_ARTIFACT = "trials.csv"
"""The parent run's table of trials and their status."""
ROBUSTNESS_FOLDER = "robustness"
"""The parent run's artifact folder of the sweep analysis."""
BY_AXIS_VALUE_ARTIFACT = "by_axis_value.csv"
STABILITY_ARTIFACT = "stability.csv"
PARTNERS_ARTIFACT = "partners.parquet"
"""The parent's matched feature pairs between trials (seed and expansion-ratio twins), one-to-one above
MATCH_THRESHOLD: a feature's partners in the browser."""
PARTNER_COLUMNS = ["run_a", "feature_a", "run_b", "feature_b", "cosine"]
VERDICTS_ARTIFACT = "verdicts.json"
REPORT_FOLDER = "report"
"""The parent run's artifact folder of the report."""
VERDICT_TAG = "verdict."
"""Prefix of the parent run's tag per claim."""

# --- claims: thresholds and rules

TASK_LEARNED_ACCURACY = 0.9
"""A snapshot counts for the causal claim when its clean agreement accuracy reaches this: before the
task is learned, a share of a near-zero metric means nothing."""
TOP_FEATURES = 10
"""Features per snapshot whose RelIE is summarised (and, in the sweep, compared across seeds)."""
MATCH_THRESHOLD = 0.7
"""Cosine above which two matched features count as the same feature."""
RELIE_ONSET = 1 / 3
"""A feature starts to matter at the first snapshot where its RelIE against the last snapshot, |IE_s| / (|IE_s| +
|IE_last|), reaches this: its indirect effect half of what it ends with."""


@dataclass(frozen=True)
class CutOffs:
    """Every cut-off a verdict rule reads, named once with its reason. The sweep re-judges each verdict at the
    NEIGHBOURS of the cut-offs it reads, and says whether it would flip there."""

    turn_alpha: float = 0.05
    """The transition's test level: a curve turns when random snapshot orders of its values turn as clearly in at
    most this share of orderings (the nominal rate of a false turn in a curve whose order means nothing)."""
    monotone_fit: float = 0.8
    """A dimensionality curve that does not turn and of which a monotone curve explains at least this share of the
    variance only rises or falls: the transition fails there (below it, the curve is noise, and undecided)."""
    min_order_coherence: float = 0.5
    """Order coherence every trial needs for an order claim to be judged at all (a shuffled trajectory has ~0)."""
    min_resolved_share: float = 0.5
    """Share of live features whose decoders moved from their initial value, for emergence to be read from them."""
    min_emergent_share: float = 0.1
    """Emergence needs at least this share of resolved features to emerge after the first snapshot."""
    near_share: float = 0.5
    """Emergence holds where at least this share of the emergent features emerge near the turning step ("mostly
    near the transition", read on the share, not on the median)."""
    norm_proxy_r: float = -0.5
    """The smallest within-snapshot correlation of probe error and decoder norm that counts as tracking (a large
    effect): paper 1's -0.87 pools features and snapshots, and a time trend both share makes most of such a figure."""
    token_specificity_r: float = 0.1
    """The smallest Spearman r of peak snapshot and token entropy that counts as "early token-specific, later
    abstract"."""
    quality_min_ev: float = 0.85
    """Explained variance at the worst snapshot (paper 1's 85 %)."""
    quality_min_loss_recovered: float = 0.8
    """Share of the mean-ablation loss increase the reconstruction avoids, at the worst snapshot (ΔCE relative to
    what the layer is worth; paper 2's < 0.5 nats is in one model's units)."""
    quality_max_l0_per_dimension: float = 120 / 768
    """Most active features per token as a share of d_model: paper 1's L0 < 120 on Pythia-160M's 768 dimensions."""
    quality_max_dead: float = 0.10
    """Largest dead share (paper 2 reads many dead features as poor training)."""
    shared_share_low: float = 0.30
    """Low end of the share of features shared across seeds published for SAEs (30-53 %)."""
    ablate_left_below: float = 0.5
    """Paper 1: ablating the top features leaves under half of the task metric..."""
    keep_recovers_above: float = 0.9
    """...and keeping only them recovers over 90 % of it."""
    attribution_gap_max: float = 0.2
    """The causal claim is judged only where integrated gradients account for the metric (the effects add up to it
    within this share)..."""
    error_share_max: float = 0.5
    """...and the features carry most of the effect (the reconstruction error at most this share): a ranking that
    explains little of the metric ranks nothing."""


CUT_OFFS = CutOffs()
"""The cut-offs the verdicts are judged at."""
NEIGHBOURS = {
    "turn_alpha": (0.025, 0.1),
    "monotone_fit": (0.7, 0.9),
    "min_order_coherence": (0.4, 0.6),
    "min_resolved_share": (0.4, 0.6),
    "min_emergent_share": (0.05, 0.2),
    "near_share": (0.4, 0.6),
    "norm_proxy_r": (-0.4, -0.6),
    "token_specificity_r": (0.05, 0.2),
    "quality_min_ev": (0.8, 0.9),
    "quality_min_loss_recovered": (0.7, 0.9),
    "quality_max_l0_per_dimension": (0.1, 0.2),
    "quality_max_dead": (0.05, 0.2),
    "shared_share_low": (0.2, 0.4),
    "ablate_left_below": (0.4, 0.6),
    "keep_recovers_above": (0.8, 0.95),
    "attribution_gap_max": (0.1, 0.3),
    "error_share_max": (0.4, 0.6),
}
"""The values either side of each cut-off at which every verdict reading it is judged again."""


MIN_COMPARABLE_TRIALS = 2
"""No verdict from fewer finished trials that give the claim's statistic: it is inconclusive."""
NEAR_FACTOR = 2.5
"""Two training steps are near when (1 + step) of one is within this factor of the other's: on the log axis
pre-training schedules use, and the same at 4 snapshots as at 32 (a grid interval is not)."""
STATISTICAL_END_TOLERANCE = 0.05
"""Statistical learning ends at the first snapshot whose unigram KL lies within this share of the curve's range of its floor."""

SHARED_RULES = (
    "Every claim but stability is judged at each value of the swept key, its seeds pooled (one trial suffices: each "
    "trial's statistic comes with its own null or interval), and overall: holds or fails where the decided values "
    "agree, mixed where some hold and some fail, inconclusive where none decides. A claim a paper expects to change "
    "along the axis is judged at each value, not failed for changing. A claim read as an effect with a 95 % interval "
    "(the trials of a value pooled: their mean, and the larger of the standard errors their own intervals and their "
    "spread give) holds where the interval lies beyond its smallest effect of interest, fails where it lies on the "
    "null's side of it, and is inconclusive where it holds it: too little power reads as neither. "
    f"No verdict across the axis from fewer than {MIN_COMPARABLE_TRIALS} comparable trials (finished trials that "
    "give the claim's statistic): inconclusive. Pairs of trials (stability) differ in the compared key; trials with "
    "the same configuration are replicates, never pairs. The order claims (transition, emergence, token_specificity) "
    f"are inconclusive unless every trial's snapshots evolve in their order (order coherence >= {CUT_OFFS.min_order_coherence}; "
    "a frozen or shuffled trajectory has none) and forward (the model's held-out loss lower at the last snapshot than "
    "at the first; checkpoints in reverse order have the same coherence). A verdict read from trials that had not "
    f"converged (training loss still falling by more than {UNCONVERGED_LOSS_DROP:.0%} over the last fifth of the "
    "steps) keeps its outcome and says so in its evidence: it describes dictionaries still moving."
)
"""The rules every claim obeys, as the report states them."""


class Claim(NamedTuple):
    claim: str
    """The claim's id."""
    paper_claim: str
    """What the paper concluded."""
    statistic: str
    """What it is judged on."""
    rule: str
    """When it holds, as the report states it."""


CLAIMS = (
    Claim(
        "transition",
        "statistical then feature learning, turning near step 1000 (paper 1)",
        "transition_p_value, transition_monotone_fit, transition_step, model/unigram_kl",
        "per trial, the total feature dimensionality's turn (how much of the curve a fall-then-rise explains, each arm "
        f"at least {VALLEY_MIN_DEPTH:.0%} of its range) is tested against the same values in random snapshot orders; "
        "holds if every trial turns at "
        f"p <= {CUT_OFFS.turn_alpha}, the turning steps of seeds of one configuration are near each other (within a factor of "
        f"{NEAR_FACTOR} in 1 + step) and at "
        "or near the end of statistical learning (the first snapshot whose unigram KL is within "
        f"{STATISTICAL_END_TOLERANCE:.0%} of its range of its floor); fails if they are not, or if a trial without a "
        f"turn has a curve a monotone one explains (fit >= {CUT_OFFS.monotone_fit}); inconclusive otherwise, and where too few "
        "snapshots could show a turn at that level (fewer than 6)",
    ),
    Claim(
        "emergence",
        "features are initialization-dependent or emerge, mostly near the transition (paper 1)",
        "initial_share, emergence_near_share, unresolved_share",
        "counted over resolved features (decoders that moved measurably from their initial value); follows the "
        "transition where it does not hold (fails with it, inconclusive with it); holds if in every trial at least "
        f"{CUT_OFFS.min_resolved_share:.0%} of live features are resolved, at least {CUT_OFFS.min_emergent_share:.0%} of them emerge "
        f"after the first snapshot, and at least {CUT_OFFS.near_share:.0%} of those emerge near the trial's turning step; "
        "fails otherwise (the spread of the shares across trials is evidence, not a rule: paper 1 expects it to "
        "change with the dictionary)",
    ),
    Claim(
        "norm_proxy",
        "decoder norm tracks feature presence, r about -0.87 with probe error (paper 1)",
        "norm_proxy_r_within, norm_proxy_r_within_low, norm_proxy_r_within_high",
        "per trial, the correlation between probe error and relative decoder norm within snapshots (each snapshot's "
        "mean over features taken out, so a time trend both share does not count) with its 95 % bootstrap interval "
        f"over features; the trials' effects pooled: holds if the interval lies below {CUT_OFFS.norm_proxy_r}, fails if it "
        "lies above, inconclusive if it holds it",
    ),
    Claim(
        "quality",
        "EV >= 85 %, L0 < 120 (paper 1); ΔCE < 0.5, few dead features (paper 2)",
        "min_explained_variance_by_snapshot, min_loss_recovered_by_snapshot, l0_per_dimension, dead_fraction",
        f"holds if every trial, at its worst snapshot, explains at least {CUT_OFFS.quality_min_ev:.0%} of the variance (and more "
        f"than the untrained control) and recovers at least {CUT_OFFS.quality_min_loss_recovered:.0%} of the loss that "
        f"replacing the layer by its mean costs, with L0 at most {CUT_OFFS.quality_max_l0_per_dimension:.3f} of d_model and "
        f"at most {CUT_OFFS.quality_max_dead:.0%} dead features; fails otherwise",
    ),
    Claim(
        "stability",
        "crosscoders find the same features across seeds (paper 2's check)",
        "shared_share (seed pairs)",
        f"holds if, between trials whose seeds differ and nothing else, the mean share of features matched one-to-one "
        f"with cosine > {MATCH_THRESHOLD} is at least {CUT_OFFS.shared_share_low} (the low end of published SAE levels); fails below",
    ),
    Claim(
        "token_specificity",
        "early features are token-specific, later ones abstract (paper 2)",
        "token_specificity_r, token_specificity_r_low, token_specificity_r_high",
        "per trial, the Spearman r between the snapshot where a feature's decoder norm peaks and the entropy of its "
        f"token ids, each read on the same count of its firings (a feature that fires more often is not more abstract for "
        "that), with its 95 % bootstrap interval over features; the trials' effects pooled: holds if the interval "
        f"lies above {CUT_OFFS.token_specificity_r}, fails if below, inconclusive if it holds it",
    ),
    Claim(
        "relie",
        "RelIE locates where a feature starts to matter (paper 2)",
        "relie_onset_step, task_learned_step",
        f"per trial, the top {TOP_FEATURES} features by indirect effect at the last snapshot start to matter where "
        f"their pooled RelIE against the last snapshot reaches {RELIE_ONSET:.2f} (their effect half the last); holds if "
        "in every trial that onset is near the first snapshot where the task is learned (accuracy >= "
        f"{TASK_LEARNED_ACCURACY}), fails if in most it is not, inconclusive otherwise and where the task is never "
        "learned or learned at the first snapshot; the top features' overlap across seeds is shown, as stability",
    ),
    Claim(
        "causal",
        "ablating tens of features breaks the task; keeping a few hundred restores it (paper 1)",
        "causal_ablate_relative, causal_keep_relative and their intervals, causal_random_*",
        f"over the trials whose task is learned at some snapshot (accuracy >= {TASK_LEARNED_ACCURACY}; the others are "
        "left out, not failed): features ranked by indirect effect on half of the prompts, every figure measured on "
        "the other half as a share of metric(clean) - metric(baseline), averaged over the learned snapshots, with 95 % "
        f"intervals over the measuring prompts. Ablated: paper 1's {ABLATE_K} features, at most "
        f"{ABLATE_MAX_SHARE:.0%} of the dictionary; kept: its {KEEP_SHARE:.2%} of the dictionary, at least {KEEP_MIN}, at "
        f"most {KEEP_MAX_SHARE:.0%}. Inconclusive where attribution misses the metric by more than "
        f"{CUT_OFFS.attribution_gap_max:.0%} or the reconstruction error carries more than {CUT_OFFS.error_share_max:.0%} of the effect; "
        f"holds if ablating leaves under {CUT_OFFS.ablate_left_below:.0%} and keeping recovers over {CUT_OFFS.keep_recovers_above:.0%} "
        "(intervals clear of both) while as many random features do neither; fails if an interval lies on the wrong "
        "side or random features do as well; inconclusive otherwise",
    ),
)
"""Each claim of the two papers this harness tests, in the report's order."""
RULES = {claim.claim: claim.rule for claim in CLAIMS}
"""claim id -> its rule."""


def natural_order(value) -> tuple:
    """Sort key of axis values (one, or a tuple of several): numbers by value before other values, as logged params
    are strings and "16" would come before "8"."""
    items = value if isinstance(value, tuple) else (value,)

    def key(item) -> tuple:
        try:
            return (0, float(item), "")
        except (TypeError, ValueError):
            return (1, 0.0, str(item))

    return tuple(key(item) for item in items)


def near(step: float, other: float) -> bool:
    """Whether two training steps are near (NEAR_FACTOR)."""
    return abs(math.log1p(step) - math.log1p(other)) <= math.log(NEAR_FACTOR)


# --- names as attributes (see Names)

PROGRESS_METRICS = ("explained_variance", "l0", "dead_fraction")
"""Held-out metrics reported with every checkpoint, so a searcher or scheduler can judge a trial while it trains."""
TABLE_METRICS = ("explained_variance", "l0", "dead_fraction", "loss_drop_last_fifth")
"""The metrics of the sweep's closing table and its per-trial lines."""
TRIAL_RESULT = Names(("seconds", "mlflow_run_id", "training_step", "trial_id"))
"""What a trial reports to Tune besides its summary: its time, its MLflow run, the step of a checkpoint, Tune's id."""
TAG = Names(
    (
        "sweep_name",
        "tune_trial_id",
        "stopped_early",
        "error",
        "ray_node_id",
        "gpu_share",
        "ray_gpu_ids",
        "resumed_from_step",
        "search",
        "scheduler",
        "search_metric",
        "l0_target_missed",
        "trial_workers",
        "cache_location",
        "storage_location",
        "sweep_interrupted",
        "skipped_checkpoints",
    )
)
"""Run tags: the sweep's name and Tune's trial id (how a run is found again), a trial stopped by the scheduler,
a trial's error, where it ran and on what (its node, GPU share and ids, the Ray Train workers it was split over),
where it resumed and which damaged checkpoints it skipped to get there; the parent's searcher, scheduler and their
metric, where its activation cache and Tune storage lived (credentials stripped), and whether the sweep was last
interrupted (Ctrl-C); a trial whose held-out L0 missed its target_l0 (one line: by how much, and what to change)."""
OPTION_TAG = "option."
"""Prefix of the parent run's tag per sweep option (``study.sweep.options.SweepOptions``), credentials stripped."""
ERROR_ARTIFACT = "error.txt"
"""A failed trial's traceback."""
METRIC = Names(
    (
        *TrialSummary._fields,
        *PlantedSummary._fields,
        *TrialCurves._fields,
        *MODEL_CURVES,
        "step",
        "value",
        "run_id",
        "trajectory",
        "shared_share",
        "mean_max_cosine",
        "top_feature_jaccard",
    )
)
"""Every metric name, and the columns of the tables built from them (a curve's step and value, the run, the
trajectory of a model curve, the n-gram reference levels, the stability table's figures)."""
CLAIM = Names(claim.claim for claim in CLAIMS)
"""Claim ids."""
