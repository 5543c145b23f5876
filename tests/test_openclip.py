"""open_clip checkpoints (embed/openclip.py): local folders and hf-hub: ids, safetensors
only, preprocessing equal to open_clip's own ``preprocess_val``, the ONNX text tower equal
to torch, and the commands that read vectors working on such a library.

open_clip imports torchvision, whose wheels here do not load beside the CPU torch of the
main test environment.  CI makes a second environment (.ci/run: a venv over the system's
site-packages with torch 2.14.1 and torchvision 0.29.1, a pair that loads together, from the
package index) and points ITR_OPENCLIP_PYTHON at it: where open_clip cannot be imported,
:func:`test_openclip_suite_in_its_own_environment` runs this file there, for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_shapes

HERE = Path(__file__).resolve().parent


def _open_clip_here() -> bool:
    try:
        import open_clip  # noqa: F401
    except Exception:
        return False
    return True


HAVE = _open_clip_here()
needs = pytest.mark.skipif(not HAVE, reason="open_clip not importable here (see the module doc)")

SPECS = [("red", "circle", "left", 1), ("blue", "square", "right", 2),
         ("green", "triangle", "top", 3), ("yellow", "star", "bottom", 4)]
TEXTS = ["a red circle on the left", "a blue square", "Two children, on a LAWN!", "赤い円 über"]


def test_openclip_suite_in_its_own_environment():
    """Where this interpreter cannot import open_clip, the tests below run in the one
    ITR_OPENCLIP_PYTHON names (CI's); under CI=true its absence is a failure."""
    if HAVE:
        pytest.skip("open_clip imports here: the tests below run in this process")
    py = os.environ.get("ITR_OPENCLIP_PYTHON")
    if not py:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but ITR_OPENCLIP_PYTHON is not set (.ci/run makes it)")
        pytest.skip("open_clip not importable and ITR_OPENCLIP_PYTHON not set")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    r = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                       capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=1500)
    print(r.stdout[-3000:], r.stderr[-2000:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


@pytest.fixture(scope="module", params=["vit", "mobileclip", "squash"])
def oc_model(request, tmp_path_factory):
    from support import synth

    return synth.make_tiny_openclip(tmp_path_factory.mktemp("models") / f"oc-{request.param}",
                                    kind=request.param)


@pytest.fixture(scope="module")
def oc_vit(tmp_path_factory):
    from support import synth

    return synth.make_tiny_openclip(tmp_path_factory.mktemp("models") / "oc-vit", kind="vit")


def _reference(model_dir: Path, path: Path) -> np.ndarray:
    """open_clip's own pipeline: its preprocess_val on the file, its model, fp32."""
    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess_val = open_clip.create_model_and_transforms("local-dir:" + str(model_dir))
    with torch.no_grad():
        x = preprocess_val(Image.open(path)).unsqueeze(0)
        return model.eval().encode_image(x, normalize=True)[0].numpy()


@needs
def test_vectors_equal_open_clips_own_pipeline(itr, oc_model, tmp_path):
    """Indexed vectors (itr's decode and preprocessing) against open_clip's preprocess_val
    and model on the same files: cosine >= 0.9999, fp32.  Odd sizes exercise the centre
    crop's rounding; a large JPEG exercises itr's draft-mode decode."""
    from support import synth

    from itrcli import Library

    photos = tmp_path / "photos"
    photos.mkdir()
    files = []
    for i, (w, h) in enumerate([(97, 61), (61, 97), (300, 211), (1632, 1224)]):
        p = photos / f"p{i}.jpg" if w > 1000 else photos / f"p{i}.png"
        if w > 1000:
            synth.make_photo(p, w, h, seed=i)
        else:
            synth.draw("red", "star", "left", size=max(w, h), seed=i).resize((w, h)).save(p)
        files.append(p)
    db = tmp_path / "lib"
    r = itr("index", photos, "--db", db, "-m", oc_model, "--precision", "fp32", "-q")
    assert r.code == 0, r
    with Library.open(db, readonly=True) as L:
        assert L.store.get_meta("model_type") == "open_clip"
        for p in files:
            got = L.stored_vector(str(p))
            want = _reference(oc_model, p)
            cos = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
            assert cos >= 0.9999, (p.name, cos)


@needs
def test_text_tower_export_equals_torch(itr, oc_model, tmp_path):
    """The ONNX text tower gives open_clip's token ids and its fp32 vectors; searches use it."""
    from itrcli import Library
    from itrcli.embed.textonnx import OnnxTextEncoder

    write_shapes(tmp_path / "photos", SPECS)
    db = tmp_path / "lib"
    assert itr("index", tmp_path / "photos", "--db", db, "-m", oc_model, "-q").code == 0
    assert OnnxTextEncoder.available(db)
    with Library.open(db, readonly=True) as L:
        onnx = L.text_encoder()
        assert isinstance(onnx, OnnxTextEncoder)
        fp32 = L.encoder(precision="fp32")
        ids, _ = onnx.tokenize(TEXTS)
        want = fp32.tokenize(TEXTS)["input_ids"].numpy()  # [n, 77]: open_clip pads to 77
        # a causal tower that pools the end token runs on the longest text's tokens alone
        # (embed/cliptext.py); MobileCLIP's attend to their padding: 77
        short = "mobileclip" not in oc_model.name
        assert onnx.settings["padding"] == ("longest" if short else "max_length")
        assert onnx.settings["lean"] is short
        assert (ids.shape[1] < 77) is short
        np.testing.assert_array_equal(ids, want[:, :ids.shape[1]])
        assert (want[:, ids.shape[1]:] == 0).all()
        torch_vecs = fp32.encode_texts(TEXTS)
        np.testing.assert_allclose(onnx.encode_texts(TEXTS), torch_vecs, atol=1e-5)
        for t in TEXTS:  # each alone, at its own length
            np.testing.assert_allclose(onnx.encode_texts([t]), fp32.encode_texts([t]), atol=1e-5)
        vids, vecs = L.store.vectors()
        assert [h.id for h in L.search(TEXTS[0], top=4, exact=True)] == [
            int(i) for i in vids[np.argsort(-(vecs @ torch_vecs[0]), kind="stable")]]


@needs
def test_open_clip_reference_text_equals_ours(oc_vit):
    """Our encoder's text vectors are open_clip's encode_text of its own tokenizer's ids."""
    import open_clip
    import torch

    from itrcli.embed.encoder import Encoder

    enc = Encoder(str(oc_vit), device="cpu", precision="fp32")
    model = open_clip.create_model("local-dir:" + str(oc_vit)).eval()
    tok = open_clip.get_tokenizer("local-dir:" + str(oc_vit))
    with torch.no_grad():
        want = model.encode_text(tok(TEXTS), normalize=True).numpy()
    np.testing.assert_allclose(enc.encode_texts(TEXTS), want, atol=1e-6)


@needs
def test_image_tower_alone_reads_no_text_weights(oc_vit):
    from itrcli.embed.encoder import Encoder

    both = Encoder(str(oc_vit), device="cpu", precision="fp32")
    image = Encoder(str(oc_vit), device="cpu", precision="fp32", towers="image")
    assert image._net.transformer is None and image._net.token_embedding is None
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(image.encode_pixels(x), both.encode_pixels(x))


@needs
def test_pickled_weights_are_never_loaded(itr, oc_vit, tmp_path):
    import shutil

    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(oc_vit / "open_clip_config.json", d)
    (d / "open_clip_pytorch_model.bin").write_bytes(b"not to be unpickled")
    write_shapes(tmp_path / "photos", SPECS[:1])
    r = itr("index", tmp_path / "photos", "--db", tmp_path / "lib", "-m", d)
    assert r.code == 1 and "never loads pickled" in r.err, r


def _fake_hub(oc_vit: Path, repo: str, commit: str) -> None:
    """``repo`` at ``commit`` in the (test's own) Hugging Face cache, as a download leaves it."""
    import shutil

    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copy(oc_vit / f, snap / f)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


@needs
def test_hf_hub_id_from_the_local_cache(itr, oc_vit, tmp_path):
    """``-m hf-hub:ORG/NAME``: read from the cache offline; the library records the commit,
    exports the text tower, and `itr info` names the model."""
    from itrcli import Library

    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub(oc_vit, "someorg/tiny-openclip", commit)
    write_shapes(tmp_path / "photos", SPECS)
    db = tmp_path / "lib"
    r = itr("index", tmp_path / "photos", "--db", db, "-m", "hf-hub:someorg/tiny-openclip", "-q")
    assert r.code == 0, r
    with Library.open(db, readonly=True) as L:
        assert L.model == "hf-hub:someorg/tiny-openclip"
        assert L.store.get_meta("model_revision") == commit
        assert L.info()["fast_text_search"]
    r = itr("search", "a red circle", "--db", db, "--json", "-n", "2")
    assert r.code == 0 and len(r.json()["results"]) == 2, r
    missing = itr("index", tmp_path / "photos", "--db", tmp_path / "lib2", "-m", "hf-hub:someorg/absent")
    assert missing.code == 1 and "hf-hub:someorg/absent" in missing.err, missing


@needs
def test_commands_on_an_open_clip_library(itr, oc_vit, tmp_path):
    """eval (with --hash-bits), hash, adapt and re-ranking run on such a library."""
    from support import synth

    specs = [(*c, i) for i, c in enumerate(synth.combinations()[:12])]
    paths = write_shapes(tmp_path / "photos", specs)
    db = tmp_path / "lib"
    assert itr("index", tmp_path / "photos", "--db", db, "-m", oc_vit, "-q").code == 0
    captions = tmp_path / "captions.csv"
    captions.write_text("image,caption\n" + "".join(
        f"{p.name},{synth.caption(*s[:3])}\n" for p, s in zip(paths, specs)))
    r = itr("eval", captions, "--images", tmp_path / "photos", "-m", oc_vit, "--json",
            "--hash-bits", "32")
    assert r.code == 0, r
    r = itr("hash", paths[0], "--db", db, "--bits", "32")
    assert r.code == 0 and r.out.strip(), r
    r = itr("adapt", captions, "--images", tmp_path / "photos", "--db", db)
    assert r.code == 0, r
    blip = synth.make_tiny_blip_itm(tmp_path / "blip")
    r = itr("search", "a red circle", "--db", db, "--rerank", "--rerank-model", blip,
            "--rerank-k", "4", "--json", "-n", "4")
    assert r.code == 0 and len(r.json()["results"]) == 4, r
