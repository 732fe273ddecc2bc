"""Run by tests/test_cluster.py in a process of its own (a pytest session holds one Ray already):
a sweep on a real multi-node Ray cluster on this machine, one worker node removed mid-sweep.

    python tests/multinode_sweep.py RESULT.json STORAGE_URI SWEEP_ARGUMENT...

The head node has no CPU, so trials can only land on the two worker nodes (one CPU each). As soon as
a running trial has handed Tune its second checkpoint, the worker node it runs on is killed. Writes
what happened to RESULT.json.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.fs as pafs
import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from study.storage import Location
from study.sweep.cli import main

WORKER_NODES = 2
DEADLINE_SECONDS = 400


def running_trial_nodes() -> dict[str, str]:
    """Tune trial id -> Ray node id of the trials MLflow shows running (each trial tags its node)."""
    runs = MlflowClient().search_runs(
        [experiment.experiment_id for experiment in MlflowClient().search_experiments()],
        filter_string="attributes.status = 'RUNNING'",
    )
    return {
        run.data.tags["tune_trial_id"]: run.data.tags["ray_node_id"] for run in runs if "ray_node_id" in run.data.tags
    }


def checkpoints_per_trial(storage: Location) -> dict[str, int]:
    """Trial folder name -> how many checkpoints it holds under ``storage`` (a folder or an object-store URI)."""
    try:
        listed = storage.filesystem.get_file_info(pafs.FileSelector(storage.path, recursive=True))
    except FileNotFoundError:  # Tune has not written there yet
        return {}
    # An object store lists files only, so the trial folder and its checkpoints are read off each file's path.
    parts = [info.path.split("/") for info in listed]
    found = {(path[i - 1], path[i]) for path in parts for i in range(1, len(path)) if path[i].startswith("checkpoint_")}
    return Counter(trial for trial, _ in found)


def remove_node_under_a_checkpointed_trial(cluster: Cluster, workers: list, storage: Location, removed: dict) -> None:
    """Kill the worker node that runs a trial which has already handed Tune two checkpoints.

    A checkpoint's files reach the storage before Tune's driver has taken the report that names it: a node
    killed in between restarted its trial from nothing (seen once, with another test's sweep loading the
    machine). The trial reports its checkpoints in turn, about a second apart here, so once the second
    one's files are there the first is Tune's."""
    by_id = {worker.node_id: worker for worker in workers}
    deadline = time.time() + DEADLINE_SECONDS
    while time.time() < deadline:
        checkpointed = {trial for trial, count in checkpoints_per_trial(storage).items() if count >= 2}
        for trial_id, node_id in running_trial_nodes().items() if checkpointed else ():
            if node_id in by_id and any(trial_id in name for name in checkpointed):
                cluster.remove_node(by_id[node_id], allow_graceful=False)
                removed.update(node_id=node_id, trial_id=trial_id, at=time.time())
                return
        time.sleep(0.2)


def run(result_path: Path, storage: Location, arguments: list[str]) -> None:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": 100 * 1024**2},
    )
    workers = [cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2) for _ in range(WORKER_NODES)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    nodes = {"head": cluster.head_node.node_id, "workers": [worker.node_id for worker in workers]}
    removed: dict = {}
    remover = threading.Thread(
        target=remove_node_under_a_checkpointed_trial, args=(cluster, workers, storage, removed), daemon=True
    )
    remover.start()
    try:
        exit_code = main(arguments)
    finally:
        ray.shutdown()
        cluster.shutdown()
    result = {"exit_code": exit_code, "removed": removed, **nodes}
    result_path.write_text(json.dumps(result))


if __name__ == "__main__":
    run(Path(sys.argv[1]), Location.of(sys.argv[2]), sys.argv[3:])
