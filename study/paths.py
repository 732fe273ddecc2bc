"""Where the harness keeps what it builds once and reuses."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from study.storage import Location

CACHE_ENV = "CROSSCODER_STUDY_CACHE"


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """The local cache folder: ``override``, else ``$CROSSCODER_STUDY_CACHE``, else the user's cache dir.

    Models must be local for ``from_pretrained``: where ``override`` is a URI (it then holds only the
    activations, see ``cache_location``), trajectories and model curves stay in the local default."""
    if override and "://" not in str(override):
        return Path(override).expanduser().resolve()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser().resolve() / "crosscoder-study"


def cache_location(override: str | os.PathLike | None = None) -> Location:
    """Like ``cache_root``, but ``override`` may also be a URI (``s3://bucket/prefix``, ``file:///abs``)."""
    if override and "://" in str(override):
        return Location.of(str(override))
    return Location.of(cache_root(override))


def build_once(folder: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """Return ``folder``, first calling ``build(partial)`` unless ``folder/marker`` exists.

    ``build`` writes into a private folder (``marker`` last) that is renamed into place, so a crash
    or a concurrent build never leaves a half-written folder where readers look; the lock makes
    concurrent callers wait for one build instead of repeating it.
    """
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / marker).is_file():
            return folder
        partial = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            build(partial)
            os.replace(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return folder
