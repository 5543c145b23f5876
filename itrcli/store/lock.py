"""The library's write lock: one writer at a time, readers never wait.

An ``flock`` on ``<library>/lock``: the kernel drops it when the holder exits, however it
exits (``kill -9`` included), so a lock left by a killed run clears itself.  The holder's
pid and command are written into the file only to make the "locked" message useful.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from ..errors import LibraryError, LockedError


class WriteLock:
    def __init__(self, directory: Path, what: str = "itr index") -> None:
        self.path = Path(directory) / "lock"
        self.what = what
        self.fd: int | None = None

    def acquire(self, wait: float = 0.0) -> "WriteLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            raise LibraryError(f"library {self.path.parent} is not writable (permission denied)") from None
        except OSError as e:
            raise LibraryError(f"cannot open {self.path}: {e.strerror}") from None
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _holder(fd)
                    os.close(fd)
                    raise LockedError(
                        f"library {self.path.parent} is locked by another {holder}; "
                        "try again later, or pass --wait SECONDS"
                    ) from None
                time.sleep(0.1)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "what": self.what,
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        except OSError:
            pass  # informational only
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> "WriteLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(directory: Path) -> str | None:
    """Who holds the write lock of the library at ``directory`` right now, or None.

    Probes with a shared lock for an instant (works on a read-only library too).
    """
    try:
        fd = os.open(Path(directory) / "lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, 0)
        info = json.loads(os.read(fd, 4096) or b"{}")
        return f"'{info.get('what', 'itr')}' (pid {info.get('pid', '?')}, since {info.get('since', '?')})"
    except Exception:
        return "itr process"
