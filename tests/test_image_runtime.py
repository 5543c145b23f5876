"""The image tower's runtime (embed/imagetower.py): for float32 on the CPU, once an export
of the model is in the per-machine tower cache, onnxruntime where the export timed it faster
on this CPU, torch otherwise; the export made at the start of a first run, before it loads
its encoder, and reused by other libraries; its vectors equal torch's; any failure falls
back to torch with one line under -v; `itr info` names the runtime; `itr eval` figures
unchanged."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import write_shapes
from itrcli.embed import clipvision, imageexport, imagetower, towercache

SPECS = [("red", "circle", "left", 1), ("blue", "square", "right", 2),
         ("green", "triangle", "top", 3), ("yellow", "circle", "bottom", 4),
         ("red", "square", "top", 5), ("blue", "triangle", "left", 6)]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv("ITR_IMAGE_RUNTIME", raising=False)
    monkeypatch.setenv("ITR_TEXT_EXPORT", "inline")  # the tiny models' exports in-process
    # these runs of six photos stand for a large run (the export is worth it from 1,000)
    monkeypatch.setattr(imagetower, "WORTH_EXPORTING", 1)
    # onnxruntime whatever the export timed for the tiny models (the timed choice has its
    # own test)
    monkeypatch.setattr(imagetower, "MIN_GAIN", 0.0)


@pytest.fixture
def photos(tmp_path):
    write_shapes(tmp_path / "photos", SPECS)
    return tmp_path / "photos"


def _vectors(db):
    from itrcli.library import Library

    with Library.open(db, readonly=True) as lib:
        pairs = sorted(lib.store.shown_paths().values())  # (path, id)
        ids, vecs = lib.store.vectors([i for _, i in pairs])
        by_id = dict(zip(np.asarray(ids).tolist(), vecs))
        return np.stack([np.asarray(by_id[i], dtype=np.float32) for _, i in pairs])


def _index(itr, photos, db, model, *extra):
    r = itr("index", photos, "--db", db, "-m", model, "--precision", "fp32", *extra)
    assert r.code == 0, r
    return r


def _info(itr, db):
    return itr("info", "--db", db, "--json").json()


def test_the_rule(monkeypatch):
    assert imagetower.wants_onnx("cpu", "fp32")
    assert not imagetower.wants_onnx("cpu", "bf16")  # torch's native bf16 kernels
    assert not imagetower.wants_onnx("cuda", "fp16") and not imagetower.wants_onnx("cuda:0", "fp32")
    monkeypatch.setenv("ITR_IMAGE_RUNTIME", "torch")
    assert not imagetower.wants_onnx("cpu", "fp32")
    monkeypatch.setenv("ITR_IMAGE_RUNTIME", "onnx")
    assert imagetower.wants_onnx("cpu", "fp32") and not imagetower.wants_onnx("cpu", "bf16")
    monkeypatch.setenv("ITR_IMAGE_RUNTIME", "tensorflow")
    assert imagetower.requested() == "auto"


def test_exported_once_and_reused_by_another_library(itr, tmp_path, photos, micro_clip, monkeypatch):
    made = []
    orig = imageexport.export
    monkeypatch.setattr(imageexport, "export", lambda *a, **k: made.append(1) or orig(*a, **k))
    r = _index(itr, photos, tmp_path / "lib1", micro_clip, "-v")
    # made before the run loaded its encoder: the first library of the model on this
    # machine is encoded by onnxruntime too
    exported = r.err.index("itr: image tower exported for onnxruntime")
    assert r.err.index("itr: image tower: onnxruntime") > exported
    assert "torch (no onnxruntime export" not in r.err
    assert _info(itr, tmp_path / "lib1")["image_runtime"] == "onnxruntime"
    entry = towercache.lookup(str(micro_clip), None, imagetower.KIND)
    assert entry is not None and (entry / imagetower.MODEL_FILE).is_file()
    done = json.loads((entry / towercache.DONE).read_text())
    assert done["format"] == imagetower.FORMAT and done["min_cosine"] >= imagetower.MIN_COSINE
    assert done["photos"] == len(SPECS)

    r = _index(itr, photos, tmp_path / "lib2", micro_clip, "-v")
    assert "itr: image tower: onnxruntime" in r.err and made == [1]  # not exported again
    info = _info(itr, tmp_path / "lib2")
    assert info["image_runtime"] == "onnxruntime"
    assert "encoder:   images by onnxruntime" in itr("info", "--db", tmp_path / "lib2").out
    a, b = _vectors(tmp_path / "lib1"), _vectors(tmp_path / "lib2")
    assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() > 0.9999
    # searches agree
    for q in ("a red circle", "a blue triangle"):
        hits = [itr("search", q, "--db", d, "-n", "3").out.split("\n") for d in (tmp_path / "lib1", tmp_path / "lib2")]
        assert [h.split("\t")[-1] for h in hits[0]] == [h.split("\t")[-1] for h in hits[1]]

    # forced torch, or bf16: torch even with the export there, and nothing exported
    monkeypatch.setenv("ITR_IMAGE_RUNTIME", "torch")
    _index(itr, photos, tmp_path / "lib3", micro_clip)
    assert _info(itr, tmp_path / "lib3")["image_runtime"] == "torch"
    monkeypatch.setenv("ITR_IMAGE_RUNTIME", "onnx")
    r = itr("index", photos, "--db", tmp_path / "lib4", "-m", micro_clip, "--precision", "bf16")
    assert r.code == 0 and _info(itr, tmp_path / "lib4")["image_runtime"] == "torch"
    assert made == [1]


@pytest.mark.parametrize("which", ["tiny_clip", "tiny_siglip", "micro_clip"])
def test_vectors_equal_torchs(request, tmp_path, photos, which, monkeypatch):
    """The export's vectors within cosine 0.99999 of torch's float32 ones, each, on real
    pixels, through the encoder an index run uses."""
    model = str(request.getfixturevalue(which))
    paths = sorted(str(p) for p in photos.iterdir())
    torch_enc = imageexport.torch_encoder(model, None)
    assert torch_enc.image_runtime == "torch"
    imageexport.export(torch_enc, paths[:3])
    from itrcli.embed.encoder import Encoder
    from itrcli.ingest.images import decode_file

    fast = Encoder(model, device="cpu", precision="fp32", towers="image")
    assert fast.image_runtime == "onnxruntime"
    px = np.stack([decode_file(p, fast.prep)[0] for p in paths])  # [n, 3, H, W]
    want, got = imageexport.torch_encoder(model, None).encode_pixels(px), fast.encode_pixels(px)
    assert got.shape == want.shape
    assert (got * want).sum(1).min() >= imagetower.MIN_COSINE
    # a batch of one too (the batch axis is dynamic)
    assert (fast.encode_pixels(px[:1]) * want[:1]).sum() >= imagetower.MIN_COSINE


def test_a_damaged_export_falls_back_to_torch(itr, tmp_path, photos, micro_clip, monkeypatch):
    _index(itr, photos, tmp_path / "first", micro_clip)  # exports
    monkeypatch.setenv("ITR_IMAGE_RUNTIME", "torch")
    _index(itr, photos, tmp_path / "torch", micro_clip)  # torch's vectors
    monkeypatch.delenv("ITR_IMAGE_RUNTIME")
    entry = towercache.lookup(str(micro_clip), None, imagetower.KIND)
    (entry / imagetower.MODEL_FILE).write_bytes(b"not an onnx model")
    r = _index(itr, photos, tmp_path / "lib", micro_clip, "-v")
    lines = [ln for ln in r.err.splitlines() if "onnxruntime export unusable" in ln]
    assert len(lines) == 1 and lines[0].startswith("itr: image tower: "), r.err
    assert _info(itr, tmp_path / "lib")["image_runtime"] == "torch"
    np.testing.assert_array_equal(_vectors(tmp_path / "lib"), _vectors(tmp_path / "torch"))
    # the damaged export was dropped, and the next run makes it again before encoding
    assert towercache.lookup(str(micro_clip), None, imagetower.KIND) is None
    _index(itr, photos, tmp_path / "again", micro_clip)
    entry = towercache.lookup(str(micro_clip), None, imagetower.KIND)
    assert entry is not None and (entry / imagetower.MODEL_FILE).read_bytes()[:4] != b"not "
    assert _info(itr, tmp_path / "again")["image_runtime"] == "onnxruntime"

    # weights that load but give other numbers: the check vector catches them
    check = json.loads((entry / imagetower.CHECK_FILE).read_text())
    check["vector"] = [-v for v in check["vector"]]
    (entry / imagetower.CHECK_FILE).write_text(json.dumps(check))
    r = _index(itr, photos, tmp_path / "lib2", micro_clip, "-v")
    assert "check vector off" in r.err and _info(itr, tmp_path / "lib2")["image_runtime"] == "torch"
    # without -v: not a word
    _index(itr, photos, tmp_path / "made", micro_clip)  # made again
    (towercache.lookup(str(micro_clip), None, imagetower.KIND) / imagetower.MODEL_FILE).write_bytes(b"x")
    r = _index(itr, photos, tmp_path / "lib3", micro_clip)
    assert "onnxruntime" not in r.err


def test_an_error_while_encoding_falls_back_to_torch(itr, tmp_path, photos, micro_clip, monkeypatch):
    _index(itr, photos, tmp_path / "first", micro_clip)  # exports
    monkeypatch.setenv("ITR_IMAGE_RUNTIME", "torch")
    _index(itr, photos, tmp_path / "torch", micro_clip)  # torch's vectors
    monkeypatch.delenv("ITR_IMAGE_RUNTIME")

    import onnxruntime

    def failing_run(*a, **k):
        raise onnxruntime.capi.onnxruntime_pybind11_state.Fail("boom")

    real_session = imagetower._session

    def session(d):
        s = real_session(d)
        check_run = s.run
        calls = []

        class S:
            def run(self, *a, **k):  # the load-time check passes, encoding fails
                calls.append(1)
                return check_run(*a, **k) if len(calls) == 1 else failing_run()

        return S()

    monkeypatch.setattr(imagetower, "_session", session)
    r = _index(itr, photos, tmp_path / "lib", micro_clip, "-v")
    lines = [ln for ln in r.err.splitlines() if "failed while encoding" in ln]
    assert len(lines) == 1, r.err
    assert _info(itr, tmp_path / "lib")["image_runtime"] == "torch"
    np.testing.assert_array_equal(_vectors(tmp_path / "lib"), _vectors(tmp_path / "torch"))


def test_eval_figures_unchanged(itr, tmp_path, micro_clip, monkeypatch):
    from test_eval import draw_set, write_formats

    items = draw_set(tmp_path / "imgs", 24)
    paths = write_formats(tmp_path / "ann", tmp_path / "imgs", items)
    imageexport.export(imageexport.torch_encoder(str(micro_clip), None),
                      [str(tmp_path / "imgs" / n) for n, _ in items[:4]])
    calls = []
    orig = imagetower.OnnxImageTower.__call__
    monkeypatch.setattr(imagetower.OnnxImageTower, "__call__",
                        lambda self, pixel_values: calls.append(1) or orig(self, pixel_values))
    figures = {}
    for runtime in ("torch", "onnx"):
        monkeypatch.setenv("ITR_IMAGE_RUNTIME", runtime)
        r = itr("eval", paths["karpathy"], "--images", tmp_path / "imgs", "-m", micro_clip,
                "--precision", "fp32", "-k", "1,5,10", "--no-cache", "--json")
        assert r.code == 0, r
        figures[runtime] = r.json()["results"][0]
    assert calls  # the onnx run's images went through onnxruntime
    for direction in ("t2i", "i2t"):
        for k, v in figures["torch"].get(direction, {}).items():
            assert abs(figures["onnx"][direction][k] - v) <= 0.1, (direction, k)


def test_a_quick_trace_that_fails_is_traced_again_the_usual_way(tmp_path, photos, micro_clip,
                                                                 monkeypatch):
    from itrcli.embed import onnxexport

    orig = onnxexport.trace
    tries: list[bool] = []

    def trace(*a, quick, **k):
        tries.append(quick)
        if quick:
            raise RuntimeError("the quick graph is wrong")
        return orig(*a, quick=quick, **k)

    monkeypatch.setattr(onnxexport, "trace", trace)
    enc = imageexport.torch_encoder(str(micro_clip), None)
    entry = imageexport.export(enc, sorted(photos.iterdir()), release=True)
    assert tries == [True, False]
    done = json.loads((entry / towercache.DONE).read_text())
    assert done["quick_trace"] is False and done["min_cosine"] >= imagetower.MIN_COSINE
    assert not list(entry.parent.glob("*.tmp*"))  # the failed try left nothing behind


def test_a_small_run_keeps_torch_and_leaves_the_export_to_a_large_one(itr, tmp_path, photos,
                                                                       micro_clip, monkeypatch):
    """The export costs more than it saves below WORTH_EXPORTING files: such a first run
    encodes with torch and makes none; the first large run makes it; ITR_IMAGE_RUNTIME=onnx
    makes it for any run."""
    monkeypatch.setattr(imagetower, "WORTH_EXPORTING", len(SPECS) + 1)
    _index(itr, photos, tmp_path / "small", micro_clip)
    assert _info(itr, tmp_path / "small")["image_runtime"] == "torch"
    assert towercache.lookup(str(micro_clip), None, imagetower.KIND) is None
    assert (tmp_path / "small" / "text").is_dir()  # the text tower's export is not held back

    monkeypatch.setattr(imagetower, "WORTH_EXPORTING", len(SPECS))
    _index(itr, photos, tmp_path / "large", micro_clip)
    assert _info(itr, tmp_path / "large")["image_runtime"] == "onnxruntime"
    assert towercache.lookup(str(micro_clip), None, imagetower.KIND) is not None

    towercache.remove(str(micro_clip), None, imagetower.KIND)
    monkeypatch.setattr(imagetower, "WORTH_EXPORTING", 10**9)
    monkeypatch.setenv("ITR_IMAGE_RUNTIME", "onnx")
    _index(itr, photos, tmp_path / "forced", micro_clip)
    assert _info(itr, tmp_path / "forced")["image_runtime"] == "onnxruntime"
    # a forced runtime times nothing
    entry = towercache.lookup(str(micro_clip), None, imagetower.KIND)
    assert json.loads((entry / towercache.DONE).read_text())["rates"] is None


def test_the_runtime_is_the_one_the_export_timed_faster_on_this_cpu(itr, tmp_path, photos,
                                                                    micro_clip, monkeypatch):
    """auto: onnxruntime only where the export timed it MIN_GAIN times torch's rate on this
    CPU; timings of another CPU, or none (an older export): onnxruntime, the rule."""
    _index(itr, photos, tmp_path / "lib1", micro_clip)
    entry = towercache.lookup(str(micro_clip), None, imagetower.KIND)
    done = json.loads((entry / towercache.DONE).read_text())
    rates = done["rates"]
    assert rates["torch"] > 0 and rates["onnxruntime"] > 0 and rates["photos"] == len(SPECS)
    assert rates["cpu"] == imagetower.cpu_identity()

    info = _info(itr, tmp_path / "lib1")  # what this machine timed, and what auto makes of it
    assert info["image_runtime_timing"] == {"torch": rates["torch"], "onnxruntime":
                                            rates["onnxruntime"], "photos": len(SPECS),
                                            "chosen": "onnxruntime"}
    line = [ln for ln in itr("info", "--db", tmp_path / "lib1").out.splitlines()
            if ln.startswith("encoder:")][0]
    assert "images by onnxruntime (timed here: onnxruntime " in line, line
    assert line.endswith("fp32 indexing here uses onnxruntime)"), line

    monkeypatch.setattr(imagetower, "MIN_GAIN", 1e9)  # onnxruntime timed too slow
    r = _index(itr, photos, tmp_path / "lib2", micro_clip, "-v")
    assert "itr: image tower: torch (timed on this CPU at the export: onnxruntime " in r.err, r.err
    assert _info(itr, tmp_path / "lib2")["image_runtime"] == "torch"
    assert _info(itr, tmp_path / "lib2")["image_runtime_timing"]["chosen"] == "torch"
    monkeypatch.setenv("ITR_IMAGE_RUNTIME", "onnx")  # forced: no timing asked
    _index(itr, photos, tmp_path / "lib3", micro_clip)
    assert _info(itr, tmp_path / "lib3")["image_runtime"] == "onnxruntime"
    monkeypatch.delenv("ITR_IMAGE_RUNTIME")

    for change, said in ((lambda d: d["rates"].update(cpu="0123456789abcdef"), "on another CPU"),
                         (lambda d: d.pop("rates"), "has no timings")):
        change(done)
        (entry / towercache.DONE).write_text(json.dumps(done))
        db = tmp_path / said.replace(" ", "-")
        r = _index(itr, photos, db, micro_clip, "-v")
        assert said in r.err and _info(itr, db)["image_runtime"] == "onnxruntime", r.err
        assert _info(itr, db)["image_runtime_timing"] is None  # no timing of this machine


@pytest.mark.parametrize("torch_rate, onnx_rate, chosen", [
    (20.0, 17.7, "torch"), (20.0, 20.9, "torch"), (20.0, 21.0, "onnxruntime"),
    (13.2, 17.7, "onnxruntime")])
def test_the_timed_choice_needs_a_real_gain(tmp_path, monkeypatch, torch_rate, onnx_rate, chosen):
    monkeypatch.setattr(imagetower, "MIN_GAIN", 1.05)
    (tmp_path / towercache.DONE).write_text(json.dumps({"rates": {
        "torch": torch_rate, "onnxruntime": onnx_rate, "cpu": imagetower.cpu_identity()}}))
    got, why = imagetower.timed_choice(tmp_path)
    assert got == chosen and f"onnxruntime {onnx_rate:.1f} img/s, torch {torch_rate:.1f}" in why


def test_timings_hold_only_for_the_instruction_sets_this_process_detects(tmp_path, monkeypatch):
    """CPUID masked for a process (bench/avx2only: AVX2 kernels on an AVX-512 CPU) gives it
    other kernels than /proc/cpuinfo's flags say: the timings of the unmasked CPU are not
    its own, and the other way round."""
    monkeypatch.setattr(imagetower, "MIN_GAIN", 1.05)
    (tmp_path / towercache.DONE).write_text(json.dumps({"rates": {
        "torch": 20.0, "onnxruntime": 17.0, "cpu": imagetower.cpu_identity()}}))
    assert imagetower.timed_choice(tmp_path)[0] == "torch"
    monkeypatch.setattr(imagetower, "_detected_isa", lambda: "AVX AVX2 F16C FMA3")
    got, why = imagetower.timed_choice(tmp_path)
    assert got == "onnxruntime" and "timed on another CPU" in why, why


def test_a_large_run_starts_torch_with_sleeping_threads(tmp_path, photos, micro_clip):
    """A run that may make the image export resolves its device (importing torch) before
    its encoder loads: torch's OpenMP must still start with OMP_WAIT_POLICY=PASSIVE (read
    once, at torch's first import).  A fresh process, through the library API."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    code = textwrap.dedent(f"""
        import os, sys
        seen = []
        def hook(event, args):
            if event == "import" and args[0] == "torch" and not seen:
                seen.append(os.environ.get("OMP_WAIT_POLICY"))
        sys.addaudithook(hook)
        from itrcli.embed import imagetower
        imagetower.WORTH_EXPORTING = 1  # six photos stand for a large run
        from itrcli.library import Library
        with Library.open({str(tmp_path / "lib")!r}, create=True) as lib:
            lib.index([{str(photos)!r}], model={str(micro_clip)!r}, device="auto",
                      precision="fp32")
        print(seen)
    """)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(ITR_TOWER_CACHE=str(tmp_path / "towers"), ITR_TEXT_EXPORT="inline",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "['PASSIVE']", r.stdout
    # the run took the large run's way: it made the image tower's export (in its own cache)
    assert list((tmp_path / "towers").glob(f"*/{imagetower.KIND}/{towercache.DONE}"))


def test_a_large_tower_is_exported_in_a_child_process(itr, tmp_path, photos, micro_clip,
                                                      monkeypatch):
    """A tower worth a child process (here forced: ITR_TEXT_EXPORT=child) is exported by
    one before the run loads its encoder; the run then encodes with it."""
    monkeypatch.setenv("ITR_TEXT_EXPORT", "child")
    made = []
    monkeypatch.setattr(imageexport, "export", lambda *a, **k: made.append(1))  # not in-process
    r = _index(itr, photos, tmp_path / "lib", micro_clip, "-v")
    assert "itr: image tower exported for onnxruntime" in r.err, r.err
    assert made == [] and _info(itr, tmp_path / "lib")["image_runtime"] == "onnxruntime"
    done = json.loads((towercache.lookup(str(micro_clip), None, imagetower.KIND)
                       / towercache.DONE).read_text())
    assert done["photos"] == len(SPECS) and done["rates"]["cpu"] == imagetower.cpu_identity()


def _encoder_in_fp32(model, precision: str = "fp32"):
    from itrcli.embed.encoder import Encoder

    return Encoder(str(model), device="cpu", precision=precision, towers="image")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("which", ["tiny_clip", "micro_clip"])
def test_the_plain_torch_clip_tower_gives_transformers_vectors(request, which, precision,
                                                                monkeypatch):
    """CPU indexing on torch runs CLIP's image tower in plain torch (embed/clipvision: no
    import of transformers' modeling), with transformers' vectors: in fp32, and in bf16 as
    transformers' bf16 tower gives them (its own tolerance: the two round alike)."""
    import torch

    from itrcli.constants import BF16_MIN_COSINE

    monkeypatch.setenv("ITR_IMAGE_RUNTIME", "torch")
    enc = _encoder_in_fp32(request.getfixturevalue(which), precision)
    assert enc.image_runtime == "torch" and enc._image.module is None  # the plain tower
    theirs = enc._tower("image", enc.dtype)
    x = torch.from_numpy(np.random.default_rng(7).random(
        (6, 3, enc.prep.crop_height, enc.prep.crop_width), dtype=np.float32)).to(enc.dtype)
    with torch.inference_mode():
        ours = enc._image(pixel_values=x)
        cos = torch.nn.functional.cosine_similarity(ours.float(), theirs(pixel_values=x).float(),
                                                    dim=-1)
    assert ours.dtype == enc.dtype
    assert float(cos.min()) >= (0.99999 if precision == "fp32" else 0.999)
    if precision == "bf16":  # and within bf16's tolerance of the float32 vectors
        with torch.inference_mode():
            f32 = enc._tower("image", torch.float32)(pixel_values=x.float())
        cos = torch.nn.functional.cosine_similarity(ours.float(), f32, dim=-1)
        assert float(cos.min()) >= BF16_MIN_COSINE


@pytest.mark.parametrize("where,precision", [("folder", "fp32"), ("hub cache", "fp32"),
                                             ("folder", "bf16")])
def test_loading_the_plain_tower_imports_no_transformers(tiny_clip, tmp_path, where, precision):
    """An image-only CLIP encoder in fp32 or bf16 on the CPU reads config.json itself:
    transformers is not imported at all (0.9 s of an index run's start), and a hub model's
    revision is still the snapshot's commit."""
    import subprocess
    import sys

    env = {**os.environ, "ITR_IMAGE_RUNTIME": "torch"}
    model, commit = str(tiny_clip), None
    if where == "hub cache":
        model, commit = "itr-test/tiny-clip", "c" * 40
        cache = tmp_path / "hub" / "models--itr-test--tiny-clip"
        shutil.copytree(tiny_clip, cache / "snapshots" / commit)
        (cache / "refs").mkdir()
        (cache / "refs" / "main").write_text(commit)
        env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    code = ("import sys; from itrcli.embed.encoder import Encoder; "
            f"e = Encoder({model!r}, device='cpu', precision={precision!r}, towers='image'); "
            "print(e._image.module is None, e.revision, e.dim, "
            "sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')[:3])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", str(commit), "32", "[]"], r.stdout


@pytest.mark.parametrize("model", ["not/a folder/nor a hub id", "missing-org/missing-model"])
def test_an_image_only_encoder_of_a_missing_model_is_the_model_error(tmp_path, model, monkeypatch):
    """The plain config.json read gives way to transformers' load, whose one-line model
    error names the model (a path that is no hub id raised HFValidationError here)."""
    from itrcli.errors import ModelError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot load model"):
        _encoder_in_fp32(tmp_path / model if "folder" in model else model)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("which", ["tiny_clip", "tiny_siglip"])
def test_the_preload_imports_what_the_encoder_will(request, which, precision):
    """encoder.preload (beside the text tower's export child) imports no transformers for a
    CLIP checkpoint in fp32 or bf16 on the CPU, whose encoder reads config.json itself; a
    SigLIP one still gets transformers' configuration."""
    import subprocess
    import sys

    model = str(request.getfixturevalue(which))
    code = ("import sys; from itrcli.embed.encoder import preload; "
            f"preload({model!r}, 'cpu', {precision!r}); print('transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == str(which == "tiny_siglip"), r.stdout


def _config_fields(c):
    v, t = c.vision_config, c.text_config
    return ([c.model_type, c.projection_dim] + [getattr(t, k) for k in clipvision.TEXT_DEFAULTS]
            + [getattr(v, k) for k in clipvision.VISION_DEFAULTS])


@pytest.mark.parametrize("vision, text", [
    ({}, {}), ({"hidden_act": "gelu", "layer_norm_eps": 1e-6}, {"hidden_act": "gelu"}),
    ({"image_size": 336, "patch_size": 14, "hidden_size": 1024, "num_hidden_layers": 24,
      "num_attention_heads": 16, "intermediate_size": 4096},
     {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
      "layer_norm_eps": 1e-6, "eos_token_id": 2, "vocab_size": 1000})])
def test_the_plain_config_reads_what_transformers_reads(tmp_path, micro_clip, vision, text):
    """clipvision.read_config gives transformers' CLIPConfig values for every setting it
    reads: those config.json spells out, and the defaults transformers leaves out."""
    from transformers import CLIPConfig

    for source in (micro_clip, tmp_path / "saved"):
        if source != micro_clip:
            CLIPConfig(vision_config=vision, text_config=text,
                       projection_dim=64).save_pretrained(source)
        path = str(Path(source) / "config.json")
        assert _config_fields(clipvision.read_config(path)) == \
            _config_fields(CLIPConfig.from_pretrained(source))
    text = json.loads((tmp_path / "saved" / "config.json").read_text())
    text["vision_config_dict"] = {"hidden_size": 64}  # the old spelling: transformers reads it
    (tmp_path / "old" / "config.json").parent.mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(text))
    with pytest.raises(clipvision.Unsupported):
        clipvision.read_config(str(tmp_path / "old" / "config.json"))


def test_freed_tensor_blocks_stay_in_the_heap():
    """embed/heap: after keep_tensor_blocks, a block of an activation's size freed and
    allocated again is not faulted in afresh (glibc gives it back to the kernel by
    default)."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc only")
    code = """
import ctypes, resource, sys
from itrcli.embed.heap import keep_tensor_blocks
kept = keep_tensor_blocks() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for size in (20 << 20, 3 << 20, 20 << 20, 3 << 20, 20 << 20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(p)
print(kept, faults[2] + faults[4])
"""
    kept = subprocess.run([sys.executable, "-c", code, "keep"], capture_output=True, text=True, timeout=60)
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.split()[0] == "True" and int(kept.stdout.split()[1]) < 200, kept.stdout
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "0"}  # the user's setting stands
    mine = subprocess.run([sys.executable, "-c", code, "keep"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert mine.stdout.split()[0] == "False", mine.stdout


def test_a_clip_the_plain_tower_does_not_know_gets_transformers(tiny_clip, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("ITR_IMAGE_RUNTIME", "torch")
    model = tmp_path / "relu-clip"
    shutil.copytree(tiny_clip, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = "relu"
    (model / "config.json").write_text(json.dumps(cfg))
    enc = _encoder_in_fp32(model)
    assert enc._image.module is not None  # transformers' tower
    (model / "model.safetensors").rename(model / "elsewhere.safetensors")
    cfg["vision_config"]["hidden_act"] = "quick_gelu"
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception):  # no weights at all: the usual model error, from transformers
        _encoder_in_fp32(model)
