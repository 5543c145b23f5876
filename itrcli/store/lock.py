"""The library's write lock: one writer at a time, readers never wait.

A lock on ``<library>/lock`` that the operating system drops when the holder exits,
however it exits (``kill -9`` and a closed console window included), so a lock left by a
killed run clears itself:

- POSIX: ``flock`` on the whole file;
- Windows (no ``fcntl``): ``msvcrt.locking`` on the file's first byte (a ``LockFileEx``
  region, released when the process ends).

The holder's pid and command are written into the file after that first byte (a region
another process can still read on Windows), only to make the "locked" message useful.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import LibraryError, LockedError

try:  # POSIX
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

#: The locked region on Windows: the first byte; the holder's note follows it.
_NOTE_AT = 1


class _Backend:
    """How this platform takes and drops a lock that dies with its holder."""

    def try_lock(self, fd: int) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def unlock(self, fd: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def probe(self, fd: int) -> bool:
        """Whether another process holds the lock (taking nothing for long)."""
        if self.try_lock(fd):
            self.unlock(fd)
            return False
        return True


class _Flock(_Backend):
    def try_lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def unlock(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

    def probe(self, fd: int) -> bool:
        try:  # a shared lock: works on a library opened read-only too
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False


class _Msvcrt(_Backend):
    def __init__(self, msvcrt) -> None:
        self.msvcrt = msvcrt

    def try_lock(self, fd: int) -> bool:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            self.msvcrt.locking(fd, self.msvcrt.LK_NBLCK, 1)
            return True
        except OSError:  # held by another process (EACCES / EDEADLOCK)
            return False

    def unlock(self, fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        self.msvcrt.locking(fd, self.msvcrt.LK_UNLCK, 1)


def backend() -> _Backend:
    """The lock of this platform: ``flock`` where ``fcntl`` exists, else ``msvcrt``."""
    if fcntl is not None:
        return _Flock()
    import msvcrt  # type: ignore[import-not-found]

    return _Msvcrt(msvcrt)


class WriteLock:
    def __init__(self, directory: Path, what: str = "itr index") -> None:
        self.path = Path(directory) / "lock"
        self.what = what
        self.fd: int | None = None
        self._backend = backend()

    def acquire(self, wait: float = 0.0) -> "WriteLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        except PermissionError:
            raise LibraryError(f"library {self.path.parent} is not writable (permission denied)") from None
        except OSError as e:
            raise LibraryError(f"cannot open {self.path}: {e.strerror}") from None
        deadline = time.monotonic() + max(wait, 0.0)
        while not self._backend.try_lock(fd):
            if time.monotonic() >= deadline:
                holder = _holder(fd)
                os.close(fd)
                raise LockedError(
                    f"library {self.path.parent} is locked by another {holder}; "
                    "try again later, or pass --wait SECONDS"
                ) from None
            time.sleep(0.1)
        try:
            os.ftruncate(fd, _NOTE_AT)
            os.lseek(fd, _NOTE_AT, os.SEEK_SET)
            os.write(fd, json.dumps({"pid": os.getpid(), "what": self.what,
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        except OSError:
            pass  # informational only
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                self._backend.unlock(self.fd)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> "WriteLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(directory: Path) -> str | None:
    """Who holds the write lock of the library at ``directory`` right now, or None.

    Probes the lock for an instant (a shared lock where the platform has one, so it works
    on a read-only library too).
    """
    try:
        fd = os.open(Path(directory) / "lock", os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError:
        return None
    try:
        try:
            held = backend().probe(fd)
        except OSError:  # Windows: locking needs write access; ask the note instead
            held = False
        return _holder(fd) if held else None
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, _NOTE_AT, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).strip(b"\0 ") or b"{}")
        return f"'{info.get('what', 'itr')}' (pid {info.get('pid', '?')}, since {info.get('since', '?')})"
    except Exception:
        return "itr process"
