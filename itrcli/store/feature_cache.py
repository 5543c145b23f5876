"""The re-ranker's feature cache: the vision tower's output per image, on disk, bounded.

``itr search --rerank`` runs the re-ranker's vision tower on each of the top K images
(about 3.1 of 4.0 CPU-seconds per image for BLIP base in fp32); its output depends only on
the image's content, the model and the precision, not on the query.  Refining a query over
the same top results reuses it from here.

Layout: ``$XDG_CACHE_HOME/itr/rerank/<namespace digest>/<content hash>.npy``, one ``.npy``
per image in the compute dtype (so a hit gives exactly the scores of a miss), where the
namespace names the model, its revision, the precision, the device type and the decoder.
Writes go to a temporary file, synced, then renamed into place, so a reader (another
process included) sees a whole file or none; a file that does not load, or loads with the
wrong shape or dtype, is ignored and replaced.  A hit refreshes the file's modification time; after writing, the
least recently used files are removed until the cache holds at most ``max_bytes``
(``$ITR_RERANK_CACHE_BYTES``, default 1 GiB; 0 disables the cache).

No SQL: the file system is the index (a cache of a few hundred to a few thousand files).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np

from .. import lrufiles
from ..errors import UsageError
from ..paths import cache_dir

#: Default bound: about 600 BLIP base images in fp32 (1.7 MB each), 1200 in fp16/bf16.
DEFAULT_MAX_BYTES = 1 << 30
ENV = "ITR_RERANK_CACHE_BYTES"
SUFFIX = ".npy"

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"1073741824"``, ``"512M"``, ``"1G"``, ``"1.5GiB"`` -> bytes (binary units).
    Raises UsageError naming the variable on anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise UsageError(f"{ENV}={text!r}: expected a number of bytes such as 1073741824, "
                         "512M or 2G (0 disables the re-rank cache)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def max_bytes_from_env() -> int:
    """``$ITR_RERANK_CACHE_BYTES`` in bytes, else :data:`DEFAULT_MAX_BYTES`."""
    v = os.environ.get(ENV, "").strip()
    return parse_bytes(v) if v else DEFAULT_MAX_BYTES


def default_root() -> Path:
    return cache_dir() / "rerank"


class FeatureCache:
    """Arrays keyed by (namespace, content hash), one ``.npy`` file each, trimmed
    least-recently-used to ``max_bytes``.

    Args:
        root: the cache directory (created on the first write).
        max_bytes: the bound; at least one entry's size for anything to be kept.
    """

    def __init__(self, root: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = self.writes = 0
        self.error: str | None = None  #: the first write error (the cache never fails a run)

    @classmethod
    def from_env(cls) -> "FeatureCache | None":
        """The default cache bounded by ``$ITR_RERANK_CACHE_BYTES``; None when that is 0."""
        n = max_bytes_from_env()
        return cls(default_root(), n) if n > 0 else None

    def _path(self, namespace: str, key: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{8,128}", key):
            raise ValueError(f"not a content hash: {key!r}")
        ns = hashlib.blake2b(namespace.encode(), digest_size=8).hexdigest()
        return self.root / ns / (key + SUFFIX)

    def get(self, namespace: str, key: str, shape: tuple[int, ...], dtype) -> np.ndarray | None:
        """The array stored under (namespace, key) if it loads whole with ``shape`` and
        ``dtype``; None otherwise (absent, truncated, corrupt or of another shape: the
        next :meth:`put` replaces it)."""
        path = self._path(namespace, key)
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            self.misses += 1
            return None
        if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
            self.misses += 1
            return None
        lrufiles.touch(path)  # the last use, for least-recently-used trimming
        self.hits += 1
        return arr

    def put(self, namespace: str, key: str, arr: np.ndarray) -> None:
        """Store ``arr`` under (namespace, key): written to a temporary file, synced, then
        renamed over any previous entry (atomic: readers see the old file or the new one;
        synced, since after a crash a full-length file of zeros would pass the shape
        check: milliseconds against seconds of compute)."""
        if arr.nbytes + 128 > self.max_bytes:
            return  # could never be kept
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        try:
            lrufiles.write_atomic(self._path(namespace, key), buf.getvalue(), sync=True)
            self.writes += 1
        except OSError as e:
            self.error = self.error or f"{self.root}: {e.strerror or e}"

    def entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, path) of every entry; other processes may remove any of them
        meanwhile, so a vanished one is simply not listed."""
        return lrufiles.entries(self.root, SUFFIX)

    def size(self) -> int:
        """Bytes the entries hold now."""
        return sum(b for _, b, _ in self.entries())

    def trim(self) -> int:
        """Remove the least recently used entries until at most ``max_bytes`` remain.
        Returns the bytes removed (concurrent trims may each remove some)."""
        return lrufiles.trim(self.entries(), self.max_bytes)[1]
