"""Files in a folder as a least-recently-used cache: one copy of the mechanism that the
thumbnail cache (:mod:`itrcli.show.thumbs`) and the re-ranker's feature cache
(:mod:`itrcli.store.feature_cache`) share.

Layout: ``<root>/<shard>/<name><suffix>``.  A write goes to a hidden temporary file in
the same folder, then is renamed into place, so a reader (another process included) sees
a whole file or none.  "Used" is the file's modification time, refreshed on each hit
(access times are unreliable under ``noatime``/``relatime``).  Trimming removes the least
recently used files; any of them may vanish meanwhile (a concurrent trim), which is not an
error.  Nothing here raises for a cache that cannot be written: the callers go on
uncached.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

#: A temporary file older than this is a crashed writer's, removed when listing.
STALE_TMP_SECONDS = 3600.0
TMP_SUFFIX = ".tmp"


def write_atomic(path: Path, data: bytes, *, sync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed over it (``sync``:
    on disk before the rename, so that a crash cannot leave a full-length file of zeros).
    Raises:
        OSError: the folder cannot be written (the temporary file is removed).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink(tmp)
        raise


def touch(path: Path) -> None:
    """Mark ``path`` as just used (best effort)."""
    try:
        os.utime(path)
    except OSError:
        pass


def entries(root: Path | None, suffix: str) -> list[tuple[float, int, str]]:
    """(last use, bytes, path) of every cached file under ``root``'s shard folders; the
    temporary files of writers that crashed long ago are removed on the way."""
    out: list[tuple[float, int, str]] = []
    if root is None:
        return out
    try:
        shards = [s.path for s in os.scandir(root) if s.is_dir(follow_symlinks=False)]
    except OSError:
        return out
    now = time.time()
    for shard in shards:
        try:
            files = list(os.scandir(shard))
        except OSError:
            continue
        for e in files:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:  # removed by a concurrent trim
                continue
            if e.name.startswith("."):
                if e.name.endswith(TMP_SUFFIX) and now - st.st_mtime > STALE_TMP_SECONDS:
                    unlink(e.path)
                continue
            if e.name.endswith(suffix):
                out.append((st.st_mtime, st.st_size, e.path))
    return out


def trim(found: list[tuple[float, int, str]], cap: int, target: int | None = None) -> tuple[int, int]:
    """When the files ``found`` (from :func:`entries`) hold more than ``cap`` bytes, remove
    the least recently used until at most ``target`` (default ``cap``) remain.
    Returns (files removed, bytes removed)."""
    total = sum(n for _, n, _ in found)
    if total <= cap:
        return 0, 0
    keep = cap if target is None else target
    count = removed = 0
    for _used, n, path in sorted(found):
        if total - removed <= keep:
            break
        if unlink(path):
            count, removed = count + 1, removed + n
    return count, removed


def unlink(path: str | os.PathLike) -> bool:
    """Remove a file; True when it is gone (also when a concurrent trim removed it first)."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False
