"""The ``adapters`` table (migration ``m006_adapters``): the query-side map of ``itr adapt``.

At most one row.  The matrix and mean are float32 little-endian blobs; the parameters and
the cross-validation figures JSON.  A library written before the table existed has none
(read-only opens do not migrate): reading it gives None.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from .sql import now_iso


@dataclass
class StoredAdapter:
    """One stored map and where it came from."""

    model: str
    pairs_hash: str
    source: str
    pairs: int
    images: int
    method: str
    params: dict[str, float]
    dim: int
    matrix: Any  #: numpy ``[dim, dim]`` float32
    mean: Any  #: numpy ``[dim]`` float32
    cv: dict[str, Any]
    created_at: str

    def to_json(self) -> dict[str, Any]:
        """What ``itr info --json`` shows (no matrix)."""
        return {"model": self.model, "pairs_hash": self.pairs_hash, "source": self.source,
                "pairs": self.pairs, "images": self.images, "method": self.method,
                "params": self.params, "dim": self.dim, "cv": self.cv,
                "created_at": self.created_at}


class Adapters:
    """The query map table (``adapters``, at most one row): its one owner (``store.adapters``)."""

    def __init__(self, store) -> None:
        self.store = store

    def load(self) -> StoredAdapter | None:
        """The stored map, or None (none fitted, or a library from before the table)."""
        conn = self.store.conn
        try:
            r = conn.execute(
                "SELECT model, pairs_hash, source, pairs, images, method, params, dim, matrix, "
                "mean, cv, created_at FROM adapters WHERE id = 1").fetchone()
        except sqlite3.OperationalError:  # no such table: not migrated yet
            return None
        if r is None:
            return None
        import numpy as np  # only now: `itr info` on a library without a map never needs it

        dim = int(r[7])
        matrix = np.frombuffer(r[8], dtype="<f4").astype(np.float32).reshape(dim, dim)
        mean = np.frombuffer(r[9], dtype="<f4").astype(np.float32)
        return StoredAdapter(r[0], r[1], r[2], int(r[3]), int(r[4]), r[5], json.loads(r[6]), dim,
                             matrix, mean, json.loads(r[10]), r[11])

    def save(self, a: StoredAdapter) -> None:
        """Store ``a`` in place of any previous map (call inside a transaction)."""
        c = self.store.conn
        import numpy as np

        c.execute(
            "INSERT OR REPLACE INTO adapters (id, model, pairs_hash, source, pairs, images, method, "
            "params, dim, matrix, mean, cv, created_at) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (a.model, a.pairs_hash, a.source, a.pairs, a.images, a.method, json.dumps(a.params),
             a.dim, np.ascontiguousarray(a.matrix, dtype="<f4").tobytes(),
             np.ascontiguousarray(a.mean, dtype="<f4").tobytes(), json.dumps(a.cv),
             a.created_at or now_iso()))

    def delete(self) -> bool:
        """Drop the stored map (inside a transaction); True if there was one."""
        c = self.store.conn
        try:
            return c.execute("DELETE FROM adapters").rowcount > 0
        except sqlite3.OperationalError:
            return False
