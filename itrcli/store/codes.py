"""The library's binary codes on disk: the ``hashers`` and ``hash_codes`` tables (created by
the migration ``m003_hash_codes`` in :mod:`itrcli.store.db`).

:mod:`itrcli.query.binary` fits hashers and computes codes; this module only stores and
reads them.  ``hash_codes`` holds one row per coded vector (for incremental updates), keyed
by its label: an image's file id, or a video frame's id (whose content is its video's); the
``hashers`` row also keeps all ids and codes as two blobs (a search reads them in
milliseconds where reading 10^6 rows takes seconds).  Both are current when ``seq_codes``
is the store's vector-log sequence, which every vector put or delete advances.  Codes are
packed bits, stored as big-endian uint64 words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sql import in_chunks, now_iso


@dataclass(frozen=True)
class HasherRecord:
    """A saved hasher: its model, the log sequences of its fit and codes, its parameters."""

    model: str
    seq_fit: int
    seq_codes: int
    params: str  #: ``Hasher.to_dict()`` as JSON
    snap_ids: bytes | None
    snap_codes: bytes | None

    def snapshot(self, words: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids ``[n]`` int64, codes ``[n, words]`` uint64) as of ``seq_codes``, if saved."""
        if self.snap_ids is None or self.snap_codes is None:
            return None
        ids = np.frombuffer(self.snap_ids, dtype="<i8").astype(np.int64)
        codes = np.frombuffer(self.snap_codes, dtype=">u8").reshape(len(ids), words)
        return ids, codes.astype(np.uint64)


#: (label, content hash) of every label: an image's file id and hash, a frame's id and
#: its video's hash (a video's own row holds no vector, so it has no code)
_LABEL_HASHES = ("SELECT id, hash FROM files WHERE duration IS NULL"
                 " UNION ALL SELECT fr.id, f.hash FROM frames fr JOIN files f ON f.id = fr.file_id")
#: SQL true when the code row ``c`` still matches its label's content (an image's or a
#: frame's video's): false once the file changed or left, or the frame was replaced
_CURRENT = ("(EXISTS (SELECT 1 FROM files f WHERE f.id = {c}.id AND f.hash = {c}.content_hash)"
            " OR EXISTS (SELECT 1 FROM frames fr JOIN files f ON f.id = fr.file_id"
            " WHERE fr.id = {c}.id AND f.hash = {c}.content_hash))")


class Codes:
    """The binary codes of ``itr hash`` (tables ``hashers`` and ``hash_codes``): their one
    owner (``store.codes``)."""

    def __init__(self, store) -> None:
        self.store = store

    def has_tables(self) -> bool:
        """False for a library that no writer of this version has opened yet (read-only)."""
        return self.store.conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
            " AND name IN ('hashers', 'hash_codes')"
        ).fetchone()[0] == 2

    def read_hasher(self, name: str) -> HasherRecord | None:
        if not self.has_tables():
            return None
        r = self.store.conn.execute(
            "SELECT model, seq_fit, seq_codes, params, snap_ids, snap_codes FROM hashers"
            " WHERE name = ?", (name,)).fetchone()
        return None if r is None else HasherRecord(*r)

    def replace_all(self, name: str, model: str, seq: int, params: str,
                    ids: np.ndarray, codes: np.ndarray, hashes: dict[int, str] | None = None) -> None:
        """A new fit: forget the old codes, save the hasher and every code (in a transaction).
        ``seq``: the vector-log sequence the fit and codes are as of; ``hashes``: the files'
        content hashes then (default: now), which the codes are keyed by."""
        c = self.store.conn
        c.execute("DELETE FROM hash_codes WHERE hasher = ?", (name,))
        c.execute("INSERT OR REPLACE INTO hashers VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
                  (name, model, seq, seq, now_iso(), params))
        if hashes is None:
            hashes = dict(c.execute(_LABEL_HASHES))
        self._insert(name, ids, codes, hashes)
        self.save_snapshot(name, ids, codes, seq)

    def content_hashes(self) -> dict[int, str]:
        """The content hash each label was embedded from, by label: an image's file id and
        hash, a video frame's id and its video's hash."""
        return dict(self.store.conn.execute(_LABEL_HASHES))

    def drop_stale(self, name: str) -> None:
        """Forget codes of images (and video frames) removed, or whose content (hence vector)
        changed, since."""
        c = self.store.conn
        c.execute("DELETE FROM hash_codes WHERE hasher = ? AND NOT "
                  + _CURRENT.format(c="hash_codes"), (name,))

    def vector_ids(self) -> np.ndarray:
        """Every vector's id ``[n]`` int64, in id order."""
        return np.fromiter((r[0] for r in self.store.conn.execute("SELECT id FROM vectors ORDER BY id")),
                           dtype=np.int64)

    def uncoded_ids(self, name: str) -> list[int]:
        """Ids of vectors without a current code under this hasher."""
        if not self.has_tables():
            return [r[0] for r in self.store.conn.execute("SELECT id FROM vectors ORDER BY id")]
        return [r[0] for r in self.store.conn.execute(
            f"SELECT l.id FROM ({_LABEL_HASHES}) l WHERE EXISTS (SELECT 1 FROM vectors v"
            " WHERE v.id = l.id) AND NOT EXISTS (SELECT 1 FROM hash_codes c WHERE c.hasher = ?"
            " AND c.id = l.id AND c.content_hash = l.hash) ORDER BY l.id", (name,))]

    def add_codes(self, name: str, ids: np.ndarray, codes: np.ndarray) -> None:
        """Save codes of (new or changed) vectors, keyed by their file's current content."""
        self._insert(name, ids, codes, self._content_hashes(ids))

    def load_codes(self, name: str, words: int,
                   valid_only: bool) -> tuple[np.ndarray, np.ndarray]:
        """(ids ``[n]``, codes ``[n, words]`` uint64) in id order.  ``valid_only``: skip codes of
        files changed or removed since they were coded (a read-only store cannot drop them)."""
        if not self.has_tables():
            return np.zeros(0, np.int64), np.zeros((0, words), np.uint64)
        if valid_only:
            sql = ("SELECT c.id, c.code FROM hash_codes c WHERE c.hasher = ? AND "
                   + _CURRENT.format(c="c") + " ORDER BY c.id")
        else:
            sql = "SELECT id, code FROM hash_codes WHERE hasher = ? ORDER BY id"
        rows = self.store.conn.execute(sql, (name,)).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        if not rows:
            return ids, np.zeros((0, words), np.uint64)
        codes = np.frombuffer(b"".join(r[1] for r in rows), dtype=">u8").reshape(len(rows), words)
        return ids, codes.astype(np.uint64)

    def save_snapshot(self, name: str, ids: np.ndarray, codes: np.ndarray,
                      seq: int) -> None:
        """Record that the codes are current as of log entry ``seq``, with their blobs."""
        c = self.store.conn
        c.execute("UPDATE hashers SET seq_codes = ?, snap_ids = ?, snap_codes = ? WHERE name = ?",
                  (seq, np.ascontiguousarray(ids, dtype="<i8").tobytes(),
                   np.ascontiguousarray(codes.astype(">u8")).tobytes(), name))

    def _insert(self, name: str, ids: np.ndarray, codes: np.ndarray,
                hashes: dict) -> None:
        c = self.store.conn
        blobs = codes.astype(">u8")
        c.executemany(
            "INSERT OR REPLACE INTO hash_codes VALUES (?, ?, ?, ?)",
            ((name, int(i), hashes[int(i)], blobs[j].tobytes()) for j, i in enumerate(ids)),
        )

    def _content_hashes(self, ids: np.ndarray) -> dict[int, str]:
        """label -> the content hash it was embedded from (a frame's: its video's)."""
        c = self.store.conn
        out: dict[int, str] = {}
        for cur in in_chunks(c, "SELECT id, hash FROM files WHERE id IN ({marks}) UNION ALL"
                             " SELECT fr.id, f.hash FROM frames fr JOIN files f ON f.id = fr.file_id"
                             " WHERE fr.id IN ({marks})", [int(i) for i in ids]):
            out.update(cur)
        return out
