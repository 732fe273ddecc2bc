"""The report's plots, each a function of a SweepRecord's tables returning a matplotlib figure (or None
when the sweep holds nothing to plot).

Just over 300 lines: one function per figure of the report.
"""

from __future__ import annotations

import math

import matplotlib

from study.record import METRIC

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from study.record import COMPARED, CUT_OFFS, LABELS, natural_order  # noqa: E402


def step_axis(axis) -> None:
    """Training steps start at 0 and are log-spaced: symlog shows both."""
    axis.set_xscale("symlog", linthresh=1)
    axis.set_xlim(left=0)
    axis.set_xlabel("training step")


def model_curve_figure(curves: pd.DataFrame) -> Figure | None:
    if curves.empty:
        return None
    figure, (kl_axis, loss_axis, agreement_axis) = plt.subplots(1, 3, figsize=(13, 3.6))
    for trajectory, group in curves.groupby(METRIC.trajectory):
        kl_axis.plot(
            group[METRIC.step],
            group[METRIC.unigram_kl],
            "o-",
            label=f"unigram KL ({trajectory})" if curves[METRIC.trajectory].nunique() > 1 else "unigram KL",
        )
        kl_axis.plot(group[METRIC.step], group[METRIC.bigram_kl], "s-", label="bigram KL")
        loss_axis.plot(group[METRIC.step], group[METRIC.lm_loss], "o-", label="LM loss")
        agreement_axis.plot(group[METRIC.step], group[METRIC.agreement_accuracy], "o-", label="accuracy")
        twin = agreement_axis.twinx()
        twin.plot(
            group[METRIC.step],
            group[METRIC.agreement_logit_difference],
            "s--",
            color="tab:red",
            label="logit difference",
        )
        twin.set_ylabel("logit difference", color="tab:red")
    first = curves.iloc[0]
    loss_axis.axhline(first[METRIC.unigram_entropy], color="gray", linestyle=":", label="unigram entropy")
    loss_axis.axhline(first[METRIC.bigram_entropy], color="black", linestyle=":", label="bigram entropy")
    kl_axis.set_ylabel("KL(n-gram ‖ model), nats")
    loss_axis.set_ylabel("nats per token")
    agreement_axis.set_ylabel("agreement accuracy")
    agreement_axis.set_ylim(0, 1.05)
    for axis, title in (
        (kl_axis, "n-gram KL divergence"),
        (loss_axis, "language-model loss"),
        (agreement_axis, "subject-verb agreement"),
    ):
        step_axis(axis)
        axis.set_title(title)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def dimensionality_figure(curve: pd.DataFrame, trials: pd.DataFrame, labels: dict[str, str]) -> Figure | None:
    if curve.empty:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4))
    turning = (
        trials.set_index(METRIC.run_id)[METRIC.transition_step]
        if METRIC.transition_step in trials
        else pd.Series(dtype=float)
    )
    for run_id, group in curve.groupby(METRIC.run_id):
        (line,) = axis.plot(group[METRIC.step], group[METRIC.value], "o-", label=labels.get(run_id, run_id[:8]))
        step = turning.get(run_id, math.nan)
        if not math.isnan(step):
            axis.plot(
                [step],
                group.loc[group[METRIC.step] == step, METRIC.value],
                marker="v",
                markersize=13,
                color=line.get_color(),
                markeredgecolor="black",
            )
    step_axis(axis)
    axis.set_ylabel("total feature dimensionality Σ D_i")
    axis.set_title("feature dimensionality (▼ turning point)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def decoder_norm_heatmap(axis, norms: pd.DataFrame):
    """One crosscoder's decoder norms ([features, snapshots], columns step<N>) as an image on ``axis``,
    features by peak snapshot, strongest first."""
    values = norms.to_numpy()
    order = np.lexsort((-values.max(1), values.argmax(1)))
    image = axis.imshow(values[order], aspect="auto", interpolation="nearest", cmap="viridis")
    axis.set_xticks(
        range(values.shape[1]), [column.removeprefix(METRIC.step) for column in norms.columns], rotation=70, fontsize=6
    )
    axis.set_xlabel("snapshot step")
    return image


def decoder_norm_heatmaps(
    decoder_norms: dict[str, pd.DataFrame], labels: dict[str, str], limit: int = 6
) -> Figure | None:
    if not decoder_norms:
        return None
    chosen = list(decoder_norms.items())[:limit]
    figure, axes = plt.subplots(1, len(chosen), figsize=(3.4 * len(chosen), 4), squeeze=False)
    for axis, (run_id, norms) in zip(axes[0], chosen):
        image = decoder_norm_heatmap(axis, norms)
        axis.set_title(labels.get(run_id, run_id[:8]), fontsize=9)
        figure.colorbar(image, ax=axis, fraction=0.05)
    axes[0][0].set_ylabel("feature (by peak snapshot)")
    figure.tight_layout()
    return figure


def trial_decoder_norm_figure(norms: pd.DataFrame) -> Figure:
    """One trial's decoder-norm heatmap, logged with its run."""
    figure, axis = plt.subplots(figsize=(6, 4))
    image = decoder_norm_heatmap(axis, norms)
    axis.set_ylabel("feature (by peak snapshot)")
    figure.colorbar(image, label="decoder norm")
    figure.tight_layout()
    return figure


def emergence_figure(features: dict[str, pd.DataFrame], labels: dict[str, str]) -> Figure | None:
    tables = {run_id: table[table["alive"]] for run_id, table in features.items()}
    if not tables:
        return None
    steps = sorted({step for table in tables.values() for step in table["emergence_step"].dropna().unique()})
    if not steps:
        return None
    figure, axis = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(tables)
    for index, (run_id, table) in enumerate(tables.items()):
        counts = table["emergence_step"].value_counts(normalize=True).reindex(steps, fill_value=0)
        axis.bar(
            np.arange(len(steps)) + index * width - 0.4 + width / 2,
            counts.to_numpy(),
            width,
            label=labels.get(run_id, run_id[:8]),
        )
    axis.set_xticks(range(len(steps)), [str(int(step)) for step in steps], rotation=60, fontsize=7)
    axis.set_xlabel("emergence step (decoder norm first ≥ half its maximum)")
    axis.set_ylabel("share of live features")
    axis.set_title("emergence histogram (first bar: initialization-dependent)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def per_snapshot_figure(curves: dict[str, pd.DataFrame], labels: dict[str, str]) -> Figure | None:
    shown = [
        (METRIC.explained_variance_by_snapshot, "explained variance"),
        (METRIC.delta_ce_by_snapshot, "ΔCE (nats)"),
        (METRIC.probe_error_by_snapshot, "probe balanced error (0.5 = chance)"),
        (METRIC.token_entropy_by_peak_snapshot, "token entropy of features peaking here"),
        (METRIC.alignment_overlap_by_snapshot, "top-10 overlap with the previous snapshot"),
    ]
    shown = [(name, title) for name, title in shown if not curves.get(name, pd.DataFrame()).empty]
    if not shown:
        return None
    figure, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.4), squeeze=False)
    for axis, (name, title) in zip(axes[0], shown):
        for run_id, group in curves[name].groupby(METRIC.run_id):
            axis.plot(group[METRIC.step], group[METRIC.value], "o-", markersize=3, label=labels.get(run_id, run_id[:8]))
        step_axis(axis)
        axis.set_title(title, fontsize=9)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    return figure


def statistics_figure(by_axis_value: pd.DataFrame, axis_keys: list[str]) -> Figure | None:
    if by_axis_value.empty or not axis_keys:
        return None
    key_columns = [f"params.{key}" for key in axis_keys]
    statistics = [s for s in COMPARED if s in set(by_axis_value["statistic"])]
    columns = 4
    rows = math.ceil(len(statistics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 2.8 * rows), squeeze=False)
    for axis, statistic in zip(axes.flat, statistics):
        table = by_axis_value[by_axis_value["statistic"] == statistic]
        names = table[key_columns].astype(str).agg(", ".join, axis=1)
        numeric = (
            pd.to_numeric(table[key_columns[0]], errors="coerce") if len(key_columns) == 1 else pd.Series([math.nan])
        )
        positions = numeric.to_numpy() if numeric.notna().all() else np.arange(len(table))
        axis.errorbar(positions, table["mean"], yerr=table["std"].fillna(0), fmt="o-", capsize=4)
        if not numeric.notna().all():
            axis.set_xticks(positions, names, rotation=30, fontsize=7)
        elif len(positions) > 1 and positions.min() > 0 and positions.max() / positions.min() >= 4:
            axis.set_xscale("log", base=2)
        axis.set_title(LABELS[statistic], fontsize=9)
        axis.set_xlabel(", ".join(axis_keys), fontsize=8)
    for axis in list(axes.flat)[len(statistics) :]:
        axis.axis("off")
    figure.suptitle("each statistic against the axis (error bars: standard deviation over seeds)", fontsize=10)
    figure.tight_layout()
    return figure


def stability_figure(stability: pd.DataFrame, labels: dict[str, str]) -> Figure | None:
    if stability.empty:
        return None
    kinds = list(dict.fromkeys(stability["kind"]))
    figure, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 4), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        pairs = stability[stability["kind"] == kind]
        runs = list(dict.fromkeys(list(pairs["run_a"]) + list(pairs["run_b"])))
        matrix = np.full((len(runs), len(runs)), math.nan)
        for row in pairs.itertuples():
            a, b = runs.index(row.run_a), runs.index(row.run_b)
            matrix[a, b] = row.shared_share  # share of the row trial's (smaller) dictionary found in the column's
            if kind == "seed":
                matrix[b, a] = row.shared_share
        image = axis.imshow(matrix, vmin=0, vmax=1, cmap="magma")
        names = [labels.get(run, run[:8]) for run in runs]
        axis.set_xticks(range(len(runs)), names, rotation=45, ha="right", fontsize=7)
        axis.set_yticks(range(len(runs)), names, fontsize=7)
        for (a, b), value in np.ndenumerate(matrix):
            if not math.isnan(value):
                axis.text(
                    b,
                    a,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    color="white" if value < 0.6 else "black",
                    fontsize=8,
                )
        axis.set_title(
            "seed stability" if kind == "seed" else "small dictionary's features found in the larger", fontsize=9
        )
        figure.colorbar(image, ax=axis, fraction=0.05, label="share matched with cosine > 0.7")
    figure.tight_layout()
    return figure


def ablation_figure(
    curves: dict[str, pd.DataFrame], ablate_curve: pd.DataFrame, keep_curve: pd.DataFrame, labels: dict[str, str]
) -> Figure | None:
    """Per trial, the task metric (relative to clean) against k at the last snapshot where the task
    is learned, with the top k features ablated and with only them kept; and the verdict's two
    points over the snapshots where the task is learned."""
    if not curves or all(not table["learned"].any() for table in curves.values()):
        return None
    figure, (ablated_axis, kept_axis, snapshot_axis) = plt.subplots(1, 3, figsize=(15, 3.8))
    colours = {run_id: f"C{index}" for index, run_id in enumerate(curves)}
    for run_id, table in curves.items():
        learned = table[table["learned"]]
        if learned.empty:
            continue
        step = learned[METRIC.step].max()
        at_step = learned[learned[METRIC.step] == step]
        label = f"{labels.get(run_id, run_id[:8])} (step {int(step)})"
        ablated_axis.plot(
            at_step["k"], at_step["ablated_relative"], "o-", color=colours[run_id], markersize=3, label=label
        )
        kept_axis.plot(at_step["k"], at_step["kept_relative"], "o-", color=colours[run_id], markersize=3, label=label)
    for axis, title in ((ablated_axis, "top k features ablated"), (kept_axis, "only the top k kept (errors kept)")):
        axis.set_xscale("log")
        axis.axhline(1.0, color="gray", linestyle=":")
        axis.axhline(0.0, color="black", linewidth=0.6)
        axis.set_xlabel("k (features ranked by indirect effect)")
        axis.set_ylabel("task metric / clean metric")
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=7)
    ablated_axis.axhline(CUT_OFFS.ablate_left_below, color="tab:red", linestyle="--", linewidth=0.8)
    kept_axis.axhline(CUT_OFFS.keep_recovers_above, color="tab:red", linestyle="--", linewidth=0.8)
    for curve, style, what in (
        (ablate_curve, "v--", "top features ablated"),
        (keep_curve, "^-", "top features kept"),
    ):
        for run_id, group in curve.dropna(subset=[METRIC.value]).groupby(METRIC.run_id):
            snapshot_axis.plot(
                group[METRIC.step],
                group[METRIC.value],
                style,
                color=colours.get(run_id),
                markersize=5,
                label=f"{labels.get(run_id, run_id[:8])}: {what}",
            )
    snapshot_axis.set_xscale("log")
    snapshot_axis.set_xlabel("training step")
    snapshot_axis.axhline(CUT_OFFS.ablate_left_below, color="tab:red", linestyle="--", linewidth=0.8)
    snapshot_axis.axhline(CUT_OFFS.keep_recovers_above, color="tab:red", linestyle="--", linewidth=0.8)
    snapshot_axis.set_ylabel("task metric / clean metric")
    snapshot_axis.set_title("per snapshot where the task is learned", fontsize=9)
    snapshot_axis.legend(fontsize=6)
    figure.tight_layout()
    return figure


def frontier_figure(trials: pd.DataFrame, axis_keys: list[str]) -> Figure | None:
    """The sparsity/fidelity frontier: each trial's explained variance and loss recovered against its held-out L0,
    one line per value of the swept keys but target_l0 and seed (a target_l0 sweep traces each method's frontier),
    with the untrained control's points: at what L0 the dictionaries are compared."""
    if trials.empty or METRIC.l0 not in trials:
        return None
    keys = [f"params.{key}" for key in axis_keys if key not in ("target_l0", "seed") and f"params.{key}" in trials]
    groups = sorted(trials.groupby(keys), key=lambda item: natural_order(item[0])) if keys else [((), trials)]
    panels = [
        (METRIC.explained_variance, "explained variance (held out)"),
        (METRIC.min_loss_recovered_by_snapshot, "loss recovered, worst snapshot"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(10, 3.8), squeeze=False, sharex=True)
    for axis, (statistic, label) in zip(axes[0], panels):
        for name, group in groups:
            if statistic not in group:
                continue
            ordered = group.sort_values(METRIC.l0)
            text = ", ".join(f"{key.removeprefix('params.')}={value}" for key, value in zip(keys, np.atleast_1d(name)))
            axis.plot(ordered[METRIC.l0], ordered[statistic], "o-", label=text or "trials")
        if statistic == METRIC.explained_variance and METRIC.control_l0 in trials:
            axis.plot(
                trials[METRIC.control_l0], trials[METRIC.control_explained_variance], "kx", label="untrained control"
            )
        axis.set_xlabel("L0 (active features per token, held out)")
        axis.set_ylabel(label)
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle("sparsity against fidelity: each point a trial", fontsize=10)
    figure.tight_layout()
    return figure
