"""Reading an activation cache: checksummed shards, and a seeded stream of [batch, S, d_model] batches.

The cache lives on any ``study.storage`` location (local, shared filesystem, object store). Its
manifest, written last, names the build folder holding the files; a folder without a manifest
is not a cache. Every file is checked against the manifest's SHA-256 as it is read, so a corrupt
or truncated file is never used; ``study.activations.extraction.ensure_activations`` rebuilds files
that are missing or of the wrong size (it trusts the manifest and file sizes, and reads no shard).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from study.storage import Location

MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class CorruptShardError(RuntimeError):
    """A cache file does not match its checksum; the message names it and the fix."""


def dtype_of(name: str) -> torch.dtype:
    return DTYPES[name]


def stored_digest(location: Location) -> str | None:
    """SHA-256 of the file's bytes, None where it is missing."""
    try:
        return hashlib.sha256(location.read_bytes()).hexdigest()
    except (FileNotFoundError, OSError):
        return None


class ActivationCache:
    """A complete cache (one with a manifest) written by ``ensure_activations``, at a local path or URI.

    With ``stage``, a local folder (``--local-cache``), every file read is also kept there, under the
    cache's key and build, and later reads on this node take that copy: a shared folder or object
    store is read once per node, not once per trial and epoch. Staged copies are checked against the
    manifest like any read; a bad one is fetched again.
    """

    def __init__(self, folder: str | Path | Location, stage: str | Path | None = None):
        self.folder = folder if isinstance(folder, Location) else Location.of(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        # Caches from before builds had their own folder keep their files beside the manifest.
        self.files = self.folder / self.manifest["build"] if "build" in self.manifest else self.folder
        # A rebuilt cache has a new build folder, so a stage never serves files of an older build.
        self.staged = Path(stage) / self.folder.name / self.files.name if stage is not None else None

    @property
    def steps(self) -> list[int]:
        return self.manifest["steps"]

    @property
    def layers(self) -> list[int]:
        return self.manifest["layers"]

    @property
    def n_tokens(self) -> int:
        return self.manifest["n_tokens"]

    @property
    def d_model(self) -> int:
        return self.manifest["d_model"]

    @property
    def n_shards(self) -> int:
        return len(self.manifest["rows_per_shard"])

    def mean_norms(self, layer: int) -> list[float]:
        """Per snapshot, the mean norm of the layer's activations (the crosscoder's normalisation)."""
        return self.manifest["mean_norms"][str(layer)]

    def token_ids(self) -> np.ndarray:
        """[n_tokens] id of the token at each row (the same row in every snapshot)."""
        return self._read_verified("tokens.npy", self.manifest["token_files"]["tokens.npy"])

    def positions(self) -> np.ndarray:
        """[n_tokens] position of each row's token in its context (never 0)."""
        return self._read_verified("positions.npy", self.manifest["token_files"]["positions.npy"])

    def _read_verified(self, relative: str, digest: str) -> np.ndarray:
        if self.staged is not None and (copy := self.staged / relative).is_file():
            data = copy.read_bytes()
            if hashlib.sha256(data).hexdigest() == digest:
                return np.load(io.BytesIO(data))
        location = self.files / relative
        try:
            data = location.read_bytes()
        except (FileNotFoundError, OSError):
            data = b""
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptShardError(
                f"{location} is missing or does not match its checksum; delete it and run again: the extraction "
                "rebuilds missing shards"
            )
        if self.staged is not None:
            # Written aside and renamed, so a trial on the same node never reads a half-written copy.
            copy = self.staged / relative
            copy.parent.mkdir(parents=True, exist_ok=True)
            partial = copy.with_name(f"{copy.name}.{os.getpid()}.partial")
            partial.write_bytes(data)
            os.replace(partial, copy)
        return np.load(io.BytesIO(data))

    def shard(self, layer: int, index: int, snapshots: list[int] | None = None) -> torch.Tensor:
        """[rows of shard ``index``, S, d_model] in the stored dtype, every file verified."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not in this cache (layers {self.layers})")
        columns = []
        for snapshot in snapshots if snapshots is not None else range(len(self.steps)):
            relative = f"layer{layer}/step{self.steps[snapshot]}/shard{index:05d}.npy"
            columns.append(torch.from_numpy(self._read_verified(relative, self.manifest["files"][relative])))
        stacked = torch.stack(columns, dim=1)
        return stacked.view(torch.bfloat16) if self.manifest["dtype"] == "bfloat16" else stacked

    def unit_of(self, relative: str) -> tuple[int, int]:
        """(snapshot index, shard) of a shard file ``layer<L>/step<N>/shard<K>.npy``."""
        _, step, shard = relative.split("/")
        return self.steps.index(int(step[4:])), int(shard[5:10])

    def corrupt_units(self) -> list[tuple[int, int]]:
        """(snapshot, shard) units with a file that is missing or fails its checksum: reads every file."""
        files = self.manifest["files"].items()
        return sorted(
            {self.unit_of(relative) for relative, digest in files if stored_digest(self.files / relative) != digest}
        )

    def incomplete_units(self) -> list[tuple[int, int]]:
        """(snapshot, shard) units with a file that is missing or not of its recorded size: reads no file body,
        and lists the build folder once, so a complete cache of any size costs one listing."""
        sizes = self.manifest.get("sizes", {})  # caches written before sizes were recorded: presence only
        stored = self.files.file_sizes()
        bad = {
            self.unit_of(relative)
            for relative in self.manifest["files"]
            if (size := stored.get(relative)) is None or size != sizes.get(relative, size)
        }
        return sorted(bad)

    def load(self, layer: int) -> torch.Tensor:
        """All rows, [n_tokens, S, d_model] float32, in memory: for small caches and notebooks."""
        return torch.cat([self.shard(layer, index) for index in range(self.n_shards)]).float()

    def batches(
        self,
        layer: int,
        batch_size: int,
        seed: int,
        epochs: int | None = None,
        snapshots: list[int] | None = None,
        shards: list[int] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Float32 batches [batch_size, S, d_model], shuffled by ``seed``: shard order per epoch, rows within.

        Holds one shard and the remainder of the last at a time, so memory does not grow with
        the cache. ``epochs=None`` repeats forever (the trainer stops after its steps);
        ``shards`` limits the stream to those shards (e.g. to keep others held out).
        """
        generator = torch.Generator().manual_seed(seed)
        chosen = list(range(self.n_shards)) if shards is None else list(shards)

        def blocks() -> Iterator[torch.Tensor]:
            epoch = 0
            while epochs is None or epoch < epochs:
                for position in torch.randperm(len(chosen), generator=generator).tolist():
                    yield self.shard(layer, chosen[position], snapshots)
                epoch += 1

        return rebatch(blocks(), batch_size, generator)


def rebatch(blocks: Iterator[torch.Tensor], batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Full float32 batches from blocks of rows: each block shuffled, its remainder carried into the next."""
    carry = None
    for rows in blocks:
        rows = rows[torch.randperm(len(rows), generator=generator)]
        if carry is not None:
            rows = torch.cat([carry, rows])
        full = len(rows) // batch_size * batch_size
        for start in range(0, full, batch_size):
            yield rows[start : start + batch_size].float()
        carry = rows[full:]
