"""Small helpers of the store's SQL that every table's owner uses (so that ``db.py`` and
the owners of the other tables import this, not each other).  No import of itr's own."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from typing import Iterable, Iterator, Sequence


#: Values bound in one ``IN (...)`` list: well under SQLite's limit on host parameters.
IN_CHUNK = 500


def in_chunks(conn: sqlite3.Connection, sql: str, values: Iterable, *, before: Sequence = (),
              chunk: int = IN_CHUNK) -> Iterator[sqlite3.Cursor]:
    """Run ``sql`` once per chunk of ``values``: each ``{marks}`` in it becomes the chunk's
    placeholders (``?,?,...``) and is bound to the chunk; ``before``: parameters bound
    ahead of them.  Yields each run's cursor (the one way itr queries a long ``IN`` list)."""
    values = list(values)
    n = sql.count("{marks}")
    for i in range(0, len(values), chunk):
        part = values[i : i + chunk]
        yield conn.execute(sql.replace("{marks}", ",".join("?" * len(part))),
                           [*before, *(part * n)])


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()
