"""Where things live on disk: the default library and the cache."""

from __future__ import annotations

import os
from pathlib import Path


def default_library_dir() -> Path:
    """``$ITR_DB`` if set, else ``$XDG_DATA_HOME/itr`` (``~/.local/share/itr``)."""
    env = os.environ.get("ITR_DB")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "itr"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/itr`` (``~/.cache/itr``): the eval embedding cache and the
    re-ranker's feature cache live here."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "itr"
