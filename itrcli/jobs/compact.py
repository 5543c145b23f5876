"""``itr check --compact``: bring a library to the dense layout of new libraries.

Libraries made by 0.1.0 keep each vector's database copy as float32 in 4 KiB pages, where
a row of 2 KiB is just over half a page and ~2 KiB per image is wasted.  Compaction takes
two steps, under the write lock:

1. The float32 copies are rewritten as float16, a chunk of rows per transaction.  This is
   the long step, and it is resumable: interrupted (Ctrl-C, kill, power cut), it keeps the
   chunks it committed, and the next ``--compact`` goes on with the rows still in float32.
   The library stays fully usable meanwhile (a blob's length says its type).
2. The database is written afresh with 16 KiB pages and no free space (``VACUUM INTO`` a
   temporary file, then an atomic rename).  Interrupted, the old file is untouched and the
   step runs again next time.

The graph keeps its float32 vectors: results change by float16 rounding only
(docs/library-format.md, "Vector storage").
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from ..progress import NoProgress, Progress
from ..store.db import PAGE_SIZE, Store, library_error

#: Rows per transaction in step 1 (~20 MB of float32 read, one commit every second or so).
CHUNK = 10_000


@dataclass
class Compaction:
    """What ``--compact`` did (``itr check --compact --json`` prints it as ``compact``)."""

    converted: int = 0           #: float32 vectors rewritten as float16 in this run
    rewritten: bool = False      #: the file was written afresh (step 2)
    page_size_before: int = 0
    page_size: int = 0
    bytes_before: int = 0        #: the database file (and its write-ahead log)
    bytes_after: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {**self.__dict__, "seconds": round(self.seconds, 3)}


def _db_bytes(store: Store) -> int:
    total = 0
    for suffix in ("", "-wal"):
        try:
            total += (store.path.parent / (store.path.name + suffix)).stat().st_size
        except OSError:
            pass
    return total


def compact(store: Store, *, progress: Progress | None = None, wait: float = 0.0) -> Compaction:
    """Convert the library at ``store`` to float16 vectors in 16 KiB pages (see the module
    docstring).  A library already compact is left as it is.
    Raises:
        LibraryError: read-only, locked (``wait`` seconds), no space for the new file.
    """
    from ..errors import LibraryError

    if store.readonly:
        raise LibraryError("library opened read-only; cannot compact")
    progress = progress or NoProgress()
    try:
        with store.writing("itr check --compact", wait):
            return _compact(store, progress)
    except (sqlite3.Error, OSError) as e:
        raise library_error(e, store.directory) from e


def _compact(store: Store, progress: Progress) -> Compaction:
    t0 = time.monotonic()
    before = store.layout()
    out = Compaction(page_size_before=before["page_size"], bytes_before=_db_bytes(store))
    if store.vector_dtype != "float16":
        store.set_vector_dtype("float16")  # new writes are float16 from now on
    if store.get_meta("dim") is not None:
        left = store.float32_vectors()
        progress.start(left)
        after = -1
        try:
            while left:
                last, n = store.convert_vectors(after, CHUNK)
                if last is None:
                    break
                after = last
                out.converted += n
                progress.advance(n, n)
        finally:
            progress.close()
    fragmented = before["free_pages"] > 0.1 * max(before["pages"], 1)
    if out.converted or before["page_size"] != PAGE_SIZE or fragmented:
        store.rewrite_file(PAGE_SIZE)
        out.rewritten = True
    out.page_size = store.layout()["page_size"]
    out.bytes_after = _db_bytes(store)
    out.seconds = time.monotonic() - t0
    return out
