"""A team's tracking server as docs/cluster.md starts it: MLflow's basic-auth app, nobody let in by default, a
researcher's account; a real `mlflow server` on loopback (SQLite behind it, so that it runs anywhere)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient
from mlflow.tracking import MlflowClient

from tests.mlflow_server import free_port, mlflow_server
from tests.test_sweep import REPO, sweep_arguments

pytestmark = pytest.mark.slow  # starts Ray, a sweep, a server or a browser: not in the fast tier

ADMIN_PASSWORD = "admin-7f3e-not-the-default"
RESEARCHER_PASSWORD = "researcher-2c9b-secret"
AUTH_CONFIG = """[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///{folder}/users.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
"""


def as_user(monkeypatch, user: str, password: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    """The basic-auth app with its own secret key, an admin password of ours, no permission by default, and two
    accounts: a researcher of the team and an outsider."""
    folder = tmp_path_factory.mktemp("team-server")
    (folder / "auth.ini").write_text(AUTH_CONFIG.format(folder=folder))
    environment = {
        "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-key-of-this-test-only-0123456789",
    }
    with mlflow_server(f"sqlite:///{folder / 'mlflow.db'}", folder, "basic-auth", environment) as url:
        with pytest.MonkeyPatch.context() as monkeypatch:
            as_user(monkeypatch, "admin", ADMIN_PASSWORD)
            accounts = AuthServiceClient(url)
            accounts.create_user("researcher", RESEARCHER_PASSWORD)
            accounts.create_user("outsider", "outsider-password")
        yield url


def sweep_process(
    url: str, trajectory: Path, folder: Path, password: str, ray_address: str | None
) -> subprocess.CompletedProcess:
    """A one-trial seed sweep as the researcher, with ``password``, in its own process."""
    arguments = sweep_arguments(trajectory, folder, "--experiment", "team", "--set", "seed=0")
    arguments[0] = "seed"
    environment = dict(
        os.environ, MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME="researcher", MLFLOW_TRACKING_PASSWORD=password
    )
    environment.pop("RAY_ADDRESS", None)
    if ray_address:
        environment["RAY_ADDRESS"] = ray_address
    return subprocess.run(
        [sys.executable, "-m", "study.sweep", *arguments], cwd=REPO, env=environment, capture_output=True, text=True
    )


def test_a_wrong_password_is_one_line_before_ray_starts(team_server, tiny_trajectory_folder, tmp_path):
    result = sweep_process(team_server, tiny_trajectory_folder, tmp_path, "not-the-password", ray_address=None)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"error: MLflow server {team_server} refused user 'researcher'"), line
    assert "Ray" not in result.stdout + result.stderr  # refused before Ray started
    assert not (tmp_path / "sweeps").exists()


def test_a_sweep_on_the_team_server_keeps_its_secrets_out_of_every_record(
    team_server, tiny_trajectory_folder, tmp_path, ray_cluster, monkeypatch
):
    """The researcher's sweep runs on the session's Ray, whose workers never saw the credentials (as on a cluster):
    trials and the report read them from the sweep. No run, artifact, log, storage file or Ray job holds the
    password; an outsider of the server reads nothing of it."""
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ  # the session's Ray workers inherit none
    address = ray_cluster.get_runtime_context().gcs_address
    result = sweep_process(team_server, tiny_trajectory_folder, tmp_path, RESEARCHER_PASSWORD, address)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    secret = RESEARCHER_PASSWORD.encode()
    assert secret not in (result.stdout + result.stderr).encode()

    as_user(monkeypatch, "researcher", RESEARCHER_PASSWORD)
    client = MlflowClient(team_server)
    experiment = client.get_experiment_by_name("team")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs)  # the sweep and its one trial
    downloads = tmp_path / "downloads"
    for run in runs:
        recorded = repr((run.data.params, run.data.tags, sorted(run.data.metrics)))
        assert RESEARCHER_PASSWORD not in recorded and "PASSWORD" not in recorded
        client.download_artifacts(run.info.run_id, "", str(downloads / run.info.run_id))
    pages = list(downloads.rglob("*.html"))
    assert any(page.name == "report.html" for page in pages) and any(page.name == "features.html" for page in pages)
    for folder in (downloads, tmp_path / "sweeps"):
        leaking = [path for path in folder.rglob("*") if path.is_file() and secret in path.read_bytes()]
        assert not leaking, leaking
    # Every job's record in Ray's GCS, runtime_env included: what Ray's dashboard and job API show (the dashboard
    # itself is off in tests; a runtime_env's env_vars appear in this record verbatim).
    jobs = ray._private.worker.global_worker.gcs_client.get_all_job_info()
    assert jobs and not any(RESEARCHER_PASSWORD in str(job) for job in jobs.values())

    as_user(monkeypatch, "outsider", "outsider-password")
    outsider = MlflowClient(team_server)
    assert outsider.search_runs([experiment.experiment_id]) == []  # the server filters what a user may not read
    with pytest.raises(MlflowException, match="error code 403"):
        outsider.get_run(runs[0].info.run_id)
    with pytest.raises(MlflowException, match="error code 403"):
        outsider.set_tag(runs[0].info.run_id, "vandalised", "yes")


def test_a_sweep_rides_through_its_tracking_server_going_away_for_35_seconds(
    tiny_trajectory_folder, tmp_path, ray_cluster
):
    """The server stops once the first trial has finished, while the next one opens and logs its run, and comes
    back 35 s later on the same port and store: the sweep finishes, each trial with one FINISHED run."""
    port, backend = free_port(), f"sqlite:///{tmp_path / 'mlflow.db'}"
    arguments = sweep_arguments(tiny_trajectory_folder, tmp_path, "--experiment", "outage", "--max-concurrent", "1")
    arguments[0] = "seed"
    log = tmp_path / "sweep.log"
    with mlflow_server(backend, tmp_path, port=port) as url:
        address = ray_cluster.get_runtime_context().gcs_address
        environment = dict(os.environ, MLFLOW_TRACKING_URI=url, RAY_ADDRESS=address)
        sweep = subprocess.Popen(
            [sys.executable, "-m", "study.sweep", *arguments, "--set", "seed={grid_search: [0, 1]}"],
            cwd=REPO,
            env=environment,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 300
        while "[done]" not in log.read_text() and sweep.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    assert sweep.poll() is None, "the sweep ended before the outage:\n" + log.read_text()[-3000:]
    time.sleep(35)
    assert log.read_text().count("[done]") < 2, "the second trial did not wait for the server"
    with mlflow_server(backend, tmp_path, port=port) as url:
        assert sweep.wait(timeout=400) == 0, log.read_text()[-3000:]
        runs = MlflowClient(url).search_runs([MlflowClient(url).get_experiment_by_name("outage").experiment_id])
    trials = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(runs) == 3 and len({run.data.tags["tune_trial_id"] for run in trials}) == 2
    assert all(run.info.status == "FINISHED" for run in runs)
