"""The HNSW vector index (hnswlib, cosine space): a cache derived from the store.

The index lives in ``<library>/hnsw/<seq>.bin`` where ``seq`` is the last
``vector_log`` entry it contains; the number is in the file name so that the graph and
the point it reflects are replaced together by one atomic ``rename``.  Opening replays any
newer log entries (a run killed before saving), in memory for readers; the writer saves.
A one-off search maps the file instead of loading it (:meth:`VectorIndex.open_mapped`,
:mod:`itrcli.store.graphfile`) when the file is up to date with the store; a long-lived
reader of a large graph searches its compact copy (:mod:`itrcli.store.compactgraph`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from ..constants import GRAPH_DIR
from ..errors import LibraryError
from .db import Store, fsync_dir

#: HNSW build parameters (hnswlib names).  M=16 and ef_construction=200 are the usual
#: quality/size balance for 512-d CLIP vectors.
M = 16
EF_CONSTRUCTION = 200
#: Search-time ``ef`` of a library that has not been measured (see :func:`calibrate`);
#: never below ``4 * k``.
EF_SEARCH = 128
#: :func:`calibrate` picks the smallest of these whose recall@10 reaches RECALL_TARGET.
EF_LADDER = (64, 128, 256, 512, 1024, 2048)
RECALL_TARGET = 0.99
#: Calibration queries: stored vectors turned to this cosine in a random direction.  A
#: caption scores about 0.3 against its image in CLIP-style models, and such far-off,
#: noisy queries are the hard case for a graph (a stored vector as query is easy).
TEXT_LIKE_COSINE = 0.3
CALIBRATION_QUERIES = 200
#: Measure again when the library has grown or shrunk by more than this since.
RECALIBRATE_CHANGE = 0.2
_FILE = re.compile(r"^(\d+)\.bin$")


def graph_files(directory: Path | str) -> tuple[list[tuple[int, Path]], list[Path]]:
    """The library's graph files: (``(seq, path)`` of saved graphs, oldest first; temporary
    files of saves that were killed).  This module owns ``hnsw/`` and its file names."""
    d = Path(directory) / GRAPH_DIR
    try:
        names = os.listdir(d)
    except OSError:
        return [], []
    saved = sorted((int(m.group(1)), d / n) for n in names if (m := _FILE.match(n)))
    temps = sorted(d / n for n in names if n.startswith(".") and n.endswith(".tmp"))
    return saved, temps


#: A long-lived reader (``itr serve``) loads the graph whole up to this file size (hnswlib
#: then searches several times faster than the mapped file is searched): about 230,000
#: 512-d images.  Past it, it searches the file's compact copy (int8 codes, a third of the
#: file: 634 MiB at a million; :mod:`itrcli.store.compactgraph`), where thousands of
#: searches over the mapped file would come to hold nearly all of its pages.
LOADED_GRAPH_MAX = 512 * 2**20


def vindex_size(directory: Path | str) -> int:
    """Bytes of the newest saved graph file (0 when there is none)."""
    saved = graph_files(directory)[0]
    try:
        return saved[-1][1].stat().st_size if saved else 0
    except OSError:
        return 0


def remove_temp_files(directory: Path | str) -> int:
    """Delete the temporary graph files of killed saves (call with the write lock held);
    returns how many there were."""
    temps = graph_files(directory)[1]
    for p in temps:
        try:
            p.unlink()
        except OSError:
            pass
    return len(temps)


def remove_graphs(directory: Path | str) -> None:
    """Delete every graph file (``--reindex``; searches rebuild from the database)."""
    import shutil

    shutil.rmtree(Path(directory) / GRAPH_DIR, ignore_errors=True)


def adopt_graphs(source: Path | str, directory: Path | str) -> None:
    """Move the graph files of the library at ``source`` into the library at ``directory``
    (``--reindex`` swaps in the library it built beside; the caller holds the lock)."""
    dst = Path(directory) / GRAPH_DIR
    saved = graph_files(source)[0]
    if not saved:
        return
    dst.mkdir(exist_ok=True)
    for _seq, path in saved:
        os.replace(path, dst / path.name)
    fsync_dir(dst)


class VectorIndex:
    def __init__(self, directory: Path, dim: int) -> None:
        self.dir = Path(directory) / GRAPH_DIR
        self.dim = dim
        self.seq = 0
        self.index = None
        #: instead of ``index``: a :class:`~itrcli.store.graphfile.GraphFile` (or its
        #: compact copy, :class:`~itrcli.store.compactgraph.CompactGraph`)
        self.mapped = None
        self._compact = None  #: a future of the mapped file's compact copy, being built
        self._cancel = None  #: set: that build stops (:meth:`interrupt`)
        self.dirty = False

    def close(self) -> None:
        """Let go of the graph: the loaded index, or the mapped file (nothing is saved)."""
        if self.mapped is not None:
            self.mapped.close()
        self.index = self.mapped = None
        self.interrupt()
        done, self._compact = self._compact, None
        if done is not None:  # a copy still being built: let it go once it stops
            done.add_done_callback(lambda d: d.exception() is None and d.result().close())

    def interrupt(self) -> None:
        """Stop building the compact copy, if one is being built (from any thread: a
        server told to stop does not wait for a copy it will never search); the mapped
        file goes on answering."""
        cancel = self._cancel
        if cancel is not None:
            cancel.set()

    # -- loading ---------------------------------------------------------------------
    def _files(self) -> list[tuple[int, Path]]:
        return graph_files(self.dir.parent)[0]

    def _new(self, capacity: int):
        import hnswlib

        idx = hnswlib.Index(space="cosine", dim=self.dim)
        idx.init_index(max_elements=max(capacity, 1024), ef_construction=EF_CONSTRUCTION, M=M,
                       random_seed=100)
        idx.set_ef(EF_SEARCH)
        return idx

    def open(self, store: Store) -> "VectorIndex":
        """Load the newest saved graph and replay the log past it.

        A graph that cannot be read, is ahead of the database, or whose log entries were
        truncated under it (a writer saved meanwhile) is rebuilt from the stored vectors.
        """
        for _attempt in range(2):
            files = self._files()
            if not files:
                break
            seq, path = files[-1]
            try:
                import hnswlib

                idx = hnswlib.Index(space="cosine", dim=self.dim)
                idx.load_index(str(path))
            except Exception:
                continue  # replaced under us, or damaged: look again, then rebuild
            last = store.last_seq()
            log = store.log_after(seq)
            # seqs are contiguous (AUTOINCREMENT, never reused), so a complete log has
            # exactly last - seq entries after this graph
            if seq > last or len(log) != last - seq:
                continue
            self.index, self.seq = idx, seq
            self._replay(store, log)
            return self
        self.rebuild(store)
        return self

    def open_mapped(self, store: Store, *, compact: bool = False) -> "VectorIndex":
        """For searching only: map the newest graph file when it looks whole, with the
        logged changes past it (at most :data:`MAX_DELTA`: an index run commits between
        two saves of the graph) kept beside it and scored exactly; otherwise load it as
        :meth:`open` does.  ``compact``: read the file into a
        :class:`~itrcli.store.compactgraph.CompactGraph` instead of mapping it (a reader
        that searches thousands of times: a third of the memory the mapped file's pages
        come to)."""
        from .graphfile import GraphFile, GraphFileError

        files = self._files()
        last = store.last_seq()
        if files and files[-1][0] <= last:
            seq, path = files[-1]
            log = store.log_after(seq) if seq < last else []
            # a complete log has exactly last - seq entries past the file (see open)
            if len(log) == last - seq and len(log) <= MAX_DELTA:
                try:
                    self.mapped = GraphFile(path, self.dim)
                except GraphFileError:
                    pass  # replaced under us, or damaged: open() looks again or rebuilds
                else:
                    self.seq = self.file_seq = seq
                    self._touched, self._delta = set(), {}
                    self._apply(store, log)
                    if compact:
                        from .compactgraph import fits

                        if fits(self.mapped):  # else the page cache holds what it can
                            self._start_compact(path)
                    return self
        return self.open(store)

    def _start_compact(self, path: Path) -> None:
        """Read the mapped file into its compact copy on a thread of its own (seconds at a
        million); :meth:`settle` puts it in the mapped file's place once it is built, and
        meanwhile the mapped file answers."""
        import threading

        from ..pools import in_thread
        from .compactgraph import CompactGraph

        cancel = self._cancel = threading.Event()
        self._compact = in_thread(lambda: CompactGraph(path, self.dim, cancel=cancel),
                                  "itr-compact-graph")

    def settle(self, wait: bool = False) -> None:
        """Put a compact copy that is built in the mapped file's place (``wait``: wait for
        it first).  A copy that failed (the file gone or damaged under it) or was
        interrupted is dropped: the mapped file goes on answering."""
        from .graphfile import GraphFileError

        done = self._compact
        if done is None or not (wait or done.done()):
            return
        self._compact = None
        try:
            copy = done.result()
        except (GraphFileError, OSError, MemoryError):
            return
        if self.mapped is None:  # closed meanwhile
            copy.close()
            return
        old, self.mapped = self.mapped, copy
        old.close()

    def follow(self, store: Store, last: int) -> bool:
        """Bring a graph opened for searching up to the log entry ``last`` in place (a
        long-lived reader, ``itr serve``): a loaded graph replays the entries past it, a
        mapped one keeps them beside it.  False when it cannot (the log was truncated by
        a save meanwhile, a newer file is there to map, or too much changed): open again."""
        if last == self.seq:
            return True
        if last < self.seq:
            return False
        if self.mapped is not None:
            files = self._files()
            # a newer file this snapshot can use: map it instead (one saved after this
            # snapshot began is of no use yet; the snapshot still sees the log under it)
            if files and self.file_seq < files[-1][0] <= last:
                return False
        log = store.log_after(self.seq)
        if len(log) != last - self.seq:
            return False
        if self.mapped is None:
            self._replay(store, log)
        elif len(self._touched) + len(log) > MAX_DELTA:
            return False
        else:
            self._apply(store, log)
        return True

    def _apply(self, store: Store, log: list[tuple[int, int, str]]) -> None:
        """Log entries past a mapped file: their labels leave the file's answers, the
        vectors they put are scored exactly."""
        import numpy as np

        if not log:
            return
        final: dict[int, str] = {}
        for _, id_, op in log:
            final[id_] = op
        for i in final:
            self._delta.pop(i, None)
        self._touched.update(final)
        ids, vecs = store.vectors([i for i, op in final.items() if op == "put"])
        for i, v in zip(ids.tolist(), vecs):
            self._delta[i] = v
        self._dids = np.fromiter(self._delta, dtype=np.int64, count=len(self._delta))
        self._dvecs = (np.stack(list(self._delta.values())) if self._delta
                       else np.zeros((0, self.dim), np.float32))  # [n, dim]
        self.seq = log[-1][0]

    @property
    def count(self) -> int:
        """Elements in the graph, deleted marks included (an upper bound of live ones)."""
        if self.mapped is not None:
            return self.mapped.count + len(getattr(self, "_delta", ()))
        return self.index.get_current_count()

    def _replay(self, store: Store, log: list[tuple[int, int, str]]) -> None:
        if not log:
            return
        final: dict[int, str] = {}
        for _, id_, op in log:
            final[id_] = op  # only the last operation on a label matters
        ids, vecs = store.vectors([i for i, op in final.items() if op == "put"])
        self.add(ids, vecs)
        self.remove(i for i, op in final.items() if op == "del")
        self.seq = log[-1][0]
        self.dirty = True

    def rebuild(self, store: Store) -> None:
        """Build the graph from every stored vector."""
        seq = store.last_seq()
        ids, vecs = store.vectors()
        self.index = self._new(len(ids) + 1024)
        self.add(ids, vecs)
        self.seq = seq
        self.dirty = True

    # -- changing --------------------------------------------------------------------
    def add(self, ids, vecs) -> None:
        """Add or replace vectors ``[n, dim]`` under labels ``ids``."""
        n = len(ids)
        if n == 0:
            return
        cap = self.index.get_max_elements()
        if self.index.element_count + n > cap:
            self.index.resize_index(max(int(cap * 1.5), self.index.element_count + n + 1024))
        self.index.add_items(vecs, ids, num_threads=min(2, os.cpu_count() or 1))
        self.dirty = True

    def remove(self, ids: Iterable[int]) -> None:
        for i in ids:
            try:
                self.index.mark_deleted(int(i))
            except RuntimeError:
                pass  # never added, or already marked
            self.dirty = True

    def save(self, seq: int) -> None:
        """Write the graph as ``<seq>.bin`` atomically, then drop older files."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"{seq}.bin"
        tmp = self.dir / f".{seq}.bin.tmp"
        self.index.save_index(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(self.dir)
        for s, p in self._files():
            if s != seq:
                try:
                    p.unlink()
                except OSError:
                    pass
        self.seq = seq
        self.dirty = False

    def verify_saved(self, seq: int) -> None:
        """hnswlib does not check its writes: on a full disk it leaves a short file.  Remove
        such a file (readers then rebuild from the database) and raise :class:`LibraryError`."""
        path = self.dir / f"{seq}.bin"
        want = self.index.index_file_size()
        try:
            got = path.stat().st_size
        except OSError:
            got = -1
        if got != want:
            try:
                path.unlink()
            except OSError:
                pass
            raise LibraryError(
                f"disk full? cannot write library {self.dir.parent}: the search graph was "
                f"written incompletely ({max(got, 0):,} of {want:,} bytes); free some space and "
                "run again (the vectors are safe in the database)"
            )

    # -- searching -------------------------------------------------------------------
    def search(self, query, k: int, live: int, ef: int | None = None, filter=None):
        """Top ``k`` (labels ``[k]``, cosine similarities ``[k]``) for one query ``[dim]``.

        Raises ``RuntimeError`` when fewer than ``k`` pass ``filter`` (as hnswlib does) or
        the mapped file turns out damaged.

        ``live``: how many vectors the store holds (hnswlib cannot return more than that
        without failing, and does not count its deleted marks for us).
        """
        import numpy as np

        k = min(k, live)
        if k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        ef = max(ef or EF_SEARCH, 4 * k)
        if self.mapped is not None:
            self.settle()
            touched = getattr(self, "_touched", None)
            allowed = filter
            if touched:  # changed since the file was saved: answered from the delta
                allowed = ((lambda label: label not in touched) if filter is None else
                           (lambda label: label not in touched and filter(label)))
            try:
                labels, dist = self.mapped.search(query, k, ef, allowed)
            except (IndexError, KeyError) as e:  # a link past the end: a damaged file
                raise RuntimeError("damaged graph file") from e  # callers then search exactly
            sims = (1.0 - dist).astype(np.float32)
            if touched and len(self._dids):
                labels, sims = self._with_delta(query, k, labels, sims, filter)
            if len(labels) < k:  # as hnswlib's knn_query does
                raise RuntimeError("fewer than k elements pass the filter")
            return labels, sims
        self.index.set_ef(ef)
        labels, dist = self.index.knn_query(np.asarray(query, dtype=np.float32)[None, :], k=k,
                                            filter=filter)
        return labels[0].astype(np.int64), (1.0 - dist[0]).astype(np.float32)

    def _with_delta(self, query, k: int, labels, sims, filter):
        """The file's answers merged with the exactly scored vectors put since it was saved."""
        import numpy as np

        q = np.asarray(query, dtype=np.float32).ravel()
        q = q / max(float(np.linalg.norm(q)), 1e-30)
        ids, scores = self._dids, self._dvecs @ q  # [n]
        if filter is not None:
            keep = np.fromiter((bool(filter(int(i))) for i in ids), dtype=bool, count=len(ids))
            ids, scores = ids[keep], scores[keep]
        all_ids = np.concatenate([np.asarray(labels, np.int64), ids])
        all_sims = np.concatenate([np.asarray(sims, np.float32), scores.astype(np.float32)])
        order = np.argsort(-all_sims, kind="stable")[:k]
        return all_ids[order], all_sims[order]


#: Log entries a mapped graph keeps beside it (:meth:`VectorIndex.open_mapped`) before a
#: search loads and replays instead: an index run saves its graph every few minutes.
MAX_DELTA = 20_000


# -- calibrating ef ------------------------------------------------------------------------

def text_like_queries(base, cosine: float = TEXT_LIKE_COSINE, seed: int = 0):
    """Unit vectors at ``cosine`` to each row of ``base`` ``[n, dim]``, in random directions."""
    import numpy as np

    rng = np.random.default_rng(seed)
    r = rng.standard_normal(base.shape).astype(np.float32)  # [n, dim]
    r -= (r * base).sum(1, keepdims=True) * base  # orthogonal to its base row
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    q = cosine * base + np.sqrt(1.0 - cosine ** 2) * r
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_top(store: Store, queries, k: int, chunk: int = 50_000):
    """(labels ``[n_queries, k]``, scores ``[n_queries, k]``) of the exact top ``k`` over
    every stored vector, unordered within a row; read in chunks (memory stays
    ``chunk x dim`` however large the library)."""
    import numpy as np

    nq = len(queries)
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    for ids, mat in store.vector_chunks(chunk):
        s = np.concatenate([best_s, queries @ mat.T], axis=1)  # [nq, kept + chunk]
        i = np.concatenate([best_i, np.broadcast_to(ids, (nq, len(ids)))], axis=1)
        keep = np.argpartition(-s, min(k, s.shape[1]) - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    return best_i, best_s


def _saved_graph_top(vi: VectorIndex, queries, k: int, chunk: int = 65_536):
    """Scores ``[n_queries, k]`` of the exact top ``k`` over the live vectors of the saved
    graph file that holds exactly ``vi`` (None when there is none).  At a million images
    this is several times faster than reading the database: the file is mapped, its
    vectors are float32 already, and it holds what the graph searches."""
    import numpy as np

    from .graphfile import GraphFile, GraphFileError

    if vi.dirty or vi.index is None:
        return None
    path = next((p for s, p in vi._files() if s == vi.seq), None)
    if path is None:
        return None
    try:
        g = GraphFile(path, vi.dim)
    except GraphFileError:
        return None
    if g.count != vi.index.get_current_count():
        return None
    dead = g.deleted
    best = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    for lo in range(0, g.count, chunk):
        s = queries @ np.ascontiguousarray(g.vectors[lo : lo + chunk]).T  # [nq, chunk]
        s[:, dead[lo : lo + chunk]] = -np.inf
        s = np.concatenate([best, s], axis=1)
        best = np.partition(s, s.shape[1] - min(k, s.shape[1]), axis=1)[:, -k:]  # the k best
    return best


def calibrate(vi: VectorIndex, store: Store, k: int = 10) -> tuple[int, float] | None:
    """The smallest ``ef`` in :data:`EF_LADDER` whose recall@``k`` against exact search
    reaches :data:`RECALL_TARGET` on :data:`CALIBRATION_QUERIES` text-like queries made
    from this library's own vectors, and that recall (the largest ``ef`` and its recall
    when none reaches it).  None when the library is too small to measure."""
    import numpy as np

    ids = store.vector_ids()
    if len(ids) < 4 * k:
        return None
    rng = np.random.default_rng(0)
    sample = rng.choice(ids, size=min(CALIBRATION_QUERIES, len(ids)), replace=False)
    _, base = store.vectors(sample.tolist())
    queries = text_like_queries(base)
    truth = _saved_graph_top(vi, queries, k)
    if truth is None:  # no saved file holds exactly these vectors: read the database
        _, truth = exact_top(store, queries, k)
    # tie-aware: a result counts when it scores at least the exact k-th best (equal
    # scores are interchangeable; copies of one photo are common in real libraries)
    # (1e-4: a compacted library scores its float16 rows against a graph of float32 originals)
    kth = truth.min(axis=1, keepdims=True) - 1e-4  # [n_queries, 1]
    threads = min(2, os.cpu_count() or 1)
    for ef in EF_LADDER:
        vi.index.set_ef(ef)
        _, dist = vi.index.knn_query(queries, k=k, num_threads=threads)
        recall = float(np.mean((1.0 - dist) >= kth))
        if recall >= RECALL_TARGET:
            break
    vi.index.set_ef(EF_SEARCH)
    return ef, recall


def measure_search_ef(vi: VectorIndex, store: Store, count: int) -> None:
    """:func:`calibrate` and record the result in the library's meta (``search_ef``,
    ``search_recall``, and ``search_ef_count``: the file count it was measured at)."""
    got = calibrate(vi, store)
    if got is not None:
        store.set_meta(search_ef=got[0], search_recall=round(got[1], 4), search_ef_count=count)


def needs_calibration(measured_at: int | None, count: int) -> bool:
    """No measurement yet, or the library changed size by more than
    :data:`RECALIBRATE_CHANGE` since the last one."""
    return measured_at is None or abs(count - measured_at) > RECALIBRATE_CHANGE * max(measured_at, 1)
