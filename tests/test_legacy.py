"""A library written by itr 0.1.0 itself (tests/fixtures/library-0.1.0, made by
scripts/make_legacy_fixture.sh) opens and searches as before, read-only, and is migrated
on its first write without losing anything."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from itrcli.store.db import sqlite_uri

from conftest import copy_legacy_library


@pytest.fixture
def legacy(tmp_path) -> tuple[Path, Path, dict]:
    """The fixture copied to tmp_path, its recorded paths moved there."""
    return copy_legacy_library(tmp_path)


def _schema(lib: Path) -> tuple[int, list[str]]:
    c = sqlite3.connect(sqlite_uri(lib / "itr.db", mode="ro"), uri=True)
    try:
        v = json.loads(c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        return v, [r[0] for r in c.execute("SELECT name FROM migrations ORDER BY rowid")]
    finally:
        c.close()


def _ranked(result: dict) -> list[tuple[str, float]]:
    return [(h["path"], round(h["score"], 4)) for h in result["results"]]


def test_a_0_1_0_library_searches_as_before_without_being_written(itr, legacy):
    lib, _photos, expected = legacy
    assert _schema(lib) == (2, ["m001_create_tables", "m002_failures"])
    got = itr("search", "a red circle", "--db", lib, "--json", "-n", "6")
    assert got.code == 0, got
    assert _ranked(got.json()) == _ranked(expected)
    info = itr("info", "--db", lib, "--json").json()
    assert info["files"] == 6 and info["schema_version"] == 2
    assert itr("check", "--db", lib, "-q").code == 0
    hashed = itr("search", "a red circle", "--db", lib, "--json", "-n", "6", "--hash")
    assert hashed.code == 0 and {h["path"] for h in hashed.json()["results"]} == {
        p for p, _ in _ranked(expected)}
    assert _schema(lib) == (2, ["m001_create_tables", "m002_failures"])  # reading migrates nothing


def test_a_0_1_0_library_is_migrated_on_its_first_write_and_loses_nothing(itr, legacy):
    from itrcli.store.db import MIGRATIONS, SCHEMA_VERSION

    lib, photos, expected = legacy
    s = itr("index", photos, "--db", lib, "--json", "-q")
    assert s.code == 0, s
    s = s.json()
    # nothing re-embedded; the broken file is retried once (a new decoder) and still skipped
    assert (s["added"], s["updated"], s["unchanged"], s["removed"], s["skipped"]) == (0, 0, 6, 0, 1)
    assert _schema(lib) == (SCHEMA_VERSION, [m.__name__ for m in MIGRATIONS])
    got = itr("search", "a red circle", "--db", lib, "--json", "-n", "6").json()
    assert _ranked(got) == _ranked(expected)
    # the codes 0.1.0 saved are kept by the migration (same hasher, nothing to refit)
    c = sqlite3.connect(lib / "itr.db")
    assert c.execute("SELECT count(*) FROM hash_codes").fetchone()[0] == 6
    c.close()
    assert itr("hash", "--bits", "64", photos, "--db", lib, "-q").out.count("\n") == 6
    r = itr("check", "--db", lib, "--json", "-q")
    assert r.code == 0 and r.json()["ok"], r
