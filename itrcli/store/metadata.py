"""Reading the photo metadata recorded at index time (camera, GPS, capture time, size).

The SQL behind search filters and ``itr info``'s metadata counts.  Filtering here only
narrows with what SQL tests cheaply and safely (a superset of the matches); the exact
predicate is :meth:`itrcli.query.filters.MetaFilter.matches`, applied by the caller.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Iterator

#: Columns a filter predicate reads (``kind`` too where the schema has it).
FILTER_COLUMNS = ("id", "path", "camera", "lat", "lon", "width", "height")


def _columns(conn: sqlite3.Connection) -> set[str]:
    return {r[1] for r in conn.execute("PRAGMA table_info(files)")}


def filter_rows(
    conn: sqlite3.Connection,
    *,
    lat_range: tuple[float, float] | None = None,
    min_size: tuple[int, int] | None = None,
    camera: bool = False,
    ids: set[int] | None = None,
) -> Iterator[dict[str, Any]]:
    """``files`` rows (as dicts of :data:`FILTER_COLUMNS`) that may pass a filter:
    within ``lat_range`` with GPS, at least ``min_size`` (width, height), with a camera
    when ``camera``, and among ``ids`` when given."""
    cols = list(FILTER_COLUMNS) + (["kind"] if "kind" in _columns(conn) else [])
    where, args = [], []
    if lat_range is not None:
        where.append("lat BETWEEN ? AND ? AND lon IS NOT NULL")
        args += list(lat_range)
    if min_size is not None:
        where.append("width >= ? AND height >= ?")
        args += list(min_size)
    if camera:
        where.append("camera IS NOT NULL")
    sql = f"SELECT {', '.join(cols)} FROM files" + (f" WHERE {' AND '.join(where)}" if where else "")
    for r in conn.execute(sql, args):
        row = dict(zip(cols, r))
        if ids is None or row["id"] in ids:
            yield row


def coverage(conn: sqlite3.Connection) -> dict[str, int]:
    """How many files carry each kind of metadata: ``gps``, ``camera``, ``taken_at``."""
    gps, camera, taken = conn.execute(
        "SELECT count(lat IS NOT NULL AND lon IS NOT NULL OR NULL), count(camera),"
        " count(taken_at) FROM files"
    ).fetchone()
    return {"gps": gps, "camera": camera, "taken_at": taken}


def sample_ids(conn: sqlite3.Connection, n: int, seed: int = 0) -> list[int]:
    """Up to ``n`` file ids drawn with a fixed seed (the same ids for the same library):
    all of them when the library has at most ``n``.  Draws from the id range first (no
    scan of every id); falls back to the list of ids when ids are too sparse for that."""
    import numpy as np

    count, lo, hi = conn.execute("SELECT count(*), min(id), max(id) FROM files").fetchone()
    if not count:
        return []
    if count > n:
        rng = np.random.default_rng(seed)
        draw = rng.permutation(np.unique(rng.integers(lo, hi + 1, 4 * n)))
        got: list[int] = []
        for i in range(0, len(draw), 500):
            chunk = [int(x) for x in draw[i: i + 500]]
            got += [r[0] for r in conn.execute(
                f"SELECT id FROM files WHERE id IN ({','.join('?' * len(chunk))})", chunk)]
            if len(got) >= n:
                return sorted(got[:n])
    ids = np.asarray([r[0] for r in conn.execute("SELECT id FROM files ORDER BY id")], np.int64)
    if len(ids) <= n:
        return ids.tolist()
    return sorted(np.random.default_rng(seed).choice(ids, n, replace=False).tolist())
