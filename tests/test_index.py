"""`itr index` end to end with a tiny random CLIP built by the test."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_shapes

SUMMARY_KEYS = {"scanned", "added", "updated", "moved", "removed", "unchanged", "skipped",
                "errors", "seconds", "images_per_second", "engine", "passed_over"}


@pytest.fixture
def photos(tmp_path):
    return write_shapes(tmp_path / "photos", [
        ("red", "circle", "left", 1), ("blue", "square", "right", 2),
        ("green", "triangle", "top", 3), ("yellow", "circle", "bottom", 4),
    ])


def index(itr, lib, *args):
    r = itr("index", *args, "--db", lib, "--json", "-q")
    assert r.code == 0, r
    return r.json()


def stored(lib):
    from itrcli.store.db import Store

    s = Store(lib)
    ids, vecs = s.vectors()
    paths = {r["id"]: r["path"] for r in s.rows(ids.tolist()).values()}
    s.close()
    return {paths[int(i)]: v for i, v in zip(ids, vecs)}


def test_first_run_adds_everything_and_prints_exact_keys(itr, tiny_clip, photos, tmp_path):
    lib = tmp_path / "lib"
    s = index(itr, lib, photos[0].parent, "--model", tiny_clip)
    assert set(s) == SUMMARY_KEYS
    assert (s["scanned"], s["added"], s["skipped"], s["errors"]) == (4, 4, 0, [])
    vecs = stored(lib)
    assert len(vecs) == 4
    for v in vecs.values():
        assert abs(float(np.linalg.norm(v)) - 1) < 1e-5  # L2-normalised


def test_second_run_reads_nothing(itr, tiny_clip, photos, tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    index(itr, lib, photos[0].parent, "-m", tiny_clip)
    import itrcli.jobs.indexer as indexer

    calls = []
    monkeypatch.setattr(indexer, "read_for_vectors", lambda *a, **k: calls.append(a) or None)
    s = index(itr, lib, photos[0].parent)
    assert (s["unchanged"], s["added"], s["updated"]) == (4, 0, 0)
    assert calls == []  # no file was opened, let alone decoded


def test_rename_edit_delete_show_up_as_moved_updated_removed(itr, tiny_clip, photos, tmp_path):
    lib = tmp_path / "lib"
    index(itr, lib, photos[0].parent, "-m", tiny_clip)
    before = stored(lib)
    moved_to = photos[0].parent / "sub" / "renamed.jpg"
    moved_to.parent.mkdir()
    shutil.move(photos[0], moved_to)
    from support import synth

    synth.draw("purple", "square", "center", size=64, seed=9).save(photos[1])  # edit in place
    os.utime(photos[1], ns=(time.time_ns(), time.time_ns() + 10**9))
    photos[2].unlink()
    s = index(itr, lib, photos[0].parent)
    assert (s["moved"], s["updated"], s["removed"], s["unchanged"], s["added"]) == (1, 1, 1, 1, 0)
    after = stored(lib)
    assert set(after) == {str(moved_to), str(photos[1]), str(photos[3])}
    np.testing.assert_array_equal(after[str(moved_to)], before[str(photos[0])])  # vector kept
    assert not np.allclose(after[str(photos[1])], before[str(photos[1])])  # re-embedded
    np.testing.assert_array_equal(after[str(photos[3])], before[str(photos[3])])


def test_copy_reuses_vector_and_touch_is_unchanged(itr, tiny_clip, photos, tmp_path):
    lib = tmp_path / "lib"
    index(itr, lib, photos[0].parent, "-m", tiny_clip)
    copy = photos[0].parent / "copy.jpg"
    shutil.copy(photos[0], copy)
    os.utime(photos[1], ns=(time.time_ns(), time.time_ns() + 10**9))  # same bytes, new mtime
    s = index(itr, lib, photos[0].parent)
    assert (s["added"], s["unchanged"], s["updated"]) == (1, 4, 0)
    v = stored(lib)
    np.testing.assert_array_equal(v[str(copy)], v[str(photos[0])])


def test_no_prune_keeps_deleted_files(itr, tiny_clip, photos, tmp_path):
    lib = tmp_path / "lib"
    index(itr, lib, photos[0].parent, "-m", tiny_clip)
    photos[0].unlink()
    s = index(itr, lib, photos[0].parent, "--no-prune")
    assert s["removed"] == 0 and len(stored(lib)) == 4
    s = index(itr, lib, photos[0].parent)
    assert s["removed"] == 1 and len(stored(lib)) == 3


def test_bad_files_are_skipped_with_reasons_exit_zero(itr, tiny_clip, photos, tmp_path):
    d = photos[0].parent
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.png").write_text("not really")
    (d / "cut.jpg").write_bytes(photos[0].read_bytes()[:300])
    s = index(itr, tmp_path / "lib", d, "-m", tiny_clip)
    assert s["added"] == 4 and s["skipped"] == 3
    reasons = {os.path.basename(e["path"]): e["error"] for e in s["errors"]}
    assert reasons["empty.jpg"] == "empty file"
    assert "not an image" in reasons["text.png"]
    assert set(reasons) == {"empty.jpg", "text.png", "cut.jpg"}


def test_library_is_bound_to_its_model(itr, tiny_clip, tiny_siglip, photos, tmp_path):
    lib = tmp_path / "lib"
    index(itr, lib, photos[0].parent, "-m", tiny_clip)
    r = itr("index", photos[0].parent, "--db", lib, "-m", tiny_siglip)
    assert r.code == 1 and "--reindex" in r.err and r.err.count("\n") == 1
    s = index(itr, lib, photos[0].parent, "-m", tiny_siglip, "--reindex")
    assert s["added"] == 4
    r = itr("info", "--db", lib, "--json")
    assert r.json()["model"] == str(tiny_siglip) and r.json()["model_type"] == "siglip"


def test_unknown_model_fails_fast_with_advice(itr, photos, tmp_path):
    r = itr("index", photos[0].parent, "--db", tmp_path / "lib", "-m", "nobody/no-such-model")
    assert r.code == 1
    assert "cannot load model 'nobody/no-such-model'" in r.err and "--model" in r.err
    assert "Traceback" not in r.err


def test_info_reports_counts_and_roots(itr, tiny_clip, photos, tmp_path):
    lib = tmp_path / "lib"
    index(itr, lib, photos[0].parent, "-m", tiny_clip)
    data = itr("info", "--db", lib, "--json").json()
    assert data["files"] == 4 and data["vectors"] == 4 and data["dim"] == 32
    assert data["roots"] == [str(photos[0].parent)]
    assert data["sizes"]["total"] > 0
    text = itr("info", "--db", lib).out
    assert "model:" in text and str(tiny_clip) in text


def test_default_library_location_and_env(itr, tiny_clip, photos, tmp_path, monkeypatch):
    r = itr("path")
    assert r.out.strip() == str(tmp_path / "xdg-data" / "itr")
    monkeypatch.setenv("ITR_DB", str(tmp_path / "envlib"))
    monkeypatch.setenv("ITR_MODEL", str(tiny_clip))
    r = itr("index", photos[0].parent, "-q")
    assert r.code == 0 and (tmp_path / "envlib" / "itr.db").exists()


def test_siglip_library_indexes_and_searches(itr, tiny_siglip, photos, tmp_path):
    lib = tmp_path / "lib"
    index(itr, lib, photos[0].parent, "-m", tiny_siglip)
    r = itr("search", "a red circle", "--db", lib, "--json")
    assert r.code == 0 and len(r.json()["results"]) == 4


def test_human_summary_on_stderr_and_quiet(itr, tiny_clip, photos, tmp_path):
    r = itr("index", photos[0].parent, "--db", tmp_path / "lib", "-m", tiny_clip)
    assert r.code == 0 and r.out == ""
    assert "scanned 4, added 4" in r.err and "\x1b[" not in r.err
    r = itr("index", photos[0].parent, "--db", tmp_path / "lib", "-q")
    assert r.code == 0 and r.out == "" and r.err == ""


def _hub_snapshot(model: str, source, revision: str, *, main: bool = True):
    """``source`` (a model directory) as ``revision`` of hub model ``model`` in the test's
    Hugging Face cache (the autouse fixture points HF_HUB_CACHE into tmp_path); ``main``:
    refs/main names it, as after a download."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + model.replace("/", "--"))
    shutil.copytree(source, repo / "snapshots" / revision)
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return repo


def test_the_recorded_model_revision_is_the_one_loaded(itr, tiny_clip, photos, tmp_path):
    """A hub model's newer snapshot in the cache is not mixed into a library embedded with
    an older one: the recorded revision is loaded, and when it is gone the run refuses in
    one line naming both and the way out (--reindex re-embeds with the new one)."""
    from support import synth

    from itrcli import Library

    model, old, new = "itr-test/tiny-clip", "a" * 40, "b" * 40
    repo = _hub_snapshot(model, tiny_clip, old)
    lib = tmp_path / "lib"
    index(itr, lib, tmp_path / "photos", "-m", model)
    with Library.open(lib, readonly=True) as L:
        assert L.store.get_meta("model_revision") == old
        want = L.stored_vector(str(photos[0]))

    retrained = synth.make_tiny_clip(tmp_path / "retrained", seed=7)
    _hub_snapshot(model, retrained, new)  # an update: refs/main moves on
    with Library.open(lib) as L:
        assert L.encoder(device="cpu", precision="fp32").revision == old
    # a new file is embedded with the old snapshot: the same pixels as an indexed photo
    # (other bytes: embedded, not reused) give the same vector
    again = tmp_path / "photos" / "again.jpg"
    again.write_bytes(photos[0].read_bytes() + b"\0")
    s = index(itr, lib, tmp_path / "photos")
    assert s["added"] == 1, s
    with Library.open(lib, readonly=True) as L:
        assert L.store.get_meta("model_revision") == old
        np.testing.assert_allclose(L.stored_vector(str(again)), want, atol=2e-3)

    shutil.rmtree(repo / "snapshots" / old)  # the old snapshot is gone
    write_shapes(tmp_path / "photos", [("purple", "square", "left", 9)])
    r = itr("index", tmp_path / "photos", "--db", lib, "-q")
    assert r.code == 1 and r.err.count("\n") == 1, r
    assert old in r.err and new in r.err and "--reindex" in r.err, r
    s = index(itr, lib, tmp_path / "photos", "--reindex")
    with Library.open(lib, readonly=True) as L:
        assert L.store.get_meta("model_revision") == new


def test_a_local_model_directory_has_no_revision(itr, tiny_clip, photos, tmp_path):
    from itrcli import Library

    index(itr, tmp_path / "lib", tmp_path / "photos", "-m", tiny_clip)
    with Library.open(tmp_path / "lib") as L:
        assert L.store.get_meta("model_revision") is None
        assert L.encoder(device="cpu").revision is None
def test_a_library_inside_the_photos_is_not_indexed(itr, tiny_clip, photos, tmp_path):
    """The library's own thumbnails (and any other library's files) are not photos: a
    folder holding an ``itr.db`` is skipped with everything under it."""
    d = photos[0].parent
    lib = d / "itr-library"
    index(itr, lib, d, "-m", tiny_clip)
    r = itr("search", "a red circle", "--db", lib, "--html", tmp_path / "sheet.html")
    assert r.code == 0, r
    assert list((lib / "thumbs").rglob("*.jpg")), "the contact sheet made thumbnails"
    s = index(itr, lib, d)
    assert (s["scanned"], s["added"], s["unchanged"]) == (4, 0, 4)
    other = tmp_path / "elsewhere"  # another library's run skips this one too
    s = index(itr, other, d, "-m", tiny_clip)
    assert (s["scanned"], s["added"]) == (4, 4)
    for db in (lib, other):
        hits = itr("search", "a red circle", "--db", db, "--json", "-n", "20").json()["results"]
        assert sorted(h["path"] for h in hits) == sorted(map(str, photos))


def test_unreadable_media_types_are_passed_over_and_said(itr, tiny_clip, photos, tmp_path):
    """Raw photos without rawpy, HEIC without pillow-heif and videos without PyAV (a broken
    install, or where no wheel exists) are not read: counted by extension (``passed_over``),
    said on stderr with what reads them, not counted as skipped."""
    import itrcli.ingest.images as images
    import itrcli.ingest.video as video

    d = photos[0].parent
    for n in ("a.dng", "b.DNG", "raw/c.nef", "d.heic", "e.mp4", "notes.txt", "f.xyz"):
        (d / n).parent.mkdir(exist_ok=True)
        (d / n).write_bytes(b"x")
    lib = tmp_path / "lib"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(images, "heif_available", lambda: False)
        mp.setattr(images, "raw_available", lambda: False)
        mp.setattr(video, "available", lambda: False)
        r = itr("index", d, "--db", lib, "-m", tiny_clip, "--json")
        assert r.code == 0, r
        s = r.json()
        assert (s["scanned"], s["added"], s["skipped"]) == (4, 4, 0)
        assert s["passed_over"] == {".dng": 2, ".heic": 1, ".mp4": 1, ".nef": 1}
        assert list(s["passed_over"]) == sorted(s["passed_over"])  # a stable order
        assert ("passed over 5 files of unsupported types (.dng 2, .heic 1, .mp4 1, .nef 1); "
                "camera RAW needs rawpy (pip install rawpy), HEIC needs pillow-heif, videos "
                "need PyAV\n" in r.err)
        r = itr("index", d, "--db", lib, "--no-video")  # videos left out by choice: not said
        assert ("passed over 4 files of unsupported types (.dng 2, .heic 1, .nef 1); camera "
                "RAW needs rawpy (pip install rawpy), HEIC needs pillow-heif\n" in r.err)
        r = itr("index", d, "--db", lib, "-q")
        assert r.code == 0 and r.err == "" and r.out == ""
    # as installed (rawpy, pillow-heif and PyAV): every one is read, and these 1-byte
    # files are bad ones, skipped
    s = index(itr, lib, d)
    assert s["passed_over"] == {} and s["skipped"] == 5
    for n in ("a.dng", "b.DNG", "raw/c.nef", "d.heic", "e.mp4"):
        (d / n).unlink()
    assert index(itr, lib, d)["passed_over"] == {}


@pytest.mark.skipif(not __import__("PIL.features").features.check("avif"),
                    reason="this Pillow does not decode AVIF")
def test_avif_photos_are_indexed_where_pillow_decodes_them(itr, tiny_clip, photos, tmp_path):
    from PIL import Image

    d = photos[0].parent
    Image.open(photos[0]).save(d / "copy.avif", quality=90)
    s = index(itr, tmp_path / "lib", d, "-m", tiny_clip)
    assert (s["scanned"], s["added"], s["skipped"], s["passed_over"]) == (5, 5, 0, {})
    hits = itr("search", str(d / "copy.avif"), "--db", tmp_path / "lib", "--json").json()
    assert hits["results"][0]["path"] == str(photos[0])  # an image query by an AVIF file


def _watch_the_load(monkeypatch, *, wait_for_a_decode: bool):
    """Records which thread loads the encoder; with ``wait_for_a_decode`` the load waits
    (up to 30 s) for a file to be decoded first, which only a load beside the decodes sees."""
    import threading

    import itrcli.jobs.indexer as indexer
    from itrcli.library import Library

    seen = {"loaded_in": [], "decoded_first": [], "reads": 0}
    decoding = threading.Event()
    read, load = indexer.read_for_vectors, Library._encoder_at

    def counted_read(*a, **k):
        seen["reads"] += 1
        decoding.set()
        return read(*a, **k)

    def watched_load(self, *a, **k):
        if wait_for_a_decode:
            seen["decoded_first"].append(decoding.wait(30))
        seen["loaded_in"].append(threading.current_thread().name)
        return load(self, *a, **k)

    monkeypatch.setattr(indexer, "read_for_vectors", counted_read)
    monkeypatch.setattr(Library, "_encoder_at", watched_load)
    return seen


def test_a_new_library_decodes_while_its_encoder_loads(itr, tiny_clip, photos, tmp_path,
                                                       monkeypatch):
    """A new library's run decodes with the recipe read from the model's files while the
    encoder loads in a thread, and stores the vectors of a run that loads it first."""
    import itrcli.embed.encoder as encoder

    seen = _watch_the_load(monkeypatch, wait_for_a_decode=True)
    s = index(itr, tmp_path / "beside", photos[0].parent, "--model", tiny_clip)
    assert (s["added"], s["skipped"]) == (4, 0)
    assert seen["loaded_in"][0] == "itr-load-encoder" and seen["decoded_first"][0] is True
    assert seen["reads"] == 4  # the guess was the model's recipe: nothing decoded twice

    monkeypatch.setattr(encoder, "guess_preprocess", lambda *a: None)  # no guess: load first
    seen = _watch_the_load(monkeypatch, wait_for_a_decode=False)
    index(itr, tmp_path / "first", photos[0].parent, "--model", tiny_clip)
    assert seen["loaded_in"][0] != "itr-load-encoder"
    beside, first = stored(tmp_path / "beside"), stored(tmp_path / "first")
    assert beside.keys() == first.keys()
    for path in beside:
        assert np.array_equal(beside[path], first[path])


def test_a_wrong_guess_is_decoded_again(itr, tiny_clip, photos, tmp_path, monkeypatch):
    """Files decoded with a guessed recipe that the loaded encoder's contradicts are decoded
    again with its own: the vectors are those of the right recipe."""
    import dataclasses

    import itrcli.embed.encoder as encoder

    real = encoder.guess_preprocess
    index(itr, tmp_path / "right", photos[0].parent, "--model", tiny_clip)
    monkeypatch.setattr(encoder, "guess_preprocess", lambda *a: dataclasses.replace(
        real(*a), mean=(0.1, 0.2, 0.3), crop_height=20, crop_width=20))
    seen = _watch_the_load(monkeypatch, wait_for_a_decode=True)
    s = index(itr, tmp_path / "wrong", photos[0].parent, "--model", tiny_clip)
    assert (s["added"], s["skipped"]) == (4, 0) and seen["decoded_first"][0] is True
    assert seen["reads"] == 8  # each file decoded with the guess, then again
    right, wrong = stored(tmp_path / "right"), stored(tmp_path / "wrong")
    for path in right:
        assert np.array_equal(right[path], wrong[path])


def test_a_model_that_fails_to_load_beside_the_decodes_fails_the_run_cleanly(
        itr, tiny_clip, photos, tmp_path):
    """The load's error reaches the run as any model error: one line, exit 2... nothing bound."""
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_clip, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    r = itr("index", photos[0].parent, "--db", tmp_path / "lib", "--model", broken, "-q")
    assert r.code == 1 and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1, r
    assert "this is a bug" not in r.err and "cannot load model" in r.err, r.err
    from itrcli.store.db import Store

    s = Store(tmp_path / "lib")
    assert s.get_meta("model") is None and len(s.vectors()[0]) == 0
    s.close()
