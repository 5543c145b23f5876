"""Fault injection: bad files, kill -9, Ctrl-C, two writers, a full or read-only disk.

Every scenario ends with the library verified by ``check`` (rows vs vectors vs graph) and
its contents compared with what is on disk.  Child processes come from a zygote
(``tests/faults.py``) so that a ``kill -9`` lands in a real ``itr index`` process without
paying the torch import each time; ``--runslow`` adds long loops that exec
``python -m itrcli`` for every run.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import faults
from conftest import python_cmd, posix_only
from itrcli.store.db import sqlite_uri
from support import synth

BATCH = ["--batch-size", "4", "--precision", "fp32", "--workers", "2"]


# --- helpers -------------------------------------------------------------------------------

def make_photos(d: Path, n: int, start: int = 0, size: int = 48) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    combos = synth.combinations()
    out = []
    for i in range(start, start + n):
        c, s, p = combos[i % len(combos)]
        path = d / f"{i:03d}-{c}-{s}-{p}.jpg"
        synth.draw(c, s, p, size=size, seed=i).save(path, quality=90)
        out.append(path)
    return out


def rows(db: Path) -> int:
    """Committed file rows, read like a concurrent reader would (0 before the first commit)."""
    try:
        c = sqlite3.connect(sqlite_uri(db / "itr.db", mode="ro"), uri=True, timeout=5)
        try:
            return c.execute("SELECT count(*) FROM files").fetchone()[0]
        finally:
            c.close()
    except sqlite3.Error:
        return 0


def wait_for(pred, timeout: float = 60.0, every: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return False


def holds_lock(db: Path, pid: int) -> bool:
    try:
        return json.loads((db / "lock").read_text().strip("\0 ") or "{}").get("pid") == pid
    except (OSError, ValueError):
        return False


def check(db: Path, *, strict: bool = False):
    """The library's check report; errors fail the test, and with ``strict`` warnings too."""
    from itrcli import Library

    with Library.open(db, readonly=True) as lib:
        rep = lib.check()
    assert rep.ok, json.dumps(rep.to_json(), indent=1)
    if strict:
        bad = [f.to_json() for f in rep.findings if f.severity != "note"]
        assert not bad, bad
    return rep


def stored(db: Path) -> dict[str, np.ndarray]:
    from itrcli.store.db import Store, fs_path_of

    s = Store(db, readonly=True)
    try:
        ids, vecs = s.vectors()
        meta = s.rows(ids.tolist())
        out = {fs_path_of(meta[int(i)]["path"], meta[int(i)]["fsname"]): v for i, v in zip(ids, vecs)}
        assert len(out) == len(ids)  # one vector per path, none twice
        return out
    finally:
        s.close()


def assert_matches_disk(db: Path, photos_dir: Path, reference: dict[str, np.ndarray]) -> None:
    """Exactly the images on disk are in the library, each with its own vector."""
    have = stored(db)
    on_disk = {str(p) for p in photos_dir.rglob("*.jpg")}
    assert set(have) == on_disk
    for path, v in have.items():
        ref = reference.get(path)
        if ref is None:  # a file made during the test: embed it in-process to compare
            ref = embed_one(db, path)
        np.testing.assert_allclose(v, ref, atol=1e-4, err_msg=path)


def embed_one(db: Path, path: str) -> np.ndarray:
    from itrcli import Library

    with Library.open(db, readonly=True) as lib:
        return lib.embed_image(path, precision="fp32")


def search_works(itr, db: Path) -> int:
    """A search on the (idle) library: ANN and exact both return every indexed file that
    still exists, once."""
    n = sum(os.path.exists(p) for p in stored(db))
    a = itr("search", "a red circle", "--db", db, "--json", "-n", "500")
    assert a.code == 0, a
    b = itr("search", "a red circle", "--db", db, "--json", "-n", "500", "--exact")
    assert b.code == 0, b
    paths = [h["path"] for h in a.json()["results"]]
    assert len(paths) == len(set(paths))
    assert sorted(paths) == sorted(h["path"] for h in b.json()["results"])
    assert len(paths) == n
    return n


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = faults.Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_clip):
    """Vectors of the corpus computed in-process in one clean run: what a library must hold."""
    from conftest import run_itr

    base = tmp_path_factory.mktemp("reference")
    photos = make_photos(base / "photos", 72)
    r = run_itr("index", base / "photos", "--db", base / "lib", "-m", tiny_clip, "-q", *BATCH)
    assert r.code == 0, r
    vecs = stored(base / "lib")
    return {p.name: vecs[str(p)] for p in photos}


def with_reference(reference: dict[str, np.ndarray], photos_dir: Path) -> dict[str, np.ndarray]:
    return {str(photos_dir / name): v for name, v in reference.items()}


# --- bad files --------------------------------------------------------------------------------

def test_bad_files_are_indexed_or_skipped_with_a_reason(itr, tiny_clip, tmp_path, monkeypatch):
    d = tmp_path / "photos"
    expected = faults.make_bad_corpus(d)
    make_photos(d / "good", 3)
    db = tmp_path / "lib"
    r = itr("index", d, "--db", db, "-m", tiny_clip, "--json", *BATCH)
    assert r.code == 0, r
    s = r.json()
    from itrcli.store.db import db_path_of

    errors = {e["path"]: e["error"] for e in s["errors"]}
    have = stored(db)
    for path, (want, reason) in expected.items():
        shown = db_path_of(path)[0]
        if want == faults.INDEXED:
            assert path in have and shown not in errors, (path, errors.get(shown))
        else:
            assert path not in have and shown in errors, path
            assert reason is None or reason in errors[shown], (path, errors[shown])
            assert "\n" not in errors[shown] and len(errors[shown]) < 250
    n_indexed = sum(w == faults.INDEXED for w, _ in expected.values())
    assert s["added"] == n_indexed + 3 and len(have) == n_indexed + 3
    assert s["skipped"] == len(errors) == sum(w == faults.SKIPPED for w, _ in expected.values())
    # one line per skipped file and the summary; no warning or traceback leaks to stderr
    assert "Traceback" not in r.err and "Warning" not in r.err
    assert r.err.count("skipped ") >= 16
    check(db, strict=True)
    j = itr("search", "a red circle", "--db", db, "--json", "-n", "100").json()
    assert {h["path"] for h in j["results"]} >= {db_path_of(p)[0] for p in have}

    # unchanged bad files are not read again, but still reported
    import itrcli.jobs.indexer as indexer

    reads = []
    real = indexer.read_for_vectors
    monkeypatch.setattr(indexer, "read_for_vectors", lambda p, *a: reads.append(p) or real(p, *a))
    again = itr("index", d, "--db", db, "--json", "-q").json()
    assert reads == []
    assert {e["path"] for e in again["errors"]} == set(errors)
    assert (again["skipped"], again["unchanged"], again["added"]) == (s["skipped"], n_indexed + 3, 0)

    # an unchanged run gives the files it found and holds (what `itr hash PATH` reads)
    # from its change detection: the same as asking the library, odd names included
    from itrcli import Library

    with Library.open(db) as lib:
        run = lib.index([str(d)], list_indexed=True)
        assert run.indexed_files is not None and len(run.indexed_files) == n_indexed + 3
        assert run.indexed_files == lib.indexed(run.found)
        assert any(not p.isascii() for p, _ in run.indexed_files)
        assert lib.index([str(d)]).indexed_files is None  # not asked for
    make_photos(d / "good", 1, start=3)  # one file more: rows change, so the library is asked
    with Library.open(db) as lib:
        run = lib.index([str(d)], list_indexed=True)
        assert run.added == 1 and run.indexed_files is None
    # an indexed photo overwritten by a broken one: its row stays, the failure is remembered,
    # and later runs leave it unread but still held
    spoilt = sorted((d / "good").iterdir())[0]
    spoilt.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    with Library.open(db) as lib:
        assert lib.index([str(d)], list_indexed=True).indexed_files is None
        run = lib.index([str(d)], list_indexed=True)
        assert run.indexed_files is not None and run.indexed_files == lib.indexed(run.found)
        assert str(spoilt) in dict(run.indexed_files)


def test_a_remembered_bad_file_is_read_again_once_it_changes(itr, tiny_clip, tmp_path):
    d = tmp_path / "photos"
    make_photos(d, 2)
    bad = d / "later.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 half a download")
    db = tmp_path / "lib"
    s = itr("index", d, "--db", db, "-m", tiny_clip, "--json", "-q").json()
    assert s["skipped"] == 1 and s["added"] == 2
    synth.draw("blue", "square", "left", size=48, seed=3).save(bad)  # the download finished
    s = itr("index", d, "--db", db, "--json", "-q").json()
    assert (s["added"], s["skipped"], s["errors"]) == (1, 0, [])
    bad.unlink()
    s = itr("index", d, "--db", db, "--json", "-q").json()
    assert s["removed"] == 1
    from itrcli.store.db import Store

    st = Store(db, readonly=True)
    assert st.failures() == {}
    st.close()
    check(db, strict=True)


def test_names_that_collide_once_escaped_are_skipped_not_fatal(itr, tiny_clip, tmp_path):
    d = tmp_path / "photos"
    make_photos(d, 2)
    raw = os.path.join(os.fsencode(d), b"x\xe9.jpg")  # shown as x\xe9.jpg
    synth.draw("red", "square", "top", size=48, seed=7).save(os.fsdecode(raw))
    synth.draw("blue", "square", "top", size=48, seed=8).save(d / "x\\xe9.jpg")  # literally
    s = itr("index", d, "--db", tmp_path / "lib", "-m", tiny_clip, "--json", "-q").json()
    assert s["added"] == 3 and s["skipped"] == 1 and "another indexed file" in s["errors"][0]["error"]
    check(tmp_path / "lib", strict=True)


@posix_only("denies access with chmod, which Windows ignores")
def test_permission_denied_files_and_directories(itr, tiny_clip, tmp_path, monkeypatch):
    """As root, chmod does not stop reads: then the denial is simulated at os.open/scandir."""
    d = tmp_path / "photos"
    make_photos(d, 3)
    make_photos(d / "private", 2, start=3)
    db = tmp_path / "lib"
    assert itr("index", d, "--db", db, "-m", tiny_clip, "-q").code == 0
    locked_file = d / "secret.jpg"
    synth.draw("green", "circle", "top", size=48, seed=9).save(locked_file)
    if os.geteuid() != 0:
        locked_file.chmod(0)
        (d / "private").chmod(0)
    else:
        real_open, real_scandir = os.open, os.scandir

        def deny_open(path, *a, **k):  # the file, and the directory (the walk opens it)
            if os.fspath(path) in (str(locked_file), str(d / "private")):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *a, **k)

        def deny_scandir(path="."):  # where the walk lists by path
            if not isinstance(path, int) and os.fspath(path) == str(d / "private"):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "open", deny_open)
        monkeypatch.setattr(os, "scandir", deny_scandir)
    try:
        r = itr("index", d, "--db", db, "--json", "-q")
    finally:
        monkeypatch.undo()
        locked_file.chmod(0o644)
        (d / "private").chmod(0o755)
    assert r.code == 0, r
    s = r.json()
    reasons = {os.path.basename(e["path"]): e["error"] for e in s["errors"]}
    assert reasons == {"secret.jpg": "permission denied", "private": "permission denied"}
    # files under a directory that could not be listed are kept, not pruned
    assert (s["removed"], s["unchanged"], s["skipped"]) == (0, 3, 2)
    assert len(stored(db)) == 5
    # a denied file is not remembered as bad: it is read as soon as it can be
    s = itr("index", d, "--db", db, "--json", "-q").json()
    assert (s["added"], s["skipped"]) == (1, 0)
    check(db, strict=True)


@posix_only("makes a FIFO, which Windows does not have")
def test_read_file_refuses_fifos_huge_files_and_files_being_written(tmp_path, monkeypatch):
    from itrcli.ingest.files import MAX_FILE_BYTES
    from itrcli.jobs import indexer

    os.mkfifo(tmp_path / "fifo.jpg")
    r = indexer.read_for_vectors(str(tmp_path / "fifo.jpg"), None, True, frozenset())
    assert r.error == "not a regular file" and not r.remember
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing is written or read
    r = indexer.read_for_vectors(str(big), None, True, frozenset())
    assert r.error.startswith("file too large") and r.remember and r.size == MAX_FILE_BYTES + 1
    growing = tmp_path / "growing.jpg"
    synth.draw("red", "circle", "left", size=48).save(growing)
    real_fstat, calls = os.fstat, []

    def fstat(fd):  # the file grows between our look before and after reading it
        calls.append(fd)
        if len(calls) % 2 == 0:
            with open(growing, "ab") as f:
                f.write(b"more")
        return real_fstat(fd)

    monkeypatch.setattr(os, "fstat", fstat)
    r = indexer.read_for_vectors(str(growing), None, True, frozenset())
    assert r.error.startswith("file changed while being read") and not r.remember
    monkeypatch.undo()
    r = indexer.read_for_vectors(str(tmp_path / "gone.jpg"), None, True, frozenset())
    assert r.error == "file vanished during the run"


def test_files_deleted_and_changed_during_a_run(itr, tiny_clip, tmp_path, monkeypatch):
    d = tmp_path / "photos"
    photos = make_photos(d, 24)
    db = tmp_path / "lib"
    import itrcli.jobs.indexer as indexer

    real, seen, done = indexer.read_for_vectors, [], set()

    def read_one(path, *a):
        seen.append(path)
        if len(seen) == 10:  # mid-run: one file already read, some not yet, one rewritten
            deadline = time.monotonic() + 30
            while os.fspath(photos[2]) not in done and time.monotonic() < deadline:
                time.sleep(0.005)  # another decode thread may still be reading it
            photos[2].unlink()
            for p in photos[18:22]:
                p.unlink()
            synth.draw("purple", "square", "right", size=48, seed=99).save(photos[23])
        out = real(path, *a)
        done.add(os.fspath(path))
        return out

    monkeypatch.setattr(indexer, "read_for_vectors", read_one)
    r = itr("index", d, "--db", db, "-m", tiny_clip, "--json", "-q", *BATCH)
    monkeypatch.undo()
    assert r.code == 0, r
    s = r.json()
    assert {os.path.basename(e["path"]) for e in s["errors"]} == {p.name for p in photos[18:22]}
    assert all(e["error"] == "file vanished during the run" for e in s["errors"])
    assert s["added"] == 20  # photos[2] was read before it went
    s = itr("index", d, "--db", db, "--json", "-q").json()
    assert (s["removed"], s["added"], s["skipped"]) == (1, 0, 0)
    # the rewritten file was read after the rewrite: its vector is the new content's
    # (within float16 rounding: the library keeps float16 copies)
    np.testing.assert_allclose(stored(db)[str(photos[23])], embed_one(db, str(photos[23])),
                               rtol=1e-3, atol=1e-4)
    assert set(stored(db)) == {str(p) for p in d.glob("*.jpg")}
    check(db, strict=True)


# --- kill -9 ---------------------------------------------------------------------------------

@pytest.fixture
def killable(tmp_path, tiny_clip, reference, itr):
    """A library holding 24 of 72 photos (text tower exported), and its photo directory."""
    d = tmp_path / "photos"
    photos = make_photos(d, 72)
    for p in photos[24:]:
        os.rename(p, tmp_path / p.name)  # brought in later
    db = tmp_path / "lib"
    assert itr("index", d, "--db", db, "-m", tiny_clip, "-q", *BATCH).code == 0
    for p in photos[24:48]:
        os.rename(tmp_path / p.name, p)
    return db, d, photos, with_reference(reference, d)


POINTS = [
    "commit:3",         # between two batches
    "encode:2",         # a batch decoded, not yet committed
    "graph-tmp:1",      # the graph written to its temporary file, not renamed
    "graph-replace:1",  # renamed, older graphs and the log not yet cleaned up
    "truncate:1",       # saved, log not truncated
]


@posix_only("kills a process with SIGKILL, which Windows does not have")
def test_kill9_at_every_critical_point_then_resume(zygote, killable, tiny_clip, itr, tmp_path):
    db, d, photos, ref = killable
    # the first run of a library, killed before it exports the text tower (the first of
    # its model on the machine: an empty tower cache, or it would take the tower from there)
    first = tmp_path / "first"
    fresh = {"ITR_TOWER_CACHE": str(tmp_path / "towers")}
    c = zygote.run("index", d, "--db", first, "-m", tiny_clip, *BATCH, faults="kill=export:1",
                   env=fresh)
    assert c.code == -signal.SIGKILL, c
    assert not (first / "text").exists()
    check(first, strict=True)
    assert zygote.run("index", d, "--db", first, "-q", env=fresh).code == 0
    assert (first / "text" / "settings.json").exists()
    pending = photos[48:]
    for i, point in enumerate(POINTS):
        c = zygote.run("index", d, "--db", db, *BATCH, faults=f"kill={point}")
        assert c.code == -signal.SIGKILL, (point, c)
        check(db)
        search_works(itr, db)
        # between runs the disk changes too: new files, a deletion, a move
        for p in pending[i * 4 : i * 4 + 4]:
            os.rename(tmp_path / p.name, p)
        photos[i].unlink()
        os.rename(photos[30 + i], d / f"moved-{i}.jpg")
        ref[str(d / f"moved-{i}.jpg")] = ref[str(photos[30 + i])]
    c = zygote.run("index", d, "--db", db, "--json", "-q", *BATCH)
    assert c.code == 0, c
    assert c.json()["skipped"] == 0
    assert_matches_disk(db, d, ref)
    rep = check(db, strict=True)
    assert rep.log_entries == 0 and rep.graph_labels == len(list(d.glob("*.jpg")))


def _random_kills(spawn, db: Path, d: Path, ref, iterations: int, seed: int, churn: int = 8,
                  late: float = 0.3) -> int:
    """``iterations`` runs, each killed at a random moment, with the disk changing between
    runs (files added, removed, renamed, touched).  ``spawn()`` starts a run and returns
    (pid, poll, kill, wait).  Returns how many kills landed after the run's first commit
    and before its end."""
    rng = random.Random(seed)
    spare = d.parent / "spare"
    mid_run = 0
    for it in range(iterations):
        # files leave, others come back (as new files), one is renamed, one touched
        files = sorted(d.glob("*.jpg"))
        for p in rng.sample(files, churn):
            os.rename(p, spare / p.name)
        for p in rng.sample(sorted(spare.glob("*.jpg")), churn):
            os.rename(p, d / p.name)
        src = rng.choice(sorted(d.glob("*.jpg")))
        dst = d / f"r{it}-{src.name}"
        os.rename(src, dst)
        ref[str(dst)] = ref[str(src)]
        os.utime(rng.choice(sorted(d.glob("*.jpg"))))
        start = rows(db)
        child = spawn()
        pid, poll, kill, wait = child.pid, child.poll, child.kill, child.wait
        assert wait_for(lambda: holds_lock(db, pid) or poll() is not None, 180)
        if rng.random() < 0.25:  # early: walking, planning, loading the model
            time.sleep(rng.uniform(0.0, 0.5))
        else:  # in the middle of the batches, or while removing and saving at the end
            wait_for(lambda: rows(db) != start or poll() is not None, 180, every=0.005)
            time.sleep(rng.uniform(0.0, late))
        done = poll() is not None
        kill()
        code = wait()
        assert code in (0, -signal.SIGKILL), child
        mid_run += (not done and code == -signal.SIGKILL and rows(db) != start)
        check(db)
    return mid_run


@pytest.fixture
def random_setup(tmp_path, reference, tiny_clip, itr):
    d = tmp_path / "photos"
    make_photos(d, 72)
    ref = with_reference(reference, d)
    (tmp_path / "spare").mkdir()
    for p in sorted(d.glob("*.jpg"))[48:]:
        os.rename(p, tmp_path / "spare" / p.name)
    db = tmp_path / "lib"
    assert itr("index", d, "--db", db, "-m", tiny_clip, "-q", *BATCH).code == 0
    return db, d, ref


def _zygote_spawn(zygote, db, d, slow):
    return lambda: zygote.spawn("index", d, "--db", db, "-q", *BATCH, faults=f"slow={slow}")


def test_kill9_at_random_moments(zygote, random_setup, itr):
    db, d, ref = random_setup
    _random_kills(_zygote_spawn(zygote, db, d, 0.1), db, d, ref, iterations=4, seed=1)
    search_works(itr, db)
    assert itr("index", d, "--db", db, "-q", *BATCH).code == 0
    assert_matches_disk(db, d, ref)
    check(db, strict=True)


@pytest.mark.slow
def test_kill9_at_random_moments_long_zygote(zygote, random_setup, itr):
    db, d, ref = random_setup
    mid = _random_kills(_zygote_spawn(zygote, db, d, 0.05), db, d, ref, iterations=60, seed=3,
                        churn=16, late=0.2)
    assert mid >= 15  # many kills landed inside a run, not before or after it
    search_works(itr, db)
    assert itr("index", d, "--db", db, "-q", *BATCH).code == 0
    assert_matches_disk(db, d, ref)
    check(db, strict=True)


@pytest.mark.slow
def test_kill9_at_random_moments_long_exec(random_setup, itr):
    """The same with a fresh ``python -m itrcli`` per run (real exec, imports and all)."""
    db, d, ref = random_setup

    class Exec(subprocess.Popen):
        def wait(self, timeout=None):
            super().wait(timeout)
            return self.returncode

    def spawn():
        return Exec([*python_cmd(), "index", str(d), "--db", str(db), "-q", *BATCH],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    mid = _random_kills(spawn, db, d, ref, iterations=12, seed=2, churn=20, late=0.03)
    assert mid >= 2
    search_works(itr, db)
    assert itr("index", d, "--db", db, "-q", *BATCH).code == 0
    assert_matches_disk(db, d, ref)
    check(db, strict=True)


# --- Ctrl-C, two writers, readers during a run --------------------------------------------------

@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_keeps_committed_batches_and_the_next_run_goes_on(zygote, killable, itr, sig, code):
    """Ctrl-C, and SIGTERM from `timeout`, systemd or kill: committed batches kept, graph
    saved, each with its own exit code."""
    db, d, photos, ref = killable
    before = rows(db)
    c = zygote.spawn("index", d, "--db", db, *BATCH, faults="slow=0.15")
    assert wait_for(lambda: rows(db) >= before + 8, 60), c
    c.kill(sig)
    assert c.wait() == code, c
    assert "interrupted: scanned" in c.err and "Traceback" not in c.err, c.err
    kept = rows(db)
    assert before + 8 <= kept < before + 24
    check(db, strict=True)  # saved on the way out: nothing left to replay
    s = itr("index", d, "--db", db, "--json", "-q", *BATCH).json()
    assert (s["added"], s["unchanged"]) == (before + 24 - kept, kept)
    assert_matches_disk(db, d, ref)
    check(db, strict=True)


def test_two_index_runs_and_readers_at_once(zygote, killable, itr):
    db, d, photos, ref = killable
    first = zygote.spawn("index", d, "--db", db, "--json", "-q", *BATCH, faults="slow=0.1")
    assert wait_for(lambda: holds_lock(db, first.pid), 60), first
    # a second writer fails fast, with one line naming the holder
    r = itr("index", d, "--db", db, "-q")
    assert r.code == 1 and r.err.count("\n") == 1, r
    assert "locked by another 'itr index'" in r.err and f"pid {first.pid}" in r.err and "--wait" in r.err
    # a third waits for it, then finds nothing left to do
    waiter = zygote.spawn("index", d, "--db", db, "--json", "-q", "--wait", "120", *BATCH)
    # readers see the last commit while the run goes on: never an error, never a half batch
    seen, writer_seen = set(), False
    while first.poll() is None:
        j = itr("search", "a red circle", "--db", db, "--json", "-n", "500")
        assert j.code == 0, j
        paths = [h["path"] for h in j.json()["results"]]
        assert len(paths) == len(set(paths))
        seen.add(len(paths))
        writer_seen |= check(db).get("writer") is not None
    assert writer_seen
    assert first.wait() == 0 and waiter.wait() == 0, (first, waiter)
    assert first.json()["added"] == 24 and waiter.json()["unchanged"] == 48
    assert len(seen) >= 2 and all(n % 4 == 0 for n in seen)  # batches are atomic
    assert_matches_disk(db, d, ref)
    check(db, strict=True)


def test_a_lock_left_by_a_killed_holder_is_cleared(tmp_path):
    from itrcli.errors import LockedError
    from itrcli.store.lock import WriteLock, holder

    code = ("import sys, time; from pathlib import Path; from itrcli.store.lock import WriteLock\n"
            "WriteLock(Path(sys.argv[1]), 'itr index').acquire(); print('held', flush=True);"
            " time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        assert f"pid {p.pid}" in holder(tmp_path)
        with pytest.raises(LockedError, match=f"pid {p.pid}"):
            WriteLock(tmp_path).acquire(wait=0.2)
    finally:
        p.kill()
        p.wait()
    assert holder(tmp_path) is None
    WriteLock(tmp_path).acquire().release()  # the kernel dropped it with the process


# --- the environment: read-only, full disk ---------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A real 8 MiB file system when we may mount one, else a plain directory."""
    mnt = tmp_path / "fs"
    if faults.can_mount():
        with faults.tmpfs(mnt, "8m"):
            yield mnt, True
    else:
        mnt.mkdir()
        yield mnt, False


def _snapshot(db: Path) -> dict[str, bytes]:
    return {str(p.relative_to(db)): p.read_bytes() for p in sorted(db.rglob("*"))
            if p.is_file() and p.name not in ("lock",) and not p.name.endswith(("-shm", "-wal"))}


def test_read_only_library(itr, tiny_clip, tmp_path, small_fs, monkeypatch):
    mnt, real = small_fs
    d = tmp_path / "photos"
    make_photos(d, 8)
    db = mnt / "lib"
    assert itr("index", d, "--db", db, "-m", tiny_clip, "-q", *BATCH).code == 0
    make_photos(d, 4, start=8)
    before = _snapshot(db)
    if real:
        faults.remount(mnt, "ro")
    elif os.geteuid() != 0:
        for p in [db, *db.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
    else:  # root without mount: make every write the library attempts fail like EROFS
        import itrcli.store.db as store_mod

        monkeypatch.setattr(store_mod, "_not_writable", lambda d: OSError(errno.EROFS, "Read-only file system"))
        real_connect = sqlite3.connect
        monkeypatch.setattr(sqlite3, "connect", lambda p, *a, **k: real_connect(
            sqlite_uri(p, mode="ro"), *a, **{**k, "uri": True}) if not str(p).startswith("file:") else real_connect(p, *a, **k))
    try:
        r = itr("index", d, "--db", db, "-q")
        assert r.code == 1 and r.err.count("\n") == 1, r
        assert r.err.startswith("Error: library") and ("read-only" in r.err or "not writable" in r.err), r
        assert "unexpected" not in r.err
        # searching and checking a read-only library work
        j = itr("search", "a red circle", "--db", db, "--json")
        assert j.code == 0 and len(j.json()["results"]) == 8, j
        check(db)
    finally:
        if real:
            faults.remount(mnt, "rw")
        elif os.geteuid() != 0:
            for p in [db, *db.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)
        monkeypatch.undo()
    assert _snapshot(db) == before
    s = itr("index", d, "--db", db, "--json", "-q").json()
    assert (s["added"], s["unchanged"]) == (4, 8)
    check(db, strict=True)


def test_disk_full_is_one_line_and_loses_nothing(itr, tiny_clip, tmp_path, small_fs, monkeypatch):
    mnt, real = small_fs
    d = tmp_path / "photos"
    make_photos(d, 8)
    db = mnt / "lib"
    assert itr("index", d, "--db", db, "-m", tiny_clip, "-q", *BATCH).code == 0
    make_photos(d, 40, start=8)
    n0 = rows(db)
    if real:
        filler = faults.fill(mnt)
    else:
        import itrcli.store.db as store_mod

        calls = []
        real_put = store_mod.Store._put_vector

        def put(self, c, id_, vector):
            calls.append(id_)
            if len(calls) > 6:  # after a batch or so, the disk is full
                raise sqlite3.OperationalError("database or disk is full")
            return real_put(self, c, id_, vector)

        monkeypatch.setattr(store_mod.Store, "_put_vector", put)
    r = itr("index", d, "--db", db, "-q", *BATCH)
    assert r.code == 1 and r.err.count("\n") == 1, r
    assert r.err.startswith("Error: disk full") and "free some space" in r.err, r
    monkeypatch.undo()
    if real:
        filler.unlink()
    n1 = rows(db)
    assert n0 <= n1 < 48
    check(db)
    search_works(itr, db)
    s = itr("index", d, "--db", db, "--json", "-q", *BATCH).json()
    assert s["added"] == 48 - n1 and s["skipped"] == 0
    check(db, strict=True)


def test_a_graph_cut_short_by_a_full_disk_is_caught(itr, tiny_clip, tmp_path, monkeypatch):
    """hnswlib does not check its writes: a short graph file must not be left in place."""
    from itrcli.store.vindex import VectorIndex

    d = tmp_path / "photos"
    make_photos(d, 8)
    db = tmp_path / "lib"
    real_save = VectorIndex.save

    def short_save(self, seq):
        real_save(self, seq)
        p = self.dir / f"{seq}.bin"
        p.write_bytes(p.read_bytes()[:-100])

    monkeypatch.setattr(VectorIndex, "save", short_save)
    r = itr("index", d, "--db", db, "-m", tiny_clip, "-q", *BATCH)
    monkeypatch.undo()
    assert r.code == 1 and "disk full?" in r.err and r.err.count("\n") == 1, r
    assert list((db / "hnsw").glob("*.bin")) == []
    check(db)
    assert search_works(itr, db) == 8  # the vectors were committed
    assert itr("index", d, "--db", db, "-q").code == 0
    rep = check(db, strict=True)
    assert rep.graph_labels == 8


def test_sqlite_and_os_errors_become_one_line_errors(itr, tiny_clip, tmp_path, monkeypatch):
    d = tmp_path / "photos"
    make_photos(d, 4)
    db = tmp_path / "lib"
    import itrcli.store.db as store_mod

    def broken(self, *a, **k):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(store_mod.Store, "insert_file", broken)
    r = itr("index", d, "--db", db, "-m", tiny_clip, "-q")
    assert r.code == 1 and r.err.count("\n") == 1 and "damaged" in r.err and "itr check" in r.err, r
    monkeypatch.setattr(store_mod.Store, "insert_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    r = itr("index", d, "--db", db, "-q")
    assert r.code == 1 and r.err.count("\n") == 1 and "Input/output error" in r.err, r
    r = itr("index", d, "--db", db, "-q", "-v")
    assert r.code == 1 and "Traceback" in r.err


# --- cron ------------------------------------------------------------------------------------------

def test_cron_run_is_silent_or_one_line(zygote, tiny_clip, tmp_path):
    d = tmp_path / "photos"
    make_photos(d, 6)
    faults.make_bad_corpus(d / "junk")
    db = tmp_path / "lib"
    c = zygote.run("index", d, "--db", db, "-m", tiny_clip, "-q", *BATCH)
    assert (c.code, c.out, c.err) == (0, "", ""), c  # first run: model load, export and all
    c = zygote.run("index", d, "--db", db, *BATCH)
    assert c.code == 0 and c.out == "", c
    assert "\x1b" not in c.err and "\r" not in c.err
    lines = c.err.splitlines()
    assert lines[-1].startswith("scanned ") and all(
        line.startswith(("skipped ", "... and ")) for line in lines[:-1]), lines
    (d / "new.jpg").write_bytes((d / "000-red-circle-left.jpg").read_bytes()[::-1])
    c = zygote.run("index", d, "--db", tmp_path / "other", "-m", tmp_path / "no-model", "-q")
    assert c.code == 1 and c.err.count("\n") == 1 and c.err.startswith("Error: "), c


# --- the write transaction when SQLite itself fails --------------------------------------------

def _store_with_probe(tmp_path):
    """A new library's store with a table whose trigger makes SQLite roll the whole
    transaction back by itself (as it may on SQLITE_FULL or SQLITE_IOERR), and one whose
    foreign key is checked only at COMMIT."""
    from itrcli.store.db import Store

    store = Store(tmp_path / "lib", create=True)
    store.conn.executescript("""
        CREATE TABLE probe (x INTEGER);
        CREATE TRIGGER probe_abort BEFORE INSERT ON probe WHEN NEW.x < 0
            BEGIN SELECT RAISE(ROLLBACK, 'probe rolled back'); END;
        CREATE TABLE parent (id INTEGER PRIMARY KEY);
        CREATE TABLE child (pid INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);
    """)
    return store


def test_an_error_sqlite_rolled_back_itself_is_the_error_raised(tmp_path):
    store = _store_with_probe(tmp_path)
    with pytest.raises(sqlite3.IntegrityError, match="probe rolled back"):
        with store.transaction() as c:
            c.execute("INSERT INTO probe VALUES (1)")
            c.execute("INSERT INTO probe VALUES (-1)")  # SQLite rolls back, then raises
    assert not store.conn.in_transaction
    assert store.conn.execute("SELECT count(*) FROM probe").fetchone()[0] == 0
    with store.transaction() as c:  # the connection is usable
        c.execute("INSERT INTO probe VALUES (2)")
    assert store.conn.execute("SELECT x FROM probe").fetchall() == [(2,)]
    store.close()


def test_a_commit_that_fails_rolls_back_and_raises_its_error(tmp_path):
    store = _store_with_probe(tmp_path)
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        with store.transaction() as c:
            c.execute("INSERT INTO probe VALUES (1)")
            c.execute("INSERT INTO child VALUES (42)")  # no parent 42: COMMIT refuses
    assert not store.conn.in_transaction  # not left open, holding the write lock
    assert store.conn.execute("SELECT count(*) FROM probe").fetchone()[0] == 0
    other = sqlite3.connect(store.path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another writer gets the lock at once
        other.execute("ROLLBACK")
    finally:
        other.close()
    store.close()
