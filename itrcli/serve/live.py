"""The server's library: opened read-only, on one thread of its own, followed as it changes.

Every request that reads the library runs on that thread (SQLite connections belong to
the thread that opened them; one thread also means one graph and one text session in
memory), inside one read transaction: a search sees the library as one commit left it,
old or new, never a mix, and the write of a concurrent ``itr index`` goes on meanwhile
(WAL; a reader never takes the write lock).  Before each request the database file is
looked at: when ``itr check --compact``/``--repair`` or ``itr index --reindex`` swapped
in another file, the library is opened again.  Commits into the same file need nothing:
:meth:`itrcli.library.Library.search` follows the change log (``vector_log``) and the
rows are read by each search.

Slow work that needs no library (decoding thumbnails, sending files) runs elsewhere, so
that it never holds up a search; so does a text search's text tower, once the library's
thread has handed it over (:mod:`itrcli.serve.texts`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..errors import ItrError, LibraryError

T = TypeVar("T")

#: The most texts one search embeds for those waiting behind it, late arrivals included
#: (the searches already embedded wait for them).
LATE_CAP = 96


class LiveLibrary:
    """A read-only :class:`~itrcli.library.Library` at ``directory``, used through
    :meth:`run` / :meth:`call` (never directly: it belongs to its thread)."""

    def __init__(self, directory: Path, text_precision: str = "fp32") -> None:
        self.directory = Path(directory)
        self.text_precision = text_precision  #: the text tower's (``--text-precision``)
        from .texts import TextEmbedder

        # the int8 tower's texts beside this thread (float32's are embedded on it, in
        # batches: beside it, its two threads lost more to the graph walks than they gained)
        self._texts = TextEmbedder() if text_precision == "int8" else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="itr-library")
        self._lib = None
        self.reopened = 0  #: times the library was opened again (a swapped database file)
        self.batched = 0  #: texts embedded together with others while requests waited
        self._waiting: list[str] = []  # texts of searches queued for the library's thread
        self._waiting_lock = threading.Lock()
        self._closed = threading.Event()
        self._interrupted = False  #: told to stop (:meth:`interrupt`)

    # -- on the library's thread ------------------------------------------------------------
    def _current(self):
        from ..library import Library

        lib = self._lib
        if lib is not None and lib.store.replaced():
            lib.close()
            lib = self._lib = None
            self.reopened += 1
        if lib is None:
            lib = self._lib = Library.open(self.directory, readonly=True)
            lib.long_lived = True  # a warm text tower: pre-packed weights
            lib.text_precision = self.text_precision
            if self._interrupted:
                lib.interrupt()
        return lib

    def _in_snapshot(self, fn: Callable[..., T], args: tuple, text: str | None = None,
                     embedded: tuple | None = None) -> T:
        if self._closed.is_set():
            raise LibraryError("the server is shutting down")
        lib = self._current()
        if text is not None and self._texts is not None:
            self._hand_over(lib)  # checks the library's encoder, which keeping a vector needs
            if embedded is not None:
                lib.keep_text_vector(embedded[0], text, embedded[1])
        if text is not None and not lib.knows_text(text):
            # under load: this text and those of the searches queued behind it, in one
            # batch; while kept vectors answer, the queue grows into the next batch.  The
            # texts that came while those were embedded are embedded too, before any of
            # their searches run: else each would wait for this batch's searches and then
            # for a batch of its own (a tail of about twice the usual wait under load)
            texts, primed = self._take_waiting(2), 0
            while texts and primed < LATE_CAP:
                try:
                    n = lib.prime_texts(texts, least=1 if primed else 2)
                except ItrError:
                    break  # each search reports its own error
                self.batched += n
                primed += len(texts)
                texts = self._take_waiting(1)
        lib.store.begin_snapshot()
        try:
            return fn(lib, *args)
        finally:
            lib.store.end_snapshot()

    def _hand_over(self, lib) -> None:
        """Give the text embedder this library's text encoder, when other threads may use
        it (the exported tower), else none."""
        self._texts.use(lib.shared_text_encoder())

    def _take_waiting(self, least: int) -> list[str]:
        """The texts of the searches waiting for the library's thread, when at least
        ``least`` are (a search's own text alone is left to it: it embeds it as alone)."""
        with self._waiting_lock:
            if len(self._waiting) < least:
                return []
            texts, self._waiting = self._waiting, []
        return texts

    # -- from anywhere -----------------------------------------------------------------------
    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(library, *args)`` on the library's thread, in one read snapshot; waits."""
        return self._pool.submit(self._in_snapshot, fn, args).result()

    async def run(self, fn: Callable[..., T], *args: Any, text: str | None = None) -> T:
        """:meth:`call` from the event loop, without blocking it.  ``text``: the query of a
        plain text search: embedded first, beside the library's thread (the int8 tower:
        :mod:`itrcli.serve.texts`), or on it together with the others waiting when several
        are."""
        embedded = None
        if text is not None:
            fut = self._texts.submit(text) if self._texts is not None else None
            if fut is not None:  # embedded beside the library's thread
                t = time.perf_counter()
                try:
                    embedded = (*await asyncio.wrap_future(fut), time.perf_counter() - t)
                except asyncio.CancelledError:
                    if not fut.cancelled():
                        raise  # this request's own cancellation
                    embedded = None  # the server is stopping: the library says so
            else:
                with self._waiting_lock:
                    self._waiting.append(text)
        out = await asyncio.wrap_future(
            self._pool.submit(self._in_snapshot, fn, args, text, embedded))
        if embedded is not None and embedded[0] is not None and isinstance(out, dict):
            out.get("timings", {})["embed"] = round(embedded[2], 6)  # the wait for it
        return out

    def warm(self) -> None:
        """Load what a text search needs (the text tower, the graph) before the first one;
        a library that is missing or empty is left to the requests to report."""
        def load(lib):
            if lib.model and lib.store.has_files():
                lib.settle_graph()  # the graph (a large one's compact copy)
                if not self._interrupted:
                    lib.search(text="a photo", top=1)  # text tower, adapter
                    if self._texts is not None:
                        self._hand_over(lib)

        try:
            self.call(load)
        except ItrError:
            pass

    def interrupt(self) -> None:
        """From any thread (the server's signal handler): stop the start-up work the
        library's thread may be in (a large graph's compact copy; the text tower's first
        run is skipped), so that a server told to stop while it starts ends at once.
        Requests already taken are still answered."""
        self._interrupted = True
        lib = self._lib
        if lib is not None:
            lib.interrupt()

    def close(self) -> None:
        self._closed.set()
        if self._texts is not None:
            self._texts.close()

        def shut(_lib=None):
            if self._lib is not None:
                self._lib.close()
                self._lib = None

        try:
            self._pool.submit(shut).result(timeout=30)
        except Exception:
            pass
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["LiveLibrary"]
