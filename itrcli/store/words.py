"""The words read in images (scene text): tables, the FTS5 index, and safe full-text
queries.  ``store.words`` (:class:`Words`) owns the tables; the table names keep the
``text_`` prefix they have on disk.

Keyed by content hash, like the vectors: a moved file keeps its text, a copy shares it, a
changed file (new hash) is read again, and text whose content left the library is dropped.

- ``text_status``: one row per content hash read: how many lines were kept, or why reading
  failed (remembered: not retried until the reader changes), and which reader read it.
- ``text_lines``: one row per kept line: text, box (JSON, four ``[x, y]`` corners in the
  upright image's pixels) and confidence.
- ``text_fts``: FTS5 over each image's lines (one document per hash, ``rowid`` =
  ``text_status.id``), tokenizer ``unicode61 remove_diacritics 2``: case and accents are
  ignored, so ``cafe`` finds "Café".

Queries typed by users never reach FTS5 syntax: :func:`fts_query` keeps only words and
quoted phrases and quotes every token, so no operator, quote or bracket can raise an error.
"""

from __future__ import annotations

import json
import re
import sqlite3
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

#: Words left out of text queries: they would match nearly any sign, and a descriptive
#: query ("a dog on the beach") should not be pulled towards photos of text by them.
STOPWORDS = frozenset(
    "a an the of on in at to and or with by for from is are as its it this that into over "
    "under near".split())


def create_tables(c: sqlite3.Connection) -> None:
    """The text tables (migration ``m004_text_lines``)."""
    c.execute("""CREATE TABLE text_status (
        id INTEGER PRIMARY KEY,          -- the rowid of its text_fts document
        hash TEXT NOT NULL UNIQUE,       -- files.hash
        lines INTEGER NOT NULL,          -- kept lines (0: no text)
        error TEXT,                      -- why reading failed, else NULL
        reader TEXT NOT NULL,            -- ingest.ocr.reader_id()
        seconds REAL NOT NULL,           -- time the read took
        read_at TEXT NOT NULL)""")
    c.execute("""CREATE TABLE text_lines (
        hash TEXT NOT NULL,
        line INTEGER NOT NULL,           -- 0, 1, ... in reading order
        text TEXT NOT NULL,
        box TEXT NOT NULL,               -- JSON [[x, y] x 4], upright image pixels
        confidence REAL NOT NULL,
        PRIMARY KEY (hash, line))""")
    c.execute("CREATE VIRTUAL TABLE text_fts USING fts5(text, "
              "tokenize = 'unicode61 remove_diacritics 2')")


#: The files whose text is read: images only (a video's row has a duration; its frames
#: are not read, so a video is never queued, counted as unread, or remembered as failed)
_IMAGES = "SELECT hash FROM files WHERE duration IS NULL"


# --- writing (inside the caller's transaction) ----------------------------------------------

# --- reading ---------------------------------------------------------------------------------

@dataclass
class StoredLine:
    text: str
    box: list[list[float]]
    confidence: float

    def to_json(self) -> dict:
        return {"text": self.text, "box": self.box, "confidence": round(self.confidence, 4)}


# --- full-text queries -----------------------------------------------------------------------

_TOKEN = re.compile(r"[^\W_]+")
_PHRASE = re.compile(r'"([^"]*)"')


def fold(word: str) -> str:
    """Lower case without accents: what the unicode61 tokenizer indexes."""
    d = unicodedata.normalize("NFKD", word.lower())
    return "".join(ch for ch in d if not unicodedata.combining(ch))


@dataclass(frozen=True)
class WordQuery:
    """A user's text, as FTS5 terms: ``words`` match a word or its beginning, ``phrases``
    their words in sequence.  Every term must match (AND)."""

    words: tuple[str, ...]
    phrases: tuple[tuple[str, ...], ...]

    @property
    def empty(self) -> bool:
        return not self.words and not self.phrases

    def match(self) -> str:
        """The FTS5 MATCH expression: every token double-quoted (tokens are runs of letters
        and digits, so they hold no quote or operator), words with a prefix star."""
        terms = [f'"{w}"*' for w in self.words]
        terms += ['"' + " ".join(p) + '"' for p in self.phrases]
        return " AND ".join(terms)

    def matches_word(self, word: str) -> bool:
        """Whether a word of an image's text is one this query matched (for showing)."""
        f = fold(word)
        return any(f.startswith(w) for w in self.words) or any(f in p for p in self.phrases)


def word_query(text: str) -> WordQuery:
    """Parse a user's query: ``"quoted phrases"`` stay phrases; other words, less
    :data:`STOPWORDS`, are matched as word beginnings.  An unbalanced quote is a plain
    character.  Never raises."""
    phrases = []
    for m in _PHRASE.finditer(text):
        toks = tuple(fold(t) for t in _TOKEN.findall(m.group(1)))
        if toks:
            phrases.append(toks)
    rest = _PHRASE.sub(" ", text)
    words = []
    for t in _TOKEN.findall(rest):
        f = fold(t)
        if f and f not in STOPWORDS and f not in words:
            words.append(f)
    return WordQuery(tuple(words), tuple(dict.fromkeys(phrases)))


class Words:
    """The words tables of a library (``text_status``, ``text_lines``, ``text_fts``):
    their one owner (``store.words``)."""

    def __init__(self, store) -> None:
        self.store = store

    def has_tables(self) -> bool:
        """False on a library written by 0.1.0 and opened read-only (not migrated yet)."""
        c = self.store.conn
        return c.execute("SELECT 1 FROM sqlite_master WHERE name = 'text_status'").fetchone() is not None

    def miscounted(self) -> list[str]:
        """Content hashes whose read record's line count disagrees with their stored lines."""
        c = self.store.conn
        return [h for h, n, m in c.execute(
            "SELECT s.hash, s.lines, (SELECT count(*) FROM text_lines l WHERE l.hash = s.hash) "
            "FROM text_status s") if n != m]

    def loose_line_hashes(self) -> int:
        """How many contents have lines but no read record."""
        c = self.store.conn
        return c.execute("SELECT count(DISTINCT hash) FROM text_lines WHERE hash NOT IN "
                         "(SELECT hash FROM text_status)").fetchone()[0]

    def delete_loose_lines(self) -> None:
        c = self.store.conn
        c.execute("DELETE FROM text_lines WHERE hash NOT IN (SELECT hash FROM text_status)")

    def fts_ids(self) -> tuple[set[int], set[int]]:
        """(ids of read records with text, rowids in the full-text index): equal when in step."""
        c = self.store.conn
        want = {r[0] for r in c.execute("SELECT id FROM text_status WHERE lines > 0")}
        have = {r[0] for r in c.execute("SELECT rowid FROM text_fts")}
        return want, have

    def unread_count(self) -> int:
        """Image contents in the library whose text was not read yet."""
        c = self.store.conn
        return c.execute(f"SELECT count(DISTINCT hash) FROM ({_IMAGES}) WHERE hash NOT IN "
                         "(SELECT hash FROM text_status)").fetchone()[0]

    def any_read(self) -> bool:
        c = self.store.conn
        return self.has_tables() and c.execute("SELECT 1 FROM text_status LIMIT 1").fetchone() is not None

    def status_counts(self) -> dict[str, int]:
        """``itr info``'s counts: images read, with text, lines kept, failed reads."""
        c = self.store.conn
        if not self.has_tables():
            return {"images_read": 0, "with_text": 0, "lines": 0, "failed": 0}
        read, with_text, lines, failed = c.execute(
            "SELECT count(*), coalesce(sum(lines > 0), 0), coalesce(sum(lines), 0), "
            "coalesce(sum(error IS NOT NULL), 0) FROM text_status").fetchone()
        return {"images_read": read, "with_text": with_text, "lines": lines, "failed": failed}

    def put(self, h: str, lines: Sequence, *, reader: str, seconds: float,
            now: str, error: str | None = None) -> None:
        """Store what was read for content ``h`` (``lines``: objects with ``text``, ``box``,
        ``confidence``), replacing an earlier read."""
        c = self.store.conn
        self.delete([h])
        cur = c.execute("INSERT INTO text_status (hash, lines, error, reader, seconds, read_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)", (h, len(lines), error, reader, seconds, now))
        sid = int(cur.lastrowid)
        c.executemany("INSERT INTO text_lines VALUES (?, ?, ?, ?, ?)",
                      [(h, i, ln.text, json.dumps([[round(x, 1), round(y, 1)] for x, y in ln.box]),
                        float(ln.confidence)) for i, ln in enumerate(lines)])
        if lines:
            c.execute("INSERT INTO text_fts (rowid, text) VALUES (?, ?)",
                      (sid, "\n".join(ln.text for ln in lines)))

    def delete(self, hashes: Iterable[str]) -> None:
        c = self.store.conn
        for h in hashes:
            r = c.execute("SELECT id FROM text_status WHERE hash = ?", (h,)).fetchone()
            if r is None:
                continue
            c.execute("DELETE FROM text_fts WHERE rowid = ?", (r[0],))
            c.execute("DELETE FROM text_lines WHERE hash = ?", (h,))
            c.execute("DELETE FROM text_status WHERE id = ?", (r[0],))

    def orphans(self) -> list[str]:
        """Hashes with text but no image (a video's record, left by a version that queued
        videos, counts: its read failed and is never retried)."""
        c = self.store.conn
        return [r[0] for r in c.execute(
            f"SELECT hash FROM text_status WHERE hash NOT IN ({_IMAGES})")]

    def clear(self) -> None:
        """Forget every read (``--no-ocr``, ``--reindex``)."""
        c = self.store.conn
        c.execute("DELETE FROM text_fts")
        c.execute("DELETE FROM text_lines")
        c.execute("DELETE FROM text_status")

    def rebuild_fts(self) -> int:
        """Re-create every FTS document from ``text_lines`` (repair); returns how many."""
        c = self.store.conn
        c.execute("DELETE FROM text_fts")
        n = 0
        for sid, h in c.execute("SELECT id, hash FROM text_status WHERE lines > 0").fetchall():
            texts = [r[0] for r in c.execute(
                "SELECT text FROM text_lines WHERE hash = ? ORDER BY line", (h,))]
            if texts:
                c.execute("INSERT INTO text_fts (rowid, text) VALUES (?, ?)", (sid, "\n".join(texts)))
                n += 1
        return n

    def read_hashes(self, reader: str) -> set[str]:
        """Hashes that need no reading: read by ``reader``, or read by any reader with success
        (a failure is retried once the reader changes)."""
        c = self.store.conn
        return {h for h, err, rd in c.execute("SELECT hash, error, reader FROM text_status")
                if err is None or rd == reader}

    def missing(self, reader: str) -> list[tuple[str, str, bytes | None]]:
        """(hash, path, fsname) of one image per content hash not yet read (see
        :func:`read_hashes`); videos are not read."""
        c = self.store.conn
        done = self.read_hashes(reader)
        out, seen = [], set()
        for h, path, fsname in c.execute(
                "SELECT hash, path, fsname FROM files WHERE duration IS NULL ORDER BY id"):
            if h not in done and h not in seen:
                seen.add(h)
                out.append((h, path, fsname))
        return out

    def lines_of(self, h: str) -> list[StoredLine] | None:
        """The stored lines of content ``h``; None when it was never read (or failed)."""
        c = self.store.conn
        st = c.execute("SELECT error FROM text_status WHERE hash = ?", (h,)).fetchone()
        if st is None or st[0] is not None:
            return None
        return [StoredLine(t, json.loads(b), conf) for t, b, conf in c.execute(
            "SELECT text, box, confidence FROM text_lines WHERE hash = ? ORDER BY line", (h,))]

    def search(self, q: WordQuery, limit: int) -> list[tuple[str, float]]:
        """The best ``limit`` content hashes for ``q``: ``(hash, score)``, best first, where
        score is FTS5's bm25 negated (higher is better)."""
        c = self.store.conn
        if q.empty or not self.has_tables():
            return []
        rows = c.execute(
            "SELECT s.hash, bm25(text_fts) AS r FROM text_fts JOIN text_status s ON s.id = text_fts.rowid "
            "WHERE text_fts MATCH ? ORDER BY r, s.hash LIMIT ?", (q.match(), limit)).fetchall()
        return [(h, -float(r)) for h, r in rows]

    def matched_words(self, h: str, q: WordQuery) -> list[str]:
        """The words of content ``h``'s text that ``q`` matches, in reading order, each once."""
        c = self.store.conn
        out: list[str] = []
        for (text,) in c.execute("SELECT text FROM text_lines WHERE hash = ? ORDER BY line", (h,)):
            for w in _TOKEN.findall(text):
                if q.matches_word(w) and w not in out:
                    out.append(w)
        return out
