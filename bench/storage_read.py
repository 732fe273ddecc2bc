"""What reading the activation cache through ``study.storage`` costs, against bare ``np.load`` of the
same files, measured in one run on this machine.

    python bench/storage_read.py CACHE_FOLDER [--uri file:///...]

CACHE_FOLDER is one cache (``<cache>/activations/<key>``, the folder holding ``manifest.json``).
Reads every shard of its first layer three ways: ``np.load`` on the paths (no checksum), the
cache reader on the local path (pyarrow's local filesystem, SHA-256 of every file), and the
reader on a URI (``file://`` of the same folder by default, or ``--uri``, e.g. an ``s3://`` copy),
and the reader on that URI with a node-local stage (``--local-cache``): its first pass, which fills
the stage, and a later pass, which reads the staged copies.
Then what a request for the complete cache costs (``ActivationCache.incomplete_units``, the check
``ensure_activations`` makes before returning it): its time against one full read, and how many
bytes of file bodies it reads (every ``Location.read_bytes`` call counted).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from study.activations.cache import ActivationCache
from study.storage import Location


def rows_per_second(read: Callable[[], int]) -> tuple[float, int]:
    read()  # warm the page cache, so that every way reads from memory
    started = time.perf_counter()
    rows = read()
    return rows / (time.perf_counter() - started), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", help="a cache folder holding manifest.json")
    parser.add_argument("--uri", help="the same cache behind a URI (default: file:// of CACHE)")
    args = parser.parse_args()
    folder = Path(args.cache).resolve()
    cache = ActivationCache(folder)
    layer = cache.layers[0]
    files = Path(cache.files.path)

    def bare() -> int:
        rows = 0
        for index in range(cache.n_shards):
            columns = [np.load(files / f"layer{layer}/step{step}/shard{index:05d}.npy") for step in cache.steps]
            rows += len(columns[0])
        return rows

    def through(spec: str, stage: Path | None = None) -> Callable[[], int]:
        def read() -> int:  # one reader per pass, as a trial opens its cache once
            reader = ActivationCache(spec, stage=stage)
            return sum(len(reader.shard(layer, index)) for index in range(cache.n_shards))

        return read

    print(
        f"{cache.n_tokens} rows x {len(cache.steps)} snapshots x d_model {cache.d_model}, layer {layer}, {cache.n_shards} shards"
    )
    baseline, _ = rows_per_second(bare)
    print(f"bare np.load, no checksum:   {baseline:12,.0f} rows/s")
    speeds = {}
    for name, spec in (("reader, local path", str(folder)), ("reader, URI", args.uri or f"file://{folder}")):
        speeds[name], rows = rows_per_second(through(spec))
        assert rows == cache.n_tokens
        print(f"{name:<28} {speeds[name]:12,.0f} rows/s = {speeds[name] / baseline:.2f} x bare")
    uri = args.uri or f"file://{folder}"
    with tempfile.TemporaryDirectory() as stage:
        started = time.perf_counter()
        filled = through(uri, Path(stage))()
        fill_speed = filled / (time.perf_counter() - started)
        staged_speed, _ = rows_per_second(through(uri, Path(stage)))
    for name, speed in (("reader, URI, filling stage", fill_speed), ("reader, URI, staged", staged_speed)):
        print(
            f"{name:<28} {speed:12,.0f} rows/s = {speed / baseline:.2f} x bare = {speed / speeds['reader, URI']:.2f} x URI"
        )

    body_bytes = 0
    read_bytes = Location.read_bytes

    def counted(location: Location) -> bytes:
        nonlocal body_bytes
        data = read_bytes(location)
        body_bytes += len(data)
        return data

    Location.read_bytes = counted
    try:
        started = time.perf_counter()
        incomplete = ActivationCache(args.uri or str(folder)).incomplete_units()
        check_seconds = time.perf_counter() - started
    finally:
        Location.read_bytes = read_bytes
    total_bytes = sum(cache.manifest["sizes"].values())
    # One full read: every layer at the local reader's rate measured above.
    full_read_seconds = cache.n_tokens / speeds["reader, local path"] * len(cache.layers)
    print(
        f"request for the complete cache ({total_bytes / 1e9:.2f} GB in {len(cache.manifest['files'])} files): "
        f"{check_seconds:.3f} s = {check_seconds / full_read_seconds:.4f} x one full read; file bodies read: "
        f"{body_bytes:,} bytes (the manifest); {len(incomplete)} incomplete units"
    )


if __name__ == "__main__":
    main()
