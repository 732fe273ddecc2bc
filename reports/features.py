"""A trial's feature browser, from what MLflow holds:

    python -m reports.features --run TRIAL_RUN_ID --out DIR

writes DIR/<trial>.html: one self-contained page (data and script inline, nothing fetched) over the trial's
chosen features (``study.analysis.feature_pages``): each feature's decoder-norm profile with its emergence and
peak, its direction over time, its top held-out contexts (per snapshot where the method gates each snapshot), its
tokens, its logit effects, its indirect effect and RelIE, its partners in the sweep's other trials and, on a planted
trajectory, the planted feature it recovers. The report (``reports.robustness``) writes one per trial beside
report.html and links them from its tables.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from reports.sweep_record import ReportInputError, SweepRecord, read_sweep, trial_labels
from study.errors import run_cli
from study.record import FEATURE_BROWSER, MATCH_THRESHOLD
from study.tracking import check_store, tracking_uri

PAGE = (Path(__file__).parent / "feature_browser.html").read_text()
"""The page's HTML, style and script; %TITLE%, %BACK% and %DATA% are filled in per trial."""
BROWSER_FOLDER = "features"
"""The report's folder of feature browsers, one file per trial."""


def browser_name(run_name: str) -> str:
    """A trial's browser file name, from its run name (safe on every file system and in a URL)."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", run_name) + ".html"


def trial_partners(partners: pd.DataFrame, run_id: str, names: dict[str, str]) -> dict[str, list[dict]]:
    """feature id -> its partners in the other trials (both directions of the matching): trial, file, feature,
    cosine; ``names`` maps run ids to trial labels."""
    found: dict[str, list[dict]] = {}
    if partners.empty:
        return found
    for own, other in (("a", "b"), ("b", "a")):
        rows = partners[partners[f"run_{own}"] == run_id]
        for row in rows.to_dict("records"):
            other_run = row[f"run_{other}"]
            found.setdefault(str(int(row[f"feature_{own}"])), []).append(
                {
                    "trial": names.get(other_run, other_run[:8]),
                    "run_id": other_run,
                    "feature": int(row[f"feature_{other}"]),
                    "cosine": round(float(row["cosine"]), 3),
                }
            )
    return found


def browser_html(title: str, pages: dict, partners: dict[str, list[dict]], files: dict[str, str], back: str) -> str:
    """The page: ``pages`` as logged by the trial, ``partners`` by feature id, ``files`` the browser file of each
    other trial (for partner links), ``back`` a link to the report ("" for none)."""
    data = {"title": title, "threshold": MATCH_THRESHOLD, "partners": partners, "files": files, **pages}
    payload = json.dumps(data, allow_nan=False).replace("</", "<\\/")
    back_link = f"<a href='{html.escape(back)}'>back to the report</a>" if back else ""
    return PAGE.replace("%TITLE%", html.escape(title)).replace("%BACK%", back_link).replace("%DATA%", payload)


def write_browsers(
    record: SweepRecord, out: Path, labels: dict[str, str], back: str = "../report.html"
) -> dict[str, str]:
    """One browser per finished trial with feature pages, in ``out``; returns run id -> file name."""
    names = dict(zip(record.trials.get("run_id", []), record.trials.get("run_name", [])))
    files = {run_id: browser_name(names[run_id]) for run_id in record.feature_pages}
    if files:
        out.mkdir(parents=True, exist_ok=True)
    for run_id, pages in record.feature_pages.items():
        page = browser_html(
            f"features of {labels.get(run_id, names[run_id])}",
            pages,
            trial_partners(record.partners, run_id, labels),
            {other: name for other, name in files.items() if other != run_id},
            back,
        )
        (out / files[run_id]).write_text(page)
    return files


def write_trial_browser(run_id: str, out: Path) -> Path:
    """The browser of one finished trial, read from the store at ``tracking_uri()``, into ``out``."""
    check_store(tracking_uri())
    client = MlflowClient(tracking_uri())
    try:
        run = client.get_run(run_id)
    except Exception:  # MLflow raises its own error types per store
        raise ReportInputError(f"no MLflow run {run_id} in {client.tracking_uri}; pass a trial's run id") from None
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if parent_id is None:
        raise ReportInputError(f"run {run_id} is a sweep's parent; pass one of its trials' run ids")
    record = read_sweep(client, client.get_run(parent_id))
    if run_id not in record.feature_pages:
        raise ReportInputError(f"trial {run_id} logged no {FEATURE_BROWSER} data: it did not finish, or predates it")
    only_this = record._replace(feature_pages={run_id: record.feature_pages[run_id]})
    files = write_browsers(only_this, out, trial_labels(record), back="")
    return out / files[run_id]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.features", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a trial's run id")
    parser.add_argument("--out", required=True, help="local folder for the page")
    args = parser.parse_args(argv)
    path = write_trial_browser(args.run, Path(args.out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
