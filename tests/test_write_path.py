"""The one write path: every writer takes the library's lock first, then writes into the
database file that is the library's now (not one swapped out meanwhile); a re-index builds
beside the old library and swaps it in; a text tower is used only for its own model."""

from __future__ import annotations

import json
import sqlite3

import pytest

from conftest import write_shapes

SHAPES = [("red", "circle", "left", 1), ("blue", "square", "right", 2),
          ("green", "triangle", "top", 3), ("yellow", "star", "center", 4)]
MORE = [("purple", "cross", "left", 5), ("orange", "circle", "top", 6)]


def rows(db) -> set[str]:
    c = sqlite3.connect(db / "itr.db")
    try:
        return {r[0].rsplit("/", 1)[-1] for r in c.execute("SELECT path FROM files")}
    finally:
        c.close()


def search_names(itr, db, q="a red circle", n=10) -> list[str]:
    r = itr("search", q, "--db", db, "--json", "-n", str(n))
    assert r.code == 0, r
    return [h["path"].rsplit("/", 1)[-1] for h in r.json()["results"]]


@pytest.fixture
def lib(itr, tiny_clip, tmp_path):
    write_shapes(tmp_path / "photos", SHAPES)
    db = tmp_path / "lib"
    assert itr("index", tmp_path / "photos", "--db", db, "-m", tiny_clip, "-q").code == 0
    return db


def test_a_writer_opened_before_a_file_swap_writes_into_the_new_file(lib, tmp_path):
    """The reproduced loss: an `itr index --wait` opened the library, waited on the lock
    while `itr check --compact` swapped the file, then committed into the old one."""
    from itrcli import Library

    write_shapes(tmp_path / "more", MORE)
    waiting = Library.open(lib)  # opened first, as `itr index --wait` does
    try:
        swapper = Library.open(lib)
        with swapper.store.writing("itr check --compact"):
            swapper.store.rewrite_file()  # what --compact and --repair do under the lock
        swapper.close()
        assert waiting.store.replaced()
        s = waiting.index([str(tmp_path / "more")], prune=False)
        assert s.added == 2
    finally:
        waiting.close()
    assert {p.name for p in (tmp_path / "more").iterdir()} <= rows(lib)
    assert len(rows(lib)) == 6


def test_a_lone_write_takes_the_lock_too(lib):
    from itrcli import Library
    from itrcli.errors import LockedError
    from itrcli.store.lock import WriteLock

    with Library.open(lib) as l:
        with WriteLock(lib, "itr index").acquire():
            with pytest.raises(LockedError, match="locked by another 'itr index'"):
                l.remove_adapter()
            with pytest.raises(LockedError):
                l.store.set_meta(roots=[])
        assert l.remove_adapter() is False  # once the lock is free


def test_adapt_and_remove_adapter_wait_for_the_lock(itr, lib):
    from itrcli.store.lock import WriteLock

    with WriteLock(lib, "itr index").acquire():
        r = itr("adapt", "--remove", "--db", lib)
    assert r.code == 1 and "locked by another 'itr index'" in r.err, r
    assert itr("adapt", "--remove", "--db", lib).code == 0


def test_reindex_with_a_missing_model_keeps_the_library(itr, lib, tiny_clip, tmp_path):
    before = search_names(itr, lib)
    r = itr("index", tmp_path / "photos", "--db", lib, "-m", tmp_path / "typo", "--reindex")
    assert r.code == 1 and "cannot load model" in r.err and r.err.count("\n") == 1, r
    info = itr("info", "--db", lib, "--json").json()
    assert info["files"] == 4 and info["model"] == str(tiny_clip)
    assert search_names(itr, lib) == before
    assert not (lib / ".reindex").exists()


def test_reindex_swaps_in_a_library_built_beside(itr, lib, micro_clip, tmp_path):
    r = itr("index", tmp_path / "photos", "--db", lib, "-m", micro_clip, "--reindex", "--json",
            "-q")
    assert r.code == 0 and r.json()["added"] == 4, r
    info = itr("info", "--db", lib, "--json").json()
    assert info["model"] == str(micro_clip) and info["files"] == 4
    assert info["fast_text_search"] is True
    assert info["roots"] == [str(tmp_path / "photos")]
    assert len(search_names(itr, lib)) == 4
    assert itr("check", "--db", lib).code == 0
    assert not (lib / ".reindex").exists()
    settings = json.loads((lib / "text" / "settings.json").read_text())
    assert settings["model"] == str(micro_clip)


def test_an_interrupted_reindex_leaves_the_old_library_searchable(itr, lib, tiny_siglip,
                                                                   tiny_clip, tmp_path,
                                                                   monkeypatch):
    """Killed at the last moment before the swap: the old library is whole; the next
    re-index clears the half-built one."""
    from itrcli.store.db import Store

    before = search_names(itr, lib)

    def killed(self, other):
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, "swap_in", killed)
    r = itr("index", tmp_path / "photos", "--db", lib, "-m", tiny_siglip, "--reindex", "-q")
    assert r.code == 130, r
    monkeypatch.undo()
    info = itr("info", "--db", lib, "--json").json()
    assert info["model"] == str(tiny_clip) and info["files"] == 4
    assert search_names(itr, lib) == before
    (lib / ".reindex").mkdir(exist_ok=True)  # as a kill -9 would leave it
    (lib / ".reindex" / "itr.db").write_bytes(b"half")
    c = itr("check", "--db", lib, "--json").json()
    # (killed at the swap: the old graph was already gone, rebuilt from the rows meanwhile)
    assert "reindex-leftover" in [p["kind"] for p in c["problems"]], c
    r = itr("check", "--db", lib, "--repair", "--json")
    assert r.code == 0 and not (lib / ".reindex").exists(), r
    (lib / ".reindex").mkdir()
    (lib / ".reindex" / "itr.db").write_bytes(b"half")
    r = itr("index", tmp_path / "photos", "--db", lib, "-m", tiny_siglip, "--reindex", "-q")
    assert r.code == 0, r
    assert itr("info", "--db", lib, "--json").json()["model"] == str(tiny_siglip)


def test_a_text_tower_of_another_model_is_never_used(itr, lib, micro_clip, tmp_path):
    """A kill between the database swap and the tower's leaves the old model's tower (or a
    copied folder brings one): searches must not embed queries with it."""
    import shutil

    other = tmp_path / "other"
    write_shapes(tmp_path / "p2", SHAPES[:2])
    assert itr("index", tmp_path / "p2", "--db", other, "-m", micro_clip, "-q").code == 0
    right = itr("search", "a red circle", "--db", lib, "--json").json()["results"]
    shutil.rmtree(lib / "text")
    shutil.copytree(other / "text", lib / "text")  # another model's tower, same folder name
    info = itr("info", "--db", lib, "--json").json()
    assert info["fast_text_search"] is False
    got = itr("search", "a red circle", "--db", lib, "--json").json()["results"]
    assert [h["path"] for h in got] == [h["path"] for h in right]
    assert [h["score"] for h in got] == pytest.approx([h["score"] for h in right], abs=1e-3)
    # the next index run exports the right one
    assert itr("index", tmp_path / "photos", "--db", lib, "-q").code == 0
    assert itr("info", "--db", lib, "--json").json()["fast_text_search"] is True


def test_a_second_library_of_a_model_takes_the_text_tower_from_the_machines_cache(
        itr, micro_clip, tmp_path, monkeypatch):
    """Only the first library of a model on a machine pays for the text tower's export; the
    next ones take it from the tower cache (towercache.py), checked as any export."""
    from itrcli.embed import textonnx, towercache

    write_shapes(tmp_path / "p1", SHAPES[:2])
    write_shapes(tmp_path / "p2", SHAPES[2:])
    assert itr("index", tmp_path / "p1", "--db", tmp_path / "a", "-m", micro_clip, "-q").code == 0
    assert towercache.lookup(str(micro_clip), None, textonnx.CACHE_KIND) is not None

    def no_export(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(textonnx, "export", no_export)
    monkeypatch.setattr(textonnx, "start", no_export)
    assert itr("index", tmp_path / "p2", "--db", tmp_path / "b", "-m", micro_clip, "-q").code == 0
    assert itr("info", "--db", tmp_path / "b", "--json").json()["fast_text_search"] is True
    monkeypatch.undo()
    # the same vectors as the tower exported for the first library
    from itrcli import Library

    with Library.open(tmp_path / "a", readonly=True) as a, Library.open(tmp_path / "b",
                                                                       readonly=True) as b:
        va = a.text_encoder().encode_texts(["a red circle"])
        vb = b.text_encoder().encode_texts(["a red circle"])
    assert (va == vb).all()
