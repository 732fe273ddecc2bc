"""The activation cache on a real S3 endpoint (moto's server on loopback, or the
endpoint the environment names through AWS_ENDPOINT_URL, which both pyarrow and boto3 read)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from study.activations.cache import ActivationCache, CorruptShardError
from study.activations.extraction import ActivationRequest, ensure_activations
from study.lm.trajectory import directory_trajectory
from study.storage import Location

pytestmark = pytest.mark.slow  # starts Ray, a sweep, a server or a browser: not in the fast tier

REPO = Path(__file__).parent.parent


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


def extraction_script(trajectory_folder, cache_uri: str, contexts_per_shard: int, lease_seconds: float = 60.0) -> str:
    """A process requesting ``leased_request``'s cache."""
    return textwrap.dedent(
        f"""
        from study.activations import lease
        from study.activations.extraction import ActivationRequest, ensure_activations
        from study.lm.trajectory import directory_trajectory
        lease.LEASE_SECONDS = {lease_seconds}
        from tests.test_s3 import leased_request
        request = leased_request({str(trajectory_folder)!r}, {contexts_per_shard})
        cache = ensure_activations(request, {cache_uri!r}, progress=False)
        print(cache.manifest["built_by"], cache.files.name)
        """
    )


def builds(cache_uri: str, key: str) -> list[Location]:
    return [
        child for child in Location.of(f"{cache_uri}/activations/{key}").children() if child.name.startswith("build-")
    ]


def test_two_requests_on_s3_build_once_under_a_lease(tiny_trajectory_folder, s3_bucket, ray_cluster):
    cache_uri = f"{s3_bucket}/leased"
    environment = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    script = extraction_script(tiny_trajectory_folder, cache_uri, contexts_per_shard=12)
    processes = [
        subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=environment, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300)[0].strip().splitlines()[-1] for process in processes]
    assert all(process.returncode == 0 for process in processes)
    assert outputs[0] == outputs[1], outputs  # the same builder's manifest and build folder
    key = leased_request(tiny_trajectory_folder, 12).cache_key()
    assert len(builds(cache_uri, key)) == 1  # the other waited on the lease and built nothing
    assert not Location.of(f"{cache_uri}/activations/{key}.lease").exists()  # released


def test_a_killed_build_on_s3_is_taken_over_when_its_lease_expires(tiny_trajectory_folder, s3_bucket, ray_cluster):
    cache_uri = f"{s3_bucket}/killed"
    request = leased_request(tiny_trajectory_folder, 4)
    environment = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    script = extraction_script(tiny_trajectory_folder, cache_uri, contexts_per_shard=4, lease_seconds=6.0)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=environment)
    deadline, finished = time.time() + 180, []
    while time.time() < deadline and process.poll() is None:
        found = builds(cache_uri, request.cache_key())
        finished = (found[0] / "units").children() if found else []
        if len(finished) >= 5:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    lease = Location.of(f"{cache_uri}/activations/{request.cache_key()}.lease")
    assert lease.exists() and len(finished) >= 5, "the build finished (or never started) before it was killed"
    folder = Location.of(f"{cache_uri}/activations/{request.cache_key()}")
    assert not (folder / "manifest.json").exists()
    before = {unit.name: unit.read_text() for unit in (builds(cache_uri, request.cache_key())[0] / "units").children()}

    started = time.time()
    cache = ensure_activations(request, cache_uri, progress=False)
    assert time.time() - started >= 1.0  # it waited for the dead builder's lease to run out
    assert [build.name for build in builds(cache_uri, request.cache_key())] == [cache.files.name]  # continued
    after = {unit.name: unit.read_text() for unit in (cache.files / "units").children()}
    assert all(after[name] == record for name, record in before.items())  # no finished unit redone
    assert len(after) > len(before) and cache.corrupt_units() == []
    assert not lease.exists()


def leased_request(trajectory_folder, contexts_per_shard: int) -> ActivationRequest:
    """The request ``extraction_script`` makes: 4 snapshots, 49 contexts in shards of ``contexts_per_shard``."""
    return ActivationRequest(
        directory_trajectory(trajectory_folder).select(4, "log"),
        layers=(1,),
        n_tokens=1500,
        context_length=32,
        contexts_per_shard=contexts_per_shard,
    )
