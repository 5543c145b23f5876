"""An ``itr index`` run: walk, plan, read and hash, decode in a prefetching pool, encode,
and commit rows + vectors in batches.

Only files that are new or whose size/mtime changed are read.  Every file read is hashed
first; content the library already knows (a moved, renamed or copied file) takes the known
vector without being decoded.  Decoding runs in a bounded thread pool ahead of the encoder
(Pillow and numpy release the GIL), so the two overlap without unbounded memory.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

from .images import DecodeError, Preprocess, decode_file, open_image
from .store import Store
from .vindex import VectorIndex
from .walk import Known, plan as make_plan, walk

#: Seconds between saves of the HNSW graph during a long run (the log covers the rest).
SAVE_EVERY = 300.0


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, files: int, embedded: int) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, files: int, embedded: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class IndexSummary:
    """What a run did; ``to_json()`` gives the ``--json`` object with its fixed keys."""

    scanned: int = 0
    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    embedded: int = 0  #: images decoded and encoded (the images/s numerator)
    interrupted: bool = False

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {
            "scanned": d["scanned"], "added": d["added"], "updated": d["updated"],
            "moved": d["moved"], "removed": d["removed"], "unchanged": d["unchanged"],
            "skipped": d["skipped"], "errors": d["errors"],
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
        }

    def skip(self, path: str, reason: str) -> None:
        self.skipped += 1
        self.errors.append({"path": _display(path), "error": reason})


def _display(path: str) -> str:
    from .store import db_path_of

    return db_path_of(path)[0]


def content_hash(data: bytes) -> str:
    """blake2b-128 of a file's bytes, hex: the identity used to detect moves and copies."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class _Read:
    path: str
    size: int = 0
    mtime_ns: int = 0
    hash: str = ""
    pixels: Any = None
    meta: dict[str, Any] | None = None
    error: str | None = None


def read_one(path: str, prep: Preprocess | None, draft: bool, known_hashes: frozenset[str]) -> _Read:
    """Worker: read, hash, and (unless the content is known) decode and preprocess."""
    r = _Read(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        r.error = "file vanished during the run"
        return r
    except IsADirectoryError:
        r.error = "is a directory"
        return r
    except OSError as e:
        r.error = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e))
        return r
    # size/mtime as read, not as walked: a file rewritten meanwhile is seen again next run
    r.size, r.mtime_ns = st.st_size, st.st_mtime_ns
    r.hash = content_hash(data)
    if r.hash in known_hashes:
        return r
    try:
        img, meta = open_image(data, draft_for=prep if draft else None)
        r.pixels = prep(img, (meta.width, meta.height)) if prep is not None else None
        r.meta = asdict(meta)
    except DecodeError as e:
        r.error = str(e)
    except MemoryError:
        r.error = "not enough memory to decode"
    return r


class IndexRun:
    """One run over ``roots``; see :meth:`itrcli.library.Library.index`."""

    def __init__(
        self,
        store: Store,
        library_dir,
        get_encoder: Callable[[], Any],
        *,
        dim: int | None,
        prep: Preprocess | None,
        batch_size: int = 32,
        workers: int = 2,
        draft: bool = True,
        progress: Progress | None = None,
    ) -> None:
        self.store = store
        self.library_dir = library_dir
        self.get_encoder = get_encoder
        self.dim = dim
        self.prep = prep
        self.batch_size = max(1, batch_size)
        self.workers = max(1, workers)
        self.draft = draft
        self.progress = progress or NoProgress()
        self.summary = IndexSummary()
        self.vindex: VectorIndex | None = None
        self._last_save = time.monotonic()

    # -- the run -----------------------------------------------------------------------
    def run(self, roots: list[str], *, extensions: frozenset[str], include_hidden: bool = False,
            exclude: list[str] | None = None, follow_symlinks: bool = False,
            prune: bool = True) -> IndexSummary:
        t0 = time.monotonic()
        s = self.summary
        found = walk(roots, extensions=extensions, include_hidden=include_hidden,
                     exclude=exclude or [], follow_symlinks=follow_symlinks)
        for path, reason in found.errors:
            s.skip(path, reason)
        s.scanned = len(found.files)
        known = self.store.known()
        p = make_plan(found.files, known, roots, found.unlisted)
        s.unchanged = len(p.unchanged)
        missing = {path: known[path] for path in p.missing} if prune else {}
        todo = p.changed + p.new
        try:
            if todo or missing:
                self._process(todo, known, missing)
                self._remove(missing)
        except KeyboardInterrupt:
            s.interrupted = True
        finally:
            self._finish()
            s.seconds = time.monotonic() - t0
        return s

    def _open_vindex(self) -> VectorIndex:
        if self.vindex is None:
            dim = self.dim or int(self.store.get_meta("dim"))
            self.vindex = VectorIndex(self.library_dir, dim).open(self.store)
        return self.vindex

    def _process(self, todo: list[str], known: dict[str, Known], missing: dict[str, Known]) -> None:
        s = self.summary
        if not todo:
            return
        hashes = self.store.hashes()  # content hash -> an id having it
        missing_by_hash: dict[str, list[str]] = {}
        for path, k in missing.items():
            missing_by_hash.setdefault(k.hash, []).append(path)
        known_hashes = frozenset(hashes)
        # The model is needed only if something must be decoded; it is loaded on first need
        # (the pool starts hashing meanwhile only when preprocessing is already known).
        if self.prep is None:
            enc = self.get_encoder()
            self.prep, self.dim = enc.prep, enc.dim
        self.progress.start(len(todo))
        batch: list[tuple[str, _Read]] = []  # decoded, waiting to be encoded
        ops: list[tuple[str, str, Any]] = []  # (kind, path, payload) without encoding

        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="itr-decode")
        pending: deque[Future] = deque()
        it = iter(todo)
        depth = max(2 * self.batch_size, 4 * self.workers)
        try:
            def fill() -> None:
                while len(pending) < depth:
                    path = next(it, None)
                    if path is None:
                        return
                    pending.append(pool.submit(read_one, path, self.prep, self.draft, known_hashes))

            fill()
            while pending:
                r = pending.popleft().result()
                fill()
                k = known.get(r.path)
                if r.error is not None:
                    s.skip(r.path, r.error)
                    self.progress.advance(1, 0)
                    continue
                if k is not None and r.hash == k.hash:
                    # touched, same bytes: remember the new mtime so it is not read again
                    ops.append(("touch", r.path, (k, r)))
                elif k is None and missing_by_hash.get(r.hash):
                    old = missing_by_hash[r.hash].pop()
                    del missing[old]
                    ops.append(("move", r.path, (known[old], r)))
                elif r.hash in hashes and r.pixels is None:
                    ops.append(("copy", r.path, (k, r)))
                else:
                    batch.append((r.path, r))
                if len(batch) >= self.batch_size or len(ops) >= 512:
                    self._flush(batch, ops, known)
                    batch, ops = [], []
                    if time.monotonic() - self._last_save > SAVE_EVERY:
                        self._save()
            self._flush(batch, ops, known)
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            self.progress.close()

    def _flush(self, batch: list[tuple[str, _Read]], ops: list[tuple[str, str, Any]],
               known: dict[str, Known]) -> None:
        import numpy as np

        if not batch and not ops:
            return
        s = self.summary
        vecs = None
        if batch:
            enc = self.get_encoder()
            pixels = np.stack([r.pixels for _, r in batch])  # [n, 3, H, W]
            vecs = enc.encode_pixels(pixels)  # [n, dim]
        put_ids, put_vecs, counts = [], [], {"added": 0, "updated": 0, "moved": 0, "unchanged": 0}
        with self.store.transaction() as c:
            for kind, path, (k, r) in ops:
                info = {"size": r.size, "mtime_ns": r.mtime_ns, "hash": r.hash}
                if kind == "touch":
                    self.store.update_file(c, k.id, info)
                    counts["unchanged"] += 1
                elif kind == "move":
                    self.store.update_file(c, k.id, {**info, "path": path})
                    counts["moved"] += 1
                else:  # copy: known content at a new path, or a changed file now equal to another
                    src = self.store.rows([self._id_for_hash(c, r.hash)])
                    row = next(iter(src.values()))
                    vec = self.store.vector_for_hash(r.hash)
                    meta = {m: row[m] for m in ("width", "height", "taken_at", "camera", "lat", "lon")}
                    if k is None:
                        id_ = self.store.insert_file(c, path, {**info, **meta}, vec)
                        counts["added"] += 1
                    else:
                        id_ = k.id
                        self.store.update_file(c, id_, {**info, **meta}, vec)
                        counts["updated"] += 1
                    put_ids.append(id_)
                    put_vecs.append(vec)
            for (path, r), vec in zip(batch, vecs if vecs is not None else []):
                info = {"size": r.size, "mtime_ns": r.mtime_ns, "hash": r.hash, **(r.meta or {})}
                k = known.get(path)
                if k is None:
                    id_ = self.store.insert_file(c, path, info, vec)
                    counts["added"] += 1
                else:
                    self.store.update_file(c, k.id, info, vec)
                    id_ = k.id
                    counts["updated"] += 1
                put_ids.append(id_)
                put_vecs.append(vec)
        # committed: only now count it, and mirror it into the graph
        for key, n in counts.items():
            setattr(s, key, getattr(s, key) + n)
        s.embedded += len(batch)
        if put_ids:
            self._open_vindex().add(np.asarray(put_ids, dtype=np.int64), np.stack(put_vecs))
        self.progress.advance(len(batch) + len(ops), len(batch))

    @staticmethod
    def _id_for_hash(c, h: str) -> int:
        return c.execute("SELECT id FROM files WHERE hash = ? LIMIT 1", (h,)).fetchone()[0]

    def _remove(self, missing: dict[str, Known]) -> None:
        if not missing:
            return
        ids = [k.id for k in missing.values()]
        with self.store.transaction() as c:
            self.store.delete_files(c, ids)
        self.summary.removed += len(ids)
        self._open_vindex().remove(ids)

    def _save(self) -> None:
        if self.vindex is not None and self.vindex.dirty:
            seq = self.store.last_seq()
            self.vindex.save(seq)
            self.store.truncate_log(seq)
        self._last_save = time.monotonic()

    def _finish(self) -> None:
        self._save()


def decode_for_query(path: str, prep: Preprocess, draft: bool = False):
    """Decode one image file for an image query: ``[1, 3, H, W]``."""
    pixels, _meta, _data = decode_file(path, prep, draft=draft)
    return pixels[None]
