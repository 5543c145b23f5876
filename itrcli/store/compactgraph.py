"""A large graph file held compactly in memory, for a long-lived reader (``itr serve``).

A server searches thousands of times, so over the mapped file (:mod:`.graphfile`) it ends
up holding nearly every page of it: 2.2 GB at a million 512-d images, most of it the
vectors' float32.  :class:`CompactGraph` reads the file once and keeps what a search
walks: the level-0 links and deleted marks, the labels, the upper layers, and each vector
as int8 codes with its own scale (``x ~= scale * code``, the scale ``max|x| / 127``):
about 0.3 of the file (634 MiB at a million).  The walk is hnswlib's (:class:`HnswSearch`)
on the codes' distances; the beam's best are then scored again exactly, from the file's
own float32 read by offset (a read, not a mapping: the pages stay the page cache's), so
the scores are the file's, as a cold ``itr search`` gives them.

Which of the beam are scored again: a code's distance is off by at most ``scale / 2`` per
component; summed over a unit query that error has a standard deviation of
``scale / sqrt(12)``.  Every candidate whose code distance, less :data:`RESCORE_SIGMAS` of
its deviations, could still beat the worst of the first ``k`` (its code distance plus its
deviations) is read and scored: some tens at ef 1,024.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from .graphfile import DELETED, HEADER, GraphFile, GraphFileError, HnswSearch

#: Deviations of a code distance's error allowed for when choosing what to score again.
RESCORE_SIGMAS = 6.0
#: Level-0 records read from the file at a time while building (~36 MB at 512-d).
CHUNK = 16_384
#: A copy is made only while it takes at most this share of the memory the system has
#: free (past it the mapped file answers: its pages are the page cache's to drop).
FIT_SHARE = 0.5


def copy_size(g: GraphFile) -> int:
    """Bytes a :class:`CompactGraph` of the mapped file ``g`` would hold."""
    return g.count * (4 * (1 + g.max_m0) + g.dim + 4 + 8 + 1) + g._up.nbytes


def available_memory() -> int | None:
    """Bytes the system can give without swapping (Linux's MemAvailable), else its
    physical memory, else None (unknown)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def fits(g: GraphFile) -> bool:
    """Whether a copy of the mapped file ``g`` fits the memory the system has free."""
    free = available_memory()
    return free is None or copy_size(g) <= FIT_SHARE * free


class BuildCancelled(GraphFileError):
    """The copy was no longer wanted (its reader closed, the server stopping)."""


class CompactGraph(HnswSearch):
    """An hnswlib graph file (cosine space) read into int8 codes; searched like
    :class:`~itrcli.store.graphfile.GraphFile`, with exact scores.  Keeps the file open
    (a file a writer removes meanwhile stays readable) until :meth:`close`.

    ``cancel``: once set, the build stops at its next chunk of the file (a tenth of a
    second at most) with :class:`BuildCancelled`."""

    def __init__(self, path: str | os.PathLike, dim: int | None = None, *,
                 cancel: threading.Event | None = None) -> None:
        self.path = Path(path)
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise GraphFileError(f"cannot read: {e.strerror or e}") from None
        try:
            self._build(f, dim, cancel)
        except BaseException:
            f.close()
            raise
        self._file = f
        self._read_lock = threading.Lock()  # seek + read where there is no pread

    def _build(self, f, dim: int | None, cancel: threading.Event | None) -> None:
        g = GraphFile(self.path, dim, file=f)  # the header and upper layers, checked
        try:
            self.count, self.entry, self.maxlevel = g.count, g.entry, g.maxlevel
            self.dim, self._list_words, self._upper = g.dim, g._list_words, g._upper
            self._up = np.array(g._up)  # [words] the upper layers' lists, copied (small)
            n, words = g._w.shape
            vec, label, links = g._vec, g._label, 1 + g.max_m0
        finally:
            g.close()  # the mapping's pages leave this process
        self._rec = 4 * words  # bytes of one level-0 record
        self._vec_at = 4 * vec.start  # byte offset of the vector in a record
        self._links = np.empty((n, links), np.uint32)  # [n, 1 + maxM0] head, then links
        self._codes = np.empty((n, self.dim), np.int8)  # [n, dim]
        self._scale = np.empty(n, np.float32)  # [n]
        self._labels_arr = np.empty(n, np.int64)  # [n]
        buf = np.empty((min(n, CHUNK), words), "<u4")
        tmp = np.empty((min(n, CHUNK), self.dim), np.float32)
        f.seek(HEADER.size)
        for a in range(0, n, CHUNK):
            if cancel is not None and cancel.is_set():
                raise BuildCancelled("no longer wanted")
            m = min(CHUNK, n - a)
            part, t = buf[:m], tmp[:m]
            if f.readinto(memoryview(part).cast("B")) != part.nbytes:
                raise GraphFileError("truncated while reading")
            self._links[a:a + m] = part[:, :links]
            v = part.view("<f4")[:, vec]  # [m, dim]
            top = np.maximum(v.max(axis=1), -v.min(axis=1))  # [m] max |x|
            top[~(top > 0)] = 127.0  # a zero (or garbled) vector: codes of 0, scale 1
            with np.errstate(invalid="ignore"):
                np.multiply(v, (np.float32(127.0) / top)[:, None], out=t)
                np.rint(t, out=t)
                np.copyto(self._codes[a:a + m], t, casting="unsafe")
            self._scale[a:a + m] = top / np.float32(127.0)
            self._labels_arr[a:a + m] = (part[:, label].astype(np.int64)
                                         | (part[:, label + 1].astype(np.int64) << 32))
        # [n] not marked deleted: a byte an element, read by the walk for every neighbour it
        # scores (a megabyte at a million: it stays in the cache, where the links would not)
        self._alive = (self._links[:, 0] & DELETED) == 0

    def close(self) -> None:
        """Let go of the codes and the file (closing twice is harmless)."""
        self._links = self._codes = self._scale = self._labels_arr = self._up = None
        self._alive = None
        self._upper = {}
        f, self._file = getattr(self, "_file", None), None
        if f is not None:
            f.close()

    @property
    def nbytes(self) -> int:
        """Memory the copy holds."""
        return sum(a.nbytes for a in (self._links, self._codes, self._scale, self._labels_arr,
                                      self._alive, self._up))

    # -- what the walk reads (HnswSearch) ---------------------------------------------------
    def _dist(self, ids, q: np.ndarray) -> np.ndarray:
        """Code distances ``[len(ids)]`` (``1 -`` the dot product of codes times scale)."""
        codes = self._codes.take(ids, axis=0).astype(np.float32)  # [len(ids), dim]
        return np.float32(1.0) - (codes @ q) * self._scale.take(ids)

    def _links0(self, node: int) -> list[int]:
        row = self._links[node]
        return row[1: 1 + (int(row[0]) & 0xFFFF)].tolist()

    def _gather(self, new: list[int], q: np.ndarray):
        ids = np.asarray(new, dtype=np.intp)
        return self._dist(ids, q), ids

    def _usable(self, ids: np.ndarray, allowed) -> list[bool]:
        ok = self._alive[ids].tolist()
        if allowed is not None:
            ok = [o and allowed(lab) for o, lab in zip(ok, self._labels_arr[ids].tolist())]
        return ok

    def _is_usable(self, node: int, allowed) -> bool:
        return self._usable(np.asarray([node], dtype=np.intp), allowed)[0]

    def _labels(self, ids) -> np.ndarray:
        return self._labels_arr[ids]

    # -- the exact end ------------------------------------------------------------------------
    def _finish(self, top: list[tuple[float, int]], k: int, q: np.ndarray):
        """The beam's best ``k`` by exact distance, from those that could be among them."""
        if not top:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        ids = np.asarray([i for _, i in top], dtype=np.int64)  # [m]
        approx = -np.asarray([d for d, _ in top], dtype=np.float32)  # [m] code distances
        order = np.lexsort((ids, approx))
        ids, approx = ids[order], approx[order]
        err = np.float32(RESCORE_SIGMAS / np.sqrt(12.0)) * self._scale[ids]  # [m]
        kk = min(k, len(ids))
        bound = float((approx[:kk] + err[:kk]).max())  # the k-th exact distance is below it
        cand = ids[approx - err <= bound]  # [c] every one that could beat it (the first kk too)
        exact = np.float32(1.0) - self._vectors(cand) @ q  # [c] hnswlib's IP distance
        best = np.lexsort((cand, exact))[:k]  # nearest first, ties by id (as GraphFile)
        return self._labels_arr[cand[best]], exact[best].astype(np.float32)

    def _vectors(self, ids: np.ndarray) -> np.ndarray:
        """``[len(ids), dim]`` float32 of the file's records, read by offset."""
        size = 4 * self.dim
        out = np.empty((len(ids), self.dim), np.float32)
        starts = [HEADER.size + i * self._rec + self._vec_at for i in ids.tolist()]
        if hasattr(os, "pread"):
            fd = self._file.fileno()
            raw = [os.pread(fd, size, at) for at in starts]
        else:  # Windows: one reader at a time on the shared position
            with self._read_lock:
                raw = []
                for at in starts:
                    self._file.seek(at)
                    raw.append(self._file.read(size))
        for row, b in enumerate(raw):
            if len(b) != size:
                raise IndexError("the graph file is shorter than its records")
            out[row] = np.frombuffer(b, "<f4")
        return out


__all__ = ["BuildCancelled", "CompactGraph", "RESCORE_SIGMAS", "available_memory", "copy_size", "fits"]
