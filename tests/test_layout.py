"""The package's shape: imports point down the data flow, each thing on disk has one owner,
and the defects found while laying it out stay fixed."""

from __future__ import annotations

import ast
import errno
import os
import re
import sqlite3
from pathlib import Path

import pytest

from conftest import write_shapes, posix_only

PKG = Path(__file__).resolve().parents[1] / "itrcli"
BASE = {"constants", "errors", "gcpause", "logs", "lrufiles", "paths", "pools", "progress",
        "records", "__init__"}
#: What each part may import besides BASE: the flow is files -> pixels -> vectors ->
#: store + index -> results -> display; jobs and evaluation drive the parts; the library
#: (the API) everything but the command line.
ALLOWED = {
    "ingest": set(),
    "embed": {"ingest"},
    "store": set(),
    "query": {"ingest", "embed", "store"},
    "show": {"ingest", "store", "query"},
    "jobs": {"ingest", "embed", "store", "query"},
    "evaluation": {"ingest", "embed", "store", "query"},
    "library": {"ingest", "embed", "store", "query", "show", "jobs", "evaluation"},
    # itr serve: the library over HTTP (uploads decoded and --watch events filtered by
    # ingest's own rules); nothing but the command line imports it
    "serve": {"library", "ingest", "store", "query", "show", "jobs"},
}


def _imports(path: Path) -> set[str]:
    """The parts of itrcli that a module imports (relative and absolute imports alike)."""
    rel = path.relative_to(PKG.parent).with_suffix("").parts
    here = list(rel[:-1])  # the package the module is in
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = base + (node.module.split(".") if node.module else [])
                targets = [mod + [a.name] if not node.module else mod for a in node.names]
            elif node.module and node.module.split(".")[0] == "itrcli":
                targets = [node.module.split(".")]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".") for a in node.names if a.name.split(".")[0] == "itrcli"]
        for t in targets:
            part = t[1] if len(t) > 1 else "__init__"
            if not ((PKG / part).is_dir() or (PKG / f"{part}.py").exists()):
                part = "__init__"  # a name of the package itself (__version__)
            out.add(part)
    return out


def _part(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def test_imports_point_down_the_flow():
    wrong = []
    for f in sorted(PKG.rglob("*.py")):
        part = _part(f)
        if part not in ALLOWED:
            continue  # cli, __main__ and the base modules
        for used in _imports(f) - BASE - {part}:
            if used not in ALLOWED[part]:
                wrong.append(f"{f.relative_to(PKG)} imports itrcli.{used}")
    assert not wrong, wrong


def test_only_the_command_line_imports_the_server():
    wrong = [str(f.relative_to(PKG)) for f in sorted(PKG.rglob("*.py"))
             if _part(f) not in ("serve", "cli") and "serve" in _imports(f)]
    assert not wrong, wrong


def test_base_modules_import_nothing_heavy():
    for name in BASE - {"__init__"}:
        tree = ast.parse((PKG / f"{name}.py").read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        mods = {(n.module if isinstance(n, ast.ImportFrom) else n.names[0].name) or "" for n in top}
        assert not mods & {"numpy", "torch", "PIL", "transformers", "hnswlib", "onnxruntime"}, name


def test_sql_lives_in_the_store():
    """Every SQL statement is written in store/ (the eval cache included)."""
    sql = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE)\b[^\n]*\b(FROM|INTO|SET|TABLE)\b")
    outside = [str(f.relative_to(PKG)) for f in PKG.rglob("*.py")
               if _part(f) != "store" and sql.search(f.read_text())]
    assert not outside, outside


def test_each_table_has_one_owner():
    """Outside store/, nothing reaches the database connection: every table is read and
    written through its owner (Store, store.words, store.codes, store.adapters,
    store.metadata)."""
    conn = re.compile(r"\bstore\.conn\b|\.store\.conn\b")
    outside = [str(f.relative_to(PKG)) for f in PKG.rglob("*.py")
               if _part(f) != "store" and conn.search(f.read_text())]
    assert not outside, outside


def test_docs_that_the_code_points_to_exist():
    root = PKG.parent
    refs = {m for f in PKG.rglob("*.py") for m in re.findall(r"docs/[\w./-]+\.md", f.read_text())}
    assert refs, "the code points to its docs"
    assert [r for r in sorted(refs) if not (root / r).exists()] == []


def test_test_support_is_not_shipped():
    assert not (PKG / "synth.py").exists()
    import tomllib

    cfg = tomllib.loads((PKG.parent / "pyproject.toml").read_text())
    assert cfg["tool"]["setuptools"]["packages"]["find"]["include"] == ["itrcli", "itrcli.*"]


# --- defects found while reading the code ---------------------------------------------------

def test_remembered_failures_advance_the_progress_once(itr, tiny_clip, tmp_path):
    from itrcli import Library

    d = tmp_path / "photos"
    write_shapes(d, [("red", "circle", "left", i) for i in range(5)])
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (d / "empty.png").write_bytes(b"")

    class Recorder:
        def __init__(self):
            self.total, self.files, self.embedded = 0, 0, 0

        def start(self, total):
            self.total += total

        def advance(self, files, embedded):
            self.files += files
            self.embedded += embedded

        def close(self):
            pass

    for _run in range(2):  # a new library, then the same files again (failures remembered)
        rec = Recorder()
        with Library.open(tmp_path / "lib", create=True) as lib:
            s = lib.index([str(d)], model=str(tiny_clip), precision="fp32", progress=rec)
        assert s.skipped == 2
        assert rec.files == rec.total  # never past the total (the bar's ETA stays positive)
    assert rec.total == 0  # nothing to read on the second run


@posix_only("makes symbolic links, which need privileges on Windows")
def test_a_symlink_loop_is_named_as_such(tmp_path):
    from itrcli.ingest.files import Unreadable, read_file
    from itrcli.ingest.walk import walk

    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)
    with pytest.raises(Unreadable, match="^symlink loop$"):
        read_file(str(loop))
    res = walk([str(tmp_path)], extensions=frozenset({".jpg"}))
    assert (str(loop), "symlink loop") in res.errors


def test_info_does_not_fail_when_files_vanish_meanwhile(itr, tiny_clip, tmp_path, monkeypatch):
    import itrcli.library as library

    d = tmp_path / "photos"
    write_shapes(d, [("red", "circle", "left", 1), ("blue", "square", "right", 2)])
    db = tmp_path / "lib"
    assert itr("index", d, "--db", db, "-m", tiny_clip, "-q").code == 0
    real = os.scandir

    class Vanishing:
        """An entry listed, then removed by a concurrent run before it is looked at."""

        def __init__(self, e):
            self.e, self.name, self.path = e, e.name, e.path

        def is_dir(self, **kw):
            return self.e.is_dir(**kw)

        def is_file(self, **kw):
            return self.e.is_file(**kw)

        def stat(self, **kw):
            if self.name.endswith(".bin"):
                raise FileNotFoundError(errno.ENOENT, "gone", self.path)
            return self.e.stat(**kw)

    class Listing:
        def __init__(self, d):
            self.it = real(d)

        def __enter__(self):
            return [Vanishing(e) for e in self.it]

        def __exit__(self, *a):
            self.it.close()

    monkeypatch.setattr(library.os, "scandir", Listing)
    r = itr("info", "--db", db, "--json")
    assert r.code == 0, r
    sizes = r.json()["sizes"]
    assert sizes["itr.db"] > 0 and "hnsw" not in sizes  # the vanished graph is not counted


def test_foreign_keys_cascade_in_every_run(itr, tiny_clip, tmp_path):
    """REFERENCES ... ON DELETE CASCADE holds in normal runs, not only after a repair: a
    video's frame rows go with its file row (frames.file_id references files.id)."""
    from itrcli.store.db import Store

    d = tmp_path / "photos"
    write_shapes(d, [("red", "circle", "left", 1)])
    db = tmp_path / "lib"
    assert itr("index", d, "--db", db, "-m", tiny_clip, "-q").code == 0
    store = Store(db)
    try:
        assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        with store.transaction() as c:
            (fid,) = c.execute("SELECT id FROM files").fetchone()
            c.execute("INSERT INTO frames (id, file_id, time) VALUES (?, ?, 1.5)", (fid + 100, fid))
        with store.transaction() as c:
            c.execute("DELETE FROM files WHERE id = ?", (fid,))
        assert store.conn.execute("SELECT count(*) FROM frames").fetchone()[0] == 0
        with pytest.raises(sqlite3.IntegrityError), store.transaction() as c:
            c.execute("INSERT INTO frames (id, file_id, time) VALUES (1000, 999, 0)")  # no file 999
    finally:
        store.close()


def test_reindex_removes_the_graph_once(itr, tiny_clip, tmp_path, monkeypatch):
    import shutil

    d = tmp_path / "photos"
    write_shapes(d, [("red", "circle", "left", 1), ("blue", "square", "right", 2)])
    db = tmp_path / "lib"
    assert itr("index", d, "--db", db, "-m", tiny_clip, "-q").code == 0
    real, removed = shutil.rmtree, []

    def rmtree(path, *a, **k):
        removed.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    r = itr("index", d, "--db", db, "-m", tiny_clip, "--reindex", "--json", "-q")
    assert r.code == 0 and r.json()["added"] == 2, r
    assert removed.count("hnsw") == 1


def test_eval_reads_images_with_the_index_guards(itr, tiny_clip, tmp_path, monkeypatch):
    """One decode path: eval refuses a huge file (it would be read whole into memory)
    exactly as indexing does (the limit lowered here, as a 1 GiB file would take long)."""
    import itrcli.ingest.files as files

    d = tmp_path / "ds"
    write_shapes(d, [("red", "circle", "left", 1), ("blue", "square", "right", 2)], fmt="png")
    (d / "big.png").write_bytes(b"\x89PNG" + b"\0" * 20_000)
    rows = ["image,caption"] + [f"{p.name},a picture" for p in sorted(d.glob("*.png"))]
    (d / "captions.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(files, "MAX_FILE_BYTES", 10_000)
    r = itr("eval", d / "captions.csv", "-m", tiny_clip, "--precision", "fp32", "--no-cache",
            "--json", "-q")
    assert r.code == 0, r
    skipped = {Path(s["path"]).name: s["error"] for s in r.json()["skipped"]}
    assert list(skipped) == ["big.png"] and skipped["big.png"].startswith("file too large")
