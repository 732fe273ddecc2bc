"""Cluster behaviour: a sweep on several Ray nodes that loses one, with its cache and storage on S3,
and the cache's publication seen by a concurrent reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import pyarrow.fs as pafs
import pytest
from conftest import migrated_store

from study.activations.cache import ActivationCache
from study.activations.extraction import ActivationRequest, ensure_activations
from study.lm.trajectory import directory_trajectory
from study.record import CROSSCODER_ARTIFACT
from study.storage import Location

pytestmark = pytest.mark.slow  # starts Ray, a sweep, a server or a browser: not in the fast tier

REPO = Path(__file__).parent.parent


def test_sweep_survives_a_lost_node_with_cache_and_storage_on_s3(tiny_trajectory_folder, tmp_path, s3_bucket):
    cache, storage = f"{s3_bucket}/nodes-cache", f"{s3_bucket}/nodes-sweeps"
    store = migrated_store(tmp_path / "mlflow.db")
    artifacts = f"{s3_bucket}/nodes-mlflow"
    arguments = [
        "expansion_ratio",
        "--experiment",
        "nodes",
        "--trajectory",
        str(tiny_trajectory_folder),
        "--set",
        "n_snapshots=4",
        "--set",
        "layer=1",
        "--set",
        "context_length=32",
        "--set",
        "batch_size=128",
        "--set",
        "expansion_ratio={grid_search: [4, 8]}",
        "--set",
        "n_steps=1500",
        "--set",
        "task_items=4",
        "--tokens",
        "4400",
        "--cache-dir",
        cache,
        "--storage",
        storage,
        "--artifacts",
        artifacts,
        "--local-cache",
        str(tmp_path / "node-stage"),
    ]
    # The S3 endpoint and its credentials come from the environment (conftest), as a user's would.
    environment = dict(
        os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store}", CROSSCODER_STUDY_CACHE=str(tmp_path / "local-cache")
    )
    environment.pop("RAY_ADDRESS", None)
    result_file = tmp_path / "result.json"
    finished = subprocess.run(
        [sys.executable, str(REPO / "tests" / "multinode_sweep.py"), str(result_file), storage, *arguments],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0 and result_file.exists(), finished.stdout[-3000:] + finished.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["exit_code"] == 0 and result["removed"], result

    mlflow.set_tracking_uri(f"sqlite:///{store}")
    frame = mlflow.search_runs(experiment_names=["nodes"])
    trials = frame[frame["tags.mlflow.parentRunId"].notna()]
    # One MLflow run per trial although one trial ran twice, and all of them finished.
    assert len(trials) == 2 and trials["tags.tune_trial_id"].nunique() == 2, trials[["tags.tune_trial_id", "status"]]
    assert (trials["status"] == "FINISHED").all()
    # Trials ran on the worker nodes only; the lost one resumed from its checkpoint on the other.
    survivor = next(node for node in result["workers"] if node != result["removed"]["node_id"])
    assert set(trials["tags.ray_node_id"]) <= set(result["workers"])
    resumed = trials[trials["tags.resumed_from_step"].notna()]
    assert len(resumed) >= 1, "no trial was restarted from a checkpoint"
    assert (resumed["tags.resumed_from_step"].astype(int) > 0).all() and (resumed["tags.ray_node_id"] == survivor).all()
    assert result["removed"]["trial_id"] in set(resumed["tags.tune_trial_id"])
    # The bucket holds the cache (published by its manifest), Tune's state, checkpoints and the report;
    # nothing of the activations went to the local cache.
    manifests = [child / "manifest.json" for child in Location.of(f"{cache}/activations").children()]
    assert sum(manifest.is_file() for manifest in manifests) == 1
    sweep = Location.of(f"{storage}/nodes-expansion_ratio")
    names = [info.path for info in sweep.filesystem.get_file_info(pafs.FileSelector(sweep.path, recursive=True))]
    assert any("checkpoint_" in name for name in names)
    assert (sweep / "report" / "report.html").is_file()
    assert not (tmp_path / "local-cache" / "activations").exists()
    # Trials read the bucket's shards once into the nodes' stage (one folder: the nodes share this disk).
    assert len(list((tmp_path / "node-stage").rglob("shard*.npy"))) >= 3
    # MLflow's artifacts too: each trial's crosscoder, read back by the stability tasks and the report.
    assert trials["artifact_uri"].str.startswith(artifacts).all()
    for uri in trials["artifact_uri"]:
        assert (Location.of(uri) / CROSSCODER_ARTIFACT).is_file(), uri


def test_location_round_trip_and_atomic_rewrite_under_a_reader(tmp_path):
    target = Location.of(f"file://{tmp_path}/deep/folder") / "manifest.json"
    assert not target.exists()
    payloads = [json.dumps({"version": index, "padding": "x" * (200_000 + index)}) for index in range(40)]
    target.write_text(payloads[0])
    seen, broken = set(), []

    def read_while_writing(stop: threading.Event) -> None:
        while not stop.is_set():
            text = target.read_text()
            try:
                seen.add(json.loads(text)["version"])
            except json.JSONDecodeError:
                broken.append(len(text))

    stop = threading.Event()
    reader = threading.Thread(target=read_while_writing, args=(stop,))
    reader.start()
    for payload in payloads[1:]:
        target.write_text(payload)
    stop.set()
    reader.join()
    assert not broken, f"the reader saw {len(broken)} partial files"
    assert len(seen) > 1 and target.read_text() == payloads[-1]
    assert [child.name for child in Location.of(f"file://{tmp_path}/deep/folder").children()] == ["manifest.json"]


def test_cache_under_a_file_uri_is_complete_whenever_a_reader_finds_its_manifest(
    tiny_trajectory_folder, ray_cluster, tmp_path
):
    request = ActivationRequest(
        directory_trajectory(tiny_trajectory_folder).select(3, "log"),
        layers=(1,),
        n_tokens=1500,
        context_length=32,
        contexts_per_shard=4,
        batch_size=8,
    )
    uri = f"file://{tmp_path}/cache"
    folder = Location.of(uri) / "activations" / request.cache_key()
    observations: list[str] = []

    def read_until_published(stop: threading.Event) -> None:
        while not stop.is_set():
            if (folder / "manifest.json").is_file():
                cache = ActivationCache(folder)
                observations.append(
                    "complete"
                    if not cache.corrupt_units() and cache.load(1).shape[0] == cache.n_tokens
                    else "incomplete"
                )
                return
            observations.append("absent")
            stop.wait(0.005)

    stop = threading.Event()
    reader = threading.Thread(target=read_until_published, args=(stop,))
    reader.start()
    cache = ensure_activations(request, uri, progress=False)
    reader.join(timeout=60)
    stop.set()
    assert observations[0] == "absent" and observations[-1] == "complete" and "incomplete" not in observations
    assert cache.folder.uri == folder.uri and cache.files.name.startswith("build-")
    assert cache.load(1).shape == (cache.n_tokens, 3, 32)
    # The trajectory stays local: a URI cache holds only the activations.
    assert not (tmp_path / "cache" / "trajectories").exists()


@pytest.mark.parametrize("spec", ["relative/folder", "file:///abs/folder"])
def test_location_of_paths_and_uris(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    location = Location.of(spec)
    assert location.is_local and location.path.startswith("/")
    assert (location / "x").path == location.path + "/x"
