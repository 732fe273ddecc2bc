"""The activation cache on a real S3 endpoint (moto's server on loopback, or the
endpoint the environment names through AWS_ENDPOINT_URL, which both pyarrow and boto3 read)."""

from __future__ import annotations

import numpy as np
import pytest

from study.activations.cache import ActivationCache, CorruptShardError
from study.activations.extraction import ActivationRequest, ensure_activations
from study.lm.trajectory import directory_trajectory


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


def test_a_staged_cache_reads_the_object_store_once_per_node(request_, s3_bucket, tmp_path, ray_cluster):
    """--local-cache: the first read of each file keeps a copy on the node; later reads take it, and a
    damaged copy is fetched again."""
    remote = ensure_activations(request_, f"{s3_bucket}/staged", progress=False)
    stage = tmp_path / "stage"
    first = ActivationCache(remote.folder.uri, stage=stage).load(1)
    assert (first == remote.load(1)).all()
    copies = sorted(path.relative_to(stage).as_posix() for path in stage.rglob("*.npy"))
    folder = f"{remote.folder.name}/{remote.files.name}"
    assert copies == sorted(f"{folder}/{relative}" for relative in remote.manifest["files"] if "shard" in relative)

    shard = "layer1/step0/shard00002.npy"
    (remote.files / shard).filesystem.delete_file((remote.files / shard).path)
    assert (ActivationCache(remote.folder.uri, stage=stage).load(1) == first).all()  # the store is not read
    with pytest.raises(CorruptShardError):
        remote.load(1)  # without the stage it would be

    damaged = stage / folder / "layer1/step0/shard00001.npy"
    damaged.write_bytes(damaged.read_bytes()[:-5] + b"wrong")
    assert (ActivationCache(remote.folder.uri, stage=stage).shard(1, 1) == first[remote_rows(remote, 1)]).all()
    assert damaged.read_bytes() == (remote.files / "layer1/step0/shard00001.npy").read_bytes()


def remote_rows(cache: ActivationCache, index: int) -> slice:
    """The rows of shard ``index`` within ``cache.load``."""
    start = sum(cache.manifest["rows_per_shard"][:index])
    return slice(start, start + cache.manifest["rows_per_shard"][index])
