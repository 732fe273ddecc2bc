"""The activation cache and a sweep's storage on a real S3 endpoint (moto's server on loopback, or the
endpoint the environment names through AWS_ENDPOINT_URL, which both pyarrow and boto3 read)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pyarrow.fs as pafs
import pytest

from study.activations.extraction import ActivationRequest, ensure_activations
from study.lm.trajectory import directory_trajectory
from study.storage import Location
from study.sweep.cli import main
from tests.test_sweep import children, runs, sweep_arguments


@pytest.fixture(scope="module")
def request_(tiny_trajectory_folder) -> ActivationRequest:
    trajectory = directory_trajectory(tiny_trajectory_folder)
    return ActivationRequest(trajectory, layers=(1,), n_tokens=1500, context_length=32, contexts_per_shard=12)


def test_the_cache_on_s3_holds_what_a_local_cache_holds_and_repairs_a_lost_shard(
    request_, s3_bucket, tmp_path, ray_cluster
):
    local = ensure_activations(request_, tmp_path, progress=False)
    remote = ensure_activations(request_, f"{s3_bucket}/cache", progress=False)
    assert remote.folder.uri.startswith("s3://")
    assert remote.manifest["files"] == local.manifest["files"]  # the same bytes, shard by shard
    assert np.array_equal(remote.token_ids(), local.token_ids())
    assert (remote.load(1) == local.load(1)).all()

    lost = "layer1/step0/shard00003.npy"
    (remote.files / lost).filesystem.delete_file((remote.files / lost).path)  # as a killed or pruned upload
    assert remote.incomplete_units() == [(0, 3)]
    repaired = ensure_activations(request_, f"{s3_bucket}/cache", progress=False)
    assert repaired.incomplete_units() == [] and repaired.corrupt_units() == []
    assert (repaired.load(1) == local.load(1)).all()


def test_a_sweep_with_its_cache_and_storage_on_s3(tiny_trajectory_folder, tmp_path, store, s3_bucket, ray_cluster):
    arguments = sweep_arguments(tiny_trajectory_folder, tmp_path, "--experiment", "on-s3")
    arguments[0] = "seed"
    cache_at = arguments.index("--cache-dir") + 1
    arguments[cache_at] = f"{s3_bucket}/sweep-cache"
    arguments[arguments.index("--storage") + 1] = f"{s3_bucket}/sweeps"
    arguments += ["--set", "seed=0", "--set", "task_items=4"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(arguments) == 0
    trials = children(runs(store, "on-s3"))
    assert len(trials) == 1 and (trials["status"] == "FINISHED").all()
    # Tune's state, the trials' checkpoints and the report went to the bucket, the activations too.
    sweep = Location.of(f"{s3_bucket}/sweeps/on-s3-seed")
    listed = sweep.filesystem.get_file_info(pafs.FileSelector(sweep.path, recursive=True))
    names = [info.path for info in listed]
    assert any(name.endswith("report/report.html") for name in names)
    assert any("checkpoint_" in name for name in names)
    cache = Location.of(f"{s3_bucket}/sweep-cache/activations")
    assert any(child.name != "" and (child / "manifest.json").is_file() for child in cache.children())
