"""`itr check` and `--repair`: each kind of drift is found, named, and fixed."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct

import numpy as np
import pytest

from conftest import index_shapes
from itrcli.jobs.check import GraphFileError, read_graph_file

SPECS = [(c, s, p, i) for i, (c, s, p) in enumerate(
    [(c, s, p) for c in ("red", "blue", "green") for s in ("circle", "square") for p in ("left", "right")]
)]


@pytest.fixture
def lib(itr, tiny_clip, tmp_path):
    return index_shapes(itr, tmp_path, SPECS, tiny_clip)


def report(db, **kw):
    from itrcli import Library

    with Library.open(db, readonly=True) as lib:
        return lib.check(**kw)


def repair(db, **kw):
    from itrcli import Library

    with Library.open(db) as lib:
        return lib.repair(**kw)


def kinds(rep, severity="error"):
    return {f.kind: f.count for f in rep.findings if f.severity == severity}


def raw(db):
    c = sqlite3.connect(db / "itr.db", isolation_level=None)
    c.execute("PRAGMA foreign_keys=OFF")
    return c


def graph_path(db):
    (p,) = (db / "hnsw").glob("*.bin")
    return p


def load_graph(db):
    import hnswlib

    idx = hnswlib.Index(space="cosine", dim=32)
    idx.load_index(str(graph_path(db)))
    return idx


def searches_find_all(itr, db, n):
    for extra in ([], ["--exact"]):
        r = itr("search", "a red circle", "--db", db, "--json", "-n", "50", *extra)
        assert r.code == 0, r
        assert len({h["path"] for h in r.json()["results"]}) == n


def test_a_fresh_library_is_clean(lib):
    db, paths = lib
    rep = report(db)
    assert rep.ok and rep.findings == []
    j = rep.to_json()
    assert set(j) == {"library", "ok", "files", "vectors", "graph", "problems", "repaired"}
    assert (j["files"], j["vectors"], j["graph"]["labels"], j["graph"]["log_entries"]) == (12, 12, 12, 0)
    assert j["graph"]["file"] == "hnsw/12.bin"
    json.dumps(j)


def test_rows_and_vectors_out_of_step_are_repaired_then_re_embedded(itr, lib):
    db, paths = lib
    c = raw(db)
    ids, names = zip(*c.execute("SELECT id, path FROM files ORDER BY id"))
    c.execute("INSERT INTO vectors VALUES (999, ?)", (np.ones(32, "<f4").tobytes(),))  # no row
    c.execute("DELETE FROM vectors WHERE id = ?", (ids[0],))  # a row without its vector
    c.execute("UPDATE vectors SET vector = ? WHERE id = ?", (np.zeros(32, "<f4").tobytes(), ids[1]))
    c.execute("UPDATE vectors SET vector = ? WHERE id = ?", (b"\x00" * 12, ids[2]))
    nan = np.full(32, np.nan, "<f4").tobytes()
    c.execute("UPDATE vectors SET vector = ? WHERE id = ?", (nan, ids[3]))
    c.close()
    rep = report(db)
    assert not rep.ok
    assert kinds(rep) == {"orphan-vectors": 1, "rows-without-vectors": 1, "bad-vectors": 3}
    assert rep.get("rows-without-vectors").examples == [names[0]]
    fixed = repair(db)
    assert fixed.ok and kinds(fixed, "warning") == {}, fixed.to_json()
    assert any("orphan" in a for a in fixed.repaired) and any("rebuilt" in a for a in fixed.repaired)
    assert fixed.files == fixed.vectors == fixed.graph_labels == 8
    s = itr("index", paths[0].parent, "--db", db, "--json", "-q").json()
    assert (s["added"], s["unchanged"]) == (4, 8)
    assert report(db).findings == []
    searches_find_all(itr, db, 12)


def _truncate(db):
    p = graph_path(db)
    p.write_bytes(p.read_bytes()[:-60])


def _garble_links(db):
    p = graph_path(db)
    b = bytearray(p.read_bytes())
    struct.pack_into("<I", b, 96 + 4, 0x7FFFFFF0)  # element 0's first level-0 neighbour
    struct.pack_into("<I", b, 96, (struct.unpack_from("<I", b, 96)[0] & ~0xFFFF) | 1)
    p.write_bytes(bytes(b))


def _other_dim(db):
    import hnswlib

    idx = hnswlib.Index(space="cosine", dim=16)
    idx.init_index(100)
    idx.add_items(np.random.default_rng(0).random((12, 16), dtype=np.float32), np.arange(1, 13))
    idx.save_index(str(graph_path(db)))


def _extra(db):
    idx = load_graph(db)
    idx.add_items(np.random.default_rng(0).random((1, 32), dtype=np.float32), [424242])
    idx.save_index(str(graph_path(db)))


def _missing(db):
    idx = load_graph(db)
    idx.mark_deleted(int(idx.get_ids_list()[0]))
    idx.save_index(str(graph_path(db)))


def _swapped(db):
    idx = load_graph(db)
    a, b = sorted(idx.get_ids_list())[:2]
    va, vb = idx.get_items([a, b], return_type="numpy")
    idx.add_items(np.stack([vb, va]), [a, b])  # two files' vectors exchanged
    idx.save_index(str(graph_path(db)))


def _ahead(db):
    p = graph_path(db)
    p.rename(p.with_name("60.bin"))


def _log_gap(db):
    p = graph_path(db)
    p.rename(p.with_name("9.bin"))  # entries 10-12 were truncated from the log already


@pytest.mark.parametrize("damage,kind", [
    (_truncate, "graph-unreadable"), (_garble_links, "graph-unreadable"),
    (_other_dim, "graph-unreadable"), (_extra, "graph-extra-labels"),
    (_missing, "graph-missing-labels"), (_swapped, "graph-wrong-vectors"),
    (_ahead, "graph-ahead"), (_log_gap, "log-gap"),
])
def test_graph_drift_is_found_and_the_graph_rebuilt(itr, lib, damage, kind):
    db, _ = lib
    damage(db)
    rep = report(db)
    assert kinds(rep) == {kind: rep.get(kind).count}, rep.to_json()
    if damage not in (_missing, _swapped, _extra):
        searches_find_all(itr, db, 12)  # readers rebuild what they cannot use
    fixed = repair(db)
    assert fixed.ok and fixed.findings == [], fixed.to_json()
    assert any(a.startswith("rebuilt the search graph") for a in fixed.repaired)
    searches_find_all(itr, db, 12)


@pytest.mark.parametrize("when", ["before the mapped read", "between the two reads"])
def test_a_graph_file_replaced_by_the_running_writer_is_a_note(lib, monkeypatch, when):
    """A check beside an 'itr index' that saves a newer graph and removes the old file
    meanwhile (before the mapped read, or after it and before hnswlib loads the file by
    its path) notes it, never reports the graph unreadable (a flaky error in CI)."""
    from itrcli.jobs import check as checking

    db, _ = lib
    path = graph_path(db)
    keep = path.read_bytes()
    real = checking.read_graph_file

    def writer_saves_meanwhile(p, dim=None):
        if when == "before the mapped read":
            p.unlink()
            return real(p, dim)
        g = real(p, dim)  # mapped: the file may go now
        p.unlink()
        return g

    monkeypatch.setattr(checking, "holder", lambda d: "'itr index' (pid 1)")
    monkeypatch.setattr(checking, "read_graph_file", writer_saves_meanwhile)
    rep = report(db)
    assert rep.ok, rep.to_json()
    assert "was replaced during the check" in rep.get("graph-unreadable").message
    path.write_bytes(keep)


def test_graph_file_parser_reads_labels_marks_and_vectors(lib):
    db, _ = lib
    from itrcli.store.db import Store

    idx = load_graph(db)
    victim = int(sorted(idx.get_ids_list())[3])
    idx.mark_deleted(victim)
    idx.save_index(str(graph_path(db)))
    g = read_graph_file(graph_path(db), 32)
    s = Store(db, readonly=True)
    ids, vecs = s.vectors()
    s.close()
    assert sorted(g.labels.tolist()) == ids.tolist()
    assert g.labels[g.deleted].tolist() == [victim]
    order = np.argsort(g.labels)
    # the graph (cosine space) holds the stored float16 values, normalised
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(g.vectors)[order], unit, atol=1e-6)
    with pytest.raises(GraphFileError, match="32-dimensional vectors, the library 16"):
        read_graph_file(graph_path(db), 16)
    p = graph_path(db)
    p.write_bytes(p.read_bytes() + b"\0")
    with pytest.raises(GraphFileError, match="trailing"):
        read_graph_file(p, 32)


def test_leftovers_of_killed_runs(itr, lib):
    db, paths = lib
    (db / "hnsw" / ".13.bin.tmp").write_bytes(b"half a graph")
    shutil.copy(graph_path(db), db / "hnsw" / "3.bin")  # an older graph not yet removed
    rep = report(db)
    assert rep.ok and kinds(rep, "warning") == {"temp-files": 1} and kinds(rep, "note") == {"old-graphs": 1}
    fixed = repair(db)
    assert fixed.findings == [] and sorted(os.listdir(db / "hnsw")) == ["12.bin"]
    # an index run clears a temporary file too (it holds the lock, so nobody else is saving)
    (db / "hnsw" / ".13.bin.tmp").write_bytes(b"half a graph")
    assert itr("index", paths[0].parent, "--db", db, "-q").code == 0
    assert sorted(os.listdir(db / "hnsw")) == ["12.bin"]


def test_vanished_files_are_a_warning_and_pruned_only_on_request(itr, lib):
    db, paths = lib
    paths[0].unlink()
    paths[1].unlink()
    os.utime(paths[2], ns=(1, 1))
    rep = report(db)
    assert rep.ok
    assert kinds(rep, "warning") == {"vanished": 2} and kinds(rep, "note") == {"changed": 1}
    assert rep.get("vanished").examples == [str(paths[0]), str(paths[1])]
    assert report(db, files=False).findings == []
    kept = repair(db)
    assert kept.files == 12 and kinds(kept, "warning") == {"vanished": 2}
    pruned = repair(db, prune=True)
    assert pruned.files == pruned.graph_labels == 10 and kinds(pruned, "warning") == {}
    searches_find_all(itr, db, 10)


def test_an_unmounted_disk_is_not_pruned_by_index(itr, lib, tmp_path):
    """A mount point without its disk is an empty directory: the index keeps its files."""
    db, paths = lib
    hidden = tmp_path / "unplugged"
    shutil.move(paths[0].parent, hidden)
    paths[0].parent.mkdir()
    s = itr("index", paths[0].parent, "--db", db, "--json", "-q").json()
    assert s["removed"] == 0 and s["skipped"] == 1
    assert "12 indexed files are kept" in s["errors"][0]["error"]
    assert report(db, files=False).files == 12


def test_a_damaged_database_is_reported_and_not_papered_over(itr, lib):
    db, _ = lib
    path = db / "itr.db"
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) >= 6 * page
    for i in range(2 * page, 6 * page):  # tables' pages
        data[i] = (i * 7) & 0xFF
    path.write_bytes(bytes(data))
    for f in ("itr.db-wal", "itr.db-shm"):
        (db / f).unlink(missing_ok=True)
    from itrcli.errors import ItrError

    try:
        rep = report(db)
    except ItrError as e:  # too damaged to open at all: said so, with the way out
        assert "damaged" in str(e) and ".recover" in str(e)
    else:
        assert not rep.ok and "integrity" in kinds(rep)

    with pytest.raises(ItrError, match="damaged|malformed|recover"):
        repair(db)
    r = itr("search", "a red circle", "--db", db)
    assert r.code == 1 and r.err.startswith("Error:") and "unexpected" not in r.err, r


def test_repair_waits_for_or_refuses_a_running_writer(lib):
    db, _ = lib
    from itrcli.errors import LockedError
    from itrcli.store.lock import WriteLock

    with WriteLock(db).acquire():
        with pytest.raises(LockedError):
            repair(db, wait=0.2)
        rep = report(db)  # check itself never waits
        assert rep.ok and kinds(rep, "note") == {"writer": 1}


def test_a_schema_1_library_is_checked_read_only_and_migrated_by_index(itr, lib):
    db, paths = lib
    c = raw(db)
    c.execute("DROP TABLE failures")
    c.execute("DELETE FROM migrations WHERE name = 'm002_failures'")
    c.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    c.close()
    assert report(db).findings == []
    assert itr("index", paths[0].parent, "--db", db, "-q").code == 0
    c = raw(db)
    from itrcli.store.db import SCHEMA_VERSION

    assert c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    c.close()


def test_cli_check_exit_codes_and_json(itr, lib):
    db, paths = lib
    r = itr("check", "--db", db, "--json")
    assert r.code == 0 and r.json()["ok"] is True, r
    _missing(db)
    r = itr("check", "--db", db)
    assert r.code == 1 and "graph" in r.err and "--repair" in r.err, r
    r = itr("check", "--db", db, "--repair", "-q")
    assert (r.code, r.out, r.err) == (0, "", ""), r
    paths[0].unlink()
    r = itr("check", "--db", db, "--json")
    assert r.code == 0 and [p["kind"] for p in r.json()["problems"]] == ["vanished"], r
    assert itr("check", "--db", db, "--prune").code == 2
    r = itr("check", "--db", db, "--repair", "--prune", "--json")
    assert r.code == 0 and r.json()["files"] == 11 and r.json()["repaired"], r


def test_a_damaged_index_is_rebuilt_by_repair(itr, lib):
    from faults import damage_index_page

    db, _ = lib
    damage_index_page(db)
    rep = report(db)
    assert not rep.ok and "integrity" in kinds(rep), rep.to_json()
    fixed = repair(db)
    assert fixed.ok and fixed.findings == [] and "rebuilt the database file" in fixed.repaired[0], fixed.to_json()
    assert (db / "itr.db.damaged").exists()
    searches_find_all(itr, db, 12)


def test_a_rebuild_takes_its_schema_from_itr_not_from_the_damaged_file(itr, lib):
    """The damaged file's own schema is never executed: an index whose SQL was rewritten
    comes back as itr defines it, a table whose name holds a quote (or any table itr does
    not know) is left behind, and so are triggers and views."""
    from faults import damage_index_page

    from itrcli.store.db import Store

    db, _ = lib
    c = sqlite3.connect(db / "itr.db", isolation_level=None)
    want = c.execute("SELECT sql FROM sqlite_master WHERE name = 'files_hash'").fetchone()[0]
    counts = {t: c.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
              for t in ("files", "vectors", "vector_log", "meta", "migrations")}
    c.executescript("""
        CREATE TABLE "odd"" name" (x);
        INSERT INTO "odd"" name" VALUES (1);
        CREATE VIEW every_path AS SELECT path FROM files;
        CREATE TRIGGER forget AFTER INSERT ON meta BEGIN DELETE FROM files; END;
        PRAGMA writable_schema = ON;
        UPDATE sqlite_master SET sql = 'CREATE INDEX files_hash ON files(hash) WHERE size < 0'
            WHERE name = 'files_hash';
        PRAGMA writable_schema = OFF;
    """)
    c.close()
    damage_index_page(db)
    store = Store(db)
    store.rebuild_file()
    store.close()
    c = sqlite3.connect(db / "itr.db")
    names = {r[0] for r in c.execute("SELECT name FROM sqlite_master")}
    assert 'odd" name' not in names and not names & {"every_path", "forget"}
    assert c.execute("SELECT sql FROM sqlite_master WHERE name = 'files_hash'").fetchone()[0] == want
    assert {t: c.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in counts} == counts
    assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    c.close()
    assert repair(db).ok
    searches_find_all(itr, db, 12)
