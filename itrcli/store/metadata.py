"""Reading the photo metadata recorded at index time (camera, GPS, capture time, size).

The SQL behind search filters, ``itr info``'s metadata counts and ``--auto-cut``'s
library sample.  Filtering here does camera, glob, size and the latitude band of a place
in SQL (a superset of the place matches); :meth:`itrcli.query.filters.MetaFilter.matches`
then decides on the distance and the kind, applied by the caller.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Iterator, Sequence

from .sql import in_chunks

def _columns(conn: sqlite3.Connection) -> set[str]:
    return {r[1] for r in conn.execute("PRAGMA table_info(files)")}


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _where(camera, globs, min_size, lat_range) -> tuple[str, list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    if camera is not None:
        where.append("camera LIKE ? ESCAPE '\\'")
        args.append(f"%{_like_escape(camera)}%")
    if globs:
        where.append("(" + " OR ".join("path GLOB ?" for _ in globs) + ")")
        args += list(globs)
    if min_size is not None:
        where.append("width >= ? AND height >= ?")
        args += list(min_size)
    if lat_range is not None:
        where.append("lat BETWEEN ? AND ? AND lon IS NOT NULL")
        args += list(lat_range)
    return (f" WHERE {' AND '.join(where)}" if where else ""), args


class Metadata:
    """Metadata filters and coverage over ``files`` and ``frames``: ``store.metadata``."""

    def __init__(self, store) -> None:
        self.store = store

    def filter_rows(
        self,
        *,
        camera: str | None = None,
        globs: Sequence[str] = (),
        min_size: tuple[int, int] | None = None,
        lat_range: tuple[float, float] | None = None,
        ids: set[int] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Rows of ``files`` (``id``, ``lat``, ``lon``, and ``duration`` where the schema has it)
        whose camera contains ``camera`` (ASCII case-insensitive), whose path matches any of
        the SQLite ``globs``, at least ``min_size`` (width, height), with GPS inside
        ``lat_range`` when given, and among ``ids`` when given."""
        conn = self.store.conn
        cols = ["id", "lat", "lon"] + (["duration"] if "duration" in _columns(conn) else [])
        where, args = _where(camera, globs, min_size, lat_range)
        for r in conn.execute(f"SELECT {', '.join(cols)} FROM files{where}", args):
            if ids is None or r[0] in ids:
                yield dict(zip(cols, r))

    def filter_ids(
        self,
        *,
        camera: str | None = None,
        globs: Sequence[str] = (),
        min_size: tuple[int, int] | None = None,
    ) -> set[int]:
        """The ids :func:`filter_rows` would give without a place (only the ids: faster)."""
        where, args = _where(camera, globs, min_size, None)
        return {r[0] for r in self.store.conn.execute(f"SELECT id FROM files{where}", args)}

    def coverage(self) -> dict[str, int]:
        """How many files carry each kind of metadata: ``gps``, ``camera``, ``taken_at``."""
        conn = self.store.conn
        gps, camera, taken = conn.execute(
            "SELECT count(lat IS NOT NULL AND lon IS NOT NULL OR NULL), count(camera),"
            " count(taken_at) FROM files"
        ).fetchone()
        return {"gps": gps, "camera": camera, "taken_at": taken}

    def sample_ids(self, n: int, seed: int = 0) -> list[int]:
        """Up to ``n`` labels (the ids of the library's vectors: an image's file id, a video
        frame's id; a video's own row holds no vector) drawn with a fixed seed (the same labels
        for the same library): all of them when the library has at most ``n``.  Draws from the
        id range first (no scan of every id; frames take their labels from the files' id
        counter, so both share one range); falls back to the list of labels when they are too
        sparse for that."""
        conn = self.store.conn
        import numpy as np

        count = conn.execute(  # as Store.count: indexes only
            "SELECT (SELECT count(*) FROM files) - (SELECT count(*) FROM files WHERE duration"
            " IS NOT NULL) + (SELECT count(*) FROM frames)").fetchone()[0]
        if not count:
            return []
        lo, hi = conn.execute(
            "SELECT min(a), max(b) FROM (SELECT min(id) AS a, max(id) AS b FROM files"
            " UNION ALL SELECT min(id), max(id) FROM frames)").fetchone()
        if count > n:
            rng = np.random.default_rng(seed)
            draw = rng.permutation(np.unique(rng.integers(lo, hi + 1, 4 * n)))
            got: list[int] = []
            drawn = [int(x) for x in draw]
            for j, cur in enumerate(in_chunks(
                    conn, "SELECT id FROM files WHERE id IN ({marks}) AND duration IS NULL"
                    " UNION ALL SELECT id FROM frames WHERE id IN ({marks})", drawn, chunk=250)):
                present = {r[0] for r in cur}
                got += [i for i in drawn[j * 250 : (j + 1) * 250] if i in present]  # draw order
                if len(got) >= n:
                    return sorted(got[:n])
        ids = np.asarray([r[0] for r in conn.execute(
            "SELECT id FROM files WHERE duration IS NULL UNION ALL SELECT id FROM frames"
            " ORDER BY id")], np.int64)
        if len(ids) <= n:
            return ids.tolist()
        return sorted(np.random.default_rng(seed).choice(ids, n, replace=False).tolist())
