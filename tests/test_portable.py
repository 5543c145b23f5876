"""What can be checked here of the platforms this machine cannot run (see
.github/workflows/ci.yml for the runs on macOS and Windows): the write lock without
fcntl, Apple GPUs refused cleanly off a Mac, Windows paths through the pure path logic."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import types

import pytest

from conftest import write_shapes, posix_only


class FakeMsvcrt(types.ModuleType):
    """msvcrt.locking as Windows does it: a byte range locked per open handle (two handles
    of one process conflict too), released by LK_UNLCK or when the handle closes."""

    LK_UNLCK, LK_LOCK, LK_NBLCK, LK_RLCK, LK_NBRLCK = 0, 1, 2, 3, 4

    def __init__(self) -> None:
        super().__init__("msvcrt")
        self.held: dict[tuple[int, int, int], int] = {}  # (dev, ino, offset) -> fd
        self.calls: list[tuple[int, int]] = []

    def locking(self, fd: int, mode: int, nbytes: int) -> None:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, os.lseek(fd, 0, os.SEEK_CUR))
        self.calls.append((mode, nbytes))
        for k, owner in list(self.held.items()):  # a closed handle's locks are gone
            try:
                os.fstat(owner)
            except OSError:
                del self.held[k]
        if mode == self.LK_UNLCK:
            if self.held.get(key) != fd:
                raise OSError(errno.EACCES, "not locked")
            del self.held[key]
        elif mode == self.LK_NBLCK:
            if key in self.held and self.held[key] != fd:
                raise OSError(errno.EACCES, "Permission denied")
            self.held[key] = fd
        else:
            raise AssertionError(f"itr uses only LK_NBLCK and LK_UNLCK, not {mode}")


@pytest.fixture
def no_fcntl(monkeypatch):
    """The lock module as on Windows: no fcntl, msvcrt's byte-range locks."""
    import itrcli.store.lock as lock

    fake = FakeMsvcrt()
    monkeypatch.setattr(lock, "fcntl", None)
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    return fake


def test_the_lock_without_fcntl(no_fcntl, tmp_path):
    from itrcli.errors import LockedError
    from itrcli.store import lock

    assert isinstance(lock.backend(), lock._Msvcrt)
    a = lock.WriteLock(tmp_path, "itr index").acquire()
    assert lock.holder(tmp_path).startswith("'itr index' (pid ")
    with pytest.raises(LockedError, match="locked by another 'itr index'"):
        lock.WriteLock(tmp_path, "itr adapt").acquire()
    with pytest.raises(LockedError):
        lock.WriteLock(tmp_path, "itr adapt").acquire(wait=0.3)  # waits, then gives up
    a.release()
    assert lock.holder(tmp_path) is None
    b = lock.WriteLock(tmp_path, "itr adapt").acquire()
    assert lock.holder(tmp_path).startswith("'itr adapt'")
    os.close(b.fd)  # the holder dies without unlocking: the lock goes with its handle
    b.fd = None
    lock.WriteLock(tmp_path, "itr index").acquire().release()
    assert set(no_fcntl.calls) <= {(no_fcntl.LK_NBLCK, 1), (no_fcntl.LK_UNLCK, 1)}


def test_a_library_is_indexed_and_searched_without_fcntl(no_fcntl, itr, tiny_clip, tmp_path):
    write_shapes(tmp_path / "photos", [("red", "circle", "left", 1), ("blue", "square", "right", 2)])
    db = tmp_path / "lib"
    r = itr("index", tmp_path / "photos", "--db", db, "-m", tiny_clip, "--json", "-q")
    assert r.code == 0 and r.json()["added"] == 2, r
    assert any(m == no_fcntl.LK_NBLCK for m, _ in no_fcntl.calls)  # the lock was taken
    assert len(itr("search", "a red circle", "--db", db, "--json").json()["results"]) == 2
    assert itr("check", "--db", db).code == 0


def test_the_lock_module_imports_where_there_is_no_fcntl(tmp_path):
    code = ("import sys, types\n"
            "sys.modules['fcntl'] = None\n"  # import fcntl now raises ImportError
            "m = types.ModuleType('msvcrt'); m.LK_NBLCK, m.LK_UNLCK = 2, 0\n"
            "m.locking = lambda fd, mode, n: None\n"
            "sys.modules['msvcrt'] = m\n"
            "from itrcli.store import lock\n"
            "assert lock.fcntl is None and type(lock.backend()).__name__ == '_Msvcrt'\n"
            f"l = lock.WriteLock({str(tmp_path)!r}).acquire(); l.release(); print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_device_mps_is_one_line_and_exit_2_without_an_apple_gpu(itr, tiny_clip, tmp_path):
    from itrcli.embed import encoder

    if encoder.mps_available():
        pytest.skip("this machine has an Apple GPU: --device mps is accepted here")
    write_shapes(tmp_path / "photos", [("red", "circle", "left", 1)])
    r = itr("index", tmp_path / "photos", "--db", tmp_path / "lib", "-m", tiny_clip,
            "--device", "mps")
    assert r.code == 2 and r.err.count("\n") == 1, r
    assert "--device mps: no Apple GPU (MPS) is available here" in r.err
    assert not (tmp_path / "lib" / "itr.db").exists() or itr(
        "info", "--db", tmp_path / "lib", "--json").json()["files"] == 0
    r = itr("index", tmp_path / "photos", "--db", tmp_path / "lib", "--device", "metal")
    assert r.code == 2 and "expected auto, cpu, cuda, cuda:N or mps" in r.err


def test_auto_picks_the_apple_gpu_in_fp16_where_there_is_one(monkeypatch):
    import torch

    from itrcli.embed import encoder

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(encoder, "mps_available", lambda: True)
    assert encoder.resolve_device("auto") == "mps" and encoder.resolve_device("mps") == "mps"
    assert encoder.resolve_precision("auto", "mps") == "fp16"
    assert encoder.resolve_precision("fp32", "mps") == "fp32"
    monkeypatch.setattr(encoder, "mps_available", lambda: False)
    assert encoder.resolve_device("auto") == "cpu"


def test_windows_paths_through_the_pure_path_logic():
    import ntpath
    import posixpath

    from itrcli.paths import long_path, under
    from itrcli.query.filters import glob_sql

    roots = ["C:\\Users\\ana\\Photos", "\\\\nas\\share\\pics\\"]
    assert under("c:\\users\\ANA\\photos\\2024\\a.jpg", roots, pathmod=ntpath)
    assert under("C:/Users/ana/Photos/b.jpg", roots, pathmod=ntpath)  # / stands for \
    assert under("\\\\NAS\\share\\pics\\x\\y.heic", roots, pathmod=ntpath)
    assert not under("C:\\Users\\ana\\Photos2\\a.jpg", roots, pathmod=ntpath)
    assert not under("/home/ana/Photos2/a.jpg", ["/home/ana/Photos"], pathmod=posixpath)
    assert under("/home/ana/Photos/a.jpg", ["/home/ana/Photos"], pathmod=posixpath)
    assert glob_sql("2024/*.jpg", pathmod=ntpath) == "*\\2024\\*.jpg"
    assert glob_sql("C:\\Users\\*\\*.jpg", pathmod=ntpath) == "C:\\Users\\*\\*.jpg"
    assert glob_sql("[!a]*.jpg", pathmod=ntpath) == "*\\[^a]*.jpg"
    assert glob_sql("2024/*.jpg", pathmod=posixpath) == "*/2024/*.jpg"
    assert glob_sql("/srv/*.jpg", pathmod=posixpath) == "/srv/*.jpg"
    deep = "C:\\" + "\\".join(["folder-name-%02d" % i for i in range(20)]) + "\\IMG_0001.HEIC"
    assert len(deep) > 259
    assert long_path(deep, windows=True) == "\\\\?\\" + deep
    assert long_path("\\\\nas\\share\\" + "d\\" * 200 + "x.jpg", windows=True).startswith(
        "\\\\?\\UNC\\nas\\share\\")
    assert long_path("C:\\short.jpg", windows=True) == "C:\\short.jpg"
    assert long_path(deep, windows=False) == deep


@posix_only("sends SIGUSR1, which Windows does not have")
def test_ctrl_break_stops_a_run_as_ctrl_c_does(monkeypatch):
    import signal

    from itrcli import cli

    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)  # as on Windows
    assert signal.SIGUSR1 in cli._stop_signals() and signal.SIGTERM in cli._stop_signals()
    seen: list[int] = []
    previous = cli._stop_on_sigterm(seen)
    try:
        from itrcli.errors import Terminated

        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGUSR1)
            import time

            time.sleep(5)  # the handler raises in the main thread first
        assert seen == [signal.SIGUSR1]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def test_names_the_console_cannot_encode_never_stop_the_output(tmp_path):
    """A console in a legacy code page (cp1252, as Windows pipes default to): a Polish or
    Japanese file name is escaped, not a UnicodeEncodeError."""
    code = ("import sys, io\n"
            "sys.stdout = io.TextIOWrapper(io.BytesIO(), encoding='cp1252')\n"
            "from itrcli import cli\n"
            "cli._safe_console()\n"
            "sys.stdout.write('\\u0142\\u00f3d\\u017a \\u5199\\u771f.jpg\\n'); sys.stdout.flush()\n"
            "print(sys.stdout.buffer.getvalue().decode('cp1252'), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "\\u0142\u00f3d\\u017a \\u5199\\u771f.jpg"
