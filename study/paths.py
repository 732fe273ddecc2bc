"""Where the harness keeps what it builds once and reuses."""

from __future__ import annotations

import os
from pathlib import Path

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
