"""python -m study.sweep on real Ray Tune and a real MLflow store (SQLite), on the tiny trajectory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from study.sweep import main

REPO = Path(__file__).parent.parent


def sweep_arguments(trajectory_folder: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "expansion_ratio",
        "--trajectory", str(trajectory_folder),
        "--set", "n_snapshots=4", "--set", "layer=1", "--set", "context_length=32",
        "--set", "n_steps=30", "--set", "batch_size=128",
        "--tokens", "2000",
        "--cache-dir", str(tmp_path / "cache"),
        "--storage", str(tmp_path / "sweeps"),
        *extra,
    ]


def runs(store: Path, experiment: str):
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    return mlflow.search_runs(experiment_names=[experiment])


def children(frame):
    return frame[frame["tags.mlflow.parentRunId"].notna()]


@pytest.fixture
def store(tmp_path, monkeypatch):
    path = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    return path


def test_sweep_logs_one_parent_and_a_child_per_trial(tiny_trajectory_folder, tmp_path, store, ray_cluster, capsys):
    assert main(sweep_arguments(tiny_trajectory_folder, tmp_path, "--experiment", "er")) == 0
    frame = runs(store, "er")
    parent = frame[frame["tags.mlflow.parentRunId"].isna()]
    assert len(parent) == 1 and parent["params.axis"].iloc[0] == "expansion_ratio"
    assert parent["tags.git_commit"].iloc[0] and parent["tags.version.ray"].iloc[0]
    trials = children(frame)
    assert sorted(trials["params.expansion_ratio"].astype(float)) == [4.0, 8.0, 16.0]
    assert (trials["status"] == "FINISHED").all() and (trials["metrics.explained_variance"] > 0).all()
    client = MlflowClient()
    run_id = trials["run_id"].iloc[0]
    curve = client.get_metric_history(run_id, "explained_variance_by_snapshot")
    assert len(curve) == 4 and curve[0].step == 0 and curve[-1].step == 48  # the selected snapshots' steps
    assert len(client.get_metric_history(run_id, "train/mse")) >= 1
    artifacts = {item.path for item in client.list_artifacts(run_id)}
    assert {"decoder_norms.parquet", "decoder_norms.png"} <= artifacts
    output = capsys.readouterr().out
    assert output.count("[start]") == 3 and output.count("[done]") == 3


def test_killed_sweep_resumes_without_duplicate_runs(tiny_trajectory_folder, tmp_path, store, ray_cluster):
    arguments = sweep_arguments(tiny_trajectory_folder, tmp_path, "--experiment", "resumed", "--set", "n_steps=300", "--max-concurrent", "1")
    environment = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    process = subprocess.Popen([sys.executable, "-m", "study.sweep", *arguments], cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    finished = []
    while time.time() < deadline and process.poll() is None and not finished:
        time.sleep(0.5)
        if store.exists():
            try:
                frame = runs(store, "resumed")
            except Exception:
                continue  # the experiment is not created yet
            if len(frame) and "tags.mlflow.parentRunId" in frame:
                finished = list(children(frame).query("status == 'FINISHED'")["run_id"])
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert finished, "no trial finished before the kill"
    before = children(runs(store, "resumed"))
    assert len(before.query("status == 'FINISHED'")) < 3, "the sweep finished before it could be killed"
    end_time = before.set_index("run_id").loc[finished[0], "end_time"]

    assert main(arguments) == 0
    after = children(runs(store, "resumed"))
    assert len(after) == 3 and after["tags.tune_trial_id"].nunique() == 3
    assert (after["status"] == "FINISHED").all()
    assert after.set_index("run_id").loc[finished[0], "end_time"] == end_time  # not run again
    assert len(runs(store, "resumed")) == 4


def test_diverging_trial_is_failed_and_the_others_finish(tiny_trajectory_folder, tmp_path, store, ray_cluster, capsys):
    arguments = sweep_arguments(tiny_trajectory_folder, tmp_path, "--experiment", "diverge", "--set", "expansion_ratio=4", "--set", "learning_rate={grid_search: [0.001, 1.0e+30]}")
    assert main(arguments) == 1
    trials = children(runs(store, "diverge")).set_index("params.learning_rate")
    assert trials.loc["0.001", "status"] == "FINISHED"
    assert trials.loc["1e+30", "status"] == "FAILED"
    assert "loss became" in trials.loc["1e+30", "tags.error"]
    output = capsys.readouterr().out
    assert "[FAILED]" in output
    # The final table marks the diverged trial, not only the progress line.
    table_rows = [line for line in output.splitlines() if not line.startswith("[") and "e+30" in line]
    assert table_rows and all("FAILED" in row for row in table_rows)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["no_such_axis"], "unknown axis 'no_such_axis'; choose one of: expansion_ratio"),
        (["seed", "--set", "expansion_ratio={grid_search: [4"], "--set expansion_ratio"),
        (["seed", "--set", "expansion_ratio=0"], "expansion_ratio = 0 is invalid; expected a number > 0"),
        (["seed", "--set", "layer=7", "--set", "n_snapshots=4"], "layer 7 is beyond"),
        (["seed", "--set", "learning_rate={loguniform: [1]}"], "learning_rate.loguniform needs [low, high]"),
        (["seed", "--set", "layer={uniform: [0, 2]}"], "layer changes the activations"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_the_store_alone(tiny_trajectory_folder, tmp_path, arguments, message):
    store = tmp_path / "mlflow.db"
    environment = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    command = [sys.executable, "-m", "study.sweep", *arguments, "--trajectory", str(tiny_trajectory_folder), "--storage", str(tmp_path / "sweeps")]
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not store.exists() and not (tmp_path / "sweeps").exists()


def test_two_sweeps_at_once_lose_no_run(tiny_trajectory_folder, tmp_path, store, ray_cluster):
    environment = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "study.sweep", *sweep_arguments(tiny_trajectory_folder, tmp_path, "--experiment", name, "--set", "expansion_ratio={grid_search: [2, 4]}")],
            cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for name in ("first", "second")
    ]
    for process in processes:
        _, errors = process.communicate(timeout=400)
        assert process.returncode == 0, errors[-2000:]
    for name in ("first", "second"):
        frame = runs(store, name)
        assert len(frame) == 3 and (frame["status"] == "FINISHED").all()
