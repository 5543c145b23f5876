"""Scene text: the line filter, FTS query escaping, rank fusion (pure), and through the CLI:
``itr index --ocr`` with the real PP-OCR models of the rapidocr wheel, offline."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sqlite3
from pathlib import Path

import pytest

from conftest import posix_only

from itrcli.ingest.ocr import Line, keep_lines
from itrcli.query.fusion import rrf
from itrcli.store.db import sqlite_uri
from types import SimpleNamespace

from itrcli.store import words as wordstore

BOX = ((0.0, 0.0), (10.0, 0.0), (10.0, 5.0), (0.0, 5.0))


def needs_ocr():
    pytest.importorskip("rapidocr", reason="rapidocr not installed (pip install 'itr-search[ocr]')")


# --- pure: which lines are kept ------------------------------------------------------------

def L(text: str, conf: float = 0.95) -> Line:
    return Line(text, BOX, conf)


def test_keep_lines_rule():
    kept = keep_lines([L("ACME  Invoice"), L("low", 0.5), L("--"), L("42"), L("x", 0.7)])
    assert [k.text for k in kept] == ["ACME Invoice", "42"]  # whitespace normalised


def test_short_line_in_another_script_dropped_on_textless_photo():
    assert keep_lines([L("\u5c71", 0.93)]) == []  # a lone CJK character read in foliage
    assert [k.text for k in keep_lines([L("\u5c71", 0.93), L("\u5c71\u7530\u5546\u5e97\u8857")])] \
        == ["\u5c71", "\u5c71\u7530\u5546\u5e97\u8857"]  # a sign in that script: kept
    assert [k.text for k in keep_lines([L("\u0416\u0418", 0.95), L("Harbour Station")])] \
        == ["Harbour Station"]  # Cyrillic pair beside Latin text: dropped
    assert [k.text for k in keep_lines([L("A7", 0.95)])] == ["A7"]  # a Latin code on its own


# --- pure: full-text queries ---------------------------------------------------------------

def _fts(tmp_path):
    c = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    c.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, path TEXT, fsname BLOB, hash TEXT)")
    wordstore.create_tables(c)
    words = wordstore.Words(SimpleNamespace(conn=c))  # the tables' owner over a bare connection
    words.put("h1", [L("ACME Invoice"), L("Caf\u00e9 M\u00fcller 42")], reader="r",
               seconds=0.1, now="now")
    words.put("h2", [L("Harbour Station")], reader="r", seconds=0.1, now="now")
    return words


def test_text_query_words_prefixes_phrases_accents(tmp_path):
    c = _fts(tmp_path)

    def hits(q):
        return [h for h, _ in c.search(wordstore.word_query(q), 10)]

    assert hits("acme invoice") == ["h1"]
    assert hits("invoi") == ["h1"]  # a word's beginning
    assert hits("cafe") == ["h1"] and hits("MULLER") == ["h1"]  # case and accents ignored
    assert hits('"harbour station"') == ["h2"]
    assert hits('"station harbour"') == []  # a phrase keeps its order
    assert hits("acme station") == []  # every word must match
    assert hits("a dog on the beach") == []
    assert wordstore.word_query("the of a").empty
    q = wordstore.word_query("caf invoice")
    assert c.matched_words("h1", q) == ["Invoice", "Caf\u00e9"]


def test_any_typed_query_is_escaped(tmp_path):
    c = _fts(tmp_path)
    rnd = random.Random(7)
    alphabet = 'ab" *()^:-+_{}NEAR AND OR NOT \u00e9\ufb01\u0301\u200b\\\'%;'
    for q in ['"', '""', "AND", "NOT x", "(x", "x*", "NEAR(a b)", "col:val", "^x", "'; DROP"]:
        c.search(wordstore.word_query(q), 5)  # never an SQL error
    for _ in range(2000):
        q = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 14)))
        c.search(wordstore.word_query(q), 5)


# --- pure: reciprocal rank fusion ------------------------------------------------------------

def test_rrf_against_hand_computed_scores():
    fused = dict(rrf([["a", "b"], ["b", "c", "a"]], k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 63)
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["c"] == pytest.approx(1 / 62)
    assert [x for x, _ in rrf([["a", "b"], ["b", "c", "a"]])] == ["b", "a", "c"]


def test_rrf_ties_go_to_the_first_ranking():
    assert [x for x, _ in rrf([["t"], ["c"]])] == ["t", "c"]
    assert [x for x, _ in rrf([[], ["c", "d"]])] == ["c", "d"]
    assert rrf([["a", "a"]]) == [("a", pytest.approx(1 / 61))]  # counted once


# --- reading, offline --------------------------------------------------------------------------

def word_image(words: list[tuple[str, int]], size=(480, 320), seed: int = 0, rotate: int = 0):
    """Words drawn over a shape picture of the micro model's world (tests/support/synth)."""
    from PIL import ImageDraw, ImageFont

    from support import synth

    img = synth.draw("green", "square", "right", size=max(size), seed=seed).resize(size)
    d = ImageDraw.Draw(img)
    y = 30
    for text, px in words:
        d.text((24, y), text, fill=(15, 15, 15), font=ImageFont.load_default(size=px))
        y += int(px * 1.6)
    return img.rotate(rotate, expand=True, fillcolor=(240, 240, 240)) if rotate else img


@pytest.fixture
def offline(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_reads_words_offline_with_the_bundled_models(offline):
    needs_ocr()
    from itrcli.ingest.ocr import TextReader

    lines = TextReader().read_kept(word_image([("ACME Invoice", 40), ("Harbour 1984", 28)]))
    texts = [ln.text for ln in lines]
    assert texts == ["ACME Invoice", "Harbour 1984"], texts
    assert all(ln.confidence > 0.8 for ln in lines)
    (x0, y0), _, (x2, y2), _ = lines[0].box
    assert 10 <= x0 < 40 and 20 <= y0 < 45 and x2 > 200 and y2 < 90  # where it was drawn


def test_exif_rotated_photo_is_read_upright(tmp_path, offline):
    needs_ocr()
    from PIL import Image

    from itrcli.ingest.images import open_image
    from itrcli.ingest.ocr import TextReader

    img = word_image([("Bakery Lumen", 44)]).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: upright again
    p = tmp_path / "rotated.jpg"
    img.save(p, exif=exif, quality=92)
    upright, _ = open_image(p.read_bytes())
    assert [ln.text for ln in TextReader().read_kept(upright)] == ["Bakery Lumen"]


# --- through the CLI -----------------------------------------------------------------------------

WORDS = {"invoice.jpg": [("ACME Invoice", 40)], "station.jpg": [("Harbour Station", 40)],
         "bakery.jpg": [("Bakery", 44), ("Open 7 days", 30)]}


def make_photos(d: Path) -> Path:
    from support import synth

    d.mkdir(parents=True, exist_ok=True)
    for i, (name, words) in enumerate(WORDS.items()):
        word_image(words, seed=i).save(d / name, quality=92)
    synth.draw("red", "circle", "left", size=320, seed=5).save(d / "plain.jpg")
    return d


@pytest.fixture(scope="module")
def ocr_library(tmp_path_factory, micro_clip):
    """A library of three photos with words and one without, indexed with --ocr once."""
    needs_ocr()
    from conftest import run_itr

    root = tmp_path_factory.mktemp("ocr")
    photos = make_photos(root / "photos")
    r = run_itr("index", photos, "--db", root / "lib", "-m", micro_clip, "--ocr", "--json")
    assert r.code == 0, r
    return root, r.json()


@pytest.fixture
def lib_copy(ocr_library, tmp_path):
    root, _ = ocr_library
    shutil.copytree(root / "photos", tmp_path / "photos")
    shutil.copytree(root / "lib", tmp_path / "lib")
    # the library's paths are absolute: point them at the copied photos
    c = sqlite3.connect(tmp_path / "lib" / "itr.db")
    c.execute("UPDATE files SET path = replace(path, ?, ?)", (str(root / "photos"), str(tmp_path / "photos")))
    c.execute("UPDATE meta SET value = ? WHERE key = 'roots'", (json.dumps([str(tmp_path / "photos")]),))
    c.commit()
    c.close()
    return tmp_path / "photos", tmp_path / "lib"


def test_index_ocr_summary_and_storage(ocr_library, itr):
    root, s = ocr_library
    assert s["ocr"]["read"] == 4 and s["ocr"]["with_text"] == 3 and s["ocr"]["failed"] == 0
    assert s["ocr"]["lines"] == 4 and s["ocr"]["pending"] == 0
    r = itr("text", root / "photos", "--db", root / "lib", "--json")
    assert r.code == 0, r
    got = {Path(x["path"]).name: [ln["text"] for ln in x["lines"]] for x in r.json()}
    assert got == {"bakery.jpg": ["Bakery", "Open 7 days"], "invoice.jpg": ["ACME Invoice"],
                   "plain.jpg": [], "station.jpg": ["Harbour Station"]}
    assert {x["source"] for x in r.json()} == {"library"}
    info = itr("info", "--db", root / "lib", "--json").json()
    assert info["ocr"] == {"enabled": True, "images_read": 4, "with_text": 3, "lines": 4,
                           "failed": 0}
    r = itr("check", "--db", root / "lib", "--json")
    assert r.code == 0 and r.json()["problems"] == [], r


def test_fused_search_words_prefix_phrase_and_meaning(ocr_library, itr):
    root, _ = ocr_library
    db = root / "lib"

    def first(*args):
        r = itr("search", *args, "--db", db, "--json")
        assert r.code == 0, r
        return r.json()["results"]

    res = first("acme invoice")
    assert Path(res[0]["path"]).name == "invoice.jpg" and res[0]["text"] == ["ACME", "Invoice"]
    assert all(x["text"] == [] for x in res[1:])
    assert Path(first("harb")[0]["path"]).name == "station.jpg"
    assert Path(first('"open 7 days"')[0]["path"]).name == "bakery.jpg"
    # a descriptive query matches no text: the same order as cosine alone
    fused = [x["path"] for x in first("a red circle on the left")]
    plain = first("a red circle on the left", "--no-text")
    assert fused == [x["path"] for x in plain] and "text" not in plain[0]
    assert Path(fused[0]).name == "plain.jpg"
    only = first("bakery", "--text-only")
    assert [Path(x["path"]).name for x in only] == ["bakery.jpg"]
    # piped output stays score<TAB>path
    r = itr("search", "acme invoice", "--db", db)
    assert r.out.splitlines()[0].split("\t")[1].endswith("invoice.jpg")


def test_terminal_table_has_a_words_column(ocr_library, itr, monkeypatch):
    from itrcli.show import output

    root, _ = ocr_library
    monkeypatch.setattr(output, "is_tty", lambda stream: True)
    r = itr("search", "acme invoice", "--db", root / "lib", "-n", "2")
    first, second = r.out.splitlines()
    assert first.split()[3:5] == ["ACME", "Invoice"] and first.endswith("invoice.jpg"), r.out
    assert second.split()[3] == "-", r.out


def test_typed_operators_never_fail(ocr_library, itr):
    root, _ = ocr_library
    for q in ['"', 'acme AND "(', "NOT*", "x:y"]:
        r = itr("search", q, "--db", root / "lib", "--paths")
        assert r.code == 0, (q, r)
    r = itr("search", '"(', "--db", root / "lib", "--text-only")
    assert r.code == 2 and r.err.startswith("Error: --text-only: no word"), r
    r = itr("search", "acme", "--db", root / "lib", "--text-only", "--no-text")
    assert r.code == 2


def test_html_shows_matched_words(ocr_library, itr, tmp_path):
    root, _ = ocr_library
    out = tmp_path / "s.html"
    r = itr("search", "acme", "--db", root / "lib", "--html", out, "--paths")
    assert r.code == 0, r
    assert '<span class="words">ACME</span>' in out.read_text()


def test_incremental_by_content_hash(lib_copy, ocr_library, itr):
    photos, db = lib_copy
    (photos / "plain.jpg").rename(photos / "plain-moved.jpg")
    r = itr("index", photos, "--db", db, "--json")
    assert r.code == 0, r
    s = r.json()
    assert (s["moved"], s["unchanged"]) == (1, 3) and s["ocr"]["read"] == 0
    assert s["ocr"]["removed"] == 0
    shutil.copy(photos / "invoice.jpg", photos / "invoice-copy.jpg")
    word_image([("Lighthouse", 48)], seed=9).save(photos / "bakery.jpg", quality=92)  # changed
    (photos / "station.jpg").unlink()
    s = itr("index", photos, "--db", db, "--json").json()
    assert (s["added"], s["updated"], s["removed"]) == (1, 1, 1)
    assert s["ocr"]["read"] == 1 and s["ocr"]["removed"] == 2  # the new bakery content only
    res = itr("search", "acme", "--db", db, "--text-only", "--json").json()["results"]
    assert sorted(Path(x["path"]).name for x in res) == ["invoice-copy.jpg", "invoice.jpg"]
    res = itr("search", "lighthouse", "--db", db, "--text-only", "--json").json()["results"]
    assert [Path(x["path"]).name for x in res] == ["bakery.jpg"]
    assert itr("search", "bakery", "--db", db, "--text-only", "--paths").out == ""
    assert itr("check", "--db", db).code == 0


def test_no_ocr_turns_it_off_for_good(lib_copy, itr):
    photos, db = lib_copy
    r = itr("index", photos, "--db", db, "--reindex", "--json")
    assert r.json()["ocr"]["read"] == 4 and r.json()["added"] == 4  # read again, setting kept
    r = itr("index", photos, "--db", db, "--no-ocr")
    assert r.code == 0 and "text reading is off for this library" in r.err, r
    assert itr("info", "--db", db, "--json").json()["ocr"]["images_read"] == 0
    r = itr("index", photos, "--db", db, "--json")
    assert "ocr" not in r.json()
    r = itr("search", "acme", "--db", db, "--text-only")
    assert r.code == 1 and "no text read" in r.err
    assert "text" not in itr("search", "acme", "--db", db, "--json").json()["results"][0]


def test_check_finds_and_repairs_a_damaged_text_index(lib_copy, itr):
    photos, db = lib_copy
    c = sqlite3.connect(db / "itr.db")
    c.execute("DELETE FROM text_fts WHERE rowid = (SELECT min(rowid) FROM text_fts)")
    c.execute("INSERT INTO text_status (hash, lines, reader, seconds, read_at) "
              "VALUES ('gone', 0, 'r', 0, 'now')")
    c.commit()
    c.close()
    r = itr("check", "--db", db, "--json")
    kinds = {p["kind"] for p in r.json()["problems"]}
    assert r.code == 1 and {"text-index", "text-orphans"} <= kinds, r
    r = itr("check", "--db", db, "--repair", "--json")
    assert r.code == 0 and r.json()["problems"] == [], r
    assert any("full-text index" in x for x in r.json()["repaired"])


def test_failed_read_keeps_the_vector_and_is_reported_once(tmp_path, itr, micro_clip, monkeypatch):
    needs_ocr()
    from itrcli.ingest import ocr

    photos = make_photos(tmp_path / "photos")
    real = ocr.TextReader.read

    def flaky(self, img):
        if img.size == (320, 320):  # plain.jpg
            raise RuntimeError("engine fault")
        return real(self, img)

    monkeypatch.setattr(ocr.TextReader, "read", flaky)
    s = itr("index", photos, "--db", tmp_path / "lib", "-m", micro_clip, "--ocr", "--json").json()
    assert s["added"] == 4 and s["skipped"] == 0 and s["ocr"]["failed"] == 1
    assert s["ocr"]["errors"][0]["error"].startswith("text not read: cannot read text: RuntimeError")
    r = itr("index", photos, "--db", tmp_path / "lib", "--json")
    assert r.json()["ocr"]["failed"] == 0 and r.json()["ocr"]["read"] == 0  # remembered
    r = itr("check", "--db", tmp_path / "lib", "--json")
    assert r.code == 0 and "text-failures" in {p["kind"] for p in r.json()["problems"]}


def test_interrupted_reading_resumes_without_duplicates(tmp_path, itr, micro_clip, monkeypatch):
    needs_ocr()
    from itrcli.ingest import ocr

    photos = make_photos(tmp_path / "photos")
    real, calls = ocr.TextReader.read, []

    def stop_second(self, img):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, img)

    monkeypatch.setattr(ocr.TextReader, "read", stop_second)
    r = itr("index", photos, "--db", tmp_path / "lib", "-m", micro_clip, "--ocr", "--json")
    assert r.code == 130, r
    assert r.json()["ocr"]["read"] <= 1
    monkeypatch.setattr(ocr.TextReader, "read", real)
    s = itr("index", photos, "--db", tmp_path / "lib", "--json").json()
    assert s["ocr"]["read"] + r.json()["ocr"]["read"] == 4
    c = sqlite3.connect(tmp_path / "lib" / "itr.db")
    assert c.execute("SELECT count(*), count(DISTINCT hash) FROM text_status").fetchone() == (4, 4)
    assert c.execute("SELECT count(*) FROM text_lines").fetchone()[0] == 4
    assert itr("check", "--db", tmp_path / "lib").code == 0


def test_odd_modes_are_read(tmp_path, itr, micro_clip):
    needs_ocr()
    import numpy as np
    from PIL import Image

    d = tmp_path / "photos"
    d.mkdir()
    base = word_image([("Quartz", 48)])
    base.convert("CMYK").save(d / "cmyk.jpg")
    base.convert("P").save(d / "palette.png")
    base.convert("RGBA").save(d / "alpha.png")
    grey = np.asarray(base.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(d / "deep.png")  # 16-bit grey
    s = itr("index", d, "--db", tmp_path / "lib", "-m", micro_clip, "--ocr", "--json").json()
    assert s["ocr"]["read"] == 4 and s["ocr"]["failed"] == 0, s
    res = itr("search", "quartz", "--db", tmp_path / "lib", "--text-only", "--json").json()
    assert len(res["results"]) == 4


def test_old_library_is_migrated_on_first_write(tmp_path, itr, micro_clip):
    needs_ocr()
    photos = make_photos(tmp_path / "photos")
    db = tmp_path / "lib"
    assert itr("index", photos, "--db", db, "-m", micro_clip).code == 0
    c = sqlite3.connect(db / "itr.db")  # as written by 0.1.0: no text tables
    for t in ("text_fts", "text_lines", "text_status"):
        c.execute(f"DROP TABLE {t}")
    c.execute("DELETE FROM migrations WHERE name = 'm004_text_lines'")
    c.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    c.commit()
    c.close()
    assert itr("search", "acme", "--db", db, "--paths").code == 0  # read-only: no text yet
    r = itr("text", photos / "invoice.jpg", "--db", db, "--json")
    assert r.json()[0]["source"] == "read"
    s = itr("index", photos, "--db", db, "--ocr", "--json").json()
    assert s["ocr"]["read"] == 4
    assert itr("search", "acme", "--db", db, "--json").json()["results"][0]["text"] == ["ACME"]


def test_text_command_reads_now_without_library(tmp_path, itr):
    needs_ocr()
    photos = make_photos(tmp_path / "photos")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    r = itr("text", photos / "invoice.jpg", "--db", tmp_path / "none")
    assert r.code == 0 and r.out == "ACME Invoice\n", r
    r = itr("text", photos / "broken.jpg", photos / "station.jpg", "--db", tmp_path / "none")
    assert r.code == 1 and "broken.jpg: " in r.err
    assert r.out == f"==> {photos / 'station.jpg'} <==\nHarbour Station\n"


@posix_only("kills a process with SIGKILL, which Windows does not have")
def test_kill9_while_reading_then_resume(tmp_path, itr, micro_clip):
    """A real ``kill -9`` of a run that is reading text: only whole reads are kept, and
    the next run reads the rest without duplicates."""
    needs_ocr()
    import signal
    import time

    import faults

    photos = make_photos(tmp_path / "photos")
    for i in range(4):
        word_image([(f"Parcel {i}", 40)], seed=20 + i).save(photos / f"parcel{i}.jpg")
    db = tmp_path / "lib"
    z = faults.Zygote(tmp_path / "zygote")
    try:
        # the third read never ends: the run is still reading when it is killed
        child = z.spawn("index", photos, "--db", db, "-m", micro_clip, "--ocr", "-q",
                        faults="hang=ocr:3")

        def reads() -> int:
            try:
                c = sqlite3.connect(sqlite_uri(db / "itr.db", mode="ro"), uri=True, timeout=5)
                try:
                    return c.execute("SELECT count(*) FROM text_status").fetchone()[0]
                finally:
                    c.close()
            except sqlite3.Error:
                return 0

        deadline = time.monotonic() + 180
        while reads() < 2 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reads() == 2 and child.poll() is None, child
        child.kill()
        assert child.wait() == -signal.SIGKILL
    finally:
        z.close()
    r = itr("check", "--db", db, "--json")
    assert r.code == 0, r
    s = itr("index", photos, "--db", db, "--json").json()
    assert s["ocr"]["read"] >= 1 and s["ocr"]["failed"] == 0
    c = sqlite3.connect(db / "itr.db")
    assert c.execute("SELECT count(*), count(DISTINCT hash) FROM text_status").fetchone() == (8, 8)
    assert c.execute("SELECT count(*) FROM text_lines").fetchone()[0] == 8
    r = itr("check", "--db", db, "--json")
    assert r.code == 0 and r.json()["problems"] == [], r
    res = itr("search", "parcel", "--db", db, "--text-only", "--json").json()["results"]
    assert len(res) == 4


def test_rebuilding_a_damaged_database_keeps_the_text(lib_copy, itr):
    """``check --repair`` copies a damaged database table by table: the FTS index (a
    virtual table) is rebuilt from the stored lines."""
    from faults import damage_index_page

    photos, db = lib_copy
    damage_index_page(db)
    r = itr("check", "--db", db, "--repair", "--json")
    assert r.code == 0 and r.json()["problems"] == [], r
    assert "rebuilt the database file" in r.json()["repaired"][0]
    res = itr("search", "harbour", "--db", db, "--text-only", "--json").json()["results"]
    assert [Path(x["path"]).name for x in res] == ["station.jpg"]


def test_a_read_that_times_out_is_given_up_and_remembered(tmp_path, itr, micro_clip, monkeypatch):
    """A read stuck past the timeout (held on an event until the test ends) is given up
    and remembered; the others (instant fakes, far inside the timeout) are stored."""
    needs_ocr()
    import threading

    from itrcli.ingest import ocr

    photos = make_photos(tmp_path / "photos")
    release = threading.Event()

    def stuck_on_plain(self, img):
        if img.size == (320, 320):  # plain.jpg
            release.wait()
            return []
        return [L("Harbour Station")]

    monkeypatch.setattr(ocr, "TIMEOUT", 4.0)
    monkeypatch.setattr(ocr.TextReader, "load", lambda self: None)
    monkeypatch.setattr(ocr.TextReader, "read", stuck_on_plain)
    try:
        s = itr("index", photos, "--db", tmp_path / "lib", "-m", micro_clip, "--ocr",
                "--json").json()
    finally:
        release.set()
    assert s["added"] == 4 and s["ocr"]["failed"] == 1 and s["ocr"]["read"] == 3, s
    assert s["ocr"]["errors"][0]["error"] == "text not read: timed out after 4 s"
    assert Path(s["ocr"]["errors"][0]["path"]).name == "plain.jpg"
    s = itr("index", photos, "--db", tmp_path / "lib", "--json").json()
    assert s["ocr"]["read"] == 0 and s["ocr"]["failed"] == 0  # remembered, not tried again


HUNG_READ = r"""
import sys, threading
from pathlib import Path
from PIL import Image
from itrcli.ingest import ocr
from itrcli.ingest.files import content_hash
from itrcli.jobs.textread import TextJob
from itrcli.store.db import Store

class Hung:  # an OCR engine that never returns
    def load(self):
        pass
    def read_kept(self, img):
        threading.Event().wait()

d = Path(sys.argv[1])
Image.new("RGB", (64, 48), "white").save(d / "a.png")
store = Store(d / "lib", create=True)
ocr.TIMEOUT = 0.2
job = TextJob(store, reader=Hung())
job.queue(content_hash((d / "a.png").read_bytes()), str(d / "a.png"))
with store.transaction() as c:
    job.store_done(c, block=True)
job.committed()
job.close()
store.close()
print(job.stats.errors[0]["error"], flush=True)
"""


def test_a_read_abandoned_after_its_timeout_does_not_block_the_exit(tmp_path):
    """The OCR engine hangs for good: the read is given up at the timeout, and the process
    still exits (the stuck reader thread is not waited for)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-c", HUNG_READ, str(tmp_path)], capture_output=True,
                       text=True, timeout=60, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "text not read: timed out after 0 s", r
