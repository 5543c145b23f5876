"""The evaluation embedding cache: vectors ``itr eval`` already computed, keyed by model
and image content hash or caption text, in ``$XDG_CACHE_HOME/itr/embeddings.db`` (not in
any library).  A second run, or the same images under another name, encodes nothing."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ItrError
from .sql import in_chunks

CACHE_NAME = "embeddings.db"


class EmbeddingCache:
    """Vectors already computed, in ``cache_dir()/embeddings.db``.

    Tables ``images`` (model, hash, vector) and ``texts`` (model, text, vector); vectors are
    float32 little-endian blobs.
    """

    VERSION = 1

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > self.VERSION:
                raise ItrError(f"embedding cache {self.path} was written by a newer itr; "
                               "use --no-cache or delete the file")
            if version < self.VERSION:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.execute("CREATE TABLE IF NOT EXISTS images (model TEXT NOT NULL, "
                                  "hash TEXT NOT NULL, vector BLOB NOT NULL, "
                                  "PRIMARY KEY (model, hash)) WITHOUT ROWID")
                self.conn.execute("CREATE TABLE IF NOT EXISTS texts (model TEXT NOT NULL, "
                                  "text TEXT NOT NULL, vector BLOB NOT NULL, "
                                  "PRIMARY KEY (model, text)) WITHOUT ROWID")
                self.conn.execute(f"PRAGMA user_version = {self.VERSION}")
                self.conn.execute("COMMIT")
        except (sqlite3.DatabaseError, OSError) as e:
            raise ItrError(f"cannot use the embedding cache {self.path}: {e} "
                           "(use --no-cache, or delete the file)") from None

    def close(self) -> None:
        self.conn.close()

    def get(self, table: str, model: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached vectors of ``keys`` (hashes or texts) under ``model``: key -> ``[dim]``."""
        column = "hash" if table == "images" else "text"
        out: dict[str, np.ndarray] = {}
        for cur in in_chunks(self.conn, f"SELECT {column}, vector FROM {table} WHERE model = ?"
                             f" AND {column} IN ({{marks}})", dict.fromkeys(keys), before=[model]):
            for k, blob in cur:
                out[k] = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        return out

    def put(self, table: str, model: str, items: dict[str, np.ndarray]) -> None:
        column = "hash" if table == "images" else "text"
        if not items:
            return
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                f"INSERT OR REPLACE INTO {table} (model, {column}, vector) VALUES (?, ?, ?)",
                [(model, k, np.asarray(v, dtype="<f4").tobytes()) for k, v in items.items()])
            self.conn.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise ItrError(f"cannot write the embedding cache {self.path}: {e} "
                           "(use --no-cache)") from None


def default_cache_path() -> Path:
    from ..paths import cache_dir

    return cache_dir() / CACHE_NAME
