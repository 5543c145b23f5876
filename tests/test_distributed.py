"""``itr index --engine ray``: the same library as a local run, incremental, bad files,
a killed driver resumed.

One local Ray instance serves the whole module (starting one takes seconds to a minute on
a busy machine); the runs in this process use it, and the killed driver in a child
process joins it with ``--address``.  Skipped when Ray Data is not installed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import posix_only

from support import synth

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own

HERE = Path(__file__).resolve().parent
BATCH = ["--batch-size", "4", "--precision", "fp32"]


# --- without Ray: the error and the resource plan ---------------------------------------------

def test_missing_ray_is_one_line_naming_the_extra(itr, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    d = tmp_path / "photos"
    d.mkdir()
    synth.draw("red", "circle", "left", size=32).save(d / "a.jpg")
    r = itr("index", d, "--db", tmp_path / "lib", "--engine", "ray")
    assert r.code == 1, r
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --engine ray needs Ray"), r
    assert "pip install 'itr-search[ray]'" in lines[0]
    assert not (tmp_path / "lib" / "itr.db").exists() or _count(tmp_path / "lib") == 0
    r = itr("index", d, "--db", tmp_path / "lib", "--address", "host:6379")
    assert r.code == 2 and "--address goes with --engine ray" in r.err, r
    r = itr("index", d, "--db", tmp_path / "lib", "--engine", "spark")
    assert r.code == 2 and "--engine spark: expected local or ray" in r.err, r


def test_resource_plan():
    from itrcli.jobs.distributed import plan_resources

    small = plan_resources([{"CPU": 2.0}])  # this machine: one actor, decoding beside it
    assert (small.actors, small.cpus_per_actor, small.gpus_per_actor) == (1, 1.0, 0.0)
    assert small.threads == 2 and small.decode_cpus == 0.5
    one = plan_resources([{"CPU": 1.0}])  # the actor must leave room for a decode task
    assert one.cpus_per_actor + one.decode_cpus <= 1.0 and one.decode_cpus > 0
    cpus = plan_resources([{"CPU": 16.0}, {"CPU": 16.0}, {"CPU": 8.0}])
    assert cpus.cpus_per_actor == 6 and cpus.actors == 5 and cpus.gpus_per_actor == 0
    assert cpus.actors * cpus.cpus_per_actor < 40  # cores left to decode
    gpus = plan_resources([{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}])
    assert (gpus.actors, gpus.gpus_per_actor) == (3, 1.0)
    assert plan_resources([{"CPU": 8.0, "GPU": 2.0}], device="cpu").gpus_per_actor == 0


def test_a_worker_error_becomes_one_line():
    from itrcli.errors import LibraryError, ModelError
    from itrcli.jobs.distributed import cluster_error

    # Ray re-raises a worker's exception with the worker's traceback as its text
    e = RuntimeError("ray.exceptions.ActorDiedError: The actor died ...\n  File \"x.py\"\n"
                     "itrcli.errors.ModelError: cannot load model '/m': not found\n\n")
    got = cluster_error(e)
    assert isinstance(got, ModelError) and str(got) == "cannot load model '/m': not found"
    got = cluster_error(RuntimeError("Traceback ...\nray.exceptions.RaySystemError: node lost\n"))
    assert isinstance(got, LibraryError)
    assert str(got) == "the Ray pipeline failed: ray.exceptions.RaySystemError: node lost"


# --- with Ray -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """A local Ray instance for the module, started and stopped by itr's own session code;
    its token and files live in a temporary home."""
    pytest.importorskip("ray.data", reason="Ray Data not installed (pip install 'itr-search[ray]')")
    from itrcli.jobs.distributed import ray_session

    home = tmp_path_factory.mktemp("ray-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(home))
    mp.delenv("RAY_ADDRESS", raising=False)
    try:
        with ray_session():
            import ray

            token = (home / ".ray" / "auth_token")
            yield {"address": ray.get_runtime_context().gcs_address,
                   "token": token.read_text().strip() if token.exists() else None}
    finally:
        mp.undo()


def _count(db: Path) -> int:
    import sqlite3

    c = sqlite3.connect(db / "itr.db")
    try:
        return c.execute("SELECT count(*) FROM files").fetchone()[0]
    finally:
        c.close()


def make_photos(d: Path, n: int, start: int = 0) -> list[Path]:
    """Small JPEGs, some with EXIF capture time and camera."""
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    combos = synth.combinations()
    out = []
    for i in range(start, start + n):
        c, s, p = combos[i % len(combos)]
        path = d / f"{i:03d}-{c}-{s}-{p}.jpg"
        img = synth.draw(c, s, p, size=40 + 8 * (i % 3), seed=i)
        exif = Image.Exif()
        if i % 2 == 0:
            exif[0x0110] = f"Cam {i}"
            exif[0x0132] = f"2021:05:{1 + i % 28:02d} 07:08:09"
        img.save(path, quality=90, exif=exif.tobytes())
        out.append(path)
    return out


def library(db: Path) -> dict[str, dict]:
    """Every row by path, with its vector."""
    from itrcli.store.db import Store, fs_path_of

    s = Store(db, readonly=True)
    try:
        ids, vecs = s.vectors()
        rows = s.rows(ids.tolist())
        out = {}
        for i, v in zip(ids, vecs):
            r = dict(rows[int(i)])
            out[fs_path_of(r["path"], r["fsname"])] = {**r, "vector": v}
        assert len(out) == len(ids) == s.count()  # one vector per row, none twice
        return out
    finally:
        s.close()


def same_library(a: Path, b: Path) -> None:
    """Same rows (every column but the id) and the same vectors (cosine >= 0.9999)."""
    la, lb = library(a), library(b)
    assert sorted(la) == sorted(lb)
    for path, ra in la.items():
        rb = lb[path]
        for k in ("size", "mtime_ns", "hash", "width", "height", "taken_at", "camera", "lat", "lon"):
            assert ra[k] == rb[k], (path, k)
        va, vb = ra["vector"], rb["vector"]  # float16 copies: unit length to ~1e-4
        cos = float(np.dot(va, vb) / (np.linalg.norm(va) * np.linalg.norm(vb)))
        assert cos >= 0.9999, (path, cos)


def check_clean(db: Path) -> None:
    from itrcli import Library

    with Library.open(db, readonly=True) as lib:
        rep = lib.check()
    bad = [f.to_json() for f in rep.findings if f.severity != "note"]
    assert rep.ok and not bad, bad


def test_ray_engine_matches_a_local_run_and_is_incremental(itr, tiny_clip, tmp_path, ray_address):
    d = tmp_path / "photos"
    photos = make_photos(d, 14)
    (d / "corrupt.jpg").write_bytes(photos[0].read_bytes()[:300])  # a truncated JPEG
    (d / "notes.jpg").write_text("not an image\n")
    local, dist = tmp_path / "local", tmp_path / "ray"
    a = itr("index", d, "--db", local, "-m", tiny_clip, "--json", "-q", *BATCH)
    assert a.code == 0, a
    b = itr("index", d, "--db", dist, "-m", tiny_clip, "--json", "-q", "--engine", "ray", *BATCH)
    assert b.code == 0, b
    assert b.err == ""  # -q: nothing from itr, nothing from Ray
    sa, sb = a.json(), b.json()
    assert set(sa) == set(sb) and (sa["engine"], sb["engine"]) == ("local", "ray")
    for k in ("scanned", "added", "skipped", "updated", "moved", "removed"):
        assert sa[k] == sb[k], k
    assert (sb["added"], sb["skipped"]) == (14, 2)
    assert sorted(map(json.dumps, sa["errors"])) == sorted(map(json.dumps, sb["errors"]))
    same_library(local, dist)
    rows = library(dist)
    assert rows[str(photos[0])]["camera"] == "Cam 0"
    assert rows[str(photos[0])]["taken_at"] == "2021-05-01T07:08:09"
    check_clean(dist)

    # second run: nothing changed -> Ray is not even needed; bad files are not read again
    c = itr("index", d, "--db", dist, "--json", "-q", "--engine", "ray")
    assert c.code == 0, c
    s = c.json()
    assert (s["added"], s["unchanged"], s["skipped"], s["engine"]) == (0, 14, 2, "ray")

    # then: two new files, one deleted, one moved, one copied, one rewritten
    new = make_photos(d, 2, start=20)
    photos[1].unlink()
    os.rename(photos[2], d / "moved.jpg")
    (d / "copy.jpg").write_bytes(photos[3].read_bytes())
    synth.draw("blue", "triangle", "top", size=48, seed=99).save(photos[4])
    st = photos[4].stat()
    os.utime(photos[4], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    r = itr("index", d, "--db", local, "--json", "-q", *BATCH)
    assert r.code == 0, r
    s = r.json()
    assert (s["added"], s["removed"], s["moved"], s["updated"]) == (3, 1, 1, 1), s
    from itrcli import Library

    with Library.open(dist) as lib:  # the Python API
        s = lib.index([str(d)], engine="ray", batch_size=4, precision="fp32")
    assert (s.added, s.removed, s.moved, s.updated, s.engine) == (3, 1, 1, 1, "ray"), s
    assert s.embedded == 3  # the two new files and the rewritten one: not the copy
    same_library(local, dist)
    assert str(new[0]) in library(dist)
    check_clean(dist)
    hits = itr("search", "a red circle", "--db", dist, "--json", "-n", "50")
    assert hits.code == 0 and len(hits.json()["results"]) == 16, hits


@posix_only("kills a process with SIGKILL, which Windows does not have")
def test_killed_driver_resumes(itr, tiny_clip, tmp_path, ray_address):
    """kill -9 of the driver after its second commit; the same command again finishes the
    run: nothing lost, nothing twice, check clean, the vectors of a local run."""
    d = tmp_path / "photos"
    photos = make_photos(d, 24)
    db, ref = tmp_path / "lib", tmp_path / "ref"
    assert itr("index", d, "--db", ref, "-m", tiny_clip, "-q", *BATCH).code == 0
    for p in photos[8:]:
        os.rename(p, tmp_path / p.name)
    assert itr("index", d, "--db", db, "-m", tiny_clip, "-q", *BATCH).code == 0
    for p in photos[8:]:
        os.rename(tmp_path / p.name, p)  # 16 new files: 4 batches, killed after the second
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE)])
    if ray_address["token"]:
        env["RAY_AUTH_TOKEN"] = ray_address["token"]
    args = ["index", str(d), "--db", str(db), "-m", str(tiny_clip), "--engine", "ray",
            "--address", ray_address["address"], *BATCH]
    code = ("import sys, faults; faults.install('kill=commit:2'); from itrcli.cli import main; "
            f"main({args!r})")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-3000:])
    assert p.stdout == ""
    assert 8 < _count(db) < 24  # killed mid-run, with batches committed
    check_clean(db)
    r = itr("index", d, "--db", db, "--json", "-q", "--engine", "ray", *BATCH)
    assert r.code == 0, r
    s = r.json()
    assert s["added"] + s["unchanged"] == 24 and s["unchanged"] > 8 and s["skipped"] == 0
    same_library(ref, db)
    check_clean(db)


def frames_of(db: Path) -> dict[str, tuple[list[float], np.ndarray]]:
    """Each file's frame times (None: an image) and vectors ``[n, dim]``, by path."""
    from itrcli.store.db import Store, fs_path_of

    s = Store(db, readonly=True)
    try:
        out = {}
        for fid in s.file_ids():
            r = s.rows([fid])[fid]
            labels, times = s.frames(fid) if r.get("duration") is not None else ([fid], None)
            ids, vecs = s.vectors(labels)
            by = dict(zip(ids.tolist(), vecs))
            out[fs_path_of(r["path"], r["fsname"])] = (times, np.stack([by[i] for i in labels]))
        return out
    finally:
        s.close()


def test_ray_engine_reads_videos_as_a_local_run(itr, tiny_clip, tmp_path, ray_address):
    """Videos on the cluster: the same frames (times) and vectors as a local run, a bad
    video one skip line, remembered; photos and videos in the same batches."""
    from support import clips

    d = tmp_path / "media"
    make_photos(d, 3)
    red = clips.shape_scenes([(0, ("red", "circle", "center")), (4, ("blue", "square", "left"))])
    clips.write_clip(d / "a.mp4", red, 8, fps=5, codec="h264")
    clips.write_clip(d / "b.webm", clips.shape_scenes([(0, ("green", "triangle", "top"))]), 3,
                     fps=5, codec="vp9")
    (d / "broken.mov").write_bytes(b"\x00\x00\x00\x18ftypqt  " + b"\x00" * 64)
    local, dist = tmp_path / "local", tmp_path / "ray"
    a = itr("index", d, "--db", local, "-m", tiny_clip, "--json", "-q", *BATCH)
    b = itr("index", d, "--db", dist, "-m", tiny_clip, "--json", "-q", "--engine", "ray", *BATCH)
    assert a.code == 0 and b.code == 0, (a, b)
    sa, sb = a.json(), b.json()
    for k in ("scanned", "added", "skipped", "passed_over"):
        assert sa[k] == sb[k], k
    assert (sb["added"], sb["skipped"]) == (5, 1)
    assert sorted(map(json.dumps, sa["errors"])) == sorted(map(json.dumps, sb["errors"]))
    fa, fb = frames_of(local), frames_of(dist)
    assert sorted(fa) == sorted(fb) and len(fa) == 5
    assert sorted(p for p in fa if fa[p][0] is not None) == [str(d / "a.mp4"), str(d / "b.webm")]
    for path, (times, vecs) in fa.items():
        tb, vb = fb[path]
        assert times == tb and len(vecs) >= 1, path
        cos = np.sum(vecs * vb, axis=1) / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(vb, axis=1))
        assert float(cos.min()) >= 0.9999, (path, cos)
    assert len(fa[str(d / "a.mp4")][0]) >= 2  # the red and the blue shot
    check_clean(dist)
    c = itr("index", d, "--db", dist, "--json", "-q", "--engine", "ray")  # remembered
    assert c.code == 0 and (c.json()["skipped"], c.json()["unchanged"]) == (1, 5), c
