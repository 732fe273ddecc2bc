"""The activation cache on a real S3 endpoint (moto's server on loopback, or the
endpoint the environment names through AWS_ENDPOINT_URL, which both pyarrow and boto3 read)."""

from __future__ import annotations

import numpy as np
import pytest

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
