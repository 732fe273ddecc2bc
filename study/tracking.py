"""MLflow: where runs go, one parent run per sweep, one child run per trial, never duplicated."""

from __future__ import annotations

import os
import urllib.request
from contextlib import nullcontext
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from study.errors import StudyInputError
from study.record import TAG

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""MLflow 3 opens an experiment of this kind on its runs table, not on the GenAI overview."""


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else an SQLite file at an absolute path in the working directory
    (absolute, because Tune runs trials in their own directories)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


SQLITE_HEADER = b"SQLite format 3\x00"


CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
"""The environment variables from which MLflow's client reads an authenticated server's user and password."""


RIDE_THROUGH = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "8", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2"}
"""MLflow's client retries a request whose server does not answer, waiting 2, 4, 8, ... seconds (each wait at most
120): 8 retries ride through an outage of about 6 minutes (a restart, an upgrade, a network blip) before the call
fails. Set for the sweep and its trials unless the environment sets them."""


def tracking_environment() -> dict[str, str]:
    """MLflow's retry settings (RIDE_THROUGH, or this environment's) and credentials, for the trials to set in
    theirs: they travel with the sweep's context (Ray's object store), never in a job's ``runtime_env``, which Ray's
    dashboard shows. The credentials are left out where the environment has none."""
    retries = {name: os.environ.get(name, default) for name, default in RIDE_THROUGH.items()}
    return retries | {name: os.environ[name] for name in CREDENTIALS if os.environ.get(name)}


def check_server(uri: str) -> None:
    """A tracking server must answer (at once: a mistyped address is not an outage to ride through), and accept
    this environment's credentials, before Ray starts."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
    except OSError as error:
        reason = getattr(error, "reason", error)
        raise StudyInputError(
            f"MLflow server {uri} does not answer ({reason}); start it, or point MLFLOW_TRACKING_URI at one that runs"
        ) from None
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as error:
        user = os.environ.get(CREDENTIALS[0])
        if error.get_http_status_code() == 401:
            who = f"user '{user}'" if user else "no credentials (MLFLOW_TRACKING_USERNAME is not set)"
            raise StudyInputError(
                f"MLflow server {uri} refused {who}: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to "
                "an account of that server"
            ) from None
        if error.get_http_status_code() == 403:
            raise StudyInputError(
                f"MLflow server {uri} lets user '{user}' in but not read experiments; ask its admin for a permission"
            ) from None
        raise StudyInputError(f"MLflow server {uri} did not answer: {str(error).splitlines()[0][:200]}") from None


def check_store(uri: str) -> None:
    """An existing SQLite store must be an SQLite database (MLflow would fail on it deep inside SQLAlchemy); a
    tracking server must answer and accept the credentials (``check_server``)."""
    if uri.startswith(("http://", "https://")):
        check_server(uri)
        return
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///") :])
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as handle:
            if handle.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                raise StudyInputError(
                    f"{path} is not an SQLite database; move it aside or point MLFLOW_TRACKING_URI at another store"
                )


def find_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The id of the run carrying all ``tags``, if there is one."""
    query = " and ".join(f"tags.{key} = '{value}'" for key, value in tags.items())
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def store_lock(uri: str):
    """A lock beside an SQLite store: two sweeps creating its schema at once would corrupt it."""
    if uri.startswith("sqlite:///"):
        return FileLock(uri[len("sqlite:///") :] + ".lock")
    return nullcontext()


def check_artifact_location(experiment: str, artifacts: str | None) -> None:
    """``--artifacts`` can only place a new experiment's artifacts: MLflow fixes the location at creation."""
    if artifacts is None:
        return
    mlflow.set_tracking_uri(tracking_uri())
    found = MlflowClient().get_experiment_by_name(experiment)
    if found is not None and found.artifact_location.rstrip("/") != artifacts.rstrip("/"):
        raise StudyInputError(
            f"experiment '{experiment}' keeps its artifacts at {found.artifact_location}; drop --artifacts "
            "or name a new experiment with --experiment"
        )


def parent_run(
    experiment: str, sweep_name: str, params: dict, tags: dict, artifacts: str | None = None
) -> tuple[str, str]:
    """(experiment id, parent run id): the sweep's run, created on first use, reused on resume; a new
    experiment keeps its artifacts at ``artifacts`` (a URI such as s3://bucket/mlflow) when given."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        return _parent_run(MlflowClient(), experiment, sweep_name, params, tags, artifacts)


def _parent_run(
    client: MlflowClient, experiment: str, sweep_name: str, params: dict, tags: dict, artifacts: str | None
) -> tuple[str, str]:
    found = client.get_experiment_by_name(experiment)
    experiment_id = (
        found.experiment_id
        if found
        else client.create_experiment(experiment, artifact_location=artifacts, tags=EXPERIMENT_KIND)
    )
    if found and not EXPERIMENT_KIND.items() <= found.tags.items():  # made before the tag was set
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(experiment_id, key, value)
    run_id = find_run(client, experiment_id, {TAG.sweep_name: sweep_name})
    if run_id is None:
        run = client.create_run(experiment_id, run_name=sweep_name, tags={TAG.sweep_name: sweep_name, **tags})
        run_id = run.info.run_id
        for key, value in params.items():
            client.log_param(run_id, key, value)
    return experiment_id, run_id


def child_run(experiment_id: str, parent_run_id: str, trial_id: str, trial_name: str) -> str:
    """The trial's run under the parent: found by its Tune trial id, so a restarted trial logs into the same run."""
    client = MlflowClient()
    run_id = find_run(client, experiment_id, {TAG.tune_trial_id: trial_id, "mlflow.parentRunId": parent_run_id})
    if run_id is None:
        tags = {TAG.tune_trial_id: trial_id, "mlflow.parentRunId": parent_run_id}
        run_id = client.create_run(experiment_id, run_name=trial_name, tags=tags).info.run_id
    return run_id


def close_stopped_run(experiment_id: str, parent_run_id: str, trial_id: str) -> None:
    """A trial the scheduler stopped was killed mid-run: its run ends KILLED, tagged as stopped early."""
    client = MlflowClient()
    run_id = find_run(client, experiment_id, {TAG.tune_trial_id: trial_id, "mlflow.parentRunId": parent_run_id})
    if run_id is not None:
        client.set_tag(run_id, TAG.stopped_early, "true")
        client.set_terminated(run_id, status="KILLED")


def close_orphaned_runs(experiment_id: str, parent_run_id: str, status: str, error: str | None = None) -> int:
    """Once no trial is in flight: every child run still RUNNING belongs to a trial process that died without
    closing it (Ctrl-C, the OOM killer, a lost node); it ends ``status``, with ``error`` as its error tag. Returns
    how many there were."""
    client = MlflowClient()
    orphans = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=10_000,
    )
    for run in orphans:
        if error is not None:
            client.set_tag(run.info.run_id, TAG.error, error)
        client.set_terminated(run.info.run_id, status=status)
    return len(orphans)


def close_interrupted_sweep(experiment_id: str, parent_run_id: str) -> None:
    """After Ctrl-C: the runs left in flight end KILLED, and the parent run is tagged as interrupted and ends
    KILLED; the same command reopens both."""
    close_orphaned_runs(experiment_id, parent_run_id, "KILLED")
    client = MlflowClient()
    client.set_tag(parent_run_id, TAG.sweep_interrupted, "true")
    client.set_terminated(parent_run_id, status="KILLED")


UI_PORT = 5000
"""Where ``mlflow ui`` listens by default."""


def ui_instructions(uri: str, experiment_id: str) -> list[str]:
    """How to open the sweep's runs in the MLflow UI: the command that serves a local store, and the page.
    ``workflowType=machine_learning`` opens the runs table: MLflow 3's UI otherwise starts on its GenAI
    overview, whatever the experiment's kind."""
    page = f"#/experiments/{experiment_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return [f"open {uri.rstrip('/')}/{page}"]
    return [f"mlflow ui --backend-store-uri {uri}", f"then open http://127.0.0.1:{UI_PORT}/{page}"]


def run_name(config: dict, swept: tuple[str, ...]) -> str | None:
    """``expansion_ratio=16``, ``seed=1 · layer=2``: what tells a trial from the others; None when nothing varies."""

    def shown(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return " · ".join(f"{key}={shown(config[key])}" for key in swept) or None
