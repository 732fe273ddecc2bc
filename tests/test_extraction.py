"""Activation extraction on Ray Data: exact against a plain forward, resumable, self-repairing, built once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from study.activations.cache import CorruptShardError
from study.activations.contexts import sample_contexts
from study.activations.extraction import (
    ActivationRequest,
    activation_bytes,
    check_space,
    ensure_activations,
    free_bytes,
)
from study.errors import StudyInputError
from study.lm.pretrain_config import TINY
from study.lm.trajectory import directory_trajectory, load_model, load_tokenizer
from study.storage import Location

pytestmark = pytest.mark.slow  # starts Ray, a sweep, a server or a browser: not in the fast tier

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def trajectory(tiny_trajectory_folder):
    return directory_trajectory(tiny_trajectory_folder)


def small_request(trajectory, **changes) -> ActivationRequest:
    fields = dict(
        trajectory=trajectory, layers=(0, 1), n_tokens=1500, context_length=32, contexts_per_shard=12, batch_size=8
    )
    fields.update(changes)
    return ActivationRequest(**fields)


def test_cache_matches_a_plain_output_hidden_states_forward(trajectory, ray_cluster, tmp_path):
    request = small_request(trajectory)
    cache = ensure_activations(request, tmp_path, progress=False)
    contexts = sample_contexts(load_tokenizer(trajectory.snapshots[-1]), "embedded", 32, 1500, seed=0)
    assert cache.n_tokens == len(contexts) * 31 >= 1500
    assert np.array_equal(cache.token_ids(), contexts[:, 1:].reshape(-1).numpy())
    assert cache.positions().min() == 1 and cache.positions().max() == 31
    for layer in (0, 1):
        cached = cache.load(layer)
        assert cached.shape == (cache.n_tokens, len(trajectory.snapshots), TINY.hidden_size)
        for index, snapshot in enumerate(trajectory.snapshots):
            with torch.no_grad():
                direct = load_model(snapshot)(input_ids=contexts, output_hidden_states=True).hidden_states[layer][:, 1:]
            direct = direct.reshape(-1, TINY.hidden_size)
            # float16 keeps 11 significant bits: relative rounding below 2 ** -11.
            assert torch.allclose(cached[:, index], direct, rtol=2**-10, atol=1e-6), (
                f"layer {layer} step {snapshot.step}"
            )
        assert cache.mean_norms(layer) == pytest.approx(cached.norm(dim=-1).mean(0).tolist(), rel=1e-3)


def test_corrupt_shard_is_detected_and_only_it_is_rebuilt(trajectory, ray_cluster, tmp_path):
    cache = ensure_activations(small_request(trajectory), tmp_path, progress=False)
    files = Path(cache.files.path)
    victim = files / "layer1" / f"step{trajectory.steps[2]}" / "shard00001.npy"
    truncated = files / "layer0" / f"step{trajectory.steps[1]}" / "shard00002.npy"
    original, original_truncated = victim.read_bytes(), truncated.read_bytes()
    untouched = files / "layer1" / f"step{trajectory.steps[0]}" / "shard00000.npy"
    untouched_time = untouched.stat().st_mtime_ns
    victim.write_bytes(original[:-7] + b"garbage")  # same size: only a reader's checksum sees it
    truncated.write_bytes(original_truncated[:-100])  # a short file: a request sees it without reading it
    with pytest.raises(CorruptShardError, match="shard00001.npy is missing or does not match its checksum; delete it"):
        cache.shard(1, 1)
    assert cache.corrupt_units() == [(1, 2), (2, 1)]
    assert cache.incomplete_units() == [(1, 2)]

    victim.unlink()  # as the reader's message says
    repaired = ensure_activations(small_request(trajectory), tmp_path, progress=False)
    assert victim.read_bytes() == original and truncated.read_bytes() == original_truncated
    assert untouched.stat().st_mtime_ns == untouched_time
    assert repaired.corrupt_units() == []


def test_a_complete_cache_is_trusted_without_reading_a_shard(trajectory, ray_cluster, tmp_path, monkeypatch):
    request = small_request(trajectory)
    ensure_activations(request, tmp_path, progress=False)
    read = []
    original = Location.read_bytes

    def counted(self):
        read.append(self.path)
        return original(self)

    monkeypatch.setattr(Location, "read_bytes", counted)
    cache = ensure_activations(request, tmp_path, progress=False)
    assert cache.n_tokens >= 1500
    assert [path for path in read if path.endswith(".npy")] == []  # the manifest and sizes only
    cache.shard(0, 0)
    assert any(path.endswith("shard00000.npy") for path in read)  # reading still verifies


def test_a_checkpoint_rewritten_in_place_gets_new_activations(tiny_trajectory_folder, ray_cluster, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(tiny_trajectory_folder, folder)
    request = small_request(directory_trajectory(folder), layers=(1,))
    before = ensure_activations(request, tmp_path / "cache", progress=False)
    last, first = f"step{request.trajectory.steps[-1]}", f"step{request.trajectory.steps[0]}"
    # A re-run of the training job writes different weights under the same step name.
    shutil.copy(folder / first / "model.safetensors", folder / last / "model.safetensors")
    rerun = small_request(directory_trajectory(folder), layers=(1,))
    after = ensure_activations(rerun, tmp_path / "cache", progress=False)
    assert after.manifest["cache_key"] != before.manifest["cache_key"]
    assert not torch.equal(after.shard(1, 0)[:, -1], before.shard(1, 0)[:, -1])
    assert torch.equal(after.shard(1, 0)[:, -1], after.shard(1, 0)[:, 0])  # it now holds step 0's weights


def test_a_killed_extraction_resumes_without_redoing_finished_shards(trajectory, ray_cluster, tmp_path):
    request = small_request(trajectory, contexts_per_shard=2, n_tokens=2000)
    script = textwrap.dedent(
        f"""
        from study.activations.extraction import ActivationRequest, ensure_activations
        from study.lm.trajectory import directory_trajectory
        request = ActivationRequest(directory_trajectory({str(trajectory.snapshots[0].source.rsplit("/", 1)[0])!r}),
                                    layers=(0, 1), n_tokens=2000, context_length=32, contexts_per_shard=2, batch_size=8)
        ensure_activations(request, {str(tmp_path)!r}, progress=False)
        """
    )
    environment = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=environment)
    key_folder = tmp_path / "activations" / request.cache_key()
    deadline = time.time() + 120
    units_folder = None
    while time.time() < deadline and process.poll() is None:
        units_folder = next(key_folder.glob("build-*/units"), None) if key_folder.is_dir() else None
        if units_folder is not None and len(list(units_folder.glob("*.json"))) >= 5:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (key_folder / "manifest.json").exists(), "the extraction finished before it could be killed"
    finished_before = {path.name: path.stat().st_mtime_ns for path in units_folder.glob("*.json")}
    n_contexts = -(-2000 // 31)
    total_units = len(trajectory.snapshots) * -(-n_contexts // 2)
    assert 5 <= len(finished_before) < total_units
    first_file = units_folder.parent / next(iter(json.loads(next(units_folder.glob("*.json")).read_text())["files"]))
    first_time = first_file.stat().st_mtime_ns

    cache = ensure_activations(request, tmp_path, progress=False)
    assert Path(cache.files.path) == units_folder.parent  # the killed build was continued, not restarted
    after = {path.name: path.stat().st_mtime_ns for path in units_folder.glob("*.json")}
    assert len(after) == total_units
    assert all(after[name] == written for name, written in finished_before.items()), (
        "a finished unit was extracted twice"
    )
    assert first_file.stat().st_mtime_ns == first_time
    assert cache.corrupt_units() == []


def test_two_concurrent_requests_build_once(trajectory, ray_cluster, tmp_path):
    source = trajectory.snapshots[0].source.rsplit("/", 1)[0]
    script = textwrap.dedent(
        f"""
        from study.activations.extraction import ActivationRequest, ensure_activations
        from study.lm.trajectory import directory_trajectory
        request = ActivationRequest(directory_trajectory({source!r}), layers=(1,), n_tokens=2000, context_length=32,
                                    contexts_per_shard=8, batch_size=8)
        cache = ensure_activations(request, {str(tmp_path)!r}, progress=False)
        print(cache.manifest["built_by"], cache.n_tokens, len(cache.corrupt_units()))
        """
    )
    environment = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    processes = [
        subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=environment, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=240)[0].strip().splitlines()[-1] for process in processes]
    assert all(process.returncode == 0 for process in processes)
    assert outputs[0] == outputs[1], outputs  # same builder, same rows, no corrupt unit
    key_folder = next(path for path in (tmp_path / "activations").iterdir() if path.is_dir())
    assert len(list(key_folder.glob("build-*"))) == 1  # the second waited on the lock and built nothing


def test_reader_is_seeded_and_covers_every_row_once_per_epoch(trajectory, ray_cluster, tmp_path):
    cache = ensure_activations(small_request(trajectory, layers=(1,)), tmp_path, progress=False)
    first = list(cache.batches(1, batch_size=100, seed=3, epochs=1))
    again = list(cache.batches(1, batch_size=100, seed=3, epochs=1))
    other = list(cache.batches(1, batch_size=100, seed=4, epochs=1))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert len(first) == cache.n_tokens // 100
    # With a batch size dividing the row count, one epoch streams exactly the cache's rows.
    assert cache.n_tokens % 31 == 0
    streamed = torch.cat(list(cache.batches(1, batch_size=31, seed=5, epochs=1)))
    streamed_rows, streamed_counts = torch.unique(streamed.flatten(1), dim=0, return_counts=True)
    cached_rows, cached_counts = torch.unique(cache.load(1).flatten(1), dim=0, return_counts=True)
    assert torch.equal(streamed_rows, cached_rows) and torch.equal(streamed_counts, cached_counts)


def test_layer_beyond_the_model_is_refused_before_writing(trajectory, ray_cluster, tmp_path):
    with pytest.raises(StudyInputError, match=r"layer \[5\] is outside 0..2"):
        ensure_activations(small_request(trajectory, layers=(1, 5)), tmp_path, progress=False)
    assert not any((tmp_path / "activations").glob("*/manifest.json"))


def test_streaming_mode_yields_the_rows_the_cache_holds(trajectory, ray_cluster, tmp_path):
    from study.activations.streaming import StreamedActivations, cache_bytes

    request = small_request(trajectory, layers=(1,))
    cache = ensure_activations(request, tmp_path, progress=False)
    assert cache_bytes(request, cache.d_model) == 1500 * len(trajectory.snapshots) * cache.d_model * 2
    streamed = StreamedActivations(request)
    assert streamed.manifest["rows_per_shard"] == cache.manifest["rows_per_shard"]
    assert (streamed.n_tokens, streamed.d_model, streamed.steps) == (cache.n_tokens, cache.d_model, cache.steps)
    assert np.array_equal(streamed.token_ids(), cache.token_ids())
    assert np.array_equal(streamed.positions(), cache.positions())
    # The same rows bit for bit, in the same shuffled batches.
    assert torch.equal(streamed.shard(1, 2), cache.shard(1, 2))
    shards = [0, 1, 2]
    pairs = zip(range(12), streamed.batches(1, 64, seed=3, shards=shards), cache.batches(1, 64, seed=3, shards=shards))
    assert all(torch.equal(from_stream, from_cache) for _, from_stream, from_cache in pairs)


def read_a_shard_split_by_snapshot(rank: int, world_size: int, port: int, request: ActivationRequest, out: Path):
    """One rank of a gloo group streaming ``request``'s shard 1 together with the others."""
    import torch.distributed as dist

    from study.activations.streaming import StreamedActivations

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    streamed = StreamedActivations(request, group=dist.group.WORLD)
    shard = streamed.shard(1, 1)
    assert sorted(streamed.models) == list(range(rank, len(request.trajectory.snapshots), world_size))
    torch.save(shard, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_streaming_split_over_ranks_by_snapshot_gives_the_cache_rows(trajectory, ray_cluster, tmp_path):
    """Three ranks over the trajectory's snapshots (not a multiple of 3): each loads and runs only its
    own snapshots, and every rank ends with the cached shard, bit for bit."""
    request = small_request(trajectory, layers=(1,))
    cache = ensure_activations(request, tmp_path, progress=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert len(trajectory.snapshots) % 3
    torch.multiprocessing.spawn(read_a_shard_split_by_snapshot, args=(3, port, request, tmp_path), nprocs=3)
    for rank in range(3):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), cache.shard(1, 1)), rank


def fill(path: Path, size: int) -> None:
    """A ballast file of ``size`` bytes, allocated at once."""
    with path.open("wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, max(1, size))


def test_a_disk_that_fills_during_extraction_says_where_and_the_same_call_resumes(trajectory, ray_cluster):
    """On a small file system (.ci/run mounts an 8 MB tmpfs): too little room from the start is refused before
    extraction with the bytes needed; room at the start but none once shards land is one line naming the
    location, the shards written are kept, and the same call, once space is freed, finishes the cache."""
    if not os.environ.get("CROSSCODER_TEST_SMALL_DISK"):
        pytest.skip("CROSSCODER_TEST_SMALL_DISK is not set (.ci/run mounts a small tmpfs where it can)")
    disk = Path(os.environ["CROSSCODER_TEST_SMALL_DISK"]) / f"run-{os.getpid()}"
    shutil.rmtree(disk, ignore_errors=True)
    disk.mkdir()
    ballast = disk / "ballast"
    try:
        request = small_request(trajectory, layers=(1,), n_tokens=1000, contexts_per_shard=2)
        needed = activation_bytes(request, TINY.hidden_size)
        fill(ballast, free_bytes(disk) - needed // 2)
        with pytest.raises(StudyInputError, match=r"activation cache .* needs \d+\.\d MB more and its file system has"):
            check_space(request, disk, TINY.hidden_size)
        ballast.unlink()
        check_space(request, disk, TINY.hidden_size)  # room now

        units = disk / "activations" / request.cache_key()

        def fill_once_shards_land() -> None:
            deadline = time.time() + 120
            while time.time() < deadline and len(list(units.glob("build-*/units/*.json"))) < 2:
                time.sleep(0.02)
            fill(ballast, free_bytes(disk))

        watcher = threading.Thread(target=fill_once_shards_land)
        watcher.start()
        with pytest.raises(StudyInputError, match=r"no space left in .* while extracting activations \(\d+ of \d+"):
            ensure_activations(request, disk, progress=False)
        watcher.join()
        kept = {path.name: path.stat().st_mtime_ns for path in units.glob("build-*/units/*.json")}
        assert kept and not (units / "manifest.json").exists()
        ballast.unlink()
        cache = ensure_activations(request, disk, progress=False)
        assert cache.corrupt_units() == [] and cache.incomplete_units() == []
        after = {path.name: path.stat().st_mtime_ns for path in units.glob("build-*/units/*.json")}
        assert all(after[name] == written for name, written in kept.items())  # kept, not extracted again
    finally:
        shutil.rmtree(disk, ignore_errors=True)
