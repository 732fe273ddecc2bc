"""The team set-up: sweeps against a real `mlflow server` process whose backend store is PostgreSQL.

`.ci/run` installs Debian's PostgreSQL, starts it on loopback and exports MLFLOW_TEST_POSTGRES
(a server URL with a database to connect to). Elsewhere the test is skipped unless CI is set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.mlflow_server import mlflow_server
from tests.test_sweep import sweep_arguments

pytestmark = pytest.mark.slow  # starts Ray, a sweep, a server or a browser: not in the fast tier

POSTGRES = os.environ.get("MLFLOW_TEST_POSTGRES")
if not POSTGRES and not os.environ.get("CI"):
    pytest.skip("MLFLOW_TEST_POSTGRES is not set (.ci/run starts PostgreSQL and sets it)", allow_module_level=True)


def execute(statement: str) -> None:
    import psycopg

    # CREATE / DROP DATABASE cannot run inside a transaction.
    with psycopg.connect(POSTGRES, autocommit=True) as connection:
        connection.execute(statement)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """`mlflow server` on a fresh PostgreSQL database, artifacts proxied to a local folder."""
    assert POSTGRES, "CI must provide PostgreSQL: .ci/run exports MLFLOW_TEST_POSTGRES"
    database = f"mlflow_{uuid.uuid4().hex[:8]}"
    execute(f"CREATE DATABASE {database}")
    backend = POSTGRES.rsplit("/", 1)[0] + f"/{database}"
    folder = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(backend, folder) as url:
        yield url
    execute(f"DROP DATABASE {database} WITH (FORCE)")


def test_two_sweeps_at_once_against_a_tracking_server_on_postgresql(
    tracking_server, tiny_trajectory_folder, tmp_path, ray_cluster
):
    environment = dict(
        os.environ, MLFLOW_TRACKING_URI=tracking_server, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address
    )
    sweeps = {}
    for team, ratio in (("team-a", 4), ("team-b", 8)):
        arguments = sweep_arguments(
            tiny_trajectory_folder,
            tmp_path / team,
            "--experiment",
            team,
            "--set",
            f"expansion_ratio={ratio}",
            "--set",
            "task_items=4",
        )
        arguments[0] = "seed"
        arguments += ["--set", "seed={grid_search: [0, 1]}"]
        log = tmp_path / f"{team}.log"
        sweeps[team] = (
            subprocess.Popen(
                [sys.executable, "-m", "study.sweep", *arguments],
                cwd=tmp_path,
                env=environment,
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
            ),
            log,
        )
    for process, log in sweeps.values():
        assert process.wait(timeout=420) == 0, log.read_text()[-4000:]

    client = MlflowClient(tracking_server)
    for team, ratio in (("team-a", "4"), ("team-b", "8")):
        experiment = client.get_experiment_by_name(team)
        runs = client.search_runs([experiment.experiment_id])
        parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
        trials = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        assert len(parents) == 1 and len(runs) == 3, [
            run.info.run_name for run in runs
        ]  # nothing lost, nothing doubled
        assert sorted(run.data.params["seed"] for run in trials) == ["0", "1"] and {
            run.data.params["expansion_ratio"] for run in trials
        } == {ratio}
        assert all(run.info.status == "FINISHED" and run.data.metrics["explained_variance"] > 0 for run in trials)
        # Seed pairs exist here: stability gets a real verdict; relie a decided one only where the task was learned.
        tags = parents[0].data.tags
        assert tags["verdict.stability"] in ("holds", "fails")
        learned = any(run.data.metrics["task_learned_snapshots"] > 0 for run in trials)
        assert learned or tags["verdict.relie"] == "inconclusive"
        # Artifacts went through the server to its artifact store, and come back the same way.
        path = Path(
            client.download_artifacts(
                trials[0].info.run_id, "crosscoder.safetensors", str(tmp_path / team / "download")
            )
        )
        assert path.stat().st_size > 1000
        assert {item.path for item in client.list_artifacts(parents[0].info.run_id, "report")} >= {
            "report/report.html",
            "report/summary.md",
        }
