"""`itr search`: formats, filters, image queries, ONNX = torch, HNSW = exact."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import index_shapes, main_in_fresh_python, write_shapes

SPECS = [(c, s, p, i) for i, (c, s, p) in enumerate(
    [(c, s, p) for c in ("red", "blue", "green") for s in ("circle", "square") for p in ("left", "right")]
)]


@pytest.fixture
def lib(itr, tiny_clip, tmp_path):
    return index_shapes(itr, tmp_path, SPECS, tiny_clip)


def test_piped_output_is_score_tab_path(itr, lib):
    db, paths = lib
    r = itr("search", "a red circle", "--db", db, "-n", "3")
    lines = r.out.splitlines()
    assert r.code == 0 and len(lines) == 3
    for line in lines:
        score, path = line.split("\t")
        assert len(score.split(".")[1]) == 4 and os.path.isabs(path)
    scores = [float(line.split("\t")[0]) for line in lines]
    assert scores == sorted(scores, reverse=True)


def test_json_paths_and_null_formats(itr, lib):
    db, paths = lib
    j = itr("search", "a red circle", "--db", db, "--json", "-n", "5").json()
    assert j["query"] == "a red circle" and j["model"]
    assert [h["rank"] for h in j["results"]] == [1, 2, 3, 4, 5]
    assert set(j["results"][0]) == {"rank", "score", "path", "width", "height", "taken_at", "time"}
    assert j["results"][0]["width"] == 64
    p = itr("search", "a red circle", "--db", db, "--paths", "-n", "5").out.splitlines()
    assert p == [h["path"] for h in j["results"]]
    z = itr("search", "a red circle", "--db", db, "-0", "-n", "5").out
    assert z.split("\0")[:-1] == p and z.endswith("\0")


def test_hnsw_equals_exact_on_a_small_library(itr, lib):
    db, _ = lib
    for q in ("a red circle", "a blue square on the right", "green"):
        a = itr("search", q, "--db", db, "--json", "-n", "12").json()["results"]
        b = itr("search", q, "--db", db, "--json", "-n", "12", "--exact").json()["results"]
        assert [h["path"] for h in a] == [h["path"] for h in b]


def test_onnx_text_tower_gives_the_torch_ranking(itr, lib):
    """Like with like: the ONNX tower runs in fp32, so it is compared with torch in fp32
    (whatever --precision auto picks on this CPU); bf16 gets its own tolerance below."""
    from itrcli import Library
    from itrcli.embed.textonnx import OnnxTextEncoder

    db, _ = lib
    assert OnnxTextEncoder.available(db)
    with Library.open(db, readonly=True) as L:
        texts = ["a red circle on the left", "a blue square", "green", "two children on a lawn"]
        onnx = OnnxTextEncoder(db).encode_texts(texts)
        torch = L.encoder(precision="fp32").encode_texts(texts)
        np.testing.assert_allclose(onnx, torch, atol=1e-4)
        ids, vecs = L.store.vectors()
        for a, b in zip(onnx, torch):
            assert list(np.argsort(-(vecs @ a))) == list(np.argsort(-(vecs @ b)))


def test_bf16_text_vectors_stay_within_their_tolerance(lib):
    """bf16 keeps 8 bits of mantissa: vectors differ from fp32 by ~3e-3 per component, and
    the documented bound is a cosine of at least BF16_MIN_COSINE to the fp32 vector
    (emulated on CPUs without native bf16: slower, same numbers)."""
    from itrcli import Library
    from itrcli.constants import BF16_MIN_COSINE
    from itrcli.embed.textonnx import OnnxTextEncoder

    db, _ = lib
    with Library.open(db, readonly=True) as L:
        texts = ["a red circle on the left", "a blue square", "green", "two children on a lawn"]
        fp32 = OnnxTextEncoder(db).encode_texts(texts)
        bf16 = L.encoder(precision="bf16").encode_texts(texts)
    cos = (fp32 * bf16).sum(1)
    assert cos.min() >= BF16_MIN_COSINE, cos
    assert not np.array_equal(fp32, bf16)  # bf16 really ran


def test_image_query_excludes_itself_and_uses_stored_vector(itr, lib):
    db, paths = lib
    j = itr("search", paths[0], "--db", db, "--json", "-n", "20").json()
    got = [h["path"] for h in j["results"]]
    assert str(paths[0]) not in got and len(got) == len(paths) - 1


def test_resized_copy_ranks_first_for_an_image_query(itr, lib, tmp_path):
    db, paths = lib
    q = tmp_path / "query.jpg"  # outside the library: encoded with the model
    Image.open(paths[3]).resize((48, 48)).save(q, quality=70)
    j = itr("search", q, "--db", db, "--json", "-n", "1").json()
    assert j["results"][0]["path"] == str(paths[3])


def test_in_threshold_and_dates(itr, lib, tmp_path):
    db, paths = lib
    sub = tmp_path / "photos" / "sub"
    write_shapes(sub, [("red", "circle", "left", 99)])
    itr("index", tmp_path / "photos", "--db", db, "-q")
    j = itr("search", "red", "--db", db, "--json", "--in", sub).json()
    assert [os.path.dirname(h["path"]) for h in j["results"]] == [str(sub)]
    allr = itr("search", "red", "--db", db, "--json", "-n", "50").json()["results"]
    cut = allr[3]["score"] - 0.00005  # printed scores are rounded to 4 decimals
    j = itr("search", "red", "--db", db, "--json", "-n", "50", "--threshold", str(cut)).json()
    assert all(h["score"] >= cut for h in j["results"]) and len(j["results"]) >= 4
    # dates: EXIF-less files fall back to mtime; push one file into 2001
    old = paths[5]
    os.utime(old, (978307200, 978307200))  # 2001-01-01
    itr("index", tmp_path / "photos", "--db", db, "-q")
    j = itr("search", "red", "--db", db, "--json", "--before", "2002-01-01", "-n", "50").json()
    assert [h["path"] for h in j["results"]] == [str(old)]
    j = itr("search", "red", "--db", db, "--json", "--after", "2002-01-01", "-n", "50").json()
    assert str(old) not in [h["path"] for h in j["results"]] and j["results"]
    r = itr("search", "red", "--db", db, "--after", "June 1st")
    assert r.code == 2 and "YYYY-MM-DD" in r.err


def test_deleted_files_are_not_printed(itr, lib):
    db, paths = lib
    first = itr("search", "a red circle", "--db", db, "--paths", "-n", "1").out.strip()
    os.unlink(first)
    got = itr("search", "a red circle", "--db", db, "--paths", "-n", "12").out.splitlines()
    assert first not in got and len(got) == len(paths) - 1


def test_add_and_subtract_move_the_query(itr, lib):
    from itrcli import Library
    from itrcli.query.search import QueryPart

    db, paths = lib
    with Library.open(db, readonly=True) as L:
        a = L.embed_query([QueryPart("red", "text")])
        b = L.embed_query([QueryPart("red", "text"), QueryPart("blue", "text", -1.0)])
        t = L.text_encoder().encode_texts(["red", "blue"])
        expect = t[0] - t[1]
        np.testing.assert_allclose(b, expect / np.linalg.norm(expect), atol=1e-5)
        assert not np.allclose(a, b)


def test_errors(itr, lib, tmp_path):
    db, _ = lib
    r = itr("search", "", "--db", db)
    assert r.code == 2 and "empty query" in r.err
    r = itr("search", "x", "--db", tmp_path / "nolib")
    assert r.code == 1 and r.err.startswith("Error: no library")
    r = itr("search", "red", "--db", db, "--subtract", "red")
    assert r.code == 2 and "cancel" in r.err


def test_search_sees_vectors_committed_by_a_killed_run(itr, lib, tmp_path):
    """Rows committed after the last graph save are found (the log is replayed)."""
    from itrcli.store.db import Store

    db, paths = lib
    for f in (db / "hnsw").iterdir():
        f.unlink()  # as if the run died before its first save
    j = itr("search", "a red circle", "--db", db, "--json", "-n", "12").json()
    assert len(j["results"]) == 12
    # and an old graph plus newer log entries
    itr("index", tmp_path / "photos", "--db", db, "-q")  # rebuilds and saves
    s = Store(db)
    with s.transaction() as c:
        ids = [r[0] for r in c.execute("SELECT id FROM files LIMIT 2")]
        s.delete_files(c, ids)
    s.close()
    j = itr("search", "a red circle", "--db", db, "--json", "-n", "12").json()
    assert len(j["results"]) == 10


def test_one_library_object_searches_the_mapped_graph_and_sees_later_runs(lib, tmp_path):
    """A search maps the saved graph (no hnswlib load); the same Library object sees what
    a later index run added, and a deleted-mark in the file keeps that file out."""
    import itrcli

    db, paths = lib
    with itrcli.Library.open(db) as L:
        hits = L.search("a red circle", top=12)
        assert len(hits) == 12
        graph = L._search_graph()
        assert graph.mapped is not None and graph.index is None and graph.count == 12
        more = write_shapes(tmp_path / "more", [("red", "circle", "left", 99)])
        L.index([str(tmp_path / "more")], prune=False)
        hits = L.search("a red circle", top=13)
        assert str(more[0]) in {h.path for h in hits} and len(hits) == 13
        assert L._search_graph().count == 13
        exact = L.search("a red circle", top=13, exact=True)
        assert [h.path for h in hits] == [h.path for h in exact]


def test_closing_a_library_releases_the_model_the_graph_and_the_database(lib):
    import gc
    import sqlite3
    import weakref

    import itrcli

    db, _ = lib
    L = itrcli.Library.open(db)
    assert len(L.search("a red circle", top=3)) == 3
    mapped = L._search_graph().mapped
    assert mapped is not None
    L.vector_index()  # the graph loaded too, beside the mapped one
    assert L._vindex.index is not None
    enc = weakref.ref(L.encoder(device="cpu"))
    L._reranker = rr = type("Reranker", (), {})()
    rr = weakref.ref(rr)
    L.close()
    gc.collect()
    assert enc() is None and rr() is None  # nothing keeps the models' memory
    assert L._mapped is None and L._vindex is None and mapped._mm == b""
    with pytest.raises(sqlite3.ProgrammingError):
        L.store.conn.execute("SELECT 1")
    L.close()  # twice: harmless
    with itrcli.Library.open(db, readonly=True) as again:  # and the library opens again
        assert len(again.search("a red circle", top=3)) == 3


def test_cold_search_imports_no_torch(lib):
    db, _ = lib
    code = ("import sys, runpy; sys.argv=['itr','search','a red circle','--db',%r];\n"
            "from itrcli.cli import main\n"
            "try: main()\n"
            "except SystemExit: pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr)") % str(db)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "NOTORCH" in r.stderr, r.stderr
    assert len(r.stdout.splitlines()) == 10


def test_help_is_instant_and_imports_nothing_heavy():
    r = main_in_fresh_python(["--help"], ("torch", "transformers", "onnxruntime", "hnswlib", "numpy"),
                             timeout=60)
    assert "HEAVY []" in r.stderr, r.stderr



def test_siglip_without_fast_tokenizer_falls_back_to_torch(itr, tiny_siglip, tmp_path):
    """SigLIP's sentencepiece tokenizer has no `tokenizers` conversion in transformers 5:
    no ONNX export then, and text queries go through torch with the same results."""
    from itrcli import Library
    from itrcli.embed.textonnx import OnnxTextEncoder

    write_shapes(tmp_path / "photos", SPECS[:3])
    db = tmp_path / "lib"
    assert itr("index", tmp_path / "photos", "--db", db, "-m", tiny_siglip, "-q").code == 0
    assert not OnnxTextEncoder.available(db)
    with Library.open(db, readonly=True) as L:
        enc = L.text_encoder()
        assert not isinstance(enc, OnnxTextEncoder)
        q = enc.encode_texts(["a red circle on the left"])[0]
        ids, vecs = L.store.vectors()
        got = [h.id for h in L.search("a red circle on the left", top=3)]
        assert got == [int(i) for i in ids[np.argsort(-(vecs @ q), kind="stable")]]


def test_table_date_is_capture_time_else_mtime():
    from datetime import datetime

    from itrcli.query.search import Hit

    assert Hit(1, 0.5, "/a.jpg", 1, 1, "2021-06-01T12:30:00", 1, 0).date == "2021-06-01"
    ns = int(datetime(2020, 2, 3, 12).timestamp() * 1e9)
    assert Hit(1, 0.5, "/a.jpg", 1, 1, None, 1, ns).date == "2020-02-03"
    assert Hit(1, 0.5, "/a.jpg", 1, 1, None, 1, None).date is None


def test_text_like_queries_and_chunked_exact_top(lib):
    from itrcli.store.db import Store
    from itrcli.store.vindex import exact_top, needs_calibration, text_like_queries

    db, _ = lib
    s = Store(db, readonly=True)
    ids, mat = s.vectors()
    q = text_like_queries(mat, 0.3, seed=1)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose((q * mat).sum(1), 0.3, atol=1e-4)
    for chunk in (5, 50):  # the running top-k across chunks equals one full scan
        got, scores = exact_top(s, q, 4, chunk=chunk)
        order = np.argsort(-(q @ mat.T), axis=1)[:, :4]
        assert [set(r) for r in got.tolist()] == [set(r) for r in ids[order].tolist()]
        np.testing.assert_allclose(np.sort(scores, 1), np.sort(np.take_along_axis(q @ mat.T, order, 1), 1),
                                   atol=1e-6)
    s.close()
    assert needs_calibration(None, 10)
    assert not needs_calibration(1000, 1200) and needs_calibration(1000, 1201)
    assert needs_calibration(1000, 799) and not needs_calibration(1000, 800)


def test_exact_search_streams_the_vectors_and_ranks_as_a_full_scan(itr, lib, monkeypatch):
    """`--exact` over the whole library reads the vectors in chunks (never all at once) and
    gives the ranking of one full scan, at any chunk size and with a filter."""
    from itrcli.query import search
    from itrcli.store.db import Store

    db, _ = lib
    s = Store(db, readonly=True)
    ids, mat = s.vectors()
    q = mat[3] + 0.5 * mat[7]
    q = (q / np.linalg.norm(q)).astype(np.float32)
    full = q @ mat.T  # [n]
    order = np.lexsort((ids, -full))
    want = [int(i) for i in ids[order]]

    chunks = []
    real_chunks, real_vectors = Store.vector_chunks, Store.vectors

    def vector_chunks(self, chunk=50_000, threads=1):
        chunks.append(chunk)
        return real_chunks(self, chunk, threads)

    def vectors(self, ids=None):
        assert ids is not None, "the whole matrix was loaded at once"
        return real_vectors(self, ids)

    monkeypatch.setattr(Store, "vector_chunks", vector_chunks)
    monkeypatch.setattr(Store, "vectors", vectors)
    for chunk in (1, 5, 50_000):
        monkeypatch.setattr(search, "EXACT_CHUNK", chunk, raising=False)
        for k in (1, 4, len(ids), len(ids) + 3):
            got, scores = search._exact(s, q, k, None)
            assert got.tolist() == want[:k]
            np.testing.assert_allclose(scores, full[order][:k], atol=1e-6)
        # a filter larger than a chunk is streamed too, and masked chunk by chunk
        allowed = {int(i) for i in ids[::2]}
        got, _ = search._exact(s, q, 3, allowed)
        assert got.tolist() == [i for i in want if i in allowed][:3]
    assert chunks and set(chunks) == {1, 5, 50_000}
    s.close()
    r = itr("search", "a red circle", "--db", db, "--json", "-n", "12", "--exact")
    assert r.code == 0 and len(r.json()["results"]) == 12, r
    assert chunks[-1] == 50_000  # the CLI's exact search streamed as well


def test_calibration_truth_from_the_saved_graph_equals_the_database_scan(lib):
    """The recall measurement reads its exact top k from the mapped graph file (fast at a
    million images): the same scores as scanning the database, deleted marks skipped."""
    from itrcli.store.db import Store
    from itrcli.store.vindex import VectorIndex, _saved_graph_top, exact_top, text_like_queries

    db, _ = lib
    s = Store(db)
    vi = VectorIndex(db, int(s.get_meta("dim"))).open(s)
    ids, mat = s.vectors()
    q = text_like_queries(mat, 0.3, seed=2)
    for chunk in (3, 65_536):
        got = _saved_graph_top(vi, q, 4, chunk=chunk)
        _, want = exact_top(s, q, 4)
        # (the graph holds the float16 rows normalised: scores within the calibration's 1e-4)
        np.testing.assert_allclose(np.sort(got, 1), np.sort(want, 1), atol=1e-4)
    # a deleted mark: that label no longer counts, as it is gone from the database too
    victim = int(ids[np.argmax(q[0] @ mat.T)])
    vi.remove([victim])
    vi.save(vi.seq + 1)
    vi.dirty = False
    got = _saved_graph_top(vi, q[:1], 4)
    keep = ids != victim
    want = np.sort(q[:1] @ mat[keep].T, axis=1)[:, -4:]
    np.testing.assert_allclose(np.sort(got, 1), want, atol=1e-4)
    vi.dirty = True  # unsaved changes: no file holds exactly this graph
    assert _saved_graph_top(vi, q, 4) is None
    s.close()


def test_index_measures_the_search_ef_and_search_uses_it(itr, tiny_clip, tmp_path, monkeypatch):
    from itrcli.store.graphfile import GraphFile
    from itrcli.store.db import Store
    from itrcli.store.vindex import EF_LADDER

    specs = [(c, s, p, i) for i, (c, s, p) in enumerate(
        (c, s, p) for c in ("red", "blue", "green", "yellow", "purple") for s in ("circle", "square")
        for p in ("left", "right", "top", "bottom", "center"))]
    write_shapes(tmp_path / "photos", specs)
    db = tmp_path / "lib"
    assert itr("index", tmp_path / "photos", "--db", db, "-m", tiny_clip, "-q").code == 0
    info = itr("info", "--db", db, "--json").json()
    assert info["search_ef"] in EF_LADDER and info["search_recall"] >= 0.99, info
    assert f"HNSW ef {info['search_ef']} (recall@10" in itr("info", "--db", db).out
    # a library indexed by an older itr (no measurement) is measured by the next run
    s = Store(db)
    with s.transaction() as c:
        c.execute("DELETE FROM meta WHERE key LIKE 'search_%'")
    s.close()
    assert itr("info", "--db", db, "--json").json()["search_ef"] is None
    assert itr("index", tmp_path / "photos", "--db", db, "-q").code == 0
    assert itr("info", "--db", db, "--json").json()["search_ef"] == info["search_ef"]
    # searches use the measured ef (at least 4 x --top)
    s = Store(db)
    s.set_meta(search_ef=1024)
    s.close()
    seen = []
    real = GraphFile.search
    monkeypatch.setattr(GraphFile, "search", lambda self, q, k, ef, allowed=None:
                        seen.append(ef) or real(self, q, k, ef, allowed))
    assert itr("search", "a red circle", "--db", db, "-n", "5").code == 0
    assert itr("search", "a red circle", "--db", db, "-n", "5", "--exact").code == 0
    assert seen and set(seen) == {1024}


def test_measured_recall_counts_equal_scores_as_found(itr, tiny_clip, tmp_path):
    """45 copies of one photo: every result ties, so any 10 are the exact top 10."""
    import shutil

    (src,) = write_shapes(tmp_path / "one", [("red", "circle", "left", 0)])
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(45):
        shutil.copy(src, d / f"copy-{i:02d}.jpg")
    db = tmp_path / "lib"
    assert itr("index", d, "--db", db, "-m", tiny_clip, "-q").code == 0
    info = itr("info", "--db", db, "--json").json()
    assert (info["search_ef"], info["search_recall"]) == (64, 1.0), info


@pytest.mark.parametrize("name", ["lib#1", "lib?mode=rw", "lib%41", "my lib", "bibliothèque-写真",
                                  "lib#2?x=%2541 é"])
def test_a_library_path_with_uri_characters_is_searched(itr, tiny_clip, tmp_path, name):
    """The read-only open names the library by a ``file:`` URI: ``#``, ``?``, ``%``, spaces
    and non-ASCII in its path are percent-encoded, not read as URI syntax."""
    write_shapes(tmp_path / "photos", SPECS[:3])
    db = tmp_path / name
    assert itr("index", tmp_path / "photos", "--db", db, "-m", tiny_clip, "-q").code == 0
    r = itr("search", "a red circle", "--db", db, "--json")
    assert r.code == 0, r
    assert len(r.json()["results"]) == 3
    r = itr("info", "--db", db, "--json")
    assert r.code == 0 and r.json()["files"] == 3, r


def test_sqlite_uri_names_the_path_exactly(tmp_path):
    import sqlite3

    from itrcli.store.db import _connect_readonly, sqlite_uri

    for name in ("a#b", "a?b", "a%20b", "a b", "é写"):
        d = tmp_path / name
        d.mkdir()
        sqlite3.connect(d / "t.db").execute("CREATE TABLE t (x)").connection.commit()
        c = _connect_readonly(d / "t.db")
        assert c.execute("SELECT count(*) FROM t").fetchone() == (0,)
        c.close()
        assert sqlite_uri(d / "t.db", mode="ro").endswith("/t.db?mode=ro")
    assert sqlite_uri("/a#b/c?d%e f", immutable=1) == "file:///a%23b/c%3Fd%25e%20f?immutable=1"
    assert not (tmp_path / "a").exists()  # "a?b" never opened a database named "a"
