"""Sweep-level robustness: each claim statistic per axis value with its spread over seeds, feature
stability between trials, and a verdict per claim. Reads the trials from MLflow, logs to the parent run."""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import mlflow
import pandas as pd
import ray
import torch
from mlflow.tracking import MlflowClient

from crosscoder.matching import matched_jaccard, stability
from crosscoder.model import CrossCoder
from study.analysis.rules import Trials, Verdict, axis_keys, judge_sweep, value_label
from study.record import (
    ALONG_TRAINING_PREFIX,
    BY_AXIS_VALUE_ARTIFACT,
    COMPARED,
    CROSSCODER_ARTIFACT,
    FEATURES_ARTIFACT,
    IE_COLUMN,
    MATCH_THRESHOLD,
    METRIC,
    MODEL_PREFIX,
    PARTNER_COLUMNS,
    PARTNERS_ARTIFACT,
    ROBUSTNESS_FOLDER,
    RULES,
    STABILITY_ARTIFACT,
    STATISTICAL_END_TOLERANCE,
    STEPS_CURVE,
    TOP_FEATURES,
    VERDICT_TAG,
    VERDICTS_ARTIFACT,
    AlongTraining,
    natural_order,
)
from study.tracking import tracking_environment


def finished_trials(client: MlflowClient, parent_run_id: str) -> Trials:
    """The sweep's finished trials, and the swept values of those that did not finish (failed, killed, running)."""
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10_000
    )
    every_param = pd.DataFrame([run.data.params for run in children])
    swept = sorted(str(name) for name in every_param.columns if every_param[name].nunique(dropna=False) > 1)
    # In the axis's order (then the seed's): each verdict's evidence lists its trials' figures in this order.
    runs = sorted(
        (run for run in children if run.info.status == "FINISHED"),
        key=lambda run: natural_order(tuple(run.data.params.get(key) for key in [*axis_keys(swept), "seed"])),
    )
    unfinished = tuple(
        (value_label(axis_keys(swept), [run.data.params.get(key) for key in axis_keys(swept)]), run.info.status)
        for run in children
        if run.info.status != "FINISHED"
    )
    rows, steps = [], {}
    for run in runs:
        rows.append(
            {
                METRIC.run_id: run.info.run_id,
                **{f"params.{k}": v for k, v in run.data.params.items()},
                **run.data.metrics,
            }
        )
        steps[run.info.run_id] = [
            int(m.step) for m in sorted(client.get_metric_history(run.info.run_id, STEPS_CURVE), key=lambda m: m.step)
        ]
    frame = pd.DataFrame(rows)
    statistical_end = end_of_statistical_learning(client, parent_run_id)
    learns = learns_forward(client, parent_run_id)
    along = {run.info.run_id: along_training(client, run.info.run_id) for run in runs}
    return Trials(frame, swept, steps, statistical_end, learns, unfinished=unfinished, along_training=along)


def along_training(client: MlflowClient, run_id: str) -> pd.DataFrame:
    """A trial's order statistics at each checkpoint: one row per training step (empty where none was logged)."""
    columns: dict[str, dict[int, float]] = {}
    for name in AlongTraining._fields:
        for metric in client.get_metric_history(run_id, f"{ALONG_TRAINING_PREFIX}{name}"):
            columns.setdefault(name, {})[int(metric.step)] = metric.value
    frame = pd.DataFrame(columns).sort_index()
    return (
        frame.rename_axis("step").reset_index()
        if len(frame)
        else pd.DataFrame(columns=["step", *AlongTraining._fields])
    )


def end_of_statistical_learning(client: MlflowClient, parent_run_id: str) -> int | None:
    """The first snapshot step where the model's unigram KL comes within STATISTICAL_END_TOLERANCE of its
    range of its floor: statistical learning is over there. None without one model curve."""
    history = sorted(client.get_metric_history(parent_run_id, f"{MODEL_PREFIX}unigram_kl"), key=lambda m: m.step)
    if not history:
        return None
    values = [m.value for m in history]
    floor, top = min(values), max(values)
    return next(m.step for m in history if m.value <= floor + STATISTICAL_END_TOLERANCE * (top - floor))


def learns_forward(client: MlflowClient, parent_run_id: str) -> bool | None:
    """Whether the model's held-out loss is lower at its last snapshot than at its first: a training run, not
    checkpoints in reverse (a model un-learning). None without one model curve."""
    history = sorted(client.get_metric_history(parent_run_id, f"{MODEL_PREFIX}{METRIC.lm_loss}"), key=lambda m: m.step)
    if len({m.step for m in history}) != len(history) or len(history) < 2:
        return None
    return history[-1].value < history[0].value


def by_axis_value(trials: Trials) -> pd.DataFrame:
    """Each statistic per axis value: mean, standard deviation over the trials (seeds) sharing it, count."""
    keys = [f"params.{key}" for key in axis_keys(trials.swept)]
    rows = []
    groups = list(trials.frame.groupby(keys, dropna=False)) if keys else [((), trials.frame)]
    groups.sort(key=lambda item: natural_order(item[0]))
    for values, group in groups:
        values = values if isinstance(values, tuple) else (values,)
        for statistic in [name for name in COMPARED if name in trials.frame]:
            series = group[statistic].dropna()
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


class LiveDictionary(NamedTuple):
    decoder: torch.Tensor
    """[live features, S, d] decoder of the trial's crosscoder, dead features dropped."""
    top_features: torch.Tensor
    """Indices (into ``decoder``) of the top features by indirect effect at the last snapshot."""
    features: torch.Tensor
    """[live features] each row's feature id in the whole crosscoder."""


def live_dictionary(client: MlflowClient, run_id: str, folder: Path) -> LiveDictionary:
    model = CrossCoder.load(client.download_artifacts(run_id, CROSSCODER_ARTIFACT, str(folder)))
    features = pd.read_parquet(client.download_artifacts(run_id, FEATURES_ARTIFACT, str(folder)))
    alive = torch.tensor(features["alive"].to_numpy())
    last_effect = max(
        (column for column in features if column.startswith(IE_COLUMN)),
        key=lambda column: int(column[len(IE_COLUMN) :]),
    )
    live_effects = torch.tensor(features[last_effect].to_numpy())[alive]
    return LiveDictionary(
        model.decoder_weight.detach()[alive],
        live_effects.argsort(descending=True)[:TOP_FEATURES],
        alive.nonzero().squeeze(1),
    )


def pairs_differing_in(frame: pd.DataFrame, key: str) -> list[tuple[str, str]]:
    """(run_a, run_b) for trials whose params are equal except ``key``, whose values differ; ordered by ``key``'s numeric value."""
    column = f"params.{key}"
    if column not in frame:
        return []
    others = [c for c in frame.columns if c.startswith("params.") and c != column]
    pairs = []
    for _, group in frame.groupby(others, dropna=False) if others else [((), frame)]:
        ordered = group.assign(_order=pd.to_numeric(group[column], errors="coerce")).sort_values("_order")
        # Trials with the same value are replicates of one configuration, never a pair: their
        # identical dictionaries would say nothing about what ``key`` changes.
        pairs += [
            (a, b)
            for (a, value_a), (b, value_b) in itertools.combinations(zip(ordered[METRIC.run_id], ordered[column]), 2)
            if value_a != value_b
        ]
    return pairs


class PairFigures(NamedTuple):
    """Two trials' crosscoders compared."""

    shared_share: float
    mean_max_cosine: float
    pairs: int
    top_feature_jaccard: float
    partners: list[tuple[int, int, float]]
    """(feature of A, its partner in B, cosine): the one-to-one matching above MATCH_THRESHOLD."""


def pair_figures(tracking_uri: str, run_a: str, run_b: str, environment: dict[str, str]) -> PairFigures:
    """Two trials' crosscoders compared, each downloaded from MLflow here (with the ``environment`` of
    ``study.tracking.tracking_environment``, on another node), so that pairs can run anywhere in the cluster."""
    os.environ.update(environment)
    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        a, b = (live_dictionary(client, run_id, Path(folder) / run_id) for run_id in (run_a, run_b))
    result = stability(a.decoder, b.decoder, MATCH_THRESHOLD)
    jaccard = matched_jaccard(result.match, a.top_features, b.top_features, MATCH_THRESHOLD)
    match = result.match
    partners = list(zip(a.features[match.rows].tolist(), b.features[match.columns].tolist(), match.cosines.tolist()))
    return PairFigures(result.shared_share, result.mean_max_cosine, result.n_pairs, jaccard, partners)


# Two crosscoders of 64 MB together (float32; e.g. 3,600 features over 9 snapshots of d 128) match in
# about 0.2 s on one CPU core (bench/matching_scale.py), well under a Ray worker's start.
LOCAL_PAIR_BYTES = 64 * 1024**2


def crosscoder_bytes(client: MlflowClient, run_id: str) -> int:
    """Size of a trial's logged crosscoder file, read from the artifact listing (nothing downloaded)."""
    return sum(info.file_size or 0 for info in client.list_artifacts(run_id) if info.path == CROSSCODER_ARTIFACT)


class FeatureStability(NamedTuple):
    figures: pd.DataFrame
    """One row per pair of trials: kind, run_a, run_b, shared share, mean max cosine, pairs, top-feature Jaccard."""
    partners: pd.DataFrame
    """One row per matched feature pair: run_a, feature_a, run_b, feature_b, cosine (the feature browser's
    partners)."""


def feature_stability(trials: Trials) -> FeatureStability:
    """Stability between seeds (all pairs of trials differing only in seed) and, where the expansion
    ratio is swept, the share of the smaller dictionary's features with a partner in the larger;
    for each pair also the Jaccard index of their top features by indirect effect, after matching.
    Pairs run as Ray tasks in parallel where Ray is up (as in a sweep) and some pair's crosscoders
    together exceed LOCAL_PAIR_BYTES, else one after the other here: a Ray task starts a worker process
    (about 5 s of imports), far more than matching two small dictionaries costs."""
    columns = [
        "kind",
        "run_a",
        "run_b",
        METRIC.shared_share,
        METRIC.mean_max_cosine,
        "pairs",
        METRIC.top_feature_jaccard,
    ]
    pairs = [
        (kind, run_a, run_b)
        for kind, key in (("seed", "seed"), ("expansion_ratio", "expansion_ratio"))
        for run_a, run_b in pairs_differing_in(trials.frame, key)
    ]
    uri, environment = mlflow.get_tracking_uri(), tracking_environment()
    in_tasks = False
    if ray.is_initialized():
        client = MlflowClient(uri)
        sizes = {run_id: crosscoder_bytes(client, run_id) for _, *runs in pairs for run_id in runs}
        in_tasks = any(sizes[run_a] + sizes[run_b] > LOCAL_PAIR_BYTES for _, run_a, run_b in pairs)
    if in_tasks:
        task = ray.remote(num_cpus=1)(pair_figures)
        figures = ray.get([task.remote(uri, run_a, run_b, environment) for _, run_a, run_b in pairs])
    else:
        figures = [pair_figures(uri, run_a, run_b, environment) for _, run_a, run_b in pairs]
    partners = pd.DataFrame(
        [
            (run_a, feature_a, run_b, feature_b, cosine)
            for (_, run_a, run_b), figure in zip(pairs, figures)
            for feature_a, feature_b, cosine in figure.partners
        ],
        columns=PARTNER_COLUMNS,
    )
    return FeatureStability(
        pd.DataFrame([(*pair, *figure[:-1]) for pair, figure in zip(pairs, figures)], columns=columns), partners
    )


def analyse_sweep(parent_run_id: str) -> list[Verdict]:
    """Compute the sweep's robustness from its finished trials and log it to the parent run:
    ``robustness/by_axis_value.csv``, ``robustness/stability.csv``, ``robustness/verdicts.json``,
    a ``verdict.<claim>`` tag per claim, and the mean stability as metrics."""
    client = MlflowClient()
    trials = finished_trials(client, parent_run_id)
    if trials.frame.empty:
        verdicts = [Verdict(claim, "inconclusive", rule, "no finished trial") for claim, rule in RULES.items()]
        summary, stabilities, partners = (
            pd.DataFrame(),
            pd.DataFrame(columns=["kind", METRIC.shared_share, METRIC.mean_max_cosine, METRIC.top_feature_jaccard]),
            pd.DataFrame(columns=PARTNER_COLUMNS),
        )
    else:
        summary = by_axis_value(trials)
        stabilities, partners = feature_stability(trials)
        verdicts = judge_sweep(trials, stabilities)
    with tempfile.TemporaryDirectory() as folder:
        summary.to_csv(Path(folder) / BY_AXIS_VALUE_ARTIFACT, index=False)
        stabilities.to_csv(Path(folder) / STABILITY_ARTIFACT, index=False)
        payload = {"axis_keys": axis_keys(trials.swept), "verdicts": [verdict._asdict() for verdict in verdicts]}
        (Path(folder) / VERDICTS_ARTIFACT).write_text(json.dumps(payload, indent=1))
        partners.to_parquet(Path(folder) / PARTNERS_ARTIFACT, index=False)
        for name in (BY_AXIS_VALUE_ARTIFACT, STABILITY_ARTIFACT, VERDICTS_ARTIFACT, PARTNERS_ARTIFACT):
            client.log_artifact(parent_run_id, str(Path(folder) / name), ROBUSTNESS_FOLDER)
    for verdict in verdicts:
        client.set_tag(parent_run_id, f"{VERDICT_TAG}{verdict.claim}", verdict.verdict)
    for kind, group in stabilities.groupby("kind"):
        client.log_metric(parent_run_id, f"stability_{kind}_shared_share", float(group[METRIC.shared_share].mean()))
        client.log_metric(
            parent_run_id, f"stability_{kind}_mean_max_cosine", float(group[METRIC.mean_max_cosine].mean())
        )
    return verdicts
