"""Summarise a finished sweep: its trials table, the robustness analysis and verdicts, the report."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import mlflow
import pandas as pd

from reports.robustness import per_value, write_report
from study.analysis.rules import unconverged
from study.analysis.verdicts import Verdict, analyse_sweep
from study.record import TRIALS_ARTIFACT
from study.storage import Location


def log_trials_table(parent_run_id: str, table: pd.DataFrame) -> int:
    """The trials table and the done / failed counts into the parent run; the number failed."""
    failed = int(table["status"].str.startswith("FAILED").sum()) if len(table) else 0
    with mlflow.start_run(run_id=parent_run_id):
        mlflow.log_metrics({"trials_done": len(table) - failed, "trials_failed": failed})
        with tempfile.TemporaryDirectory() as folder:
            table.to_csv(Path(folder) / TRIALS_ARTIFACT, index=False)
            mlflow.log_artifact(str(Path(folder) / TRIALS_ARTIFACT))
    return failed


def publish_report(parent_run_id: str, folder: Location) -> bool:
    """The report into ``folder`` and the parent run. It reads only what MLflow holds, as
    ``python -m reports.robustness`` does from any other machine; a failure here loses no trial."""
    try:
        write_report(folder.uri, run_id=parent_run_id, log=True)
    except Exception as error:  # the trials are recorded; the report can be made again from them
        print(
            f"the report failed ({type(error).__name__}: {error}); run again: "
            f"python -m reports.robustness --run {parent_run_id} --out {folder.uri} --log",
            file=sys.stderr,
        )
        return False
    return True


def convergence_warning(table: pd.DataFrame) -> str | None:
    """A line for the trials whose training loss had not flattened (None when every trial had)."""
    moving = unconverged(table)
    if moving is None:
        return None
    return f"not converged: {moving}: their statistics describe dictionaries still moving; raise n_steps (--set n_steps=...)"


def summarise(parent_run_id: str, table: pd.DataFrame, report_folder: Location) -> tuple[int, list[Verdict], bool]:
    """(trials failed, verdicts, whether the report was written)."""
    print(table.to_string(index=False))
    warning = convergence_warning(table)
    if warning:
        print(warning)
    out_of_memory = int((table["status"] == "FAILED: out of memory").sum()) if len(table) else 0
    if out_of_memory:
        print(
            f"{out_of_memory} trial(s) killed for memory by Ray: lower expansion_ratio, batch_size or n_tokens, or split "
            "each crosscoder with --workers-per-trial (study/sweep/memory.py estimates a trial's need)",
            file=sys.stderr,
        )
    failed = log_trials_table(parent_run_id, table)
    verdicts = analyse_sweep(parent_run_id)
    for verdict in verdicts:
        print(f"  {verdict.claim:<18} {verdict.verdict:<13} [{per_value(verdict._asdict())}] {verdict.evidence}")
    return failed, verdicts, publish_report(parent_run_id, report_folder)
