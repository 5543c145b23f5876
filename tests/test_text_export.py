"""The text tower's ONNX export during `itr index`: in a child process (large towers, here
forced with ITR_TEXT_EXPORT=child) or in the run itself (small ones); what a failed export
leaves (an intact index, searches through torch) and its retries; the run's image-only
encoder."""

from __future__ import annotations

import shutil
import sys
import time

import numpy as np
import pytest

from conftest import write_shapes, posix_only

SPECS = [("red", "circle", "left", 1), ("blue", "square", "right", 2),
         ("green", "triangle", "top", 3), ("yellow", "circle", "bottom", 4)]
TEXTS = ["a red circle on the left", "a blue square", "green", "two children on a lawn"]


@pytest.fixture
def photos(tmp_path):
    write_shapes(tmp_path / "photos", SPECS)
    return tmp_path / "photos"


@pytest.fixture
def towers_loaded(monkeypatch):
    """Which towers this process loads: ``["image", "text", ...]``."""
    from itrcli.embed.encoder import Encoder

    seen: list[str] = []
    orig = Encoder._tower

    def spy(self, which, *a, **k):
        seen.append(which)
        return orig(self, which, *a, **k)

    plain = Encoder._plain_clip_tower

    def spy_plain(self):  # the image tower in plain torch (fp32 CPU) is loaded too
        tower = plain(self)
        if tower is not None:
            seen.append("image")
        return tower

    monkeypatch.setattr(Encoder, "_tower", spy)
    monkeypatch.setattr(Encoder, "_plain_clip_tower", spy_plain)
    return seen


def onnx_equals_torch(db) -> None:
    """Searches use the exported tower, and it gives torch's fp32 vectors and ranking."""
    from itrcli import Library
    from itrcli.embed.textonnx import OnnxTextEncoder

    with Library.open(db, readonly=True) as L:
        enc = L.text_encoder()
        assert isinstance(enc, OnnxTextEncoder)
        onnx = enc.encode_texts(TEXTS)
        torch = L.encoder(precision="fp32").encode_texts(TEXTS)
        np.testing.assert_allclose(onnx, torch, atol=1e-4)
        ids, vecs = L.store.vectors()
        assert [h.id for h in L.search(TEXTS[0], top=4)] == [
            int(i) for i in ids[np.argsort(-(vecs @ torch[0]), kind="stable")]]


def searches_through_torch(itr, db) -> None:
    from itrcli import Library
    from itrcli.embed.textonnx import OnnxTextEncoder

    with Library.open(db, readonly=True) as L:
        assert not isinstance(L.text_encoder(), OnnxTextEncoder)
        assert L.check().ok
    r = itr("search", TEXTS[0], "--db", db, "--json", "-n", "4")
    assert r.code == 0 and len(r.json()["results"]) == 4, r


def test_first_run_exports_in_a_child_and_never_loads_the_text_tower(
        itr, tiny_clip, photos, tmp_path, monkeypatch, towers_loaded):
    monkeypatch.setenv("ITR_TEXT_EXPORT", "child")
    db = tmp_path / "lib"
    r = itr("index", photos, "--db", db, "-m", tiny_clip, "--json", "-q")
    assert r.code == 0 and r.json()["added"] == 4, r
    assert towers_loaded == ["image"]  # the tower on disk was written by the child
    assert itr("info", "--db", db, "--json").json()["fast_text_search"] is True
    assert not list(db.glob(".text.tmp*"))
    onnx_equals_torch(db)


def test_while_the_child_exports_the_run_imports_what_its_encoder_needs(
        itr, tiny_clip, photos, tmp_path, monkeypatch):
    """The run waits on the export child before it loads its encoder: meanwhile a thread
    imports torch and transformers (encoder.preload: its model classes too, unless the
    run is fp32 on the CPU); one that fails costs the run nothing (the encoder's own
    loading imports them again)."""
    import threading

    from itrcli.embed import encoder

    monkeypatch.setenv("ITR_TEXT_EXPORT", "child")
    calls = []
    real = encoder.preload

    def preload(*args):
        calls.append(threading.current_thread().name)
        real(*args)

    monkeypatch.setattr(encoder, "preload", preload)
    r = itr("index", photos, "--db", tmp_path / "lib", "-m", tiny_clip, "-q")
    assert r.code == 0 and calls == ["itr-preload"], (r, calls)

    def broken(*args):
        calls.append("broken")
        raise ImportError("no transformers here")

    monkeypatch.setattr(encoder, "preload", broken)
    # a machine that has not exported this model yet (the first run's export is cached)
    monkeypatch.setenv("ITR_TOWER_CACHE", str(tmp_path / "other-machine"))
    r = itr("index", photos, "--db", tmp_path / "lib2", "-m", tiny_clip, "--json", "-q")
    assert r.code == 0 and r.json()["added"] == 4 and calls[-1] == "broken", r
    assert r.err == ""
    onnx_equals_torch(tmp_path / "lib2")


def test_small_tower_is_exported_by_the_run_itself(itr, tiny_clip, photos, tmp_path, monkeypatch,
                                                   towers_loaded):
    monkeypatch.delenv("ITR_TEXT_EXPORT", raising=False)
    db = tmp_path / "lib"
    assert itr("index", photos, "--db", db, "-m", tiny_clip, "-q").code == 0
    assert towers_loaded == ["image", "text"]  # text: in float32, for the export, after encoding
    onnx_equals_torch(db)


@pytest.mark.parametrize("model", ["tiny_clip", "tiny_siglip"])
def test_image_tower_alone_gives_the_two_tower_vectors(model, request):
    from itrcli.embed.encoder import Encoder

    path = str(request.getfixturevalue(model))
    both = Encoder(path, device="cpu", precision="fp32")
    image = Encoder(path, device="cpu", precision="fp32", towers="image")
    p = both.prep
    x = np.random.default_rng(0).standard_normal(
        (3, 3, p.crop_height or p.height, p.crop_width or p.width)).astype(np.float32)  # [n, 3, H, W]
    # CLIP's image-only encoder runs itr's plain tower, whose last layer works on the class
    # token alone: the two-tower model's vectors up to float rounding (SigLIP's: exactly)
    np.testing.assert_allclose(image.encode_pixels(x), both.encode_pixels(x), rtol=0, atol=1e-6)
    # and its text side, loaded on first use, is the two-tower model's
    np.testing.assert_array_equal(image.encode_texts(TEXTS), both.encode_texts(TEXTS))
    assert image.info == both.info


def test_failed_child_export_keeps_the_index_and_is_retried(itr, tiny_clip, photos, tmp_path,
                                                            monkeypatch):
    from itrcli.embed import textonnx

    monkeypatch.setenv("ITR_TEXT_EXPORT", "child")
    broken = tmp_path / "broken-model"  # the child reads this: a checkpoint it cannot load
    shutil.copytree(tiny_clip, broken)
    (broken / "model.safetensors").write_bytes(b"not a checkpoint")
    orig = textonnx.start
    monkeypatch.setattr(textonnx, "start", lambda model, d, **k: orig(str(broken), d, **k))
    db = tmp_path / "lib"
    r = itr("index", photos, "--db", db, "-m", tiny_clip, "--json", "-q")
    assert r.code == 0 and r.json()["added"] == 4 and r.json()["skipped"] == 0, r
    assert not (db / "text").exists() and not list(db.glob(".text.tmp*"))
    searches_through_torch(itr, db)
    monkeypatch.setattr(textonnx, "start", orig)
    r = itr("index", photos, "--db", db, "--json", "-q")  # nothing to embed: export only
    assert r.code == 0 and r.json()["unchanged"] == 4, r
    onnx_equals_torch(db)


def test_failed_export_is_retried_then_given_up(itr, tiny_clip, photos, tmp_path, monkeypatch):
    from itrcli.embed import textonnx
    from itrcli.library import EXPORT_TRIES

    monkeypatch.setenv("ITR_TEXT_EXPORT", "inline")
    calls = []

    def failing(*a, **k):
        calls.append(1)
        raise RuntimeError("simulated export failure")

    orig = textonnx.export
    monkeypatch.setattr(textonnx, "export", failing)
    db = tmp_path / "lib"
    assert itr("index", photos, "--db", db, "-m", tiny_clip, "-q").code == 0
    searches_through_torch(itr, db)
    for _ in range(EXPORT_TRIES):  # each run tries again, up to EXPORT_TRIES in all
        assert itr("index", photos, "--db", db, "-q").code == 0
    assert len(calls) == EXPORT_TRIES
    assert not (db / "text").exists()
    monkeypatch.setattr(textonnx, "export", orig)
    assert itr("index", photos, "--db", db, "-q").code == 0
    assert not (db / "text").exists()  # given up: no run pays for it again...
    assert itr("index", photos, "--db", db, "-q", "--reindex").code == 0
    onnx_equals_torch(db)  # ...until --reindex starts afresh


def test_run_that_finds_no_image_keeps_no_tower(itr, tiny_clip, tmp_path, monkeypatch):
    """The child starts before the walk; a library left unbound keeps no tower (a later run
    may bind it to another model)."""
    monkeypatch.setenv("ITR_TEXT_EXPORT", "child")
    (tmp_path / "empty").mkdir()
    db = tmp_path / "lib"
    assert itr("index", tmp_path / "empty", "--db", db, "-m", tiny_clip, "-q").code == 0
    assert not (db / "text").exists() and not list(db.glob(".text.tmp*"))


@posix_only("kills a process with SIGKILL, which Windows does not have")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_export_child_dies_with_its_run(tiny_clip, tmp_path):
    """A run killed with -9 leaves no export process behind to write into the library."""
    import signal
    import subprocess
    import time

    code = ("import sys, time; from itrcli.embed import textonnx\n"
            "e = textonnx.start(sys.argv[1], sys.argv[2])\n"
            "print(e.proc.pid, flush=True); time.sleep(120)")
    run = subprocess.Popen([sys.executable, "-c", code, str(tiny_clip), str(tmp_path)],
                           stdout=subprocess.PIPE, text=True)
    child = int(run.stdout.readline())
    run.send_signal(signal.SIGKILL)
    run.wait()

    def alive() -> bool:
        try:
            with open(f"/proc/{child}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 30
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive()
    assert not (tmp_path / "text").exists()


@pytest.mark.parametrize("model", ["clip", "siglip2"])
def test_quick_trace_gives_torch_vectors_at_any_batch_and_length(model, request, tmp_path,
                                                                  monkeypatch):
    from itrcli.embed import textonnx
    from itrcli.embed.encoder import Encoder
    from support import synth

    path = (request.getfixturevalue("tiny_clip") if model == "clip"
            else synth.make_tiny_siglip2(tmp_path / "siglip2"))

    tries: list[bool] = []
    orig = textonnx._export
    monkeypatch.setattr(textonnx, "_export", lambda *a, **k: tries.append(k["quick"]) or orig(*a, **k))
    enc = Encoder(str(path), device="cpu", precision="fp32")
    textonnx.export(enc, tmp_path / "lib")
    assert tries == [True]  # kept: it gave torch's vectors
    onnx = textonnx.OnnxTextEncoder(tmp_path / "lib")
    for texts in (TEXTS[:1], TEXTS, TEXTS * 5 + ["a much longer caption " * 4]):
        np.testing.assert_allclose(onnx.encode_texts(texts), enc.encode_texts(texts), atol=1e-4)


def test_a_quick_trace_that_differs_is_traced_again_the_usual_way(tiny_clip, tmp_path, monkeypatch):
    from itrcli.embed import textonnx
    from itrcli.embed.encoder import Encoder

    tries: list[bool] = []
    orig_export, orig_verify = textonnx._export, textonnx._verify
    monkeypatch.setattr(textonnx, "_export", lambda *a, **k: tries.append(k["quick"]) or orig_export(*a, **k))

    def verify(d, checks):
        if len(tries) == 1:  # the quick graph "differs"
            raise RuntimeError("exported text tower differs from torch by 1.0e+00")
        orig_verify(d, checks)

    monkeypatch.setattr(textonnx, "_verify", verify)
    enc = Encoder(str(tiny_clip), device="cpu", precision="fp32")
    textonnx.export(enc, tmp_path, release=True)  # released: the second try reads it again
    assert tries == [True, False]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text"]  # no half-written copy left
    np.testing.assert_allclose(textonnx.OnnxTextEncoder(tmp_path).encode_texts(TEXTS),
                               enc.encode_texts(TEXTS), atol=1e-4)
    import torch

    assert torch._C._jit_pass_onnx_graph_shape_type_inference.__name__ != "<lambda>"  # restored


def test_the_run_exports_its_text_tower_while_it_holds_no_image_tower(
        itr, tiny_clip, tmp_path, monkeypatch):
    """Nothing exports beside the encoding: the text tower's child runs before the run
    loads its encoder (the two peaks of memory never add up), once per run."""
    from itrcli.embed import textonnx
    from itrcli.library import Library

    monkeypatch.setenv("ITR_TEXT_EXPORT", "child")
    monkeypatch.setenv("ITR_TOWER_CACHE", str(tmp_path / "towers"))
    write_shapes(tmp_path / "photos", [("red", "circle", "left", 1), ("blue", "square", "right", 2)])
    held: list[bool] = []
    orig = textonnx.start
    lib = Library.open(tmp_path / "lib", create=True)

    def start(*a, **k):
        held.append(lib._encoder is not None)
        return orig(*a, **k)

    monkeypatch.setattr(textonnx, "start", start)
    with lib:
        assert lib.index([str(tmp_path / "photos")], model=str(tiny_clip)).embedded == 2
    assert held == [False]
    onnx_equals_torch(tmp_path / "lib")




@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_export_child_dies_with_its_parent_where_no_signal_tells_it(tmp_path):
    """A killed run leaves no export child behind, of either tower: where the kernel's
    parent-death signal is not available (macOS, Windows; here sys.platform says so), the
    child's own watch ends it once its parent is gone."""
    import subprocess

    ready = tmp_path / "child.pid"
    child = ("import os, sys, time; sys.platform = 'darwin'; "
             "from itrcli.embed.onnxexport import die_with; die_with(int(sys.argv[1])); "
             f"open({str(ready)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    parent = ("import os, subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid())]); "
              f"[time.sleep(0.05) for _ in range(600) if not os.path.exists({str(ready)!r})]; "
              "os._exit(0)")  # gone without a word to its child, as a killed run is
    subprocess.run([sys.executable, "-c", parent, child], check=True, timeout=60)
    pid = int(ready.read_text())

    def alive() -> bool:
        try:
            with open(f"/proc/{pid}/status") as f:
                return not any(line.startswith("State:") and "Z" in line for line in f)
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30  # a guard against hanging, not a timing
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(), "the export child outlived its parent"


def test_an_export_of_an_older_format_is_made_again_by_the_next_run(itr, tiny_clip, photos,
                                                                    tmp_path, monkeypatch):
    import json

    from itrcli.embed import textonnx

    monkeypatch.delenv("ITR_TEXT_EXPORT", raising=False)
    monkeypatch.setenv("ITR_TOWER_CACHE", str(tmp_path / "cache"))
    db = tmp_path / "lib"
    assert itr("index", photos, "--db", db, "-m", tiny_clip, "-q").code == 0
    settings_file = db / "text" / textonnx.SETTINGS_FILE
    settings = json.loads(settings_file.read_text())
    assert settings["format"] == textonnx.CACHE_FORMAT
    # as an earlier itr left it: no format, the whole tower with its mask
    del settings["format"], settings["lean"]
    settings_file.write_text(json.dumps(settings))
    shutil.rmtree(tmp_path / "cache")
    onnx_equals_torch(db)  # it still answers
    r = itr("index", photos, "--db", db, "--json", "-q")
    assert r.code == 0 and r.json()["added"] == 0, r
    settings = json.loads(settings_file.read_text())
    assert settings["format"] == textonnx.CACHE_FORMAT and settings["lean"] is True
    onnx_equals_torch(db)


def test_models_are_read_and_run_under_one_lock(tiny_clip, tmp_path, monkeypatch):
    """transformers' lazy imports are not safe from two threads, and a load sets torch's
    default dtype for the whole process while it runs: itr serve --watch's index run and a
    search that loads the torch text tower (a new library, no exported tower yet) broke
    each other (tests/test_serve.py's --watch test, every time without the lock).  Every
    read of a model, torch tower run and export holds ``encoder.LOADING``."""
    from itrcli.embed import encoder, textonnx
    from itrcli.embed.encoder import LOADING, Encoder

    held: list[tuple[str, bool]] = []

    def spy(name, fn):
        def wrapped(*a, **k):
            held.append((name, LOADING._is_owned()))
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(Encoder, "_from_pretrained", spy("weights", Encoder._from_pretrained))
    monkeypatch.setattr(Encoder, "_load_tokenizer", spy("tokenizer", Encoder._load_tokenizer))
    monkeypatch.setattr(Encoder, "_transformers_config",
                        spy("config", Encoder._transformers_config))
    monkeypatch.setattr(Encoder, "_text_features", spy("text tower", Encoder._text_features))
    monkeypatch.setattr(textonnx, "_export", spy("export", textonnx._export))
    enc = Encoder(str(tiny_clip), device="cpu", precision="bf16", towers="image")
    enc.encode_texts(TEXTS)  # the tokenizer and the text tower, loaded on first use
    textonnx.export(enc, tmp_path)  # the float32 text tower read again
    assert {n for n, _ in held} >= {"weights", "tokenizer", "config", "text tower", "export"}
    assert all(owned for _, owned in held), held
    assert not LOADING._is_owned() and encoder.LOADING is LOADING
