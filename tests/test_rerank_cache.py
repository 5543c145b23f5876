"""The re-ranker's feature cache: the vision tower's output per image, on disk, bounded.

A hit must give exactly the scores of a miss, skip the vision tower, never serve the
features of a file's old content, survive damaged entries, stay under its bound, and stay
whole while several processes use it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

# the same drawings, library and one-thread rule as the re-ranking tests
from test_rerank import QUERY, SPECS, _one_torch_thread, lib, tiny_blip  # noqa: F401


@pytest.fixture
def vision_calls(monkeypatch):
    """Images the vision tower ran on, per call of ``Reranker.image_embeds``."""
    from itrcli.embed.rerank import Reranker

    calls: list[int] = []
    real = Reranker.image_embeds

    def counted(self, pixels):
        calls.append(len(pixels))
        return real(self, pixels)

    monkeypatch.setattr(Reranker, "image_embeds", counted)
    return calls


def cache_files(tmp_path) -> dict[str, Path]:
    """Content hash -> cached file (the autouse fixture points XDG_CACHE_HOME here)."""
    root = tmp_path / "xdg-cache" / "itr" / "rerank"
    return {f.stem: f for f in root.glob("*/*.npy")}


def search(db, tiny_blip, k=6, **kw):
    from itrcli import Library

    with Library.open(db, readonly=True) as lib:
        hits = lib.search(QUERY, top=k, rerank=True, rerank_k=k, rerank_model=str(tiny_blip),
                          precision=kw.pop("precision", "fp32"), exact=True, **kw)
        return {h.path: h.rerank_score for h in hits}, [h.path for h in hits]


def library_hashes(db) -> dict[str, str]:
    from itrcli.store.db import Store

    store = Store(db, readonly=True)
    try:
        return {str(Path(p).name): h for p, h in
                store.conn.execute("SELECT path, hash FROM files").fetchall()}
    finally:
        store.close()


def test_a_hit_gives_the_scores_of_a_miss_without_the_vision_tower(lib, tiny_blip, tmp_path,
                                                                     vision_calls):
    db, _ = lib
    uncached, order0 = search(db, tiny_blip, rerank_cache=False)
    assert cache_files(tmp_path) == {} and sum(vision_calls) == 6
    first, order1 = search(db, tiny_blip)  # cold: fills the cache
    assert sum(vision_calls) == 12
    files = cache_files(tmp_path)
    # one file per image, named by the library's content hash (files.hash)
    hashes = library_hashes(db)
    assert set(files) == {hashes[Path(p).name] for p in first}
    arr = np.load(next(iter(files.values())))
    assert arr.shape == (17, 32) and arr.dtype == np.float32  # [(32/8)^2 + 1, width]
    second, order2 = search(db, tiny_blip)  # warm: no vision tower at all
    assert sum(vision_calls) == 12
    assert order0 == order1 == order2
    for p in first:
        assert second[p] == pytest.approx(first[p], abs=1e-6)
        assert uncached[p] == pytest.approx(first[p], abs=1e-6)


def test_cli_second_search_reads_the_cache_and_no_rerank_cache_opts_out(itr, lib, tiny_blip,
                                                                        tmp_path, vision_calls):
    db, _ = lib
    args = ("search", QUERY, "--db", db, "--json", "-n", "8", "--rerank", "--rerank-k", "5",
            "--rerank-model", tiny_blip, "--precision", "fp32")
    r = itr(*args, "--no-rerank-cache")
    assert r.code == 0, r
    assert cache_files(tmp_path) == {} and sum(vision_calls) == 5
    a = itr(*args).json()["results"]
    b = itr(*args).json()["results"]
    assert len(cache_files(tmp_path)) == 5 and sum(vision_calls) == 10
    assert [h["path"] for h in a] == [h["path"] for h in b] == [h["path"] for h in r.json()["results"]]
    for x, y in zip(a, b):
        assert (x["rerank_score"] is None) == (y["rerank_score"] is None)
        if x["rerank_score"] is not None:
            assert y["rerank_score"] == pytest.approx(x["rerank_score"], abs=1e-6)


def test_bf16_is_cached_in_bf16_and_apart_from_fp32(lib, tiny_blip, tmp_path, vision_calls):
    db, _ = lib
    fp32, _ = search(db, tiny_blip, k=3)
    cold, _ = search(db, tiny_blip, k=3, precision="bf16")
    warm, _ = search(db, tiny_blip, k=3, precision="bf16")
    assert sum(vision_calls) == 6  # bf16 did not take fp32's features
    spaces = {f.parent for f in (tmp_path / "xdg-cache" / "itr" / "rerank").glob("*/*.npy")}
    assert len(spaces) == 2
    assert {np.load(f).dtype for f in cache_files(tmp_path).values()} <= {np.dtype("<f4"), np.dtype("<i2")}
    assert warm == cold  # bf16's raw bits round-trip: exactly the same scores
    assert any(abs(cold[p] - fp32[p]) > 0 for p in fp32)  # the check could fail


def test_damaged_entries_are_ignored_and_replaced(lib, tiny_blip, tmp_path, vision_calls):
    db, _ = lib
    first, _ = search(db, tiny_blip)
    files = sorted(cache_files(tmp_path).values())
    good = np.load(files[0])
    files[0].write_bytes(files[0].read_bytes()[:1000])  # truncated
    files[1].write_bytes(b"\x93NUMPY garbage")  # corrupt header
    np.save(files[2], np.zeros((3, 3), dtype=np.float32))  # wrong shape
    np.save(files[3], good.astype(np.float64))  # wrong dtype
    files[4].write_bytes(b"")  # empty
    vision_calls.clear()
    again, _ = search(db, tiny_blip)
    assert sum(vision_calls) == 5  # the damaged five ran again, the sixth came from the cache
    for p in first:
        assert again[p] == pytest.approx(first[p], abs=1e-6)
    for f in files:  # replaced by whole entries
        arr = np.load(f)
        assert arr.shape == good.shape and arr.dtype == good.dtype


def test_a_changed_file_is_scored_on_its_new_content(lib, tiny_blip, tmp_path, vision_calls):
    """The key is the hash of the bytes read now, not the library's: a file rewritten
    since indexing never gets its old features."""
    from support import synth

    from itrcli.ingest.files import content_hash

    from test_rerank import itm_probabilities

    db, _ = lib
    first, order = search(db, tiny_blip)
    changed = order[0]
    old_hash = content_hash(Path(changed).read_bytes())
    synth.draw("green", "square", "right", seed=99).save(changed)  # not re-indexed
    new_hash = content_hash(Path(changed).read_bytes())
    assert new_hash != old_hash
    vision_calls.clear()
    again, _ = search(db, tiny_blip)
    assert sum(vision_calls) == 1  # only the changed file
    assert {old_hash, new_hash} <= set(cache_files(tmp_path))
    ref = itm_probabilities(tiny_blip, QUERY, [changed])
    assert again[changed] == pytest.approx(ref[changed], abs=1e-4)
    assert abs(again[changed] - first[changed]) > 1e-4  # the check could fail


def test_the_bound_keeps_the_most_recently_used(lib, tiny_blip, tmp_path, monkeypatch,
                                                 vision_calls):
    db, _ = lib
    search(db, tiny_blip, k=1)  # one entry, to learn its size
    (entry,) = cache_files(tmp_path).values()
    size = entry.stat().st_size
    monkeypatch.setenv("ITR_RERANK_CACHE_BYTES", str(3 * size + 10))
    search(db, tiny_blip, k=6)
    files = cache_files(tmp_path)
    assert len(files) == 3 and sum(f.stat().st_size for f in files.values()) <= 3 * size + 10
    monkeypatch.setenv("ITR_RERANK_CACHE_BYTES", "0")  # off: nothing read or written
    vision_calls.clear()
    search(db, tiny_blip, k=6)
    assert sum(vision_calls) == 6 and cache_files(tmp_path) == files


def test_a_bad_bound_is_one_line_exit_2(itr, lib, tiny_blip, monkeypatch):
    db, _ = lib
    monkeypatch.setenv("ITR_RERANK_CACHE_BYTES", "lots")
    r = itr("search", QUERY, "--db", db, "--rerank", "--rerank-model", tiny_blip)
    assert r.code == 2 and "ITR_RERANK_CACHE_BYTES" in r.err and r.err.count("\n") == 1, r


def test_an_unwritable_cache_is_one_line_and_the_search_succeeds(itr, lib, tiny_blip, tmp_path):
    db, _ = lib
    (tmp_path / "xdg-cache" / "itr").mkdir(parents=True, exist_ok=True)  # (the tower cache may be there)
    (tmp_path / "xdg-cache" / "itr" / "rerank").write_text("a file where the cache should be")
    r = itr("search", QUERY, "--db", db, "--json", "--rerank", "--rerank-k", "3",
            "--rerank-model", tiny_blip)
    assert r.code == 0, r
    assert all(h["rerank_score"] is not None for h in r.json()["results"][:3])
    assert r.err.count("re-rank feature cache not written") == 1, r.err


# --- the cache alone ----------------------------------------------------------------------


def test_parse_bytes():
    from itrcli.errors import UsageError
    from itrcli.store.feature_cache import parse_bytes

    assert parse_bytes("0") == 0 and parse_bytes("1073741824") == 1 << 30
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("1G") == parse_bytes("1GiB") == 1 << 30
    assert parse_bytes("1.5g") == 3 << 29 and parse_bytes(" 64k ") == 64 << 10
    for bad in ("", "-1", "1X", "ten"):
        with pytest.raises(UsageError, match="ITR_RERANK_CACHE_BYTES"):
            parse_bytes(bad)


def test_trim_removes_the_least_recently_used(tmp_path):
    from itrcli.store.feature_cache import FeatureCache

    arr = np.arange(64, dtype=np.float32).reshape(8, 8)
    c = FeatureCache(tmp_path / "c", max_bytes=10**9)
    keys = ["aa" * 8, "bb" * 8, "cc" * 8, "dd" * 8]
    for n, k in enumerate(keys[:3]):
        c.put("ns", k, arr + n)
        os.utime(c._path("ns", k), (1000 + n, 1000 + n))  # a, then b, then c
    size = c._path("ns", keys[0]).stat().st_size
    assert c.get("ns", keys[0], (8, 8), np.float32) is not None  # a is used again: newest
    assert c.get("other", keys[0], (8, 8), np.float32) is None  # another namespace
    c.max_bytes = 3 * size
    c.put("ns", keys[3], arr)
    assert c.trim() == size  # four entries, room for three: b, the least recently used
    assert {k for k in keys if c._path("ns", k).exists()} == {keys[0], keys[2], keys[3]}
    c.max_bytes = 2 * size
    assert c.trim() == size  # then c
    assert {k for k in keys if c._path("ns", k).exists()} == {keys[0], keys[3]}
    (c._path("ns", keys[0]).parent / ".x.1.ab.tmp").write_bytes(b"partial")
    os.utime(c._path("ns", keys[0]).parent / ".x.1.ab.tmp", (1, 1))  # a crashed writer's
    c.trim()
    assert not (c._path("ns", keys[0]).parent / ".x.1.ab.tmp").exists()
    with pytest.raises(ValueError):
        c.get("ns", "../../etc/passwd", (8, 8), np.float32)


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from itrcli.store.feature_cache import FeatureCache

    me, root = int(sys.argv[1]), sys.argv[2]
    shape = (64, 256)
    c = FeatureCache(root, max_bytes=6 * (64 * 256 * 4 + 128))
    seen = 0
    for i in range(150):
        key = f"{i % 9:032x}"
        arr = c.get("ns", key, shape, np.float32)
        if arr is not None:  # whole: one writer's array, all of it
            assert (arr == arr.flat[0]).all() and int(arr.flat[0]) % 100 == i % 9, "torn"
            seen += 1
        c.put("ns", key, np.full(shape, me * 100 + i % 9, dtype=np.float32))
        if i % 5 == 0:
            c.trim()
    print(seen)
""")


def test_concurrent_processes_never_see_a_torn_entry(tmp_path):
    root = tmp_path / "shared"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(n), str(root)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert sum(int(o[0]) for o in outs) > 0  # they did read each other's entries
    from itrcli.store.feature_cache import FeatureCache

    c = FeatureCache(root, max_bytes=6 * (64 * 256 * 4 + 128))
    c.trim()
    assert c.size() <= c.max_bytes
    assert not list(root.glob("*/*.tmp"))  # no writer left a temporary file


def test_eval_rerank_shares_the_cache(itr, tmp_path, tiny_clip, tiny_blip, vision_calls):
    from test_rerank import _caption_set

    csv, _ = _caption_set(tmp_path / "set")
    args = ("eval", csv, "-m", tiny_clip, "--precision", "fp32", "--rerank", "--rerank-k", "3",
            "--rerank-model", tiny_blip, "--json", "-k", "1,5")
    off = itr(*args, "--no-cache")
    assert off.code == 0, off
    assert cache_files(tmp_path) == {} and sum(vision_calls) == 8
    cold = itr(*args)
    assert len(cache_files(tmp_path)) == 8 and sum(vision_calls) == 16
    warm = itr(*args)
    assert sum(vision_calls) == 16  # every image's features came from the cache
    rows = [r.json()["results"][1] for r in (off, cold, warm)]
    assert rows[0]["method"] == "exact+rerank"
    assert rows[0]["t2i"] == rows[1]["t2i"] == rows[2]["t2i"]
    assert rows[0]["i2t"] == rows[1]["i2t"] == rows[2]["i2t"]


def test_a_model_rewritten_in_place_gets_a_new_namespace(tiny_blip, tmp_path):
    """A local directory's weights are fingerprinted (names, sizes, modification times):
    retraining into the same directory never reads the old model's features."""
    import shutil

    from itrcli.embed.rerank import Reranker

    d = tmp_path / "blip"
    shutil.copytree(tiny_blip, d)
    before = Reranker(str(d), device="cpu", precision="fp32")
    again = Reranker(str(d), device="cpu", precision="fp32")
    st = (d / "model.safetensors").stat()
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = Reranker(str(d), device="cpu", precision="fp32")
    assert before.cache_namespace == again.cache_namespace
    assert after.cache_namespace != before.cache_namespace
    assert "fp32" in before.cache_namespace and "cpu" in before.cache_namespace
