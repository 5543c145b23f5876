"""The library's SQLite database: schema, migrations, rows, raw vectors and the change log.

SQLite is the source of truth.  One row per file in ``files`` (its ``id`` is the file's label
in the HNSW index), its vector in ``vectors`` (float16 in libraries made since 0.2.0, float32
before; see :data:`VECTOR_DTYPE`), and every vector change appended to
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
from functools import cached_property
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..errors import LibraryError
from ..gcpause import gc_paused
from .lock import WriteLock
from ..pools import in_order
from ..records import StoredFile
from .sql import in_chunks, now_iso

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


def m005_video_frames(conn: sqlite3.Connection) -> None:
    # A video is one `files` row (its path, hash, size, creation time) holding no vector
    # itself, and one `frames` row per kept frame.  Frame ids are labels in the same space
    # as files.id (taken from the files AUTOINCREMENT counter, never reused), so the graph,
    # the vectors table and vector_log carry frames unchanged: a label is either an image's
    # file id or a frame id.  vectors.id can then no longer reference files(id): the table
    # is rebuilt without that constraint (SQLite cannot drop one in place).
    _script(
        conn,
        """
        ALTER TABLE files ADD COLUMN duration REAL;  -- seconds, set for videos only
        CREATE TABLE frames (
            id INTEGER PRIMARY KEY,                -- the frame's label in the vector index
            file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
            time REAL NOT NULL                     -- seconds from the start of the video
        );
        CREATE INDEX frames_file ON frames(file_id, time);
        CREATE INDEX files_videos ON files(id) WHERE duration IS NOT NULL;
        CREATE TABLE vectors_m005 (
            id INTEGER PRIMARY KEY,                -- a label: files.id of an image, or frames.id
            vector BLOB NOT NULL                   -- float32 little-endian, L2-normalised
        );
        INSERT INTO vectors_m005 (id, vector) SELECT id, vector FROM vectors;
        DROP TABLE vectors;
        ALTER TABLE vectors_m005 RENAME TO vectors
        """
    )


def m004_text_lines(conn: sqlite3.Connection) -> None:
    # Scene text, keyed by content hash like the vectors (see store/words.py)
    from .words import create_tables

    create_tables(conn)


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    m001_create_tables,
    m002_failures,
    m003_hash_codes,
    m004_text_lines,
    m005_video_frames,
    m006_adapters,
]
#: The schema version a library has once every migration ran (kept in meta, for readers).
SCHEMA_VERSION = len(MIGRATIONS)
#: Which migrations ran (made before the first one).
_MIGRATIONS_TABLE = "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT)"


def _quoted(name: str) -> str:
    """An SQL identifier, quoted (any ``"`` in it doubled)."""
    return '"' + name.replace('"', '""') + '"'


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



# --- the vectors' database copy ------------------------------------------------------------
#: How new libraries store each vector's database copy: float16 (1 KiB for 512-d, half of
#: float32).  The graph keeps float32, of the same float16 values, so that a graph rebuilt
#: from the database is the graph that was saved.  Libraries made before 0.2.0 keep float32
#: until ``itr check --compact`` converts them.  Each blob's length says its type (2 or 4
#: bytes per dimension), so a library half-way through a conversion reads correctly.
VECTOR_DTYPE = "float16"
#: SQLite page size of new libraries.  A row holding a 512-d float32 vector (2 KiB) is just
#: over half of a 4 KiB page, so each page held one and wasted ~2 KiB; 16 KiB pages hold
#: fifteen float16 rows (~1,090 bytes each).  Larger pages pack slightly better (64 KiB:
#: ~1,040) but every random write (the content-hash index) then costs a 64 KiB page in the
#: write-ahead log.
PAGE_SIZE = 16384
_LE = {"float16": "<f2", "float32": "<f4"}


def _unit16(half):
    """float16 rows -> float32 rows scaled back to unit length (rounding moved each norm by
    ~1e-4; the cosine graph normalises what it is given, so the database must give the
    same unit vectors to every other reader: exact search, hashing, eval, check)."""
    import numpy as np

    v = half.astype(np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norms > 0, norms, 1)


def decode_vectors(blobs: list[bytes], dim: int):
    """Raw ``vectors.vector`` blobs -> ``[n, dim]`` float32 unit vectors; a blob of any
    other length than ``2*dim`` or ``4*dim`` bytes raises ``ValueError``."""
    import numpy as np

    n = len(blobs)
    if n == 0:
        return np.zeros((0, dim), dtype=np.float32)
    joined = b"".join(blobs)
    if len(joined) == 2 * n * dim and all(len(b) == 2 * dim for b in blobs):
        return _unit16(np.frombuffer(joined, dtype="<f2").reshape(n, dim))
    if len(joined) == 4 * n * dim and all(len(b) == 4 * dim for b in blobs):
        return np.frombuffer(joined, dtype="<f4").reshape(n, dim).astype(np.float32, copy=False)
    out = np.empty((n, dim), dtype=np.float32)  # a conversion stopped half-way: both kinds
    for i, b in enumerate(blobs):
        if len(b) == 2 * dim:
            out[i] = _unit16(np.frombuffer(b, dtype="<f2"))
        elif len(b) == 4 * dim:
            out[i] = np.frombuffer(b, dtype="<f4")
        else:
            raise ValueError(f"vector blob of {len(b)} bytes for dimension {dim}")
    return out


def _decode(rows, dim: int):
    """(id, blob) rows -> (ids ``[n]`` int64, vectors ``[n, dim]`` float32)."""
    import numpy as np

    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    return ids, decode_vectors([r[1] for r in rows], dim)

class Store:
    """An open library database."""

    def __init__(self, directory: Path, *, create: bool = False, readonly: bool = False,
                 vector_dtype: str = VECTOR_DTYPE, page_size: int = PAGE_SIZE) -> None:
        """Open (``create``: or make) the library database in ``directory``.
        ``vector_dtype`` and ``page_size`` apply to a database made now (the defaults; the
        0.1.0 layout is float32 in 4,096-byte pages)."""
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        new = not self.path.exists()
        self._vector_dtype: str | None = None
        if new:
            if not create:
                raise LibraryError(
                    f"no library at {self.directory} (run 'itr index PATH' first, or pass --db)"
                )
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LibraryError(f"cannot create library directory {self.directory}: {e.strerror}") from None
        self.readonly = readonly
        self._lock: WriteLock | None = None  # held while a writing() block runs
        self._lock_depth = 0
        self._migrating = False
        try:
            if readonly:
                # the identity seen before connecting: a file swapped in meanwhile then
                # reads as replaced (one reopen too many, never one too few)
                self._identity = _identity(self.path)
                self.conn = _connect_readonly(self.path)
            else:
                self.conn, self._identity = _connect_identified(self.path, page_size if new else None)
            if not readonly:
                self._migrating = True  # under SQLite's own write lock, before any lock of ours
                try:
                    self._migrate()
                    if new and self.get_meta("vector_dtype") is None:
                        self.set_vector_dtype(vector_dtype)
                finally:
                    self._migrating = False
            else:
                self._check_version()
                self._compat_views()
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

    # -- the owners of the other tables ----------------------------------------------
    @cached_property
    def words(self):
        """The words read in images: :class:`itrcli.store.words.Words`."""
        from .words import Words

        return Words(self)

    @cached_property
    def adapters(self):
        """The query map of ``itr adapt``: :class:`itrcli.store.adapters.Adapters`."""
        from .adapters import Adapters

        return Adapters(self)

    @cached_property
    def codes(self):
        """The binary codes of ``itr hash``: :class:`itrcli.store.codes.Codes`."""
        from .codes import Codes

        return Codes(self)

    @cached_property
    def metadata(self):
        """Metadata filters and coverage: :class:`itrcli.store.metadata.Metadata`."""
        from .metadata import Metadata

        return Metadata(self)

    # -- the one write path ----------------------------------------------------------
    @contextmanager
    def writing(self, what: str = "itr", wait: float = 0.0) -> Iterator["Store"]:
        """Hold the library's write lock for a block of writes: the only way to write.

        The lock is taken first; then, if the database file was replaced since this store
        opened it (``itr check --compact`` / ``--repair`` swap in a new file), the store
        reopens the file now in place, so that no write goes into a file that is no longer
        the library's.  Re-entrant: an inner block of the same store reuses the lock.
        Raises:
            LibraryError: opened read-only.
            LockedError: another process holds the lock after ``wait`` seconds.
        """
        if self.readonly:
            raise LibraryError(f"library {self.directory} opened read-only")
        if self._lock_depth == 0:
            lock = WriteLock(self.directory, what).acquire(wait)
            try:
                self._follow_replacement()
            except BaseException:
                lock.release()
                raise
            self._lock = lock
        self._lock_depth += 1
        try:
            yield self
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock is not None:
                self._lock.release()
                self._lock = None

    @property
    def locked(self) -> bool:
        """Whether this store holds the library's write lock (inside :meth:`writing`)."""
        return self._lock_depth > 0

    def replaced(self) -> bool:
        """Whether the database file on disk is no longer the one this store has open."""
        return _identity(self.path) != getattr(self, "_identity", None)

    def _follow_replacement(self) -> None:
        if not self.replaced():
            return
        self.conn.close()
        self.conn, self._identity = _connect_identified(self.path)
        self._migrating = True
        try:
            self._migrate()
        finally:
            self._migrating = False

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, always under the write lock: inside a :meth:`writing`
        block it uses that block's lock; alone it takes the lock for itself (and fails with
        :class:`~itrcli.errors.LockedError` while another process holds it).  The schema
        migrations at open run under SQLite's own lock only.  Committed when the block
        ends; rolled back when it raises or when the COMMIT itself fails (the error raised
        is always the first one)."""
        if self._lock_depth or self._migrating:
            with self._transaction() as c:
                yield c
            return
        with self.writing(), self._transaction() as c:
            yield c

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            _rollback(conn)
            raise
        try:
            conn.execute("COMMIT")
        except BaseException:
            # e.g. SQLITE_BUSY or a deferred constraint: the transaction is still open
            _rollback(conn)
            raise

    def _applied(self) -> set[str]:
        self.conn.execute(_MIGRATIONS_TABLE)
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
        if self.get_meta("schema_version", 0) < SCHEMA_VERSION:
            # every migration is applied, whatever order they were applied in
            self.set_meta(schema_version=SCHEMA_VERSION)
        self._check_version()

    def _check_version(self) -> None:
        v = self.get_meta("schema_version", 0)
        if v > SCHEMA_VERSION:
            raise LibraryError(
                f"library {self.directory} has schema version {v}, newer than this itr "
                f"understands ({SCHEMA_VERSION}); upgrade itr"
            )

    def _compat_views(self) -> None:
        """A reader of a library written before ``m005_video_frames`` (migrated only on the
        next write) sees the tables it adds as empty: temporary views, in this connection
        only, shadow the missing table and column."""
        names = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master")}
        if "files" not in names or "frames" in names:
            return
        self.conn.execute("CREATE TEMP VIEW frames AS SELECT NULL AS id, NULL AS file_id, "
                          "NULL AS time WHERE 0")
        cols = [r[1] for r in self.conn.execute("PRAGMA main.table_info(files)")]
        if "duration" not in cols:
            self.conn.execute("CREATE TEMP VIEW files AS SELECT *, NULL AS duration FROM main.files")

    def close(self) -> None:
        self.conn.close()

    def rebuild_file(self) -> Path:
        """Copy every table of itr's schema, row by row, into a fresh file and swap it in
        (the caller holds the write lock).  This leaves behind damage confined to indexes
        or free pages.

        The fresh file's schema is made by itr's own migrations, never from SQL read out of
        the damaged file; only the tables they make are copied, the columns present on both
        sides, names quoted.  The damaged file is kept next to it as ``itr.db.damaged``;
        returns that path.  Raises ``sqlite3.DatabaseError`` when the tables themselves
        cannot be read.
        """
        fresh = self.directory / f".{DB_NAME}.rebuild"
        old = self.directory / f"{DB_NAME}.damaged"
        fresh.unlink(missing_ok=True)
        c = self.conn
        # copy rows as they are (orphans included: the repair that follows drops them)
        c.execute("PRAGMA foreign_keys=OFF")
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        new = sqlite3.connect(fresh, isolation_level=None)
        try:
            new.execute(f"PRAGMA page_size={int(c.execute('PRAGMA page_size').fetchone()[0])}")
            new.execute("BEGIN")
            new.execute(_MIGRATIONS_TABLE)
            for m in MIGRATIONS:
                m(new)
            new.execute("COMMIT")
            schema = new.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table' "
                                 "AND name NOT LIKE 'sqlite_%'").fetchall()
        finally:
            new.close()
        # a virtual table (the text FTS index) makes its own shadow tables and is not
        # copied: its contents are rebuilt from their rows (check --repair, store/words.py)
        virtual = [n for n, sql in schema if sql.upper().startswith("CREATE VIRTUAL")]
        tables = [n for n, _sql in schema
                  if n not in virtual and not any(n.startswith(v + "_") for v in virtual)]
        c.execute("ATTACH DATABASE ? AS fresh", (str(fresh),))
        try:
            there = {r[0] for r in c.execute(
                "SELECT name FROM main.sqlite_master WHERE type = 'table'")}
            c.execute("BEGIN")
            for name in tables:
                if name not in there:
                    continue
                mine = [r[1] for r in c.execute(f"PRAGMA fresh.table_info({_quoted(name)})")]
                theirs = {r[1] for r in c.execute(f"PRAGMA main.table_info({_quoted(name)})")}
                cols = ", ".join(_quoted(col) for col in mine if col in theirs)
                # WHERE 1: no "xfer" shortcut, which would copy the (damaged) indexes;
                # NOT INDEXED: read the table itself
                c.execute(f"INSERT INTO fresh.{_quoted(name)} ({cols}) SELECT {cols} "
                          f"FROM main.{_quoted(name)} NOT INDEXED WHERE 1")
            if "sqlite_sequence" in there:
                c.execute("DELETE FROM fresh.sqlite_sequence")
                c.execute("INSERT INTO fresh.sqlite_sequence (name, seq) SELECT name, seq "
                          f"FROM main.sqlite_sequence WHERE name IN ({','.join('?' * len(tables))})",
                          tables)
            c.execute("COMMIT")
        except BaseException:
            _rollback(c)
            raise
        finally:
            c.execute("DETACH DATABASE fresh")
        new = sqlite3.connect(fresh, isolation_level=None)
        try:
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
        self.conn, self._identity = _connect_identified(self.path)
        return old

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database file (before the file is moved)."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def swap_in(self, other_library: Path) -> None:
        """Replace this library's database with the one in ``other_library`` (closed and
        checkpointed; the caller holds the write lock), and reopen.  Readers that have the
        old file open go on reading it; the old write-ahead log is emptied first, so that
        no reader can replay it into the new file."""
        src = Path(other_library) / DB_NAME
        with open(src, "rb") as f:
            os.fsync(f.fileno())
        self.checkpoint()
        self.conn.close()
        os.replace(src, self.path)
        for suffix in ("-wal", "-shm"):  # the old file's: never replayed into the new one
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        fsync_dir(self.directory)
        self.conn, self._identity = _connect_identified(self.path)

    # -- layout and compaction (itr check --compact) ----------------------------------
    def layout(self) -> dict[str, Any]:
        """How the database is laid out: page size, pages, free pages, and the dtype new
        vectors are written in."""
        c = self.conn
        return {"page_size": c.execute("PRAGMA page_size").fetchone()[0],
                "pages": c.execute("PRAGMA page_count").fetchone()[0],
                "free_pages": c.execute("PRAGMA freelist_count").fetchone()[0],
                "vector_dtype": self.vector_dtype}

    def float32_vectors(self) -> int:
        """How many vectors are still stored as float32 (reads every row's length)."""
        dim = int(self.get_meta("dim", 0))
        return self.conn.execute("SELECT count(*) FROM vectors WHERE length(vector) = ?",
                                 (4 * dim,)).fetchone()[0]

    def convert_vectors(self, after: int, limit: int) -> tuple[int | None, int]:
        """Rewrite as float16 the float32 vectors among the next ``limit`` rows after label
        ``after``, in one transaction (the caller holds the write lock and has set
        ``vector_dtype`` to float16).  Returns (last label looked at, or None at the end;
        vectors converted).  The graph is not touched: it keeps the float32 originals."""
        import numpy as np

        dim = int(self.get_meta("dim", 0))
        with self.transaction() as c:
            rows = c.execute("SELECT id, vector FROM vectors WHERE id > ? ORDER BY id LIMIT ?",
                             (after, limit)).fetchall()
            if not rows:
                return None, 0
            old = [(i, b) for i, b in rows if len(b) == 4 * dim]
            if old:
                mat = np.frombuffer(b"".join(b for _, b in old), dtype="<f4").reshape(len(old), dim)
                half = mat.astype("<f2")
                c.executemany("UPDATE vectors SET vector = ? WHERE id = ?",
                              ((half[j].tobytes(), i) for j, (i, _) in enumerate(old)))
        return rows[-1][0], len(old)

    def rewrite_file(self, page_size: int = PAGE_SIZE) -> None:
        """Write the database afresh into a new file with ``page_size`` pages and no free
        pages (``VACUUM INTO``), then swap it in (the caller holds the write lock).  An
        interruption leaves the old file as it was and a temporary file that the next
        rewrite (or ``itr check --repair``) removes."""
        fresh = self.directory / f".{DB_NAME}.compact"
        fresh.unlink(missing_ok=True)
        c = self.conn
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        c.execute(f"PRAGMA page_size={int(page_size)}")  # honoured by VACUUM INTO
        try:
            c.execute("VACUUM INTO ?", (str(fresh),))
            with open(fresh, "rb") as f:
                os.fsync(f.fileno())
        except BaseException:
            fresh.unlink(missing_ok=True)
            raise
        self.conn.close()
        os.replace(fresh, self.path)
        for suffix in ("-wal", "-shm"):  # they belonged to the old file: never replay them
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        fsync_dir(self.directory)
        self.conn, self._identity = _connect_identified(self.path)

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
        new = tuple.__new__  # StoredFile(...) without the keyword-handling __new__
        return self._by_fs_path("id, size, mtime_ns, hash", lambda row: new(StoredFile, row[1:]))

    def shown_paths(self) -> dict[str, tuple[str, int]]:
        """Every file row as path to open -> (path as shown, id)."""
        return self._by_fs_path("id", tuple)

    def _by_fs_path(self, columns: str, make: Callable[[tuple], Any]) -> dict[str, Any]:
        """``make((path, *columns))`` of every file row, keyed by the path to open: most rows
        in one query with no per-row decoding (their path is its own text), then the rows of
        names that are not UTF-8.  A million rows: built with the collector paused."""
        with gc_paused():
            out = {row[0]: make(row) for row in self.conn.execute(
                f"SELECT path, {columns} FROM files WHERE fsname IS NULL")}
            for row in self.conn.execute(
                    f"SELECT path, {columns}, fsname FROM files WHERE fsname IS NOT NULL"):
                out[fs_path_of(row[0], row[-1])] = make(row[:-1])
        return out

    def file_count(self) -> int:
        """Rows in ``files`` (images and videos)."""
        return self.conn.execute("SELECT count(*) FROM files").fetchone()[0]

    def count(self) -> int:
        """Labels that carry a vector: images plus video frames."""
        return self.conn.execute(  # count(*) of files reads an index; videos a partial one
            "SELECT (SELECT count(*) FROM files) - (SELECT count(*) FROM files WHERE duration"
            " IS NOT NULL) + (SELECT count(*) FROM frames)").fetchone()[0]

    def rows(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """File rows by id (missing ids are absent)."""
        out: dict[int, dict[str, Any]] = {}
        for cur in in_chunks(self.conn, "SELECT * FROM files WHERE id IN ({marks})", ids):
            cols = [d[0] for d in cur.description]
            for r in cur:
                row = dict(zip(cols, r))
                out[row["id"]] = row
        return out

    def rows_by_hashes(self, hashes: Iterable[str]) -> list[dict[str, Any]]:
        """File rows having one of these content hashes."""
        out: list[dict[str, Any]] = []
        for cur in in_chunks(self.conn, "SELECT * FROM files WHERE hash IN ({marks})", hashes):
            cols = [d[0] for d in cur.description]
            out += [dict(zip(cols, r)) for r in cur]
        return out

    def rows_by_prefixes(self, prefixes: Iterable[str]) -> list[dict[str, Any]]:
        """File rows whose path (as shown) starts with one of ``prefixes``, each of which
        ends with a ``.`` (``<folder>/<stem>.``: the files of one stem, twins of a photo,
        see :mod:`itrcli.query.twins`).  A range of the path index per prefix: ``.`` and
        ``/`` are neighbours, so ``[prefix, prefix[:-1] + "/")`` holds exactly those paths."""
        out: list[dict[str, Any]] = []
        seen: set[int] = set()
        for p in dict.fromkeys(prefixes):
            if not p.endswith("."):
                raise ValueError(f"prefix {p!r} does not end with '.'")
            cur = self.conn.execute("SELECT * FROM files WHERE path >= ? AND path < ?",
                                    (p, p[:-1] + "/"))
            cols = [d[0] for d in cur.description]
            for r in cur:
                row = dict(zip(cols, r))
                if row["id"] not in seen:
                    seen.add(row["id"])
                    out.append(row)
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
            rows = []
            for cur in in_chunks(self.conn, "SELECT id, vector FROM vectors WHERE id IN"
                                 " ({marks}) ORDER BY id", sorted(set(ids))):
                rows += cur.fetchall()
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

    def labels_of_files(self, file_ids: set[int] | None) -> set[int] | None:
        """The labels (vector ids) of these files: an image's own id, a video's frame ids."""
        if file_ids is None:
            return None
        try:
            videos = {r[0] for r in self.conn.execute(
                "SELECT id FROM files WHERE duration IS NOT NULL")}
        except sqlite3.OperationalError:  # no duration column: a library without videos
            return set(file_ids)
        out = set(file_ids) - videos
        for cur in in_chunks(self.conn, "SELECT id FROM frames WHERE file_id IN ({marks})",
                             sorted(set(file_ids) & videos)):
            out.update(r[0] for r in cur)
        return out

    def vector_ids(self):
        """Every label that carries a vector ``[n]`` int64: images' file ids and video frames'
        ids (read from files and frames, far smaller to scan than the vectors)."""
        import numpy as np

        return np.fromiter((r[0] for r in self.conn.execute(
            "SELECT id FROM files WHERE duration IS NULL UNION ALL SELECT id FROM frames")),
            dtype=np.int64)

    def file_ids(self) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT id FROM files")]

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

    def vector_chunks(self, chunk: int = 50_000, threads: int = 1):
        """Every stored vector, ``chunk`` rows at a time in id order: (ids ``[n]`` int64,
        vectors ``[n, dim]`` float32) per chunk, so memory stays ``chunk x dim``.

        ``threads`` > 1 decodes the chunks in that many threads while this one reads the
        next (decoding takes three times as long as reading); at most ``threads + 1``
        chunks are held, and they still come in id order."""
        dim = int(self.get_meta("dim", 0))
        if threads <= 1:
            for rows in self._vector_rows(chunk):
                yield _decode(rows, dim)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads, thread_name_prefix="itr-decode") as pool:
            # the rows are read in this thread, which owns the connection
            yield from in_order(pool, lambda rows: _decode(rows, dim), self._vector_rows(chunk),
                                threads + 1)

    def _vector_rows(self, chunk: int) -> Iterator[list]:
        """``(id, blob)`` rows of every stored vector, ``chunk`` at a time in id order."""
        last = -1
        while True:
            rows = self.conn.execute("SELECT id, vector FROM vectors WHERE id > ? ORDER BY id LIMIT ?",
                                     (last, chunk)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield rows

    def vector_for_hash(self, h: str):
        """A stored vector for this content hash, or None (for moved and copied files)."""
        r = self.conn.execute(
            "SELECT v.vector FROM files f JOIN vectors v ON v.id = f.id WHERE f.hash = ? LIMIT 1",
            (h,),
        ).fetchone()
        return None if r is None else decode_vectors([r[0]], int(self.get_meta("dim", 0)))[0].copy()

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
            " camera, lat, lon, indexed_at, duration) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (text, raw, info["size"], info["mtime_ns"], info["hash"], info.get("width"),
             info.get("height"), info.get("taken_at"), info.get("camera"), info.get("lat"),
             info.get("lon"), now_iso(), info.get("duration")),
        )
        id_ = int(cur.lastrowid)
        if vector is not None:  # None: a video (its frames hold the vectors)
            self._put_vector(c, id_, vector)
        return id_

    def update_file(self, c: sqlite3.Connection, id_: int, info: dict[str, Any], vector=None) -> None:
        cols = [k for k in ("size", "mtime_ns", "hash", "width", "height", "taken_at", "camera",
                            "lat", "lon", "duration") if k in info]
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

    def delete_files(self, c: sqlite3.Connection, ids: Iterable[int]) -> list[int]:
        """Delete file rows, their vectors and a video's frames; returns the labels deleted."""
        labels = []
        for id_ in ids:
            labels += self.delete_frames(c, id_)
            c.execute("DELETE FROM vectors WHERE id = ?", (id_,))
            c.execute("DELETE FROM files WHERE id = ?", (id_,))
            c.execute("INSERT INTO vector_log (id, op) VALUES (?, 'del')", (id_,))
            labels.append(id_)
        return labels

    # -- video frames (see m005_video_frames) ------------------------------------------
    def new_labels(self, c: sqlite3.Connection, n: int) -> list[int]:
        """``n`` fresh labels from the files id counter (so file ids never take them)."""
        r = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'files'").fetchone()
        top = max(int(r[0]) if r else 0,
                  c.execute("SELECT coalesce(max(id), 0) FROM files").fetchone()[0],
                  c.execute("SELECT coalesce(max(id), 0) FROM frames").fetchone()[0])
        if r is None:
            c.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('files', ?)", (top + n,))
        else:
            c.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'files'", (top + n,))
        return list(range(top + 1, top + n + 1))

    def delete_frames(self, c: sqlite3.Connection, file_id: int) -> list[int]:
        """Delete a video's frames and their vectors (logged); returns their labels."""
        labels = [r[0] for r in c.execute("SELECT id FROM frames WHERE file_id = ?", (file_id,))]
        for i in labels:
            c.execute("DELETE FROM vectors WHERE id = ?", (i,))
            c.execute("INSERT INTO vector_log (id, op) VALUES (?, 'del')", (i,))
        c.execute("DELETE FROM frames WHERE file_id = ?", (file_id,))
        return labels

    def put_frames(self, c: sqlite3.Connection, file_id: int, times, vectors) -> tuple[list[int], list[int]]:
        """Replace a video's frames by these (times in seconds, vectors ``[n, dim]``).
        Returns (labels deleted, labels added)."""
        gone = self.delete_frames(c, file_id)
        labels = self.new_labels(c, len(times))
        for label, t, v in zip(labels, times, vectors):
            c.execute("INSERT INTO frames (id, file_id, time) VALUES (?, ?, ?)", (label, file_id, float(t)))
            self._put_vector(c, label, v)
        return gone, labels

    def frames(self, file_id: int) -> tuple[list[int], list[float]]:
        """(labels, times) of a video's frames, in time order."""
        rows = self.conn.execute("SELECT id, time FROM frames WHERE file_id = ? ORDER BY time, id",
                                 (file_id,)).fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]

    def frame_labels(self, file_ids: Iterable[int]) -> dict[int, list[int]]:
        """video file id -> its frames' labels in time order, for the videos among
        ``file_ids`` that have frames (images and unknown ids are absent)."""
        out: dict[int, list[int]] = {}
        for cur in in_chunks(self.conn, "SELECT file_id, id FROM frames WHERE file_id IN"
                             " ({marks}) ORDER BY file_id, time, id", file_ids):
            for fid, label in cur:
                out.setdefault(fid, []).append(label)
        return out

    def labels(self, ids: Iterable[int]) -> dict[int, tuple[int, float | None]]:
        """label -> (file id, time): an image's label is its file id (time None), a frame's
        is its frames row.  Unknown labels are absent."""
        ids = list(ids)
        out: dict[int, tuple[int, float | None]] = {}
        for cur in in_chunks(self.conn, "SELECT id, file_id, time FROM frames WHERE id IN"
                             " ({marks})", ids):
            out.update((id_, (fid, t)) for id_, fid, t in cur)
        for cur in in_chunks(self.conn, "SELECT id FROM files WHERE id IN ({marks})"
                             " AND duration IS NULL", ids):
            out.update((id_, (id_, None)) for (id_,) in cur)
        return out

    def video_counts(self) -> tuple[int, int]:
        """(videos, frames) in the library."""
        v = self.conn.execute("SELECT count(*) FROM files WHERE duration IS NOT NULL").fetchone()[0]
        return v, self.conn.execute("SELECT count(*) FROM frames").fetchone()[0]

    @property
    def vector_dtype(self) -> str:
        """How vectors are written: ``float16`` (libraries since 0.2.0, or compacted) or
        ``float32`` (made by 0.1.0).  Read once (only a write-locked compaction changes it)."""
        if self._vector_dtype is None:
            self._vector_dtype = self.get_meta("vector_dtype", "float32")
        return self._vector_dtype

    def set_vector_dtype(self, dtype: str) -> None:
        """Write vectors as ``dtype`` from now on (``itr check --compact``)."""
        if dtype not in _LE:
            raise ValueError(f"unknown vector dtype {dtype!r}")
        self.set_meta(vector_dtype=dtype)
        self._vector_dtype = dtype

    def as_stored(self, vectors):
        """``[n, dim]`` vectors as this library stores them and reads them back (float16
        rounding, unit length again): what the graph must hold so that it can be rebuilt
        from the database exactly."""
        import numpy as np

        v = np.asarray(vectors, dtype=np.float32)
        return _unit16(v.astype(np.float16)) if self.vector_dtype == "float16" else v

    def _put_vector(self, c: sqlite3.Connection, id_: int, vector) -> None:
        import numpy as np

        blob = np.ascontiguousarray(vector, dtype=_LE[self.vector_dtype]).tobytes()
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

    # A label (vector id) is an image's file id, or a video frame's id (m005_video_frames).
    def orphan_vector_ids(self) -> list[int]:
        """Vectors that belong to no image and no video frame."""
        return [r[0] for r in self.conn.execute(
            "SELECT v.id FROM vectors v LEFT JOIN files f ON f.id = v.id AND f.duration IS NULL "
            "LEFT JOIN frames fr ON fr.id = v.id WHERE f.id IS NULL AND fr.id IS NULL")]

    def rows_without_vectors(self) -> list[tuple[int, str]]:
        """(label, path) of images and video frames (``path @seconds``) without a vector."""
        rows = self.conn.execute("SELECT f.id, f.path FROM files f LEFT JOIN vectors v ON "
                                 "v.id = f.id WHERE v.id IS NULL AND f.duration IS NULL").fetchall()
        rows += self.conn.execute(
            "SELECT fr.id, f.path || ' @' || fr.time FROM frames fr JOIN files f ON "
            "f.id = fr.file_id LEFT JOIN vectors v ON v.id = fr.id WHERE v.id IS NULL").fetchall()
        return rows

    def vector_blobs_after(self, last: int, limit: int) -> list[tuple[int, bytes, str]]:
        """(label, raw vector blob, path) of up to ``limit`` vectors of images and video
        frames with label > ``last``, in label order."""
        return self.conn.execute(
            "SELECT v.id, v.vector, coalesce(f.path, vf.path) FROM vectors v "
            "LEFT JOIN files f ON f.id = v.id AND f.duration IS NULL "
            "LEFT JOIN frames fr ON fr.id = v.id LEFT JOIN files vf ON vf.id = fr.file_id "
            "WHERE v.id > ? AND (f.id IS NOT NULL OR vf.id IS NOT NULL) ORDER BY v.id LIMIT ?",
            (last, limit)).fetchall()

    def videos_without_frames(self) -> list[tuple[int, str]]:
        return self.conn.execute(
            "SELECT f.id, f.path FROM files f WHERE f.duration IS NOT NULL AND NOT "
            "EXISTS (SELECT 1 FROM frames fr WHERE fr.file_id = f.id)").fetchall()

    def orphan_frame_ids(self) -> list[int]:
        return [r[0] for r in self.conn.execute(
            "SELECT fr.id FROM frames fr LEFT JOIN files f ON f.id = fr.file_id "
            "WHERE f.id IS NULL OR f.duration IS NULL")]

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
        """Drop vectors (and frame rows) that belong to no image or video (logged, so the
        graph follows)."""
        for i in ids:
            c.execute("DELETE FROM vectors WHERE id = ?", (i,))
            c.execute("DELETE FROM frames WHERE id = ?", (i,))
            c.execute("INSERT INTO vector_log (id, op) VALUES (?, 'del')", (i,))

    def forget_all_failures(self, c: sqlite3.Connection) -> None:
        c.execute("DELETE FROM failures")

    def forget_model(self, c: sqlite3.Connection) -> None:
        """Drop the model binding and what was measured with it (``--reindex``)."""
        c.execute(f"DELETE FROM meta WHERE key IN ({','.join('?' * len(MODEL_META))})", MODEL_META)

    def truncate_log(self, upto: int) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM vector_log WHERE seq <= ?", (upto,))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _connect_identified(path: Path, page_size: int | None = None):
    """A writable connection and the identity (device, inode) of the file it has open: the
    file is looked at before and after connecting, again until both agree (a file swapped
    in between would otherwise be taken for the one opened)."""
    while True:
        before = _identity(path)
        conn = _connect_writable(path, page_size)
        after = _identity(path)
        if before == after or before is None:
            return conn, after
        conn.close()


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back what is left of a failed transaction, never masking why it failed: SQLite
    has already rolled back by itself after some errors (SQLITE_FULL, SQLITE_IOERR,
    RAISE(ROLLBACK)), and a ROLLBACK then would only say "no transaction is active"."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _connect_writable(path: Path, page_size: int | None = None) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    if page_size:  # only takes effect before the first table is written (a new file)
        conn.execute(f"PRAGMA page_size={int(page_size)}")
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


def sqlite_uri(path: str | os.PathLike, **params: str | int) -> str:
    """A ``file:`` URI for SQLite naming ``path`` exactly, with query ``params``.

    Every byte of the absolute path outside ``A-Za-z0-9_.-~/`` is percent-encoded: in a
    URI a ``#`` would end the path, a ``?`` start the parameters and a ``%`` start an
    escape, so a library in ``lib#1`` could not be opened.  The empty authority
    (``file:///``) keeps a path starting with ``//`` a path.
    """
    from urllib.parse import quote_from_bytes, urlencode

    uri = "file://" + quote_from_bytes(os.fsencode(os.path.abspath(path)), safe="/")
    return uri + ("?" + urlencode(params) if params else "")


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """Open for reading.  Works on read-only media too (falls back to immutable mode)."""
    conn = sqlite3.connect(sqlite_uri(path, mode="ro"), uri=True, timeout=30,
                           isolation_level=None)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
    # WAL needs a writable -shm file; on a read-only directory read the last checkpoint
    return sqlite3.connect(sqlite_uri(path, immutable=1), uri=True, isolation_level=None)

