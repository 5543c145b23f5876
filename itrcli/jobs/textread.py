"""Reading the text in a library's images during ``itr index --ocr``, beside the encoder.

One background daemon thread (``itr-ocr``) reads images one at a time: it reads the file again,
checks that its content hash is still the one queued (a file changed since is read by the
next run), decodes it upright at full size (JPEGs at the smallest DCT scale that covers
:data:`itrcli.ingest.ocr.MAX_SIDE`) and reads its lines.  The index run's own thread
stores finished reads inside its batch transactions (SQLite is written from one thread),
and after the last batch waits for the rest, storing them a few at a time.

Work is keyed by content hash, like the vectors: what is queued is every hash the library
holds without a read by the current reader (:meth:`itrcli.store.words.Words.missing`), plus the
hashes of files embedded during the run.  A run killed at any point leaves only whole
reads (each is one ``text_status`` row with its lines and FTS document, in one
transaction); the next run queues the rest.  Failed reads are remembered with their reason
and reported in the run that met them; the file keeps its vector.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from ..store.db import Store, db_path_of, fs_path_of, now_iso

#: Reads stored per transaction while waiting for the last ones (each read takes a large
#: fraction of a second, so committing each one costs nothing and a kill loses at most one).
COMMIT_EVERY = 1


@dataclass
class _Done:
    content_hash: str
    path: str
    lines: list | None = None
    error: str | None = None
    remember: bool = True  #: False: not the image's fault (memory, file gone): retried
    stale: bool = False  #: the file's content changed since it was queued
    seconds: float = 0.0


class _Draft:
    """Asks Pillow's JPEG draft mode for the OCR size (duck-types ``Preprocess``)."""

    def draft_request(self, width: int, height: int) -> tuple[int, int]:
        from ..ingest.ocr import MAX_SIDE

        f = max(width, height) / MAX_SIDE
        return (width, height) if f <= 1 else (max(1, int(width / f)), max(1, int(height / f)))


def read_for_text(path: str, h: str, reader, started: dict[str, float] | None = None) -> _Done:
    """Worker: read ``path`` (:func:`itrcli.ingest.images.read_image`) and its text; never
    raises for a bad file or image.  ``started``: where the read's start time is noted
    (for the timeout)."""
    from ..ingest.images import read_image
    from ..ingest.ocr import OcrUnavailable

    t0 = time.monotonic()
    d = _Done(h, path)
    f = read_image(path, draft_for=_Draft(), skip=lambda got: got != h)
    if f.error is not None:
        # a file that cannot be read now is not the image's fault: retried
        d.error, d.remember = f.error, f.remember and not f.unreadable
    elif f.image is None:
        d.stale = True  # its content changed since it was queued
    else:
        try:
            reader.load()  # the models' first load is not part of the timed read
            if started is not None:
                started[h] = time.monotonic()
            d.lines = reader.read_kept(f.image)
        except MemoryError:
            d.error, d.remember = "not enough memory to read its text", False
        except OcrUnavailable:
            raise
        except Exception as e:  # whatever the OCR engine raises on a hostile image
            d.error = f"cannot read text: {type(e).__name__}: {str(e)[:200]}"
    d.seconds = time.monotonic() - t0
    return d


class _ReadThread:
    """One daemon thread running the reads handed to it, in order, each with a
    :class:`~concurrent.futures.Future`.  Not a ``ThreadPoolExecutor``: Python joins those
    workers at exit, so a read abandoned after its timeout (an OCR engine stuck for good)
    would keep a finished ``itr index`` from exiting.  A daemon thread is dropped at exit."""

    def __init__(self) -> None:
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="itr-ocr", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        self._work.put((fut, fn, args))
        return fut

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                result = fn(*args)
            except BaseException as e:  # handed to whoever takes the result
                fut.set_exception(e)
            else:
                fut.set_result(result)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop after the read under way (``cancel_futures``: drop those queued behind it);
        ``wait``: until then."""
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self._work.put(None)
        if wait:
            self._thread.join()


@dataclass
class TextStats:
    """The ``ocr`` object of ``itr index --json`` (see docs/ocr.md)."""

    read: int = 0  #: images read in this run
    with_text: int = 0  #: of which some text was kept
    lines: int = 0  #: lines kept
    failed: int = 0  #: reads that failed (listed in ``errors``)
    seconds: float = 0.0  #: time the OCR thread spent reading (overlaps the encoder)
    pending: int = 0  #: queued but not read (the run was interrupted): read next run
    removed: int = 0  #: reads dropped because their content left the library
    errors: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"read": self.read, "with_text": self.with_text, "lines": self.lines,
                "failed": self.failed, "seconds": round(self.seconds, 3),
                "pending": self.pending, "removed": self.removed, "errors": self.errors}


class TextJob:
    """The OCR side of one index run; see the module docstring."""

    def __init__(self, store: Store, reader=None) -> None:
        from ..ingest.ocr import TextReader, reader_id

        self.store = store
        self.reader = reader or TextReader()
        self.reader_id = reader_id()
        self.stats = TextStats()
        self._pool: _ReadThread | None = None
        self._pending: deque[tuple[str, str, Future]] = deque()
        self._started: dict[str, float] = {}  #: hash -> when its read began (worker writes)
        self._seen = store.words.read_hashes(self.reader_id)
        self._uncommitted: list[_Done] = []  #: stored in a transaction not yet committed

    def queue_missing(self) -> None:
        """Queue every content hash of the library that has not been read."""
        for h, path, fsname in self.store.words.missing(self.reader_id):
            self.queue(h, fs_path_of(path, fsname))

    def queue(self, h: str, path: str) -> None:
        if not h or h in self._seen:
            return
        self._seen.add(h)
        if self._pool is None:
            self._pool = _ReadThread()
        self._pending.append((h, path, self._submit(path, h)))

    def _submit(self, path: str, h: str) -> Future:
        if self._pool is None:
            self._pool = _ReadThread()
        return self._pool.submit(read_for_text, path, h, self.reader, self._started)

    def _timed_out(self, h: str) -> bool:
        from ..ingest import ocr

        t0 = self._started.get(h)
        return t0 is not None and time.monotonic() - t0 > ocr.TIMEOUT

    def _abandon(self, h: str, path: str) -> _Done:
        """The oldest read ran past :data:`itrcli.ingest.ocr.TIMEOUT`: remembered as failed;
        its thread is left to finish alone (its result is dropped; a daemon, it does not
        hold up the exit if it never finishes) and the reads queued
        behind it go to a new thread with a reader of its own (the stuck one holds its
        reader's lock)."""
        from ..ingest import ocr

        self._pending.popleft()
        self.reader = type(self.reader)()
        old, self._pool = self._pool, None
        rest = list(self._pending)
        self._pending.clear()
        for _, _, f in rest:
            f.cancel()
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)
        for hh, pp, f in rest:
            self._pending.append((hh, pp, f if f.running() or f.done() and not f.cancelled()
                                  else self._submit(pp, hh)))
        return _Done(h, path, error=f"timed out after {ocr.TIMEOUT:.0f} s",
                     seconds=float(ocr.TIMEOUT))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def store_done(self, c, *, block: bool = False, limit: int | None = None) -> int:
        """Store finished reads, oldest first, inside the caller's transaction ``c``;
        ``block``: wait for the oldest.  Returns how many were stored.  Call
        :meth:`committed` once ``c`` is committed (the counts follow the commits)."""
        n = 0
        while self._pending and (limit is None or n < limit):
            h, path, fut = self._pending[0]
            while block and not fut.done() and not self._timed_out(h):
                try:
                    fut.result(timeout=0.5)
                except TimeoutError:
                    pass
            if not fut.done():
                if not self._timed_out(h):
                    break
                d = self._abandon(h, path)
            else:
                d = fut.result()  # read_for_text raises only OcrUnavailable (checked before the run)
                self._pending.popleft()
            n += 1
            self._store(c, d)
        return n

    def _store(self, c, d: _Done) -> None:
        if d.stale:
            self._seen.discard(d.content_hash)
            return
        if d.error is not None:
            if d.remember:
                self.store.words.put(d.content_hash, [], reader=self.reader_id, seconds=d.seconds,
                              now=now_iso(), error=d.error)
        else:
            self.store.words.put(d.content_hash, d.lines, reader=self.reader_id, seconds=d.seconds,
                          now=now_iso())
        self._uncommitted.append(d)

    def committed(self) -> None:
        """The transaction holding the last stored reads is committed: count them."""
        s = self.stats
        for d in self._uncommitted:
            s.seconds += d.seconds
            if d.error is not None:
                s.failed += 1
                s.errors.append({"path": db_path_of(d.path)[0],
                                 "error": f"text not read: {d.error}"})
            else:
                s.read += 1
                s.with_text += bool(d.lines)
                s.lines += len(d.lines)
        self._uncommitted.clear()

    def finish(self, progress=None) -> None:
        """Wait for every queued read, storing them a few per transaction; then drop the
        text of content no longer in the library."""
        if self._pending and progress is not None:
            progress.start(len(self._pending))
        try:
            while self._pending:
                with self.store.transaction() as c:
                    n = self.store_done(c, block=True, limit=COMMIT_EVERY)
                self.committed()
                if progress is not None:
                    progress.advance(n, 0)
        finally:
            if progress is not None:
                progress.close()
        with self.store.transaction() as c:
            gone = self.store.words.orphans()
            self.store.words.delete(gone)
        self.stats.removed = len(gone)
        self.close()

    def close(self) -> None:
        """Stop: reads not stored are dropped (queued again by the next run)."""
        self._uncommitted.clear()  # rolled back: read again by the next run
        self.stats.pending = len(self._pending)
        for _, _, f in self._pending:
            f.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def text_for(path: str, store: Store | None, reader) -> dict[str, Any]:
    """The text of one image file for ``itr text``: the library's read when it holds this
    content (by hash: a copy or a moved file counts), else read now with ``reader``.

    Returns ``{"path", "source": "library" | "read", "lines": [{"text", "box",
    "confidence"}]}``, or ``{"path", "error"}`` for a file that cannot be read.
    """
    from ..ingest.images import read_image

    shown = db_path_of(path)[0]
    stored: list = []

    def in_library(h: str) -> bool:  # then the image need not be decoded
        if store is not None and store.words.has_tables():
            lines = store.words.lines_of(h)
            if lines is not None:
                stored.append(lines)
                return True
        return False

    f = read_image(path, draft_for=_Draft(), skip=in_library)
    if f.error is not None:
        return {"path": shown, "error": f.error}
    if stored:
        return {"path": shown, "source": "library", "lines": [ln.to_json() for ln in stored[0]]}
    img = f.image
    try:
        lines = reader.read_kept(img)
    except MemoryError:
        return {"path": shown, "error": "not enough memory to read its text"}
    except Exception as e:
        from ..ingest.ocr import OcrUnavailable

        if isinstance(e, OcrUnavailable):
            raise
        return {"path": shown, "error": f"cannot read text: {type(e).__name__}: {str(e)[:200]}"}
    return {"path": shown, "source": "read", "lines": [ln.to_json() for ln in lines]}
