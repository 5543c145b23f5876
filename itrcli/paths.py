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


#: Windows' classic limit on a path's length (MAX_PATH, less the terminating NUL).
WINDOWS_MAX_PATH = 259


def long_path(path: str, *, windows: bool | None = None) -> str:
    """``path`` as the system calls can open it: on Windows an absolute path longer than
    :data:`WINDOWS_MAX_PATH` gets the ``\\\\?\\`` prefix (``\\\\?\\UNC\\`` for a network
    share), which lifts the limit when the system's long-path setting is off; elsewhere,
    and for short paths, ``path`` unchanged.  ``windows``: decide as on that system
    (default: this one)."""
    if windows is None:
        windows = os.name == "nt"
    if not windows or len(path) <= WINDOWS_MAX_PATH or path.startswith("\\\\?\\"):
        return path
    import ntpath

    full = ntpath.normpath(path)
    if full.startswith("\\\\"):  # \\server\share\...
        return "\\\\?\\UNC\\" + full[2:]
    return "\\\\?\\" + full


def under(path: str, roots, *, pathmod=os.path) -> bool:
    """Whether ``path`` is one of ``roots`` or inside one of them (absolute paths).  With
    ``ntpath`` (Windows) the comparison ignores case and takes ``/`` for ``\\``, as the
    file system does."""
    p = pathmod.normcase(path)
    sep = pathmod.sep
    for r in roots:
        r = pathmod.normcase(r)
        if p == r or p.startswith(r.rstrip(sep) + sep) or (r.endswith(sep) and p.startswith(r)):
            return True
    return False
