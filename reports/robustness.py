"""The robustness report of one sweep, from what MLflow holds:

    python -m reports.robustness (--experiment NAME | --run PARENT_RUN_ID) --out DIR [--log]

writes DIR/report.html (self-contained: plots embedded), DIR/summary.md (verdict table, per-axis
statistics) and the plots as PNG files; DIR may be a URI (s3://bucket/reports/x, file:///abs).
``--log`` also stores them in the parent run's artifacts
under ``report/``. Reads the store at $MLFLOW_TRACKING_URI (default: ./mlflow.db).

Over 300 lines on purpose: the report's HTML and Markdown are written from the same tables in one place.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from mlflow.tracking import MlflowClient

from crosscoder.methods import METHODS
from study.record import CLAIM, METRIC

# MLflow draws a progress bar per downloaded artifact; a report downloads dozens.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from reports import figures
from reports.features import BROWSER_FOLDER, browser_name, write_browsers
from reports.sweep_record import ReportInputError, SweepRecord, find_parent_run, read_sweep, trial_labels
from study.errors import run_cli
from study.record import (
    COMPARED,
    FEATURE_BROWSER,
    IE_COLUMN,
    LABELS,
    RELIE_COLUMN,
    REPORT_FOLDER,
    SHARED_RULES,
    UNCONVERGED_LOSS_DROP,
)
from study.storage import Location
from study.tracking import check_store, tracking_uri

VERDICT_COLOURS = {
    "holds": "#1a7f37",
    "fails": "#cf222e",
    "mixed": "#8250df",
    "inconclusive": "#9a6700",
    "not measured": "#57606a",
}
TOP_FEATURES_SHOWN = 5
"""Top features by indirect effect listed per trial, with their RelIE."""


def build_figures(record: SweepRecord) -> dict[str, tuple[str, plt.Figure]]:
    """name -> (caption, figure), in the report's order; plots with nothing to show are left out."""
    labels = trial_labels(record)
    candidates = {
        "verdict_statistics": (
            "Each claim statistic against the sweep's axis.",
            figures.statistics_figure(record.by_axis_value, record.axis_keys),
        ),
        "frontier": (
            "Explained variance and loss recovered against L0, each trial a point: the dictionaries compared at the "
            "sparsity they reached (the untrained control's point for scale).",
            figures.frontier_figure(record.trials, record.axis_keys),
        ),
        "model_curves": (
            "Model-level curves of the trajectory: statistical learning shows as falling n-gram KL.",
            figures.model_curve_figure(record.model_curves),
        ),
        "feature_dimensionality": (
            "Total feature dimensionality per snapshot, its turning point marked.",
            figures.dimensionality_figure(
                record.curves[METRIC.feature_dimensionality_by_snapshot], record.trials, labels
            ),
        ),
        "decoder_norms": (
            "Decoder norms of every feature over snapshots, features sorted by peak snapshot.",
            figures.decoder_norm_heatmaps(record.decoder_norms, labels),
        ),
        CLAIM.emergence: (
            "When features emerge (decoder norm first at half its maximum).",
            figures.emergence_figure(record.features, labels),
        ),
        "per_snapshot": (
            "Quality, probe error, token specificity and alignment per snapshot.",
            figures.per_snapshot_figure(record.curves, labels),
        ),
        CLAIM.stability: (
            "Feature stability: share of features matched one-to-one with cosine above 0.7.",
            figures.stability_figure(record.stability, labels),
        ),
        "ablation_curves": (
            "Agreement logit difference relative to clean, with the top-k features by indirect effect ablated or kept "
            "alone (dashed: the causal claim's thresholds).",
            figures.ablation_figure(
                record.ablation_curves,
                record.curves[METRIC.ablate_top_relative_by_snapshot],
                record.curves[METRIC.keep_top_relative_by_snapshot],
                labels,
            ),
        ),
    }
    return {name: (caption, figure) for name, (caption, figure) in candidates.items() if figure is not None}


def png_bytes(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def format_number(value) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def axis_table(record: SweepRecord) -> pd.DataFrame:
    """Statistics as rows, axis values as columns, cells "mean ± std (n)"."""
    if record.by_axis_value.empty:
        return pd.DataFrame()
    table = record.by_axis_value.copy()
    key_columns = [f"params.{key}" for key in record.axis_keys]
    table[METRIC.value] = table[key_columns].astype(str).agg(", ".join, axis=1) if key_columns else "all"
    table["cell"] = [
        "–" if n == 0 else format_number(m) if n == 1 else f"{format_number(m)} ± {format_number(s)} ({n})"
        for m, s, n in zip(table["mean"], table["std"], table["n"])
    ]
    pivot = table.pivot(index="statistic", columns=METRIC.value, values="cell")[
        list(dict.fromkeys(table[METRIC.value]))
    ]
    order = [s for s in COMPARED if s in pivot.index]
    pivot = pivot.loc[order]
    pivot.index = [LABELS[s] for s in order]
    pivot.columns.name = ", ".join(record.axis_keys)
    pivot.index.name = "statistic"
    return pivot


def trial_flags(row: dict) -> str:
    """What should make a reader distrust a trial's figures, in words."""
    flags = []
    drop = row.get(METRIC.loss_drop_last_fifth, float("nan"))
    if drop == drop and drop > UNCONVERGED_LOSS_DROP:
        flags.append(f"not converged: loss fell {drop:.1%} over the last fifth")
    if (
        row.get("params.sparsity") in METHODS
        and METHODS[row["params.sparsity"]].uses_k
        and abs(row.get(METRIC.l0, 0) - float(row.get("params.k", -9))) < 0.5
    ):
        flags.append("L0 pinned at k: choose k from the data's own L0 (e.g. an l1 trial's)")
    return "; ".join(flags)


def trials_table(record: SweepRecord) -> pd.DataFrame:
    if record.trials.empty:
        return pd.DataFrame()
    labels = trial_labels(record)
    table = pd.DataFrame(
        {
            "trial": [labels[r] for r in record.trials[METRIC.run_id]],
            "status": record.trials["status"],
            "flags": [trial_flags(row) for row in record.trials.to_dict("records")],
        }
    )
    for column in COMPARED:
        if column in record.trials:
            table[column] = record.trials[column].map(format_number)
    return table


def relie_table(record: SweepRecord) -> pd.DataFrame:
    """Per trial, its top features by indirect effect at the last snapshot, with their effects and RelIE."""
    labels = trial_labels(record)
    rows = []
    for run_id, features in record.features.items():
        effect_columns = sorted(
            (c for c in features if c.startswith(IE_COLUMN)), key=lambda c: int(c[len(IE_COLUMN) :])
        )
        if not effect_columns:
            continue
        relie_columns = [c for c in features if c.startswith(RELIE_COLUMN)]
        for row in features.nlargest(TOP_FEATURES_SHOWN, effect_columns[-1]).itertuples():
            values = row._asdict()
            rows.append(
                {
                    "trial": labels.get(run_id, run_id[:8]),
                    "feature": values["feature"],
                    f"IE at step {effect_columns[-1][len(IE_COLUMN) :]}": format_number(
                        float(values[effect_columns[-1]])
                    ),
                    **{f"RelIE step {c[len(RELIE_COLUMN) :]}": format_number(float(values[c])) for c in relie_columns},
                }
            )
    return pd.DataFrame(rows)


def markdown_table(frame: pd.DataFrame, index: bool = False) -> str:
    if frame.empty:
        return "_none_\n"
    frame = frame.reset_index() if index else frame
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(str(v).replace("|", "/") for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def heading(record: SweepRecord) -> tuple[str, str]:
    parent = record.parent
    finished = int((record.trials["status"] == "FINISHED").sum()) if len(record.trials) else 0
    failed = len(record.trials) - finished
    title = f"Robustness report: {parent.info.run_name}"
    tags = parent.data.tags
    facts = (
        f"axis **{parent.data.params.get('axis', '?')}**, {finished} finished trial(s), {failed} not finished "
        f"(stopped early by the scheduler: {int(record.trials['stopped_early'].sum()) if len(record.trials) else 0}); "
        f"search {tags.get('search', 'grid')}, scheduler {tags.get('scheduler', 'fifo')}, "
        f"on {tags.get('search_metric', 'explained_variance (max)')}; "
        f"parent run `{parent.info.run_id}`, git commit `{tags.get('git_commit', 'unknown')[:12]}`"
    )
    return title, facts


def write_markdown(record: SweepRecord, figure_names: dict[str, str], out: Path) -> Path:
    title, facts = heading(record)
    lines = [f"# {title}", "", facts, "", "## Verdicts", "", SHARED_RULES, ""]
    verdicts = pd.DataFrame(
        [{**verdict, "by_value": per_value(verdict)} for verdict in record.verdicts],
        columns=["claim", "verdict", "by_value", "evidence", "rule"],
    )
    lines.append(markdown_table(verdicts))
    lines += [
        "## Statistics per axis value",
        "",
        "mean ± standard deviation over seeds (number of trials) where an axis value has several trials",
        "",
        markdown_table(axis_table(record), index=True),
    ]
    lines += ["## Trials", "", markdown_table(trials_table(record))]
    lines += ["## Top features by indirect effect, with RelIE", "", markdown_table(relie_table(record))]
    lines += ["## Plots", ""] + [f"![{caption}]({name}.png)" for name, caption in figure_names.items()]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def per_value(verdict: dict) -> str:
    """A verdict's outcome at each value of the swept key, e.g. ``expansion_ratio=4 holds, expansion_ratio=8 fails``."""
    return ", ".join(f"{label} {outcome}" for label, outcome in verdict.get("by_value", [])) or "whole axis"


def html_table(frame: pd.DataFrame, index: bool = False, links: dict[str, list[str]] | None = None) -> str:
    """``frame`` as HTML, each cell escaped; ``links`` maps a column to one href per row ("" for none), which
    turns that column's cells into links."""
    if frame.empty:
        return "<p><em>none</em></p>"
    escaped = frame.map(lambda value: html.escape(str(value)))
    for column, hrefs in (links or {}).items():
        escaped[column] = [
            f"<a href='{html.escape(href)}'>{cell}</a>" if href else cell for cell, href in zip(escaped[column], hrefs)
        ]
    return escaped.to_html(index=index, escape=False, border=0, classes="table")


def browser_links(record: SweepRecord, files: dict[str, str]) -> tuple[dict, dict]:
    """Links from the trials table (a trial to its browser) and the RelIE table (a feature to its page)."""
    trials = {"trial": [files.get(run_id, "") for run_id in record.trials.get(METRIC.run_id, [])]}
    trials = {
        column: [f"{BROWSER_FOLDER}/{name}" if name else "" for name in hrefs] for column, hrefs in trials.items()
    }
    labels = trial_labels(record)
    by_label = {labels.get(run_id, run_id[:8]): run_id for run_id in files}
    shown = {run_id: {page["feature"] for page in record.feature_pages[run_id]["features"]} for run_id in files}
    relie = relie_table(record)
    features = {
        "feature": [
            f"{BROWSER_FOLDER}/{files[by_label[trial]]}#feature-{feature}"
            if trial in by_label and int(feature) in shown[by_label[trial]]
            else ""
            for trial, feature in zip(relie.get("trial", []), relie.get("feature", []))
        ]
    }
    return trials, features


def write_html(record: SweepRecord, images: dict[str, tuple[str, bytes]], files: dict[str, str], out: Path) -> Path:
    title, facts = heading(record)
    facts_html = html.escape(facts).replace("**", "").replace("`", "")
    verdict_rows = "".join(
        f"<tr><td><code>{html.escape(v['claim'])}</code></td>"
        f"<td><span class='verdict' style='background:{VERDICT_COLOURS.get(v['verdict'], '#57606a')}'>{html.escape(v['verdict'])}</span></td>"
        f"<td>{html.escape(per_value(v))}</td>"
        f"<td>{html.escape(v['evidence'])}</td><td class='rule'>{html.escape(v['rule'])}</td></tr>"
        for v in record.verdicts
    )
    plots = "".join(
        f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, (caption, data) in images.items()
    )
    failed = record.trials[record.trials["status"] != "FINISHED"] if len(record.trials) else record.trials
    failures = "".join(
        f"<li><code>{html.escape(r.run_name)}</code> {html.escape(r.status)}: {html.escape(r.error)}</li>"
        for r in failed.itertuples()
    )
    trial_links, feature_links = browser_links(record, files)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #1f2328; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
td, th {{ border-bottom: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }}
.verdict {{ color: white; border-radius: 4px; padding: 2px 8px; font-weight: 600; white-space: nowrap; }}
.rule {{ color: #57606a; font-size: 0.85em; max-width: 420px; }}
figure {{ margin: 1em 0 2em; }} figure img {{ max-width: 100%; }} figcaption {{ color: #57606a; }}
</style></head><body>
<h1>{html.escape(title)}</h1><p>{facts_html}</p>
<h2>Verdicts</h2><p>{html.escape(SHARED_RULES)}</p>
<table><tr><th>claim</th><th>verdict</th><th>per value</th><th>evidence</th><th>rule</th></tr>
{verdict_rows}</table>
{"<h2>Trials that did not finish</h2><ul>" + failures + "</ul>" if failures else ""}
<h2>Statistics per axis value</h2>
<p>mean ± standard deviation over seeds (number of trials) where an axis value has several trials</p>
{html_table(axis_table(record), index=True)}
<h2>Trials</h2><p>a trial's name opens its feature browser</p>{html_table(trials_table(record), links=trial_links)}
<h2>Top features by indirect effect, with RelIE</h2>
<p>RelIE at a snapshot: the share of the feature's absolute indirect effect (on the agreement logit difference)
that belongs to that snapshot, among the snapshots compared. A feature id opens its page.</p>
{html_table(relie_table(record), links=feature_links)}
<h2>Plots</h2>{plots}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path


def render_report(record: SweepRecord, out: Path) -> tuple[Path, Path]:
    """report.html, summary.md, one PNG per plot and a feature browser per trial (features/) in the local folder
    ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = write_browsers(record, out / BROWSER_FOLDER, trial_labels(record))
    images = {}
    for name, (caption, figure) in build_figures(record).items():
        data = png_bytes(figure)
        (out / f"{name}.png").write_bytes(data)
        images[name] = (caption, data)
    markdown = write_markdown(record, {name: caption for name, (caption, _) in images.items()}, out)
    return write_html(record, images, files, out), markdown


def log_browsers(client: MlflowClient, record: SweepRecord, folder: Path) -> None:
    """Each trial's browser also in its own run, as features.html (MLflow's UI shows it there)."""
    for run_id, run_name in zip(record.trials[METRIC.run_id], record.trials["run_name"]):
        page = folder / browser_name(run_name)
        if run_id in record.feature_pages and page.is_file():
            with tempfile.TemporaryDirectory() as scratch:
                shutil.copyfile(page, Path(scratch) / FEATURE_BROWSER)
                client.log_artifact(run_id, str(Path(scratch) / FEATURE_BROWSER))


def write_report(out: str, run_id: str | None = None, experiment: str | None = None, log: bool = False) -> SweepRecord:
    """Read a sweep from the store at ``tracking_uri()`` (its parent run ``run_id``, or ``experiment``'s
    newest sweep), render its report into ``out`` (a folder or a URI) and, with ``log``, store it in
    the parent run's artifacts too. Returns what it read."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise ReportInputError(
            f"no MLflow store at {uri[len('sqlite:///') :]}; run this where the sweep ran or set MLFLOW_TRACKING_URI"
        )
    check_store(uri)  # a tracking server that refuses this environment's credentials: one line, exit 2
    client = MlflowClient(uri)
    record = read_sweep(client, find_parent_run(client, experiment, run_id))
    location = Location.of(out)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(location.path) if location.is_local else Path(scratch)
        render_report(record, folder)
        location.upload_folder(folder)
        if log:
            client.log_artifacts(record.parent.info.run_id, str(folder), REPORT_FOLDER)
            log_browsers(client, record, folder / BROWSER_FOLDER)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.robustness", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="MLflow experiment: its newest sweep")
    which.add_argument("--run", help="a sweep's parent run id")
    parser.add_argument("--out", required=True, help="folder or URI for report.html, summary.md and the plots")
    parser.add_argument("--log", action="store_true", help="also log the report to the parent run (artifacts report/)")
    args = parser.parse_args(argv)
    record = write_report(args.out, run_id=args.run, experiment=args.experiment, log=args.log)
    out = Location.of(args.out)
    print(f"wrote {out}/report.html and {out}/summary.md")
    for verdict in record.verdicts:
        print(f"  {verdict['claim']:<18} {verdict['verdict']}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
