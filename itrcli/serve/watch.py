"""``itr serve --watch PATH...``: keep the library current with folders as they change.

The watched roots are indexed when the server starts, then again after each change under
them (new, changed, moved, deleted files), by the library's own index run
(:meth:`itrcli.library.Library.index`, on a writable library of this thread): it takes
the write lock as any ``itr index`` does (waiting while a cron run holds it), finds moves
by content hash, and prunes what is gone.  The server's readers see each commit as it
lands (:mod:`itrcli.serve.live`).

Changes are learnt from file events (``watchfiles``: inotify, FSEvents, ...), gathered for
:data:`DEBOUNCE` seconds into one run.  Events are not everything: they do not arrive on
network mounts (CIFS, NFS), an inotify watch limit can be reached, a watcher can miss
them across a suspend or an upgrade.  So the roots are also rescanned every ``rescan``
seconds whatever the events say, and when the event watcher cannot start or dies the
rescans go on alone (``status()["events"]`` says which).  Events under the library
itself (its thumbnails, when it lives under a watched root) and under excluded or hidden
names (``--exclude``, as the walk applies it) start no run.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..constants import MEDIA_EXTENSIONS
from ..errors import ItrError, LockedError
from ..gcpause import give_back_memory
from .answers import log as _log

#: Seconds without a new event before a run starts (a copy of many files is one run).
DEBOUNCE = 1.0
#: Default seconds between rescans that do not wait for events.
RESCAN = 600.0
#: Seconds one wait for the write lock lasts (then the watcher looks at stop, and waits again).
LOCK_WAIT = 10.0
_PICTURES = MEDIA_EXTENSIONS  # photos of every kind (HEIC, AVIF, RAW) and videos


@dataclass
class WatchOptions:
    """What to index and how (the options of ``itr index`` that ``itr serve`` takes)."""

    roots: list[str]
    model: str | None = None
    device: str = "auto"
    precision: str = "auto"
    exclude: list[str] = field(default_factory=list)
    include_hidden: bool = False
    follow_symlinks: bool = False
    rescan: float = RESCAN
    debounce: float = DEBOUNCE
    #: False: no file events, rescans only (``--rescan`` with ``--no-events``; tests)
    events: bool = True


class Stopped(KeyboardInterrupt):
    """Raised inside an index run when the server stops: the run ends as on Ctrl-C
    (the batch in progress rolled back, committed ones kept, the graph saved)."""


class _StopProgress:
    """The run's progress: counts, and the way to stop it from another thread."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.total = self.done = 0

    def start(self, total: int) -> None:
        self.total = total
        self._check()

    def advance(self, files: int, embedded: int) -> None:
        self.done += files
        self._check()

    def close(self) -> None:
        pass

    def _check(self) -> None:
        if self.stop.is_set():
            raise Stopped()


class Watcher:
    """The watch job over the library at ``directory``: :meth:`start`, :meth:`stop`,
    :meth:`status`."""

    def __init__(self, directory: Path, options: WatchOptions,
                 log: Callable[[str], None] = _log) -> None:
        self.directory = Path(directory).absolute()
        self.options = options
        self.roots = [os.path.abspath(os.path.expanduser(r)) for r in options.roots]
        self.log = log
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._thread: threading.Thread | None = None
        self._events_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._status: dict[str, Any] = {
            "roots": self.roots, "state": "starting", "runs": 0, "last": None,
            "last_error": None, "events": "starting", "rescan_seconds": options.rescan}

    # -- status ---------------------------------------------------------------------------------
    def _set(self, **values: Any) -> None:
        with self._lock:
            self._status.update(values)

    def status(self) -> dict[str, Any]:
        """``roots``, ``state`` (starting, indexing, waiting for the lock, idle, stopped),
        ``runs``, ``last`` (the last run's summary), ``last_error``, ``events`` (the event
        source, or "rescans only" and why)."""
        with self._lock:
            return dict(self._status)

    @property
    def runs(self) -> int:
        return self.status()["runs"]

    # -- life -----------------------------------------------------------------------------------
    def start(self) -> "Watcher":
        self._thread = threading.Thread(target=self._main, name="itr-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop: a run in progress ends as on Ctrl-C (committed batches kept)."""
        self._stop.set()
        self._dirty.set()
        for t in (self._thread, self._events_thread):
            if t is not None:
                t.join(timeout)
        self._set(state="stopped")

    def poke(self) -> None:
        """Run again now (as an event would)."""
        self._dirty.set()

    # -- the index runs ---------------------------------------------------------------------
    def _main(self) -> None:
        from ..library import Library

        try:
            lib = Library.open(self.directory, create=True)
        except ItrError as e:
            self._set(state="stopped", last_error=str(e))
            self.log(f"--watch: {e}")
            return
        try:
            # events first: a change during the first run starts another one after it
            if self.options.events:
                self._events_thread = threading.Thread(target=self._events, daemon=True,
                                                       name="itr-watch-events")
                self._events_thread.start()
            else:
                self._set(events="off: rescans only")
            self._run(lib)  # the roots now
            next_rescan = time.monotonic() + self.options.rescan
            while not self._stop.is_set():
                woke = self._dirty.wait(max(0.0, next_rescan - time.monotonic()))
                if self._stop.is_set():
                    break
                if woke:
                    self._settle()
                    if self._stop.is_set():
                        break
                self._run(lib)
                next_rescan = time.monotonic() + self.options.rescan
        finally:
            lib.close()
            self._set(state="stopped")

    def _settle(self) -> None:
        """Wait until no event came for ``debounce`` seconds (then one run takes them all)."""
        while not self._stop.is_set():
            self._dirty.clear()
            if not self._dirty.wait(self.options.debounce):
                return

    def _run(self, lib) -> None:
        o = self.options
        self._dirty.clear()
        progress = _StopProgress(self._stop)
        while not self._stop.is_set():
            self._set(state="indexing")
            try:
                s = lib.index(self.roots, model=o.model, device=o.device, precision=o.precision,
                              exclude=o.exclude, include_hidden=o.include_hidden,
                              follow_symlinks=o.follow_symlinks, wait=LOCK_WAIT,
                              progress=progress)
            except LockedError:
                self._set(state="waiting for the lock")  # a cron run: wait for it
                continue
            except KeyboardInterrupt:  # Stopped before the run's own handling of it
                self._set(state="stopped")
                return
            except ItrError as e:
                self._set(state="idle", last_error=str(e))
                self.log(f"--watch: {e}")
                return
            except Exception as e:  # a bug: said once, and the server goes on
                self._set(state="idle", last_error=f"{type(e).__name__}: {e}")
                self.log(f"--watch: unexpected {type(e).__name__}: {e}")
                return
            # the run's freed batches back to the system: embed/heap keeps them during a run,
            # and the server lives on
            give_back_memory()
            summary = s.to_json()
            with self._lock:
                self._status.update(state="idle", last=summary, last_error=None,
                                    runs=self._status["runs"] + 1)
            changed = [f"{summary[k]} {k}" for k in ("added", "updated", "moved", "removed")
                       if summary.get(k)]
            if changed:
                self.log("--watch: " + ", ".join(changed))
            return

    # -- file events ------------------------------------------------------------------------
    def wanted(self, path: str) -> bool:
        """Whether an event on ``path`` may change the library."""
        p = os.path.abspath(path)
        lib = str(self.directory)
        if p == lib or p.startswith(lib + os.sep):
            return False  # the library's own files (thumbnails, the database)
        root = next((r for r in self.roots if p == r or p.startswith(r.rstrip(os.sep) + os.sep)),
                    None)
        if root is None:
            return False
        from ..ingest.walk import left_out

        if left_out(p, root, include_hidden=self.options.include_hidden,
                    exclude=self.options.exclude):
            return False
        ext = os.path.splitext(p)[1].lower()
        # a picture, or a folder (moved or deleted: the event names the folder alone)
        return ext in _PICTURES or not ext or os.path.isdir(p)

    def _events(self) -> None:
        try:
            import watchfiles
        except ImportError:
            self._set(events="rescans only: watchfiles is not installed (pip install 'itr-search[serve]')")
            return
        roots = [r for r in self.roots if os.path.isdir(r)]
        if not roots:
            self._set(events="rescans only: no folder to watch")
            return
        self._set(events="file events")
        try:
            for changes in watchfiles.watch(*roots, watch_filter=None, debounce=200, step=50,
                                            stop_event=self._stop, raise_interrupt=False,
                                            rust_timeout=1000, yield_on_timeout=False,
                                            ignore_permission_denied=True):
                if any(self.wanted(p) for _, p in changes):
                    self._dirty.set()
        except Exception as e:  # an inotify limit, a root gone: the rescans go on
            why = f"{type(e).__name__}: {e}"
            self._set(events=f"rescans only: the file events stopped ({why})")
            self.log(f"--watch: no file events ({why}); rescanning every "
                     f"{self.options.rescan:g} s")


__all__ = ["DEBOUNCE", "RESCAN", "WatchOptions", "Watcher"]
