"""Dense vector storage: new libraries keep float16 copies in 16 KiB pages, the graph holds
the same values (so a graph rebuilt from the database gives the same results), and a
library made by 0.1.0 is converted by `itr check --compact`, resumably."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from itrcli.store.db import sqlite_uri

from conftest import copy_legacy_library, index_shapes, main_in_fresh_python, write_shapes

SPECS = [(c, s, p, i) for i, (c, s, p) in enumerate(
    [(c, s, p) for c in ("red", "blue", "green", "yellow", "purple") for s in ("circle", "square")
     for p in ("left", "right", "top", "bottom")])]  # 40 drawings


def blob_lengths(db: Path) -> set[int]:
    c = sqlite3.connect(sqlite_uri(db / "itr.db", mode="ro"), uri=True)
    try:
        return {r[0] for r in c.execute("SELECT DISTINCT length(vector) FROM vectors")}
    finally:
        c.close()


def page_size(db: Path) -> int:
    c = sqlite3.connect(sqlite_uri(db / "itr.db", mode="ro"), uri=True)
    try:
        return c.execute("PRAGMA page_size").fetchone()[0]
    finally:
        c.close()


def graph_results(db: Path, queries, ef: int = 400):
    """(labels, distances) of the saved graph for each query, as `itr search` reads it."""
    from itrcli import Library

    with Library.open(db, readonly=True) as lib:
        g = lib._search_graph()
        live = lib.store.count()
        return [g.search(q, 10, live, ef=ef) for q in queries]


@pytest.fixture
def lib(itr, tiny_clip, tmp_path):
    return index_shapes(itr, tmp_path, SPECS, tiny_clip)[0]


def test_a_new_library_stores_float16_vectors_in_16k_pages(itr, lib):
    from itrcli.store.db import PAGE_SIZE

    assert page_size(lib) == PAGE_SIZE == 16384
    assert blob_lengths(lib) == {2 * 32}  # the tiny model's 32 dimensions, 2 bytes each
    info = itr("info", "--db", lib, "--json").json()
    st = info["storage"]
    assert (st["vector_dtype"], st["page_size"], st["compact"]) == ("float16", 16384, True)
    total = sum(v for k, v in info["sizes"].items() if k not in ("total", "thumbs"))
    assert st["bytes_per_image"] == round(total / 40)
    line = [ln for ln in itr("info", "--db", lib).out.splitlines() if ln.startswith("storage:")]
    assert line and "bytes per image; vectors float16, 16 KiB pages" in line[0], line
    assert "--compact" not in line[0]
    # the graph holds exactly the stored (float16) values, normalised: check is clean
    r = itr("check", "--db", lib, "--json", "-q")
    assert r.code == 0 and r.json()["ok"], r


def test_a_graph_rebuilt_by_repair_gives_the_same_results(itr, lib):
    """Same top 10 and the same scores for 200 queries, after the graph is deleted and
    rebuilt from the database by `itr check --repair`."""
    from itrcli import Library
    from itrcli.store.vindex import text_like_queries

    with Library.open(lib, readonly=True) as L:
        ids, mat = L.store.vectors()
    rng = np.random.default_rng(7)
    queries = text_like_queries(mat[rng.integers(0, len(ids), 200)], seed=3)
    before = graph_results(lib, queries)
    shutil.rmtree(lib / "hnsw")
    r = itr("check", "--repair", "--db", lib, "--json", "-q")
    assert r.code == 0, r
    assert any("graph" in line for line in r.json()["repaired"]), r.json()
    after = graph_results(lib, queries)
    for (l0, d0), (l1, d1) in zip(before, after):
        assert l0.tolist() == l1.tolist()
        # equal scores: the graph was built from the very values the database holds
        np.testing.assert_allclose(d0, d1, atol=1e-6)
    # and they are the exact top 10 over the stored vectors (compared by score: drawings
    # alike to the tiny model tie)
    exact = -np.sort(-(queries @ mat.T), axis=1)[:, :10]
    got = np.array([np.sort(d)[::-1] for _, d in after])  # scores
    np.testing.assert_allclose(got, exact, atol=1e-4)


def test_vectors_added_later_are_float16_and_match_the_graph(itr, lib, tmp_path):
    write_shapes(tmp_path / "photos", [("orange", "circle", "left", 99)])
    r = itr("index", tmp_path / "photos", "--db", lib, "-q", "--json")
    assert r.code == 0 and r.json()["added"] == 1, r
    assert blob_lengths(lib) == {64}
    assert itr("check", "--db", lib, "-q").code == 0


# --- libraries made by 0.1.0: itr check --compact -------------------------------------------

@pytest.fixture
def legacy(tmp_path):
    """The 0.1.0 fixture library (float32 vectors, 4 KiB pages), bound to the micro model,
    its recorded paths moved into tmp_path."""
    return copy_legacy_library(tmp_path)[0]


def ranked(itr, db, query="a red circle"):
    r = itr("search", query, "--db", db, "--json", "-n", "6")
    assert r.code == 0, r
    hits = [(h["path"], h["score"]) for h in r.json()["results"]]
    assert hits, r  # comparing two empty lists would prove nothing
    return hits


def test_compact_converts_a_0_1_0_library_and_search_is_unchanged(itr, legacy):
    before = {q: ranked(itr, legacy, q) for q in ("a red circle", "a blue square", "green")}
    info = itr("info", "--db", legacy, "--json").json()["storage"]
    assert (info["vector_dtype"], info["page_size"], info["compact"]) == ("float32", 4096, False)
    assert "itr check --compact" in itr("info", "--db", legacy).out
    dim = 4 * itr("info", "--db", legacy, "--json").json()["dim"]
    assert blob_lengths(legacy) == {dim}

    r = itr("check", "--compact", "--db", legacy, "--json")
    assert r.code == 0, r
    out = r.json()
    assert out["ok"] and out["compact"]["converted"] == 6 and out["compact"]["rewritten"]
    assert (out["compact"]["page_size_before"], out["compact"]["page_size"]) == (4096, 16384)
    assert "compacted: 6 vectors to float16" in r.err
    assert page_size(legacy) == 16384 and blob_lengths(legacy) == {dim // 2}
    assert not list(legacy.glob(".itr.db.compact*"))
    for q, hits in before.items():
        after = ranked(itr, legacy, q)
        assert [p for p, _ in after] == [p for p, _ in hits]
        assert max(abs(a - b) for (_, a), (_, b) in zip(after, hits)) < 2e-3  # float16 rounding
    assert itr("info", "--db", legacy, "--json").json()["storage"]["compact"] is True
    again = itr("check", "--compact", "--db", legacy, "--json")
    assert again.code == 0 and not again.json()["compact"]["rewritten"]
    assert again.json()["compact"]["converted"] == 0 and "already dense" in again.err


def test_a_half_converted_library_reads_checks_and_resumes(itr, legacy, monkeypatch):
    from itrcli import Library
    from itrcli.jobs import compact as compact_mod

    monkeypatch.setattr(compact_mod, "CHUNK", 2)
    dim = itr("info", "--db", legacy, "--json").json()["dim"]
    before = ranked(itr, legacy)

    class StopAfterFirstChunk:
        def start(self, total):
            pass

        def advance(self, files, embedded):
            raise KeyboardInterrupt

        def close(self):
            pass

    with Library.open(legacy) as lib:
        with pytest.raises(KeyboardInterrupt):
            lib.compact(progress=StopAfterFirstChunk())
    assert blob_lengths(legacy) == {2 * dim, 4 * dim}  # two rows converted, four not yet
    assert page_size(legacy) == 4096  # the file is rewritten only once all rows are
    after = ranked(itr, legacy)
    assert [p for p, _ in after] == [p for p, _ in before]
    assert itr("check", "--db", legacy, "-q").code == 0
    exact = itr("search", "a red circle", "--db", legacy, "--json", "-n", "6", "--exact")
    assert [h["path"] for h in exact.json()["results"]] == [p for p, _ in before]

    r = itr("check", "--compact", "--db", legacy, "--json", "-q")
    assert r.code == 0 and r.json()["compact"]["converted"] == 4, r
    assert blob_lengths(legacy) == {2 * dim} and page_size(legacy) == 16384


def test_a_rewrite_that_fails_leaves_the_library_as_it_was(itr, legacy, monkeypatch):
    """Disk full while writing the new file: one line, exit 1, the old file untouched (its
    rows already float16), no temporary file left; the next --compact finishes."""
    import errno

    import itrcli.store.db as db_mod

    before = ranked(itr, legacy)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(db_mod.os, "fsync", full)
    r = itr("check", "--compact", "--db", legacy)
    monkeypatch.undo()
    assert r.code == 1 and r.err.count("\n") >= 1 and "disk full" in r.err, r
    assert not list(legacy.glob(".itr.db.compact*"))
    assert page_size(legacy) == 4096
    assert [p for p, _ in ranked(itr, legacy)] == [p for p, _ in before]
    assert itr("check", "--db", legacy, "-q").code == 0
    r = itr("check", "--compact", "--db", legacy, "--json", "-q")
    assert r.code == 0 and r.json()["compact"]["rewritten"] and page_size(legacy) == 16384, r


def test_eval_figures_from_float16_and_float32_libraries_agree(itr, micro_clip, tmp_path):
    """`itr eval --db` reuses a library's vectors: float16 copies move no figure by more
    than 0.1 point from float32 ones (on 60 images any flip would move one by 1.7)."""
    from test_eval import draw_set, write_formats

    from itrcli.store.db import Store

    items = draw_set(tmp_path / "imgs", 60)
    ann = write_formats(tmp_path / "ann", tmp_path / "imgs", items)["karpathy"]
    Store(tmp_path / "f32", create=True, vector_dtype="float32", page_size=4096).close()
    figures = {}
    for name in ("f16", "f32"):
        db = tmp_path / name
        r = itr("index", tmp_path / "imgs", "--db", db, "-m", micro_clip, "--precision", "fp32", "-q")
        assert r.code == 0, r
        dim = itr("info", "--db", db, "--json").json()["dim"]
        assert blob_lengths(db) == {(2 if name == "f16" else 4) * dim}
        r = itr("eval", ann, "--images", tmp_path / "imgs", "-m", micro_clip, "--precision",
                "fp32", "--db", db, "--no-cache", "--json", "-q")
        assert r.code == 0, r
        (res,) = r.json()["results"]
        figures[name] = {f"{d}:{k}": v for d in ("t2i", "i2t") for k, v in res[d].items()
                         if k.startswith("R@")}
    assert figures["f16"].keys() == figures["f32"].keys() and figures["f16"]
    for k, v in figures["f32"].items():
        assert abs(figures["f16"][k] - v) <= 0.1, (k, figures)


def test_info_reads_no_vectors_and_imports_nothing_heavy(lib):
    """`itr info` stays well under a second at a million images: counts from indexes, no
    numpy, Pillow, sqlite-utils (pandas) or model libraries."""
    r = main_in_fresh_python(["info", "--db", lib], ("torch", "transformers", "onnxruntime",
                                                      "hnswlib", "numpy", "PIL", "pandas",
                                                      "sqlite_utils"))
    assert "HEAVY []" in r.stderr, r.stderr
    assert "storage:" in r.stdout


def test_vector_chunks_decoded_in_threads_equal_those_read_in_one(tmp_path):
    from itrcli.store.db import Store

    rng = np.random.default_rng(3)
    v = rng.standard_normal((1000, 24)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    store = Store(tmp_path / "db", create=True)
    store.set_meta(model="fake-model", dim=24)
    with store.transaction() as c:
        for i, x in enumerate(v):
            store.insert_file(c, str(tmp_path / f"f{i:04d}.jpg"),
                              {"size": 1, "mtime_ns": 1, "hash": f"{i:032x}", "width": 1, "height": 1}, x)

    def read(threads):
        parts = list(store.vector_chunks(77, threads))
        return [len(i) for i, _ in parts], np.concatenate([i for i, _ in parts]), np.concatenate([m for _, m in parts])

    sizes, ids, mat = read(1)
    assert sizes[:-1] == [77] * 12 and sizes[-1] == 1000 - 12 * 77
    assert np.array_equal(ids, np.sort(ids)) and len(ids) == 1000
    for threads in (2, 3):
        t_sizes, t_ids, t_mat = read(threads)
        assert t_sizes == sizes and np.array_equal(t_ids, ids)
        assert np.array_equal(t_mat.view(np.uint32), mat.view(np.uint32))  # bit for bit
    # a reader that stops early closes the pool without waiting for the rest
    it = store.vector_chunks(77, 2)
    first_ids, _ = next(it)
    assert np.array_equal(first_ids, ids[:77])
    it.close()
    store.close()


def test_in_chunks_binds_each_chunk_and_repeated_marks(tmp_path):
    """The one helper for long IN (...) lists: every chunk bound, {marks} repeatable,
    leading parameters kept."""
    import sqlite3 as sq

    from itrcli.store.sql import in_chunks

    c = sq.connect(":memory:")
    c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT)")
    c.executemany("INSERT INTO t VALUES (?, ?)", [(i, "ab"[i % 2]) for i in range(1200)])
    got = [r[0] for cur in in_chunks(c, "SELECT id FROM t WHERE id IN ({marks})",
                                     range(0, 1200, 2), chunk=7) for r in cur]
    assert got == list(range(0, 1200, 2))
    got = [r[0] for cur in in_chunks(c, "SELECT id FROM t WHERE k = ? AND id IN ({marks})"
                                     " UNION ALL SELECT -id FROM t WHERE id IN ({marks})",
                                     [1, 2, 3], before=["b"]) for r in cur]
    assert sorted(got) == [-3, -2, -1, 1, 3]
    assert list(in_chunks(c, "SELECT id FROM t WHERE id IN ({marks})", [])) == []
