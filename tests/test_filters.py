"""Search filters (camera, place, glob, size, kind), --sort, --auto-cut, metadata counts.

The photos carry real EXIF written with Pillow (make, model, GPS, capture time); results
are compared with a naive Python filter over the same rows, written here independently.
"""

from __future__ import annotations

import fnmatch
import math
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itrcli.query import filters as F

CAMERAS = [("Canon", "Canon EOS 5D"), ("Apple", "iPhone 12"), ("NIKON CORPORATION", "NIKON D750"),
           None]
PLACES = [(48.8584, 2.2945), (48.8530, 2.3499), (51.5007, -0.1246), (-33.8568, 151.2153),
          (64.1466, -21.9426), (-16.5, 179.95), (-16.5, -179.95), None]
SIZES = [(64, 64), (96, 64), (64, 96), (128, 80)]
DRAW = [("red", "circle"), ("blue", "square"), ("green", "circle"), ("red", "square")]


def _dms(x: float) -> tuple[float, float, float]:
    x = abs(x)
    d = int(x)
    m = int((x - d) * 60)
    return float(d), float(m), round((x - d - m / 60) * 3600, 4)


def write_photo(path: Path, i: int) -> dict:
    """One drawing with EXIF; returns what was written (the truth for the naive filter)."""
    from support import synth

    color, shape = DRAW[i % len(DRAW)]
    w, h = SIZES[i % len(SIZES)]
    img = synth.draw(color, shape, "center", size=64, seed=i).resize((w, h))
    exif = Image.Exif()
    cam = CAMERAS[i % len(CAMERAS)]
    if cam:
        exif[0x010F], exif[0x0110] = cam
    place = PLACES[i % len(PLACES)]
    if place:
        gps = exif.get_ifd(0x8825)
        gps[1], gps[2] = ("N" if place[0] >= 0 else "S"), _dms(place[0])
        gps[3], gps[4] = ("E" if place[1] >= 0 else "W"), _dms(place[1])
    taken = f"20{10 + i % 12:02d}:0{1 + i % 9}:15 10:00:00" if i % 3 else None
    if taken:
        exif.get_ifd(0x8769)[0x9003] = taken
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, exif=exif)
    return {"path": str(path), "make": cam[0] if cam else None, "model": cam[1] if cam else None,
            "place": place, "size": (w, h), "taken": taken}


@pytest.fixture(scope="module")
def photo_lib(tmp_path_factory, tiny_clip):
    from conftest import run_itr

    root = tmp_path_factory.mktemp("filters")
    truth = []
    for i in range(32):
        sub = ("trips/2019", "trips/2023", "home", "home/raw")[i % 4]
        ext = ".jpg" if i % 5 else ".jpeg"
        truth.append(write_photo(root / "photos" / sub / f"img{i:02d}{ext}", i))
    db = root / "lib"
    r = run_itr("index", root / "photos", "--db", db, "-m", tiny_clip, "-q")
    assert r.code == 0, r
    return db, truth, root


def _haversine_ref(a, b) -> float:
    # spherical law of cosines: another formula than the one under test
    p1, l1, p2, l2 = map(math.radians, (*a, *b))
    c = math.sin(p1) * math.sin(p2) + math.cos(p1) * math.cos(p2) * math.cos(l2 - l1)
    return 6371.0088 * math.acos(max(-1.0, min(1.0, c)))


def naive(truth, *, camera=None, near=None, globs=(), min_size=None):
    out = set()
    for t in truth:
        if camera is not None:
            names = " ".join(x for x in (t["make"], t["model"]) if x)
            if not names or camera.lower() not in names.lower():
                continue
        if near is not None:
            if t["place"] is None or _haversine_ref(near[:2], t["place"]) > near[2] + 1e-9:
                continue
        if globs:
            p = t["path"]
            ok = False
            for g in globs:
                if g.startswith("/"):
                    ok |= fnmatch.fnmatchcase(p, g)
                else:  # some tail of the path after a "/"
                    parts = p.split("/")
                    ok |= any(fnmatch.fnmatchcase("/".join(parts[k:]), g) for k in range(1, len(parts)))
            if not ok:
                continue
        if min_size is not None and (t["size"][0] < min_size[0] or t["size"][1] < min_size[1]):
            continue
        out.add(t["path"])
    return out


def _search(itr, db, *args):
    r = itr("search", "a red circle", "--db", db, "--json", "-n", "1000", *args)
    assert r.code == 0, r
    return r.json()["results"]


# --- parsing and the pure predicate ----------------------------------------------------

def test_parse_near_and_min_size():
    assert F.parse_near("48.8584,2.2945") == F.Near(48.8584, 2.2945, F.DEFAULT_NEAR_KM)
    assert F.parse_near(" -33.9 , 151.2 , 2.5 ") == F.Near(-33.9, 151.2, 2.5)
    for bad in ("48.8", "a,b", "48,2,3,4", "91,0", "0,181", "1,2,0", "1,2,-3", "", "1,,2"):
        with pytest.raises(F.UsageError):
            F.parse_near(bad)
    assert F.parse_min_size("1920x1080") == (1920, 1080) and F.parse_min_size("10X0") == (10, 0)
    for bad in ("1920", "x1080", "-1x2", "1.5x2", ""):
        with pytest.raises(F.UsageError):
            F.parse_min_size(bad)
    with pytest.raises(F.UsageError):
        F.parse_globs(["*.jpg", " "])
    with pytest.raises(F.UsageError):
        F.parse_kind("audio")
    with pytest.raises(F.UsageError):
        F.parse_sort("size")


def test_distance_and_the_latitude_band_never_loses_a_match():
    # Eiffel tower to Big Ben: 340.5 km
    assert F.distance_km(48.8584, 2.2945, 51.5007, -0.1246) == pytest.approx(340.5, abs=0.5)
    assert F.distance_km(0, 179.99, 0, -179.99) == pytest.approx(2.224, abs=0.01)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        lat, lon = rng.uniform(-90, 90), rng.uniform(-180, 180)
        km = float(rng.choice([0.5, 10, 300, 5000]))
        p = (float(np.clip(lat + rng.normal(0, 3), -90, 90)), float(rng.uniform(-180, 180)))
        d = F.distance_km(lat, lon, *p)
        assert d == pytest.approx(_haversine_ref((lat, lon), p), abs=1e-3)
        lo, hi = F.Near(lat, lon, km).lat_range()
        if d <= km:
            assert lo <= p[0] <= hi


def _glob(pattern: str, path: str) -> bool:
    conn = sqlite3.connect(":memory:")
    return bool(conn.execute("SELECT ? GLOB ?", (path, F.glob_sql(pattern))).fetchone()[0])


def test_glob_rules():
    p = "/home/ann/photos/2023/rome/IMG_1.JPG"
    assert _glob("*.JPG", p) and not _glob("*.jpg", p)
    assert _glob("IMG_*", p) and _glob("*rome*", p) and _glob("IMG_[0-9].JPG", p)
    assert _glob("IMG_[!2].JPG", p) and not _glob("IMG_[!1].JPG", p)
    assert _glob("2023/*", p) and _glob("photos/2023/*/IMG_?.JPG", p)
    assert not _glob("2022/*", p) and not _glob("hotos/2023/*", p)
    assert _glob("/home/*/2023/*", p) and not _glob("/ann/*", p)
    assert not _glob("MG_1.JPG", p)  # a name's tail is not a name


def test_kind_predicate_hooks_on_row_kind():
    f = F.MetaFilter(kind="image")
    assert f.matches({"path": "/a.jpg"}) and f.matches({"path": "/a.jpg", "duration": None})
    assert not f.matches({"path": "/a.mp4", "duration": 12.5})
    v = F.MetaFilter(kind="video")
    assert v.matches({"path": "/a.mp4", "duration": 12.5}) and not v.matches({"path": "/a.jpg"})


def test_sort_hits_orders_and_keeps_ranks():
    from itrcli.query.search import Hit

    hits = [Hit(1, 0.9, "/b", 1, 1, "2020-01-01T00:00:00", 1),
            Hit(2, 0.8, "/a", 1, 1, None, 2, mtime_ns=1_700_000_000 * 10**9),
            Hit(3, 0.7, "/c", 1, 1, "2020-01-01T00:00:00", 3),
            Hit(4, 0.6, "/d", 1, 1, None, 4)]
    assert [h.path for h in F.sort_hits(hits, "date")] == ["/a", "/b", "/c", "/d"]
    assert [h.path for h in F.sort_hits(hits, "path")] == ["/a", "/b", "/c", "/d"]
    assert [h.rank for h in F.sort_hits(hits, "path")] == [2, 1, 3, 4]
    assert F.sort_hits(hits, "score") == hits


# --- through the CLI, on real EXIF ------------------------------------------------------

def test_exif_camera_and_gps_are_recorded_at_index_time(photo_lib):
    db, truth, _ = photo_lib
    rows = {r[0]: r[1:] for r in sqlite3.connect(db / "itr.db").execute(
        "SELECT path, camera, lat, lon, width, height, taken_at FROM files")}
    assert len(rows) == len(truth)
    for t in truth:
        camera, lat, lon, w, h, taken = rows[t["path"]]
        if t["model"]:
            assert t["model"] in camera and ("iPhone" not in camera or "Apple" in camera)
        else:
            assert camera is None
        if t["place"]:
            assert (lat, lon) == pytest.approx(t["place"], abs=1e-5)
        else:
            assert lat is None and lon is None
        assert (w, h) == t["size"]
        assert (taken is None) == (t["taken"] is None)


@pytest.mark.parametrize("opts", [
    {"camera": "canon"},
    {"camera": "APPLE"},
    {"camera": "iphone"},
    {"camera": "nikon d7"},
    {"camera": "_"},                            # LIKE wildcards are taken literally
    {"camera": "n%5"},
    {"near": (48.8566, 2.3522, 10.0)},          # central Paris: both Paris photos
    {"near": (48.8566, 2.3522, 1.0)},           # 1 km: only one of them
    {"near": (-16.5, 180.0, 6.0)},              # across the antimeridian, both sides
    {"near": (51.5, -0.12, 2.0), "camera": "canon"},
    {"globs": ["*.jpeg"]},
    {"globs": ["2023/*", "raw/*"]},
    {"globs": ["trips/*/img0?.jpg"]},
    {"globs": ["img[!0]*", str(Path("/nowhere") / "*")]},
    {"globs": ["*/home/*"]},
    {"min_size": (96, 64)},
    {"min_size": (64, 90), "globs": ["home/*"]},
    {"min_size": (100, 0), "camera": "n"},
])
def test_filters_match_a_naive_filter(itr, photo_lib, opts):
    db, truth, _ = photo_lib
    args = []
    if "camera" in opts:
        args += ["--camera", opts["camera"]]
    if "near" in opts:
        args += ["--near", ",".join(map(str, opts["near"]))]
    for g in opts.get("globs", []):
        args += ["--glob", g]
    if "min_size" in opts:
        args += ["--min-size", "{}x{}".format(*opts["min_size"])]
    want = naive(truth, **opts)
    got = {h["path"] for h in _search(itr, db, *args)}
    assert got == want
    exact = {h["path"] for h in _search(itr, db, *args, "--exact")}
    assert exact == want


def test_filters_combine_with_every_query_kind_and_the_old_filters(itr, photo_lib):
    db, truth, root = photo_lib
    want = naive(truth, camera="canon") & naive(truth, globs=["trips/*"])
    assert want
    base = ["--camera", "canon", "--glob", "trips/*"]
    got = {h["path"] for h in _search(itr, db, *base)}
    assert got == want
    assert {h["path"] for h in _search(itr, db, "--camera", "canon", "--glob",
                                       f"{root}/photos/trips/*")} == want  # absolute
    # --in is the same restriction as the glob here
    assert {h["path"] for h in _search(itr, db, "--camera", "canon", "--in",
                                       root / "photos" / "trips")} == want
    # dates: capture time where written (the others fall back to mtime, today)
    old = {t["path"] for t in truth if t["taken"] and t["taken"] < "2016"}
    got = {h["path"] for h in _search(itr, db, *base, "--before", "2016-01-01")}
    assert got == want & old
    # an image query (never itself), --add / --subtract, and the Hamming path
    q = sorted(want)[0]
    r = itr("search", q, "--db", db, "--json", "-n", "100", *base)
    assert {h["path"] for h in r.json()["results"]} == want - {q}
    r = itr("search", "a circle", "--add", "red", "--subtract", "blue", "--db", db, "--json",
            "-n", "100", *base)
    assert {h["path"] for h in r.json()["results"]} == want
    r = itr("search", "a red circle", "--hash", "--hash-bits", "16", "--db", db, "--json",
            "-n", "100", *base)
    assert {h["path"] for h in r.json()["results"]} == want
    # the filtered ranking is the unfiltered one restricted to the matches
    full = [h["path"] for h in _search(itr, db)]
    assert [h["path"] for h in _search(itr, db, *base)] == [p for p in full if p in want]


def test_kind_image_keeps_every_image_and_video_none_yet(itr, photo_lib):
    db, truth, _ = photo_lib
    assert {h["path"] for h in _search(itr, db, "--kind", "image")} == {t["path"] for t in truth}
    assert _search(itr, db, "--kind", "video") == []
    r = itr("search", "x", "--db", db, "--kind", "audio")
    assert r.code == 2 and r.err.count("\n") == 1 and "--kind" in r.err


def test_bad_input_is_one_line_and_exit_2_and_no_match_is_empty(itr, photo_lib):
    db, _, _ = photo_lib
    for args in (["--near", "48.85"], ["--near", "48.85;2.35"], ["--near", "95,2"],
                 ["--glob", ""], ["--min-size", "big"], ["--camera", " "], ["--sort", "size"]):
        r = itr("search", "red", "--db", db, *args)
        assert r.code == 2 and r.out == "" and r.err.startswith("Error: ") \
            and r.err.count("\n") == 1, (args, r)
    r = itr("search", "red", "--db", db, "--camera", "hasselblad")
    assert r.code == 0 and r.out == "" and r.err == "no results with these filters\n"
    r = itr("search", "red", "--db", db, "--camera", "hasselblad", "--json")
    assert r.code == 0 and r.json()["results"] == []
    # a negative latitude is a value, not an option
    r = itr("search", "red", "--db", db, "--near", "-33.86,151.21,1", "--json")
    assert r.code == 0 and len(r.json()["results"]) == 4


def test_sort_date_and_path(itr, photo_lib):
    db, truth, _ = photo_lib
    by_score = _search(itr, db, "-n", "10")
    by_date = _search(itr, db, "-n", "10", "--sort", "date")
    by_path = _search(itr, db, "-n", "10", "--sort", "path")
    assert {h["path"] for h in by_date} == {h["path"] for h in by_score} == {h["path"] for h in by_path}
    assert [h["path"] for h in by_path] == sorted(h["path"] for h in by_score)
    mtime = {t["path"]: os.stat(t["path"]).st_mtime_ns for t in truth}
    keys = [F.when(h["taken_at"], mtime[h["path"]]) for h in by_date]
    assert keys == sorted(keys, reverse=True)
    assert sorted(h["rank"] for h in by_date) == list(range(1, 11))
    r = itr("search", "a red circle", "--db", db, "-n", "10", "--sort", "path")
    assert [line.split("\t")[1] for line in r.out.splitlines()] == [h["path"] for h in by_path]


def test_info_counts_metadata(itr, photo_lib):
    db, truth, _ = photo_lib
    j = itr("info", "--db", db, "--json").json()
    assert j["metadata"] == {"gps": sum(t["place"] is not None for t in truth),
                             "camera": sum(t["model"] is not None for t in truth),
                             "taken_at": sum(t["taken"] is not None for t in truth)}
    r = itr("info", "--db", db)
    assert f"{j['metadata']['gps']} with GPS" in r.out


# --- auto-cut --------------------------------------------------------------------------

def test_gap_cut_and_floor():
    from itrcli.query.autocut import floor_from_scores, gap_cut

    assert gap_cut([0.9, 0.88, 0.87, 0.5, 0.49], floor=0.0) == 0.87
    assert gap_cut([0.9, 0.88, 0.87, 0.5, 0.49], floor=0.89) == 0.89  # one clears the floor
    assert gap_cut([0.9, 0.6, 0.59, 0.1], floor=0.3) == 0.9
    assert gap_cut([0.3, 0.2], floor=0.5) == 0.5
    assert gap_cut([1.0, 0.75, 0.5, 0.25, -1.0], floor=-1.0, window=4) == 1.0  # ties: the first
    s = np.random.default_rng(0).normal(0.2, 0.05, 10_000)
    assert floor_from_scores(s, 2.0) == pytest.approx(0.3, abs=0.005)


def test_auto_cut_keeps_the_standout_prefix(itr, photo_lib):
    from itrcli import Library
    from itrcli.query.autocut import FLOOR_SIGMAS
    from itrcli.query.search import query_parts

    db, truth, _ = photo_lib
    with Library.open(db, readonly=True) as lib:
        full = lib.search("a red circle", top=1000)
        cut = lib.search("a red circle", top=1000, auto_cut=True)
        assert 1 <= len(cut) < len(full)
        assert [(h.path, h.rank, h.score) for h in cut] == \
            [(h.path, h.rank, h.score) for h in full[:len(cut)]]  # a prefix of the ranking
        # the floor, computed independently: the library is smaller than the sample
        q = lib.embed_query(query_parts("a red circle"))
        _, vecs = lib.store.vectors()
        s = (vecs @ q).astype(np.float64)
        floor = s.mean() + FLOOR_SIGMAS * s.std()
        above = [h.score for h in full if h.score >= floor]
        assert all(h.score >= floor for h in cut) and len(above) >= len(cut)
        if len(above) > 1:  # the kept set ends at the largest drop above the floor
            drops = [a - b for a, b in zip(above, above[1:])]
            assert len(cut) - 1 == int(np.argmax(drops))
        # fewer asked for: the first of them; a stricter --threshold wins
        assert [h.path for h in lib.search("a red circle", top=1, auto_cut=True)] == [cut[0].path]
        strict = lib.search("a red circle", top=1000, auto_cut=True, threshold=cut[0].score)
        assert [h.path for h in strict] == [cut[0].path]
    j = _search(itr, db, "--auto-cut", "--sort", "path")
    assert [h["path"] for h in j] == sorted(h.path for h in cut)


def test_filtered_graph_search_agrees_with_exact(tmp_path, monkeypatch):
    """A filter leaving more than EXACT_BELOW candidates goes through the graph with a
    filter; on a library large enough for that it finds what exact search finds."""
    from itrcli.query import search as S
    from itrcli.store.db import Store
    from itrcli.store.vindex import VectorIndex, text_like_queries

    n, dim = 3000, 32
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((60, dim))
    vecs = centres[rng.integers(0, 60, n)] + 0.5 * rng.standard_normal((n, dim))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    files = tmp_path / "files"
    files.mkdir()
    store = Store(tmp_path / "lib", create=True)
    store.set_meta(dim=dim)
    with store.transaction() as c:
        for i in range(n):
            p = files / f"{i:05d}.jpg"
            p.touch()
            store.insert_file(c, str(p), {"size": 0, "mtime_ns": 0, "hash": f"{i:032x}",
                                          "width": 64, "height": 64,
                                          "camera": ("Canon EOS R", "Pixel 7", "X-T4")[i % 3],
                                          "lat": 45.0 + (i % 7) * 0.01, "lon": 5.0}, vecs[i])
    vi = VectorIndex(tmp_path / "lib", dim)
    vi.rebuild(store)
    vi.save(store.last_seq())
    mapped = VectorIndex(tmp_path / "lib", dim).open_mapped(store)
    assert mapped.mapped is not None
    monkeypatch.setattr(S, "EXACT_BELOW", 50)
    used = []

    class Spy:
        count = mapped.count

        def search(self, *a, **kw):
            used.append(kw.get("filter") is not None)
            return mapped.search(*a, **kw)

    queries = text_like_queries(vecs[rng.choice(n, 40, replace=False)], 0.5, seed=1)
    cases = [F.MetaFilter(camera="canon"), F.MetaFilter(camera="pixel", globs=["*0.jpg"]),
             F.MetaFilter(near=F.Near(45.0, 5.0, 2.5))]
    found = total = 0
    for meta in cases:
        allowed = S.allowed_ids(store, S.Filters(meta=meta))
        assert 50 < len(allowed) < n
        for q in queries:
            kw = dict(store=store, get_vindex=lambda: Spy(), top=10, filters=S.Filters(meta=meta))
            graph = S.rank(q, **kw)
            exact = S.rank(q, **kw, exact=True)
            assert all(h.id in allowed for h in graph) and len(graph) == 10
            kth = exact[-1].score - 1e-6
            found += sum(h.score >= kth for h in graph)
            total += 10
    assert all(used) and len(used) == len(cases) * len(queries)
    assert found / total >= 0.95, found / total
    store.close()


def test_library_sample_is_fixed_and_spread_over_sparse_ids():
    from types import SimpleNamespace

    from itrcli.store.metadata import Metadata

    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, duration REAL)")
    conn.execute("CREATE TABLE frames (id INTEGER PRIMARY KEY, file_id INTEGER, time REAL)")
    assert Metadata(SimpleNamespace(conn=conn)).sample_ids(10) == []
    conn.executemany("INSERT INTO files (id) VALUES (?)", [(i,) for i in range(1, 6)])
    assert Metadata(SimpleNamespace(conn=conn)).sample_ids(10) == [1, 2, 3, 4, 5]  # small library: all of it
    dense = list(range(1, 5001))
    sparse = list(range(10, 10_000_000, 9973))  # ~1,000 ids spread thin (after --reindex)
    for ids in (dense, sparse):
        conn.execute("DELETE FROM files")
        conn.executemany("INSERT INTO files (id) VALUES (?)", [(i,) for i in ids])
        got = Metadata(SimpleNamespace(conn=conn)).sample_ids(300)
        assert got == Metadata(SimpleNamespace(conn=conn)).sample_ids(300) and len(got) == 300 == len(set(got))
        assert set(got) <= set(ids)
        # spread over the whole range, not its start
        assert np.median(got) == pytest.approx(np.median(ids), rel=0.15)
    # labels, not files: a video's frames are drawn, never the video's own row (no vector)
    conn.execute("DELETE FROM files")
    conn.executemany("INSERT INTO files VALUES (?, ?)",
                     [(i, 9.5 if i % 10 == 0 else None) for i in range(1, 2001)])
    conn.executemany("INSERT INTO frames VALUES (?, ?, ?)", [  # 3 frames per video
        (2000 + 3 * v + j, v, float(j)) for v in range(10, 2001, 10) for j in (1, 2, 3)])
    labels = ({i for i in range(1, 2001) if i % 10}
              | {r[0] for r in conn.execute("SELECT id FROM frames")})
    assert Metadata(SimpleNamespace(conn=conn)).sample_ids(5000) == sorted(labels)  # all of them
    got = Metadata(SimpleNamespace(conn=conn)).sample_ids(300)
    assert got == Metadata(SimpleNamespace(conn=conn)).sample_ids(300) and len(set(got)) == 300 and set(got) <= labels
    assert sum(i > 2000 for i in got) > 50  # frames (a third of the labels) are drawn too
