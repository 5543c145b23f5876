"""Reading files: the bytes of a regular file with the guards every reader needs, and
their content hash (the identity that detects moves and copies).

Used by indexing, evaluation, image queries and thumbnails alike, so a FIFO, a huge file or
a file being rewritten is refused the same way everywhere.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat

from ..paths import long_path

#: Files larger than this are not read at all (a video or disk image with a photo's name
#: would otherwise be read whole into memory): 1 GiB, far above any compressed photo.
MAX_FILE_BYTES = 1 << 30


def content_hash(data: bytes) -> str:
    """blake2b-128 of a file's bytes, hex: the identity used to detect moves and copies."""
    return _hasher(data).hexdigest()


def _hasher(data: bytes = b""):
    return hashlib.blake2b(data, digest_size=16)


class Unreadable(Exception):
    """A file that cannot be read, with a one-line reason (``st`` set when the reason
    depends only on the file, so that it can be remembered until the file changes)."""

    def __init__(self, reason: str, st: os.stat_result | None = None) -> None:
        super().__init__(reason)
        self.st = st  #: set when the reason depends only on the file (remembered)


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def _open(path: str) -> int:
    """A read-only descriptor, or :class:`Unreadable` with a one-line reason.  O_NONBLOCK:
    a file replaced by a FIFO since the walk must not hang the run."""
    try:
        return os.open(long_path(path), _OPEN_FLAGS)
    except FileNotFoundError:
        raise Unreadable("file vanished during the run") from None
    except IsADirectoryError:
        raise Unreadable("is a directory") from None
    except PermissionError:
        raise Unreadable("permission denied") from None
    except OSError as e:
        raise Unreadable("symlink loop" if e.errno == errno.ELOOP else (e.strerror or str(e))) from None


def read_file(path: str) -> tuple[os.stat_result, bytes]:
    """The bytes of a regular file and its ``stat`` as read.

    Refuses what must not be read (a FIFO would block forever; a huge file would be read
    whole into memory) and a file that changed while it was being read (a copy in
    progress), which is picked up again by the next run.
    Raises :class:`Unreadable` with a one-line reason.
    """
    for _attempt in range(2):
        fd = _open(path)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Unreadable("not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise Unreadable(f"file too large: {st.st_size:,} bytes (limit {MAX_FILE_BYTES:,})", st)
            with open(fd, "rb", closefd=False) as f:
                data = f.read(MAX_FILE_BYTES + 1)
            after = os.fstat(fd)
        except OSError as e:  # EIO on a failing disk, a network share gone away
            raise Unreadable(e.strerror or str(e)) from None
        finally:
            os.close(fd)
        if len(data) > MAX_FILE_BYTES:
            raise Unreadable(f"file too large: over {MAX_FILE_BYTES:,} bytes", after)
        if len(data) == st.st_size == after.st_size and st.st_mtime_ns == after.st_mtime_ns:
            return st, data
    raise Unreadable("file changed while being read (it is read again next run)")


def hash_stream(path: str) -> tuple[os.stat_result, str]:
    """Stat and content hash of a (large) file read in chunks, never whole into memory.
    Raises :class:`Unreadable` like :func:`read_file`."""
    fd = _open(path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable("not a regular file")
        h = _hasher()
        with open(fd, "rb", closefd=False) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        after = os.fstat(fd)
    except OSError as e:
        raise Unreadable(e.strerror or str(e)) from None
    finally:
        os.close(fd)
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise Unreadable("file changed while being read (it is read again next run)")
    return st, h.hexdigest()
