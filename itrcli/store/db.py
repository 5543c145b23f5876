"""The library's SQLite database: schema, migrations, rows, raw vectors and the change log.

SQLite is the source of truth.  One row per file in ``files`` (its ``id`` is the file's label
in the HNSW index), its float32 vector in ``vectors``, and every vector change appended to
``vector_log`` in the same transaction.  The HNSW index file (see :mod:`itrcli.store.vindex`) is a
derived cache that records the last log entry it contains, so after a crash it is brought up
to date by replaying the log: rows, vectors and labels can never disagree.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from ..errors import LibraryError

from ..constants import DB_NAME


def db_path_of(fs_path: str) -> tuple[str, bytes | None]:
    """Text to store for a path, plus its raw bytes when the name is not valid UTF-8.

    Such names (legal on Linux) are shown with ``\\xNN`` escapes and kept exactly in
    ``files.fsname``, so the file can still be opened.
    """
    try:
        fs_path.encode("utf-8")
        return fs_path, None
    except UnicodeEncodeError:
        raw = os.fsencode(fs_path)
        return raw.decode("utf-8", "backslashreplace"), raw


def fs_path_of(text: str, fsname: bytes | None) -> str:
    """Inverse of :func:`db_path_of`: the path to hand to ``open``."""
    return os.fsdecode(fsname) if fsname else text


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _script(conn: sqlite3.Connection, sql: str) -> None:
    # executescript() would COMMIT the migration's transaction half-way; run one by one
    for stmt in sql.split(";"):
        if stmt.strip():
            conn.execute(stmt)


# --- migrations -------------------------------------------------------------------------
# Each is applied once, in order, inside a transaction, and recorded in `migrations`.


def m001_create_tables(conn: sqlite3.Connection) -> None:
    _script(
        conn,
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
        CREATE TABLE files (
            id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the file's label in the vector index
            path TEXT NOT NULL UNIQUE,             -- absolute path as shown to users
            fsname BLOB,                           -- raw bytes when path is not UTF-8
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            hash TEXT NOT NULL,                    -- blake2b-128 of the content, hex
            width INTEGER,
            height INTEGER,
            taken_at TEXT,                         -- EXIF capture time, ISO 8601
            camera TEXT,
            lat REAL,
            lon REAL,
            indexed_at TEXT NOT NULL
        );
        CREATE INDEX files_hash ON files(hash);
        CREATE TABLE vectors (
            id INTEGER PRIMARY KEY REFERENCES files(id) ON DELETE CASCADE,
            vector BLOB NOT NULL                   -- float32 little-endian, L2-normalised
        );
        CREATE TABLE vector_log (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id INTEGER NOT NULL,
            op TEXT NOT NULL CHECK (op IN ('put', 'del'))
        );
        """
    )


def m002_failures(conn: sqlite3.Connection) -> None:
    # Files that could not be decoded, so that an unchanged bad file is reported again
    # without being read again (a directory of broken downloads must not slow every run).
    _script(
        conn,
        """
        CREATE TABLE failures (
            path TEXT PRIMARY KEY,                 -- as in files.path
            fsname BLOB,
            size INTEGER NOT NULL,                 -- the file as it was when it failed
            mtime_ns INTEGER NOT NULL,
            reason TEXT NOT NULL,
            decoder TEXT NOT NULL,                 -- images.decoder_id(): retried on upgrade
            failed_at TEXT NOT NULL
        );
        """
    )


def m003_hash_codes(conn: sqlite3.Connection) -> None:
    # Binary codes (itr hash, search --hash; see store/codes.py).  IF NOT EXISTS: 0.1.0
    # created these tables on first use, outside the migrations.
    _script(
        conn,
        """
        CREATE TABLE IF NOT EXISTS hashers (
            name TEXT PRIMARY KEY,          -- "<method>-<bits>", e.g. "itq-64"
            model TEXT NOT NULL,            -- the library's model when fitted
            seq_fit INTEGER NOT NULL,       -- vector-log sequence at the fit (refit rule)
            seq_codes INTEGER NOT NULL,     -- vector-log sequence the codes are up to date with
            fitted_at TEXT NOT NULL,
            params TEXT NOT NULL,           -- Hasher.to_dict() as JSON
            snap_ids BLOB,                  -- every id (int64 LE) and code (big-endian uint64
            snap_codes BLOB                 --   words) at seq_codes, in id order
        );
        CREATE TABLE IF NOT EXISTS hash_codes (
            hasher TEXT NOT NULL,
            id INTEGER NOT NULL,            -- files.id
            content_hash TEXT NOT NULL,     -- files.hash when coded: a changed file is coded again
            code BLOB NOT NULL,             -- packed bits, big-endian uint64 words
            PRIMARY KEY (hasher, id)
        ) WITHOUT ROWID
        """,
    )


def m006_adapters(conn: sqlite3.Connection) -> None:
    # The query-side map fitted by `itr adapt` (see itrcli.store.adapters); at most one.
    _script(
        conn,
        """
        CREATE TABLE adapters (
            id INTEGER PRIMARY KEY CHECK (id = 1), -- one map per library
            model TEXT NOT NULL,                   -- meta.model when it was fitted
            pairs_hash TEXT NOT NULL,              -- query.adapt.pairs_hash of the pairs
            source TEXT NOT NULL,                  -- the pairs file or folder
            pairs INTEGER NOT NULL,
            images INTEGER NOT NULL,
            method TEXT NOT NULL,                  -- ridge | procrustes | cca
            params TEXT NOT NULL,                  -- JSON
            dim INTEGER NOT NULL,
            matrix BLOB NOT NULL,                  -- float32 little-endian [dim, dim], row-major
            mean BLOB NOT NULL,                    -- float32 little-endian [dim]
            cv TEXT NOT NULL,                      -- JSON: cross-validated recall per method
            created_at TEXT NOT NULL
        );
        """
    )


def m004_text_lines(conn: sqlite3.Connection) -> None:
    # Scene text, keyed by content hash like the vectors (see store/text.py)
    from .text import create_tables

    create_tables(conn)


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    m001_create_tables,
    m002_failures,
    m003_hash_codes,
    m004_text_lines,
    m006_adapters,
]
#: The schema version a library has once every migration ran (kept in meta, for readers).
SCHEMA_VERSION = len(MIGRATIONS)


class StoredFile(NamedTuple):
    """What change detection needs of a file row (duck-types :class:`itrcli.ingest.walk.Known`)."""

    id: int
    size: int
    mtime_ns: int
    hash: str


@dataclass(frozen=True)
class Failure:
    """A remembered decode failure (see ``m002_failures``)."""

    size: int
    mtime_ns: int
    reason: str
    decoder: str


#: Meta keys that belong to the bound model (dropped by ``--reindex``).
MODEL_META = ("model", "model_revision", "model_type", "dim", "precision", "preprocess",
              "text_max_length", "text_padding", "search_ef", "search_recall", "search_ef_count")


def library_error(e: BaseException, directory: Path | str) -> LibraryError:
    """A one-line, actionable :class:`LibraryError` for a database or file-system error
    met while writing the library at ``directory``."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    low = msg.lower()
    code = getattr(e, "errno", None)
    if isinstance(e, sqlite3.Error):
        if "full" in low:
            return LibraryError(f"disk full: cannot write library {directory} ({msg}); "
                                "free some space and run again (work already committed is kept)")
        if "readonly" in low or "read-only" in low:
            return LibraryError(f"library {directory} is not writable ({msg})")
        if "malformed" in low or "not a database" in low or "corrupt" in low:
            return LibraryError(f"library database in {directory} is damaged ({msg}); "
                                "run 'itr check' for details")
        if "locked" in low or "busy" in low:
            return LibraryError(f"library database in {directory} is busy ({msg}): another "
                                "program holds a write transaction on it; try again later")
        if "i/o" in low or "unable to open" in low:
            return LibraryError(f"cannot write library {directory} ({msg}); check free space, "
                                "permissions and the disk")
        return LibraryError(f"database error in library {directory}: {msg}")
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return LibraryError(f"disk full: cannot write library {directory} "
                            f"({os.strerror(code)}); free some space and run again "
                            "(work already committed is kept)")
    if code == errno.EROFS:
        return LibraryError(f"library {directory} is on a read-only file system")
    if code in (errno.EACCES, errno.EPERM):
        where = getattr(e, "filename", None) or directory
        return LibraryError(f"library {directory} is not writable (permission denied: {where})")
    if isinstance(e, OSError):
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return LibraryError(f"cannot write library {directory}: {e.strerror or msg}{where}")
    return LibraryError(f"library {directory}: {msg}")


def _not_writable(directory: Path) -> OSError | None:
    """Why files cannot be created in ``directory`` (None if they can)."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".itr-probe-", dir=directory)
    except OSError as e:
        return e
    os.close(fd)
    try:
        os.unlink(name)
    except OSError:
        pass
    return None



def _decode(rows, dim: int):
    """(id, float32 blob) rows -> (ids ``[n]`` int64, vectors ``[n, dim]`` float32)."""
    import numpy as np

    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    if not rows:
        return ids, np.zeros((0, dim), dtype=np.float32)
    mat = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1)
    return ids, mat.astype(np.float32, copy=False)

class Store:
    """An open library database."""

    def __init__(self, directory: Path, *, create: bool = False, readonly: bool = False) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        if not self.path.exists():
            if not create:
                raise LibraryError(
                    f"no library at {self.directory} (run 'itr index PATH' first, or pass --db)"
                )
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LibraryError(f"cannot create library directory {self.directory}: {e.strerror}") from None
        self.readonly = readonly
        try:
            if readonly:
                self.conn = _connect_readonly(self.path)
            else:
                self.conn = _connect_writable(self.path)
            if not readonly:
                self._migrate()
            else:
                self._check_version()
        except sqlite3.DatabaseError as e:
            if not readonly:
                why = _not_writable(self.directory)
                if why is not None:
                    raise library_error(why, self.directory) from None
                if "readonly" in str(e) or "full" in str(e) or "I/O" in str(e):
                    raise library_error(e, self.directory) from None
            if "malformed" in str(e) or "not a database" in str(e):
                raise LibraryError(
                    f"library database {self.path} is damaged ({e}); restore a backup, or "
                    f"salvage its rows: sqlite3 {self.path} .recover | sqlite3 recovered.db"
                ) from None
            raise LibraryError(f"cannot open library database {self.path}: {e}") from None

    # -- plumbing --------------------------------------------------------------------
    @property
    def db(self):
        """A sqlite-utils view of the same connection (for ad-hoc queries and tools)."""
        import sqlite_utils

        return sqlite_utils.Database(self.conn)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    def _applied(self) -> set[str]:
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT)"
        )
        return {r[0] for r in self.conn.execute("SELECT name FROM migrations")}

    def _migrate(self) -> None:
        applied = self._applied()
        for m in MIGRATIONS:
            if m.__name__ in applied:
                continue
            with self.transaction() as c:
                # a second process opening a new library at the same moment may have
                # applied it between our look and our write lock
                if c.execute("SELECT 1 FROM migrations WHERE name = ?", (m.__name__,)).fetchone():
                    continue
                m(c)
                c.execute("INSERT INTO migrations VALUES (?, ?)", (m.__name__, now_iso()))
                c.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                    (json.dumps(MIGRATIONS.index(m) + 1),),
                )
        self._check_version()

    def _check_version(self) -> None:
        v = self.get_meta("schema_version", 0)
        if v > SCHEMA_VERSION:
            raise LibraryError(
                f"library {self.directory} has schema version {v}, newer than this itr "
                f"understands ({SCHEMA_VERSION}); upgrade itr"
            )

    def close(self) -> None:
        self.conn.close()

    def rebuild_file(self) -> Path:
        """Copy every table, row by row, into a fresh file, re-create the indexes from the
        rows, and swap the new file in (the caller holds the write lock).  This leaves
        behind damage confined to indexes or free pages.

        The damaged file is kept next to it as ``itr.db.damaged``; returns that path.
        Raises ``sqlite3.DatabaseError`` when the tables themselves cannot be read.
        """
        fresh = self.directory / f".{DB_NAME}.rebuild"
        old = self.directory / f"{DB_NAME}.damaged"
        fresh.unlink(missing_ok=True)
        c = self.conn
        # copy rows as they are (orphans included: the repair that follows drops them)
        c.execute("PRAGMA foreign_keys=OFF")
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        schema = c.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL "
                           "AND name NOT LIKE 'sqlite_%'").fetchall()
        # a virtual table (the text FTS index) creates its own shadow tables and is not
        # copied: its contents are rebuilt from their rows (check --repair, store/text.py)
        virtual = [n for _k, n, sql in schema if sql.upper().startswith("CREATE VIRTUAL")]
        schema = [(k, n, sql) for k, n, sql in schema
                  if not any(n.startswith(v + "_") for v in virtual)]
        new = sqlite3.connect(fresh, isolation_level=None)
        try:
            for kind, _name, sql in schema:
                if kind == "table":
                    new.execute(sql)
        finally:
            new.close()
        c.execute("ATTACH DATABASE ? AS fresh", (str(fresh),))
        try:
            c.execute("BEGIN")
            for kind, name, _sql in schema:
                if kind == "table" and name not in virtual:
                    # WHERE 1: no "xfer" shortcut, which would copy the (damaged) indexes;
                    # NOT INDEXED: read the table itself
                    c.execute(f'INSERT INTO fresh."{name}" SELECT * FROM main."{name}" NOT INDEXED WHERE 1')
            if c.execute("SELECT 1 FROM main.sqlite_master WHERE name = 'sqlite_sequence'").fetchone():
                c.execute("DELETE FROM fresh.sqlite_sequence")
                c.execute("INSERT INTO fresh.sqlite_sequence SELECT * FROM main.sqlite_sequence")
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        finally:
            c.execute("DETACH DATABASE fresh")
        new = sqlite3.connect(fresh, isolation_level=None)
        try:
            for kind, _name, sql in schema:
                if kind == "index":
                    new.execute(sql)
            ok = [r[0] for r in new.execute("PRAGMA integrity_check(1)")] == ["ok"]
        finally:
            new.close()
        if not ok:
            fresh.unlink(missing_ok=True)
            raise sqlite3.DatabaseError("the copy is damaged too")
        with open(fresh, "rb") as f:
            os.fsync(f.fileno())
        self.conn.close()
        os.replace(self.path, old)
        os.replace(fresh, self.path)
        for suffix in ("-wal", "-shm"):  # they belonged to the old file: never replay them
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        fsync_dir(self.directory)
        self.conn = _connect_writable(self.path)
        return old

    # -- meta ------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:  # no meta table yet
            return default
        return default if row is None else json.loads(row[0])

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM meta")}

    def set_meta(self, **values: Any) -> None:
        with self.transaction() as c:
            for k, v in values.items():
                c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, json.dumps(v)))

    # -- reading ---------------------------------------------------------------------
    def known(self) -> dict[str, StoredFile]:
        """Every file row, keyed by the path to open."""
        out = {}
        for id_, path, fsname, size, mtime, h in self.conn.execute(
            "SELECT id, path, fsname, size, mtime_ns, hash FROM files"
        ):
            out[fs_path_of(path, fsname)] = StoredFile(id_, size, mtime, h)
        return out

    def count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM files").fetchone()[0]

    def rows(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """File rows by id (missing ids are absent)."""
        ids = list(ids)
        out: dict[int, dict[str, Any]] = {}
        cur = self.conn.cursor()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            q = f"SELECT * FROM files WHERE id IN ({','.join('?' * len(chunk))})"
            cur.execute(q, chunk)
            cols = [d[0] for d in cur.description]
            for r in cur.fetchall():
                row = dict(zip(cols, r))
                out[row["id"]] = row
        return out

    def rows_by_hashes(self, hashes: Iterable[str]) -> list[dict[str, Any]]:
        """File rows having one of these content hashes."""
        hashes = list(hashes)
        out: list[dict[str, Any]] = []
        cur = self.conn.cursor()
        for i in range(0, len(hashes), 500):
            chunk = hashes[i : i + 500]
            cur.execute(f"SELECT * FROM files WHERE hash IN ({','.join('?' * len(chunk))})", chunk)
            cols = [d[0] for d in cur.description]
            out += [dict(zip(cols, r)) for r in cur.fetchall()]
        return out

    def row_by_path(self, fs_path: str) -> dict[str, Any] | None:
        """The file row of a path to open (None if not indexed)."""
        return self.row_by_shown_path(db_path_of(fs_path)[0])

    def row_by_shown_path(self, text: str) -> dict[str, Any] | None:
        """The file row of a path as stored and shown (a hit's ``path``)."""
        cur = self.conn.execute("SELECT * FROM files WHERE path = ?", (text,))
        r = cur.fetchone()
        return None if r is None else dict(zip([d[0] for d in cur.description], r))

    def vectors(self, ids: Iterable[int] | None = None):
        """(ids ``[n]`` int64, vectors ``[n, dim]`` float32), in id order."""
        dim = int(self.get_meta("dim", 0))
        if ids is None:
            rows = self.conn.execute("SELECT id, vector FROM vectors ORDER BY id").fetchall()
        else:
            ids = sorted(set(ids))
            rows = []
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                rows += self.conn.execute(
                    f"SELECT id, vector FROM vectors WHERE id IN ({','.join('?' * len(chunk))}) ORDER BY id",
                    chunk,
                ).fetchall()
        return _decode(rows, dim)

    def ids_where(self, *, under: Iterable[str] = (), after: str | None = None,
                  before: str | None = None) -> set[int]:
        """Ids of files under one of the directories ``under`` (absolute, no trailing
        separator) and taken (EXIF time, else the file's mtime in local time) on or after
        ``after`` and before ``before`` (ISO dates or times)."""
        where, args = [], []
        under = list(under)
        if under:
            ors = []
            for d in under:
                ors.append("(path = ? OR substr(path, 1, ?) = ?)")
                args += [d, len(d) + 1, d + os.sep]
            where.append("(" + " OR ".join(ors) + ")")
        when = "COALESCE(taken_at, datetime(mtime_ns / 1000000000, 'unixepoch', 'localtime'))"
        if after:
            where.append(f"{when} >= ?")
            args.append(after)
        if before:
            where.append(f"{when} < ?")
            args.append(before)
        sql = "SELECT id FROM files" + (f" WHERE {' AND '.join(where)}" if where else "")
        return {r[0] for r in self.conn.execute(sql, args)}

    def vector_ids(self):
        """Every vector's id ``[n]`` int64 (read from the files table, far smaller to scan
        than the vectors; file ids are vector ids)."""
        import numpy as np

        return np.fromiter((r[0] for r in self.conn.execute("SELECT id FROM files")), dtype=np.int64)

    def vector_count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM vectors").fetchone()[0]

    def has_vectors(self) -> bool:
        return self.conn.execute("SELECT 1 FROM vectors LIMIT 1").fetchone() is not None

    def has_files(self) -> bool:
        return self.conn.execute("SELECT 1 FROM files LIMIT 1").fetchone() is not None

    def path_taken(self, c: sqlite3.Connection, fs_path: str) -> bool:
        """Whether a row already shows this path (as text, non-UTF-8 bytes escaped)."""
        return c.execute("SELECT 1 FROM files WHERE path = ?", (db_path_of(fs_path)[0],)).fetchone() is not None

    @staticmethod
    def id_for_hash(c: sqlite3.Connection, h: str) -> int | None:
        """One file id having this content hash, inside a transaction."""
        r = c.execute("SELECT id FROM files WHERE hash = ? LIMIT 1", (h,)).fetchone()
        return None if r is None else int(r[0])

    def vector_chunks(self, chunk: int = 50_000):
        """Every stored vector, ``chunk`` rows at a time in id order: (ids ``[n]`` int64,
        vectors ``[n, dim]`` float32) per chunk, so memory stays ``chunk x dim``."""
        dim = int(self.get_meta("dim", 0))
        last = -1
        while True:
            rows = self.conn.execute("SELECT id, vector FROM vectors WHERE id > ? ORDER BY id LIMIT ?",
                                     (last, chunk)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield _decode(rows, dim)

    def vector_for_hash(self, h: str):
        """A stored vector for this content hash, or None (for moved and copied files)."""
        import numpy as np

        r = self.conn.execute(
            "SELECT v.vector FROM files f JOIN vectors v ON v.id = f.id WHERE f.hash = ? LIMIT 1",
            (h,),
        ).fetchone()
        return None if r is None else np.frombuffer(r[0], dtype="<f4").copy()

    def hashes(self) -> dict[str, int]:
        """content hash -> one id having it."""
        return {h: i for i, h in self.conn.execute("SELECT id, hash FROM files")}

    def log_after(self, seq: int) -> list[tuple[int, int, str]]:
        return self.conn.execute(
            "SELECT seq, id, op FROM vector_log WHERE seq > ? ORDER BY seq", (seq,)
        ).fetchall()

    def last_seq(self) -> int:
        r = self.conn.execute("SELECT max(seq) FROM vector_log").fetchone()[0]
        if r is None:  # log truncated: AUTOINCREMENT keeps the high-water mark here
            r2 = self.conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'vector_log'"
            ).fetchone()
            return int(r2[0]) if r2 else 0
        return int(r)

    # -- writing (call inside transaction()) -------------------------------------------
    def insert_file(self, c: sqlite3.Connection, fs_path: str, info: dict[str, Any], vector) -> int:
        text, raw = db_path_of(fs_path)
        cur = c.execute(
            "INSERT INTO files (path, fsname, size, mtime_ns, hash, width, height, taken_at,"
            " camera, lat, lon, indexed_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (text, raw, info["size"], info["mtime_ns"], info["hash"], info.get("width"),
             info.get("height"), info.get("taken_at"), info.get("camera"), info.get("lat"),
             info.get("lon"), now_iso()),
        )
        id_ = int(cur.lastrowid)
        self._put_vector(c, id_, vector)
        return id_

    def update_file(self, c: sqlite3.Connection, id_: int, info: dict[str, Any], vector=None) -> None:
        cols = [k for k in ("size", "mtime_ns", "hash", "width", "height", "taken_at", "camera",
                            "lat", "lon") if k in info]
        if "path" in info:
            text, raw = db_path_of(info["path"])
            cols_sql = ", ".join([f"{k} = ?" for k in cols] + ["path = ?", "fsname = ?"])
            vals = [info[k] for k in cols] + [text, raw]
        else:
            cols_sql = ", ".join(f"{k} = ?" for k in cols)
            vals = [info[k] for k in cols]
        c.execute(f"UPDATE files SET {cols_sql}, indexed_at = ? WHERE id = ?", (*vals, now_iso(), id_))
        if vector is not None:
            self._put_vector(c, id_, vector)

    def delete_files(self, c: sqlite3.Connection, ids: Iterable[int]) -> None:
        for id_ in ids:
            c.execute("DELETE FROM vectors WHERE id = ?", (id_,))
            c.execute("DELETE FROM files WHERE id = ?", (id_,))
            c.execute("INSERT INTO vector_log (id, op) VALUES (?, 'del')", (id_,))

    def _put_vector(self, c: sqlite3.Connection, id_: int, vector) -> None:
        import numpy as np

        blob = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        c.execute("INSERT OR REPLACE INTO vectors VALUES (?, ?)", (id_, blob))
        c.execute("INSERT INTO vector_log (id, op) VALUES (?, 'put')", (id_,))

    # -- remembered failures ---------------------------------------------------------
    def failures(self) -> dict[str, Failure]:
        """Remembered decode failures, keyed by the path to open."""
        return {
            fs_path_of(path, fsname): Failure(size, mtime, reason, decoder)
            for path, fsname, size, mtime, reason, decoder in self.conn.execute(
                "SELECT path, fsname, size, mtime_ns, reason, decoder FROM failures"
            )
        }

    def record_failure(self, c: sqlite3.Connection, fs_path: str, size: int, mtime_ns: int,
                       reason: str, decoder: str) -> None:
        text, raw = db_path_of(fs_path)
        c.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?, ?, ?)",
                  (text, raw, size, mtime_ns, reason, decoder, now_iso()))

    def forget_failures(self, c: sqlite3.Connection, fs_paths: Iterable[str]) -> None:
        for p in fs_paths:
            c.execute("DELETE FROM failures WHERE path = ?", (db_path_of(p)[0],))

    # -- reading for `itr check` (inside begin_snapshot() ... end_snapshot()) -----------
    def begin_snapshot(self) -> None:
        """Start one read transaction: every query until :meth:`end_snapshot` sees the
        same commit, while a writer goes on (WAL)."""
        self.conn.execute("BEGIN")

    def end_snapshot(self) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def integrity_messages(self, limit: int = 20) -> list[str]:
        """``PRAGMA integrity_check``: ``["ok"]`` or up to ``limit`` problems."""
        return [r[0] for r in self.conn.execute(f"PRAGMA integrity_check({int(limit)})")]

    def orphan_vector_ids(self) -> list[int]:
        return [r[0] for r in self.conn.execute(
            "SELECT v.id FROM vectors v LEFT JOIN files f ON f.id = v.id WHERE f.id IS NULL")]

    def rows_without_vectors(self) -> list[tuple[int, str]]:
        """(id, path) of file rows that have no vector."""
        return self.conn.execute("SELECT f.id, f.path FROM files f LEFT JOIN vectors v ON "
                                 "v.id = f.id WHERE v.id IS NULL").fetchall()

    def vector_blobs_after(self, last: int, limit: int) -> list[tuple[int, bytes, str]]:
        """(id, raw vector blob, path) of up to ``limit`` vectors with id > ``last``, in id order."""
        return self.conn.execute(
            "SELECT v.id, v.vector, f.path FROM vectors v JOIN files f ON f.id = v.id "
            "WHERE v.id > ? ORDER BY v.id LIMIT ?", (last, limit)).fetchall()

    def file_stats(self) -> list[tuple[int, str, bytes | None, int, int]]:
        """(id, path, fsname, size, mtime_ns) of every file row, by path."""
        return self.conn.execute(
            "SELECT id, path, fsname, size, mtime_ns FROM files ORDER BY path").fetchall()

    def failure_count(self) -> int:
        if not self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                 "AND name = 'failures'").fetchone():
            return 0
        return self.conn.execute("SELECT count(*) FROM failures").fetchone()[0]

    # -- writing for `itr check --repair` --------------------------------------------------
    def forget_failures_shown(self, c: sqlite3.Connection, shown: Iterable[str]) -> None:
        """Forget remembered failures by their path as stored (shown) text."""
        for p in shown:
            c.execute("DELETE FROM failures WHERE path = ?", (p,))

    def delete_orphan_vectors(self, c: sqlite3.Connection, ids: Iterable[int]) -> None:
        """Drop vectors that belong to no file row (logged, so the graph follows)."""
        for i in ids:
            c.execute("DELETE FROM vectors WHERE id = ?", (i,))
            c.execute("INSERT INTO vector_log (id, op) VALUES (?, 'del')", (i,))

    def forget_all_failures(self, c: sqlite3.Connection) -> None:
        c.execute("DELETE FROM failures")

    def forget_model(self, c: sqlite3.Connection) -> None:
        """Drop the model binding and what was measured with it (``--reindex``)."""
        c.execute(f"DELETE FROM meta WHERE key IN ({','.join('?' * len(MODEL_META))})", MODEL_META)

    def truncate_log(self, upto: int) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM vector_log WHERE seq <= ?", (upto,))


def _connect_writable(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL: a crash of the process never loses a commit; a power cut may lose the
    # last few, never corrupt the file.
    conn.execute("PRAGMA synchronous=NORMAL")
    # ON DELETE CASCADE and REFERENCES hold in every run, not only after a repair
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def fsync_dir(d: Path) -> None:
    """fsync a directory, so that a rename in it survives a power cut (best effort)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """Open for reading.  Works on read-only media too (falls back to immutable mode)."""
    uri = f"file:{path}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
    # WAL needs a writable -shm file; on a read-only directory read the last checkpoint
    return sqlite3.connect(f"file:{path}?immutable=1", uri=True, isolation_level=None)

