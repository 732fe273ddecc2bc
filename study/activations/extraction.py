"""Activation extraction on Ray Data into a shared, resumable, verifiable cache.

One request (trajectory, layers, corpus, token budget, context length, seed, dtype) names one
cache folder by its digest. Its work is split into units of (snapshot, shard): a Ray Data actor
pool runs each unit, the actor loading the snapshot (and keeping it for the next unit) and running
the model only up to the deepest requested layer, then writing one ``.npy`` file per layer.

The cache may live on a local disk, a shared filesystem or an object store (``--cache-dir
s3://bucket/prefix``; see ``study.storage``). Layout under ``<cache>/activations/``::

    <key>/manifest.json                         written last: names the build; readers trust nothing else
    <key>/<build>/tokens.npy, positions.npy     token id and position in its context of every row
    <key>/<build>/layer<L>/step<N>/shard<K>.npy [rows of shard K, d_model] float16 (bfloat16 as uint16)
    <key>/<build>/units/<snapshot>-<shard>.json a finished unit's files and digests (a killed build resumes)
    <key>.lock                                  on filesystems: one builder at a time, the others reuse its result
    <key>.lease                                 on object stores: the same, by a renewed lease (``lease.py``)

Each build writes under its own folder (``build-<random>``), so that should two builders ever
run at once (a lease taken over from a builder that was only slow) they never mix files; whichever
manifest lands last wins, and both are whole.

Over 300 lines on purpose: the Ray Data job, its units, its resumable records and its cache manifest form one protocol.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import ray
import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import AutoConfig

from study.activations.cache import MANIFEST, ActivationCache, dtype_of, stored_digest
from study.activations.contexts import corpus_fingerprint, sample_contexts
from study.activations.lease import ObjectLease
from study.activations.residual import check_layers, residual_stream
from study.errors import StudyInputError
from study.lm.trajectory import (
    Snapshot,
    Trajectory,
    explained_load_errors,
    load_model,
    load_tokenizer,
    snapshot_fingerprint,
)
from study.paths import cache_location
from study.ray_runtime import ensure_ray
from study.storage import Location

UNITS = "units"


@dataclass(frozen=True)
class ActivationRequest:
    """Everything that changes the extracted activations; its digest names the cache folder."""

    trajectory: Trajectory
    """The snapshots, in order."""
    layers: tuple[int, ...] = (2,)
    """Residual-stream layers: 0 is the embedding output, l the output of block l."""
    corpus: str = "embedded"
    """``embedded`` or a .txt / .jsonl / .parquet file."""
    n_tokens: int = 100_000
    """Activation rows wanted (rounded up to whole contexts)."""
    context_length: int = 64
    """Tokens per context; the first position of each is left out."""
    seed: int = 0
    """Seed of the context sample."""
    dtype: str = "float16"
    """Storage dtype: float16 or bfloat16."""
    contexts_per_shard: int = 128
    """Contexts per shard file: the unit of work, of resumption and of verification."""
    batch_size: int = 32
    """Contexts per forward pass (does not change the data, so it is not part of the key)."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "bfloat16"):
            raise StudyInputError(f"activation dtype '{self.dtype}' is not supported; use float16 or bfloat16")
        for name in ("n_tokens", "contexts_per_shard", "batch_size"):
            if getattr(self, name) <= 0:
                raise StudyInputError(f"{name} must be positive, got {getattr(self, name)}")

    @cached_property
    def snapshot_contents(self) -> list[str]:
        """What each snapshot holds (``snapshot_fingerprint``), computed once per request."""
        return [snapshot_fingerprint(snapshot) for snapshot in self.trajectory.snapshots]

    def cache_key(self) -> str:
        fields = {
            "snapshots": [str(snapshot) for snapshot in self.trajectory.snapshots],
            # A checkpoint re-written in place (a re-run, a fix) is new data under the same name.
            "snapshot_contents": self.snapshot_contents,
            "layers": sorted(self.layers),
            "corpus": corpus_fingerprint(self.corpus),
            "n_tokens": self.n_tokens,
            "context_length": self.context_length,
            "seed": self.seed,
            "dtype": self.dtype,
            "contexts_per_shard": self.contexts_per_shard,
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def shard_path(layer: int, step: int, shard: int) -> str:
    return f"layer{layer}/step{step}/shard{shard:05d}.npy"


def npy_bytes(array: torch.Tensor) -> bytes:
    """``.npy`` bytes of ``array``; bfloat16 is stored as its uint16 bit patterns (numpy has no bfloat16)."""
    if array.dtype == torch.bfloat16:
        array = array.view(torch.uint16)
    buffer = io.BytesIO()
    np.save(buffer, array.numpy())
    return buffer.getvalue()


def unit_name(snapshot: int, shard: int) -> str:
    return f"{UNITS}/{snapshot}-{shard}.json"


def shard_rows(
    model: torch.nn.Module, contexts: torch.Tensor, layers: list[int], batch_size: int, device: str
) -> dict[int, torch.Tensor]:
    """Per layer, float32 [contexts x (context_length - 1), d_model]: one shard's rows of one snapshot,
    the first position of each context left out. Extraction and streaming both call it, so a streamed
    shard is the cached one bit for bit."""
    pieces: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(contexts), batch_size):
        batch = contexts[start : start + batch_size].to(device)
        states = residual_stream(model, batch, layers)  # type: ignore[arg-type]  # any causal LM of transformers
        for layer in layers:
            pieces[layer].append(states[layer][:, 1:].flatten(0, 1).float().cpu())
    return {layer: torch.cat(rows) for layer, rows in pieces.items()}


class ShardExtractor:
    """Ray Data actor: runs (snapshot, shard) units, keeping the last snapshot's model loaded."""

    def __init__(
        self, snapshots: list[Snapshot], contexts: np.ndarray, request: dict, build: str, threads: int, use_gpu: bool
    ):
        torch.set_num_threads(threads)
        self.snapshots, self.contexts, self.request, self.build = (
            snapshots,
            torch.from_numpy(contexts),
            request,
            Location.of(build),
        )
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.loaded_index: int | None = None
        self.model: torch.nn.Module | None = None

    def model_for(self, index: int):
        if index != self.loaded_index:
            self.model = load_model(self.snapshots[index], device=self.device)
            self.loaded_index = index
        return self.model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = []
        for snapshot_index, shard in zip(batch["snapshot"].tolist(), batch["shard"].tolist()):
            records.append(json.dumps(self.extract(snapshot_index, shard)))
        return {"record": np.array(records)}

    def extract(self, snapshot_index: int, shard: int) -> dict:
        request, layers = self.request, self.request["layers"]
        per_shard = request["contexts_per_shard"]
        contexts = self.contexts[shard * per_shard : (shard + 1) * per_shard]
        model = self.model_for(snapshot_index)
        by_layer = shard_rows(model, contexts, layers, request["batch_size"], self.device)
        step = self.snapshots[snapshot_index].step
        files, sizes, norm_sums = {}, {}, {}
        for layer, rows in by_layer.items():
            data = npy_bytes(rows.to(dtype_of(request["dtype"])))
            relative = shard_path(layer, step, shard)
            (self.build / relative).write_bytes(data)
            files[relative] = hashlib.sha256(data).hexdigest()
            sizes[relative] = len(data)
            norm_sums[str(layer)] = rows.norm(dim=-1).double().sum().item()
        record = {
            "snapshot": snapshot_index,
            "shard": shard,
            "rows": len(contexts) * (contexts.shape[1] - 1),
            "files": files,
            "sizes": sizes,
            "norm_sums": norm_sums,
        }
        # Written after the unit's files, where every node can see it: a killed build resumes from these.
        (self.build / unit_name(snapshot_index, shard)).write_text(json.dumps(record))
        return record


def extraction_plan() -> tuple[int, float, int]:
    """(actors, GPUs per actor, torch threads per actor) from the cluster's resources.

    One actor per GPU where there are GPUs. On CPUs, one CPU stays free for Ray Data's own tasks
    (a pool that takes every CPU hangs), and each actor's torch threads share the rest.
    """
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    if gpus:
        return gpus, 1.0, max(1, cpus // gpus - 1)
    actors = max(1, (cpus - 1) // 2)
    return actors, 0.0, max(1, cpus // actors)


def completed_units(build: Location) -> dict[tuple[int, int], dict]:
    """Units recorded as finished whose files are all present with the recorded size (a unit's record is
    written after its files, so a present file of the right size is a whole one; checksums are checked on
    reading)."""
    done = {}
    stored = build.file_sizes()  # one listing, not a metadata call per file
    for unit in (build / UNITS).children():
        record = json.loads(unit.read_text())
        if "sizes" in record:
            whole = all(stored.get(path) == size for path, size in record["sizes"].items())
        else:  # a unit from before sizes were recorded: its files' digests
            whole = all(stored_digest(build / path) == digest for path, digest in record["files"].items())
        if whole:
            done[(record["snapshot"], record["shard"])] = record
    return done


def run_units(
    request: ActivationRequest, contexts: torch.Tensor, units: list[tuple[int, int]], build: Location, progress: bool
) -> list[dict]:
    """Extract ``units`` with a Ray Data actor pool; each record is logged as soon as it arrives."""
    ensure_ray()
    actors, gpus_per_actor, threads = extraction_plan()
    request_fields = {
        "layers": sorted(request.layers),
        "contexts_per_shard": request.contexts_per_shard,
        "batch_size": request.batch_size,
        "dtype": request.dtype,
    }
    # Sorted by snapshot, so that an actor mostly finds the model it already holds.
    items = [{"snapshot": snapshot, "shard": shard} for snapshot, shard in sorted(units)]
    dataset = ray.data.from_items(items).map_batches(
        ShardExtractor,
        fn_constructor_kwargs={
            "snapshots": list(request.trajectory.snapshots),
            "contexts": contexts.numpy(),
            "request": request_fields,
            "build": build.uri,
            "threads": threads,
            "use_gpu": gpus_per_actor > 0,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=gpus_per_actor,
        batch_size=1,
        batch_format="numpy",
    )
    records = []
    bar = tqdm(total=len(items), desc="extracting activations", unit="shard", disable=not progress)
    for batch in dataset.iter_batches(batch_size=1, batch_format="numpy"):
        for text in batch["record"].tolist():
            records.append(json.loads(text))
            bar.update()
    bar.close()
    return records


def write_manifest(
    folder: Location,
    build: Location,
    request: ActivationRequest,
    records: dict[tuple[int, int], dict],
    token_files: dict[str, str],
    n_shards: int,
    d_model: int,
) -> None:
    steps = request.trajectory.steps
    files = {path: digest for record in records.values() for path, digest in record["files"].items()}
    sizes = {path: size for record in records.values() for path, size in record.get("sizes", {}).items()}
    rows_per_shard = [records[(0, shard)]["rows"] for shard in range(n_shards)]
    n_rows = sum(rows_per_shard)
    mean_norms = {
        str(layer): [
            sum(records[(s, k)]["norm_sums"][str(layer)] for k in range(n_shards)) / n_rows for s in range(len(steps))
        ]
        for layer in sorted(request.layers)
    }
    manifest = {
        "cache_key": request.cache_key(),
        "build": build.name,
        "trajectory": request.trajectory.name,
        "snapshots": [str(snapshot) for snapshot in request.trajectory.snapshots],
        "snapshot_contents": request.snapshot_contents,
        "steps": steps,
        "layers": sorted(request.layers),
        "corpus": request.corpus,
        "n_tokens": n_rows,
        "context_length": request.context_length,
        "seed": request.seed,
        "dtype": request.dtype,
        "d_model": d_model,
        "rows_per_shard": rows_per_shard,
        "mean_norms": mean_norms,
        "files": files,
        "sizes": sizes,
        "token_files": token_files,
        "built_by": f"{socket.gethostname()}:{os.getpid()}",
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def build_lock(root: Location, key: str) -> FileLock | ObjectLease:
    """One builder at a time: a file lock where the cache is on a filesystem, a lease object beside
    the cache's folder on an object store (``study.activations.lease``)."""
    if root.is_local:
        root.filesystem.create_dir(root.path, recursive=True)
        return FileLock(f"{root.path}/{key}.lock")
    return ObjectLease(root / f"{key}.lease")


def unfinished_build(folder: Location) -> Location:
    """The build folder to continue: the one with the most finished units, or a new one."""
    builds = [child for child in folder.children() if child.name.startswith("build-")]
    if builds:
        return max(builds, key=lambda build: len((build / UNITS).children()))
    return folder / f"build-{uuid.uuid4().hex[:12]}"


def activation_bytes(request: ActivationRequest, d_model: int) -> int:
    """Bytes the request's cache holds: its rows (whole contexts) at every snapshot and layer, in 2-byte floats,
    and each row's token id and position."""
    rows_per_context = request.context_length - 1
    rows = -(-request.n_tokens // rows_per_context) * rows_per_context
    return rows * (len(request.trajectory.snapshots) * len(request.layers) * d_model * 2 + 6)


def free_bytes(path: Path) -> int:
    """Free bytes of the file system ``path`` is (or would be) on."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_space(request: ActivationRequest, cache_dir: str | Path | None, d_model: int) -> None:
    """Before Ray starts: a local cache's file system must hold what the request still needs (on an object store
    a write that does not fit fails as its store says)."""
    location = cache_location(cache_dir)
    if not location.is_local:
        return
    folder = Path(location.path) / "activations" / request.cache_key()
    if (folder / MANIFEST).is_file():
        return  # built: at most a damaged file to rewrite
    written = sum(path.stat().st_size for path in folder.rglob("*.npy")) if folder.is_dir() else 0
    needed, free = activation_bytes(request, d_model) - written, free_bytes(folder)
    if needed > free:
        raise StudyInputError(
            f"the activation cache {folder.parent} needs {needed / 1e6:.1f} MB more and its file system has "
            f"{free / 1e6:.1f} MB free: free space there, or choose --cache-dir elsewhere"
        )


def no_space_left(error: BaseException) -> bool:
    """Whether a disk filled up somewhere under ``error`` (Ray Data wraps a UDF's OSError in its own exceptions)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if (isinstance(current, OSError) and current.errno == errno.ENOSPC) or "No space left on device" in str(
            current
        ):
            return True
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return False


def ensure_activations(
    request: ActivationRequest, cache_dir: str | Path | None = None, progress: bool = True
) -> ActivationCache:
    """The request's cache, extracted first where missing, resumed where partial, repaired where a file is
    missing or of the wrong size. A complete cache costs one listing of its build folder: no shard is read here
    (readers check each shard's checksum as they read it)."""
    root = cache_location(cache_dir) / "activations"
    key = request.cache_key()
    folder = root / key
    if (folder / MANIFEST).is_file() and not ActivationCache(folder).incomplete_units():
        return ActivationCache(folder)
    with build_lock(root, key):
        build = None
        if (folder / MANIFEST).is_file():
            cache = ActivationCache(folder)
            if not cache.incomplete_units():
                return cache  # another process built or repaired it while we waited
            if "build" in cache.manifest:
                build = cache.files  # rebuild only the units with a missing or short file, in place
        build = build or unfinished_build(folder)
        snapshot = request.trajectory.snapshots[-1]
        with explained_load_errors(snapshot):
            config = AutoConfig.from_pretrained(snapshot.source, revision=snapshot.revision)
        check_layers(request.layers, config.num_hidden_layers, request.trajectory.name)
        contexts = sample_contexts(
            load_tokenizer(snapshot), request.corpus, request.context_length, request.n_tokens, request.seed
        )
        token_ids = contexts[:, 1:].reshape(-1)
        positions = torch.arange(1, request.context_length).repeat(len(contexts))
        token_files = {}
        for name, values in (("tokens.npy", token_ids.to(torch.int32)), ("positions.npy", positions.to(torch.int16))):
            data = npy_bytes(values)
            (build / name).write_bytes(data)
            token_files[name] = hashlib.sha256(data).hexdigest()

        n_shards = -(-len(contexts) // request.contexts_per_shard)
        done = completed_units(build)
        pending = [
            (s, k) for s in range(len(request.trajectory.snapshots)) for k in range(n_shards) if (s, k) not in done
        ]
        if pending:
            try:
                records = run_units(request, contexts, pending, build, progress)
            except Exception as error:
                if not no_space_left(error):
                    raise
                units = len(request.trajectory.snapshots) * n_shards
                written = len(completed_units(build))
                raise StudyInputError(
                    f"no space left in {root} while extracting activations ({written} of {units} shards written "
                    f"and kept; the whole cache takes {activation_bytes(request, config.hidden_size) / 1e6:.1f} MB): "
                    "free space there or choose --cache-dir elsewhere, then run the same command: it resumes"
                ) from None
            for record in records:
                done[(record["snapshot"], record["shard"])] = record
        write_manifest(folder, build, request, done, token_files, n_shards, config.hidden_size)
    return ActivationCache(folder)
