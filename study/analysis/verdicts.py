"""Sweep-level robustness: each claim statistic per axis value with its spread over seeds, feature
stability between trials, and a verdict per claim. Reads the trials from MLflow, logs to the parent run."""

from __future__ import annotations

import bisect
import itertools
import json
import tempfile
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from crosscoder.matching import matched_jaccard, stability
from crosscoder.model import CrossCoder
from study.record import (
    ABLATE_LEFT_BELOW,
    BY_AXIS_VALUE_ARTIFACT,
    COMPARED,
    CROSSCODER_ARTIFACT,
    EMERGENCE_SHARE_RANGE,
    FEATURES_ARTIFACT,
    IE_COLUMN,
    KEEP_RECOVERS_ABOVE,
    MATCH_THRESHOLD,
    NORM_PROXY_R,
    QUALITY_MAX_DEAD,
    QUALITY_MAX_DELTA_CE,
    QUALITY_MAX_L0,
    QUALITY_MIN_EV,
    RELIE_JACCARD,
    ROBUSTNESS_FOLDER,
    RULES,
    SAE_SHARED_LOW,
    STABILITY_ARTIFACT,
    STEPS_CURVE,
    TASK_LEARNED_ACCURACY,
    TOP_FEATURES,
    VERDICT_TAG,
    VERDICTS_ARTIFACT,
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


def finished_trials(client: MlflowClient, parent_run_id: str) -> Trials:
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'",
        max_results=10_000,
    )
    rows, steps = [], {}
    for run in runs:
        rows.append(
            {"run_id": run.info.run_id, **{f"params.{k}": v for k, v in run.data.params.items()}, **run.data.metrics}
        )
        steps[run.info.run_id] = [
            int(m.step) for m in sorted(client.get_metric_history(run.info.run_id, STEPS_CURVE), key=lambda m: m.step)
        ]
    frame = pd.DataFrame(rows)
    param_columns = [c for c in frame.columns if c.startswith("params.")]
    swept = sorted(c[len("params.") :] for c in param_columns if frame[c].nunique(dropna=False) > 1)
    return Trials(frame, swept, steps)


def axis_keys(swept: list[str]) -> list[str]:
    """The keys that name an axis value: the swept ones, seeds aside unless the seed is the axis."""
    return [key for key in swept if key != "seed"] or swept


def by_axis_value(trials: Trials) -> pd.DataFrame:
    """Each statistic per axis value: mean, standard deviation over the trials (seeds) sharing it, count."""
    keys = [f"params.{key}" for key in axis_keys(trials.swept)]
    rows = []
    groups = list(trials.frame.groupby(keys, dropna=False)) if keys else [((), trials.frame)]
    groups.sort(
        key=lambda item: tuple(
            numeric_first(value) for value in (item[0] if isinstance(item[0], tuple) else (item[0],))
        )
    )
    for values, group in groups:
        values = values if isinstance(values, tuple) else (values,)
        for statistic in COMPARED:
            series = group[statistic].dropna() if statistic in group else pd.Series(dtype=float)
            rows.append(
                {
                    **dict(zip(keys, values)),
                    "statistic": statistic,
                    "mean": series.mean(),
                    "std": series.std(ddof=1) if len(series) > 1 else 0.0,
                    "n": len(series),
                }
            )
    return pd.DataFrame(rows)


def numeric_first(value: str) -> tuple:
    """Sort key: numbers by value before other strings."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


class LiveDictionary(NamedTuple):
    decoder: torch.Tensor
    """[live features, S, d] decoder of the trial's crosscoder, dead features dropped."""
    top_features: torch.Tensor
    """Indices (into ``decoder``) of the top features by indirect effect at the last snapshot."""


def live_dictionary(client: MlflowClient, run_id: str, folder: Path) -> LiveDictionary:
    model = CrossCoder.load(client.download_artifacts(run_id, CROSSCODER_ARTIFACT, str(folder)))
    features = pd.read_parquet(client.download_artifacts(run_id, FEATURES_ARTIFACT, str(folder)))
    alive = torch.tensor(features["alive"].to_numpy())
    last_effect = max(
        (column for column in features if column.startswith(IE_COLUMN)),
        key=lambda column: int(column[len(IE_COLUMN) :]),
    )
    live_effects = torch.tensor(features[last_effect].to_numpy())[alive]
    return LiveDictionary(model.decoder_weight.detach()[alive], live_effects.argsort(descending=True)[:TOP_FEATURES])


def pairs_differing_in(frame: pd.DataFrame, key: str) -> list[tuple[str, str]]:
    """(run_a, run_b) for trials whose params are equal except ``key``; ordered by ``key``'s numeric value."""
    column = f"params.{key}"
    if column not in frame:
        return []
    others = [c for c in frame.columns if c.startswith("params.") and c != column]
    pairs = []
    for _, group in frame.groupby(others, dropna=False) if others else [((), frame)]:
        ordered = group.assign(_order=pd.to_numeric(group[column], errors="coerce")).sort_values("_order")
        pairs += list(itertools.combinations(ordered["run_id"], 2))
    return pairs


def feature_stability(client: MlflowClient, trials: Trials) -> pd.DataFrame:
    """Stability between seeds (all pairs of trials differing only in seed) and, where the expansion
    ratio is swept, the share of the smaller dictionary's features with a partner in the larger;
    for each pair also the Jaccard index of their top features by indirect effect, after matching."""
    columns = ["kind", "run_a", "run_b", "shared_share", "mean_max_cosine", "pairs", "top_feature_jaccard"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        dictionaries: dict[str, LiveDictionary] = {}

        def dictionary(run_id: str) -> LiveDictionary:
            if run_id not in dictionaries:
                dictionaries[run_id] = live_dictionary(client, run_id, Path(folder) / run_id)
            return dictionaries[run_id]

        for kind, key in (("seed", "seed"), ("expansion_ratio", "expansion_ratio")):
            for run_a, run_b in pairs_differing_in(trials.frame, key):
                a, b = dictionary(run_a), dictionary(run_b)
                result = stability(a.decoder, b.decoder, MATCH_THRESHOLD)
                jaccard = matched_jaccard(result.match, a.top_features, b.top_features, MATCH_THRESHOLD)
                rows.append(
                    dict(
                        zip(
                            columns,
                            (kind, run_a, run_b, result.shared_share, result.mean_max_cosine, result.n_pairs, jaccard),
                        )
                    )
                )
    return pd.DataFrame(rows, columns=columns)


def grid_interval_spread(steps_found: list[float], grid: list[int]) -> int:
    """How many intervals of ``grid`` separate the smallest and largest of ``steps_found``."""
    positions = [bisect.bisect_left(grid, step) for step in steps_found]
    return max(positions) - min(positions)


def judge(trials: Trials, stabilities: pd.DataFrame) -> list[Verdict]:
    """A verdict per claim of DESIGN.md's table, by the rules in ``RULES``."""
    frame = trials.frame
    coarsest = min(trials.steps.values(), key=len) if trials.steps else []

    def column(name: str) -> pd.Series:
        return frame[name].dropna() if name in frame else pd.Series(dtype=float)

    def in_every_trial(claim: str, statistic: str, passes, condition: str) -> Verdict:
        values = column(statistic)
        if values.empty:
            return Verdict(claim, "inconclusive", RULES[claim], f"no trial gives {statistic}")
        passing = int(values.map(passes).sum())
        listed = ", ".join(f"{value:.3g}" for value in values)
        return Verdict(
            claim,
            "holds" if passing == len(values) else "fails",
            RULES[claim],
            f"{condition} in {passing} of {len(values)} trials ({statistic}: {listed})",
        )

    verdicts = []
    found, turning = column("transition_found"), column("transition_step")
    if found.empty:
        verdicts.append(
            Verdict("transition", "inconclusive", RULES["transition"], "no trial gives a dimensionality curve")
        )
    elif (found < 1).any():
        verdicts.append(
            Verdict(
                "transition",
                "fails",
                RULES["transition"],
                f"{int(found.sum())} of {len(found)} trials find a turning point",
            )
        )
    else:
        spread = grid_interval_spread(turning.tolist(), coarsest)
        evidence = f"turning steps {sorted({int(step) for step in turning})}, {spread} interval(s) apart on the grid {coarsest}"
        verdicts.append(Verdict("transition", "holds" if spread <= 1 else "fails", RULES["transition"], evidence))

    shares, medians = column("initial_share"), column("median_emergence_step")
    if len(shares) < 2:
        verdicts.append(
            Verdict("emergence", "inconclusive", RULES["emergence"], f"{len(shares)} trial(s): nothing to compare")
        )
    else:
        share_range = float(shares.max() - shares.min())
        median_spread = grid_interval_spread(medians.tolist(), coarsest) if len(medians) else 0
        evidence = (
            f"initialization-dependent share {shares.min():.2f} to {shares.max():.2f}; "
            f"median emergence steps {sorted({int(m) for m in medians})}"
        )
        verdicts.append(
            Verdict(
                "emergence",
                "holds" if share_range <= EMERGENCE_SHARE_RANGE and median_spread <= 1 else "fails",
                RULES["emergence"],
                evidence,
            )
        )

    verdicts.append(in_every_trial("norm_proxy", "norm_proxy_r", lambda r: r < NORM_PROXY_R, f"r < {NORM_PROXY_R}"))

    if frame.empty:
        verdicts.append(Verdict("quality", "inconclusive", RULES["quality"], "no finished trial"))
    else:
        meets = (
            (frame["explained_variance"] >= QUALITY_MIN_EV)
            & (frame["l0"] < QUALITY_MAX_L0)
            & (frame["delta_ce_max"] < QUALITY_MAX_DELTA_CE)
            & (frame["dead_fraction"] <= QUALITY_MAX_DEAD)
        )
        listed = "; ".join(
            f"EV {row.explained_variance:.3f}, L0 {row.l0:.1f}, max ΔCE {row.delta_ce_max:.3f}, dead {row.dead_fraction:.2f}"
            for row in frame.itertuples()
        )
        verdicts.append(
            Verdict(
                "quality",
                "holds" if meets.all() else "fails",
                RULES["quality"],
                f"{int(meets.sum())} of {len(frame)} trials meet all thresholds ({listed})",
            )
        )

    seeds, ratios = stabilities[stabilities["kind"] == "seed"], stabilities[stabilities["kind"] == "expansion_ratio"]
    across_ratios = (
        f"; across expansion ratios {ratios['shared_share'].mean():.2f} of the smaller dictionary's features "
        f"have a partner in the larger ({len(ratios)} pair(s))"
        if len(ratios)
        else ""
    )
    if seeds.empty:
        verdicts.append(
            Verdict(
                "stability", "inconclusive", RULES["stability"], "no two trials differ only in seed" + across_ratios
            )
        )
    else:
        mean_share = float(seeds["shared_share"].mean())
        evidence = (
            f"shared share {mean_share:.2f} (range {seeds['shared_share'].min():.2f} to "
            f"{seeds['shared_share'].max():.2f}) over {len(seeds)} seed pair(s); "
            f"mean max cosine {seeds['mean_max_cosine'].mean():.2f}{across_ratios}"
        )
        verdicts.append(
            Verdict("stability", "holds" if mean_share >= SAE_SHARED_LOW else "fails", RULES["stability"], evidence)
        )

    verdicts.append(in_every_trial("token_specificity", "token_specificity_r", lambda r: r > 0, "r > 0"))

    relie_context = f"mean RelIE of the top {TOP_FEATURES} features at the last snapshot: " + (
        ", ".join(f"{value:.2f}" for value in column("relie_top_mean")) or "none"
    )
    if len(ratios):
        relie_context += (
            f"; across expansion ratios the top features' Jaccard index is "
            f"{ratios['top_feature_jaccard'].mean():.2f} ({len(ratios)} pair(s))"
        )
    if seeds.empty:
        verdicts.append(
            Verdict("relie", "inconclusive", RULES["relie"], "no two trials differ only in seed; " + relie_context)
        )
    else:
        jaccard = float(seeds["top_feature_jaccard"].mean())
        evidence = (
            f"top-feature Jaccard {jaccard:.2f} (range {seeds['top_feature_jaccard'].min():.2f} to "
            f"{seeds['top_feature_jaccard'].max():.2f}) over {len(seeds)} seed pair(s); {relie_context}"
        )
        verdicts.append(Verdict("relie", "holds" if jaccard >= RELIE_JACCARD else "fails", RULES["relie"], evidence))

    ablated, kept = column("causal_ablate_relative"), column("causal_keep_relative")
    if ablated.empty or kept.empty:
        verdicts.append(
            Verdict(
                "causal",
                "inconclusive",
                RULES["causal"],
                f"no trial has a snapshot with agreement accuracy >= {TASK_LEARNED_ACCURACY}",
            )
        )
    else:
        meets = (frame["causal_ablate_relative"] < ABLATE_LEFT_BELOW) & (
            frame["causal_keep_relative"] > KEEP_RECOVERS_ABOVE
        )
        listed = "; ".join(
            f"ablated {a:.2f}, kept {k:.2f}"
            for a, k in zip(frame["causal_ablate_relative"], frame["causal_keep_relative"])
        )
        verdicts.append(
            Verdict(
                "causal",
                "holds" if meets.all() else "fails",
                RULES["causal"],
                f"{int(meets.sum())} of {len(frame)} trials meet both thresholds (metric relative to clean: {listed})",
            )
        )
    return verdicts


def analyse_sweep(parent_run_id: str) -> list[Verdict]:
    """Compute the sweep's robustness from its finished trials and log it to the parent run:
    ``robustness/by_axis_value.csv``, ``robustness/stability.csv``, ``robustness/verdicts.json``,
    a ``verdict.<claim>`` tag per claim, and the mean stability as metrics."""
    client = MlflowClient()
    trials = finished_trials(client, parent_run_id)
    if trials.frame.empty:
        verdicts = [Verdict(claim, "inconclusive", rule, "no finished trial") for claim, rule in RULES.items()]
        summary, stabilities = (
            pd.DataFrame(),
            pd.DataFrame(columns=["kind", "shared_share", "mean_max_cosine", "top_feature_jaccard"]),
        )
    else:
        summary = by_axis_value(trials)
        stabilities = feature_stability(client, trials)
        verdicts = judge(trials, stabilities)
    with tempfile.TemporaryDirectory() as folder:
        summary.to_csv(Path(folder) / BY_AXIS_VALUE_ARTIFACT, index=False)
        stabilities.to_csv(Path(folder) / STABILITY_ARTIFACT, index=False)
        payload = {"axis_keys": axis_keys(trials.swept), "verdicts": [verdict._asdict() for verdict in verdicts]}
        (Path(folder) / VERDICTS_ARTIFACT).write_text(json.dumps(payload, indent=1))
        for name in (BY_AXIS_VALUE_ARTIFACT, STABILITY_ARTIFACT, VERDICTS_ARTIFACT):
            client.log_artifact(parent_run_id, str(Path(folder) / name), ROBUSTNESS_FOLDER)
    for verdict in verdicts:
        client.set_tag(parent_run_id, f"{VERDICT_TAG}{verdict.claim}", verdict.verdict)
    for kind, group in stabilities.groupby("kind"):
        client.log_metric(parent_run_id, f"stability_{kind}_shared_share", float(group["shared_share"].mean()))
        client.log_metric(parent_run_id, f"stability_{kind}_mean_max_cosine", float(group["mean_max_cosine"].mean()))
    return verdicts
