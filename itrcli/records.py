"""Plain records that several parts of itr share (no imports of its own).

:class:`StoredFile` is what the library keeps of a file for change detection: the store
reads it (:meth:`itrcli.store.db.Store.known`) and the walk plans against it
(:func:`itrcli.ingest.walk.plan`), without either importing the other.
"""

from __future__ import annotations

from typing import NamedTuple


class StoredFile(NamedTuple):
    """What the library stores about a file for change detection."""

    id: int
    size: int
    mtime_ns: int
    content_hash: str  #: the ``files.hash`` column: blake2b-128 of the content, hex
