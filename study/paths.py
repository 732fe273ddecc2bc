"""Where the harness keeps what it builds once and reuses."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "CROSSCODER_STUDY_CACHE"


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``override``, else ``$CROSSCODER_STUDY_CACHE``, else the user's cache dir."""
    if override:
        return Path(override).expanduser().resolve()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser().resolve() / "crosscoder-study"
