"""The HNSW vector index (hnswlib, cosine space): a cache derived from the store.

The index lives in ``<library>/hnsw/<seq>.bin`` where ``seq`` is the last
``vector_log`` entry it contains; the number is in the file name so that the graph and
the point it reflects are replaced together by one atomic ``rename``.  Opening replays any
newer log entries (a run killed before saving), in memory for readers; the writer saves.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from .store import Store, fsync_dir

#: HNSW build parameters (hnswlib names).  M=16 and ef_construction=200 are the usual
#: quality/size balance for 512-d CLIP vectors.
M = 16
EF_CONSTRUCTION = 200
#: Search-time ``ef``: the smallest value that kept recall@10 against exact search at or
#: above 0.99 on 100,000 random-direction ViT-B/32-sized vectors (bench/search_recall.py);
#: never below ``4 * k``.
EF_SEARCH = 128
_FILE = re.compile(r"^(\d+)\.bin$")


class VectorIndex:
    def __init__(self, directory: Path, dim: int) -> None:
        self.dir = Path(directory) / "hnsw"
        self.dim = dim
        self.seq = 0
        self.index = None
        self.dirty = False

    # -- loading ---------------------------------------------------------------------
    def _files(self) -> list[tuple[int, Path]]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            m = _FILE.match(n)
            if m:
                out.append((int(m.group(1)), self.dir / n))
        return sorted(out)

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

    # -- searching -------------------------------------------------------------------
    def search(self, query, k: int, live: int, ef: int | None = None, filter=None):
        """Top ``k`` (labels ``[k]``, cosine similarities ``[k]``) for one query ``[dim]``.

        ``live``: how many vectors the store holds (hnswlib cannot return more than that
        without failing, and does not count its deleted marks for us).
        """
        import numpy as np

        k = min(k, live)
        if k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        self.index.set_ef(max(ef or EF_SEARCH, 4 * k))
        labels, dist = self.index.knn_query(np.asarray(query, dtype=np.float32)[None, :], k=k,
                                            filter=filter)
        return labels[0].astype(np.int64), (1.0 - dist[0]).astype(np.float32)

