"""CLIP's text towers of itrcli/embed/cliptext.py.  The lean one (the start token's keys and
values held as constants, the last layer on the end token alone) gives transformers'
vectors on batches of any length and padding, the export keeps it only then, and towers it
does not know are left to transformers' own forward.  The plain one (read from the
safetensors without transformers' modeling, for the export child) is transformers' tower."""

from __future__ import annotations

import json

import numpy as np
import pytest

TEXTS = ["a red circle on the left", "a blue square", "green", "two children on a lawn", "",
         "a much longer caption about nothing " * 12]  # the last: truncated at the window


def towers(path, eos: int | None = None):
    """(transformers' whole tower, the lean one made from it, the encoder) of the CLIP
    checkpoint at ``path``; ``eos``: the text model's ``eos_token_id`` set to it (2: the
    legacy argmax pooling)."""
    from itrcli.embed import cliptext, textonnx

    enc, text_model, proj = transformers_text(path)
    if eos is not None:
        m = getattr(text_model, "text_model", text_model)
        m.eos_token_id = eos
    whole = textonnx._whole_tower(text_model, proj)
    lean = cliptext.fast_tower(text_model, proj, enc.tokenizer)
    return whole, lean, enc


def transformers_text(path):
    """(a text-only encoder, transformers' text model, its projection) of ``path``: the
    encoder itself builds the plain tower (cliptext.plain_text), so transformers' is read
    here apart, as the reference."""
    import torch

    from itrcli.embed.encoder import Encoder

    enc = Encoder(str(path), device="cpu", precision="fp32", towers="text")
    module = enc._tower("text", torch.float32, "cpu").module
    assert type(module).__name__ == "CLIPTextModelWithProjection"
    return enc, module.text_model, module.text_projection


def variant(src, dst, **text_config):
    """A copy of the checkpoint folder ``src`` whose config.json's text config has these
    settings (the same weights)."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["text_config"].update(text_config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("legacy", [False, True], ids=["first-eos", "argmax"])
def test_the_plain_tower_is_transformers_tower(tiny_clip, tmp_path, legacy, act):
    """The text-only encoder (the export's) builds CLIP's text tower in plain torch, and
    its forward and projection give transformers' on padded batches, with and without the
    attention mask, for either pooling rule and activation; the lean tower made from it
    does too."""
    import torch

    from itrcli.embed import cliptext, textonnx

    path = variant(tiny_clip, tmp_path / "m", hidden_act=act)
    enc, ref_model, ref_proj = transformers_text(path)
    plain_model, plain_proj = enc.float32_text_tower()
    assert type(plain_model).__name__ == "PlainCLIPText"
    if legacy:
        ref_model.eos_token_id = plain_model.eos_token_id = 2
    ref = textonnx._whole_tower(ref_model, ref_proj)
    plain = textonnx._whole_tower(plain_model, plain_proj)
    lean = cliptext.fast_tower(plain_model, plain_proj, enc.tokenizer)
    for texts in ([TEXTS[0]], TEXTS, [TEXTS[4], TEXTS[-1]]):
        t = enc.tokenize(texts)
        with torch.no_grad():
            want = ref(t["input_ids"], t["attention_mask"]).numpy()
            np.testing.assert_allclose(plain(t["input_ids"], t["attention_mask"]).numpy(), want,
                                       atol=1e-6)
            np.testing.assert_allclose(lean(t["input_ids"]).numpy(), want, atol=1e-6)
    # the text-only encoder's own search path runs the plain tower: transformers' vectors
    with torch.no_grad():
        t = enc.tokenize(TEXTS)
        np.testing.assert_allclose(enc.encode_texts(TEXTS), ref(t["input_ids"], t["attention_mask"]).numpy(),
                                   atol=1e-6)


def test_a_text_tower_the_plain_one_does_not_know_is_transformers(tiny_clip, tmp_path):
    """An activation plain_text does not run: the encoder loads transformers' tower."""
    from itrcli.embed.encoder import Encoder

    path = variant(tiny_clip, tmp_path / "m", hidden_act="relu")
    enc = Encoder(str(path), device="cpu", precision="fp32", towers="text")
    text_model, _ = enc.float32_text_tower()
    assert type(text_model).__name__ in ("CLIPTextTransformer", "CLIPTextModel")


def test_the_text_export_imports_no_transformers_modeling(tiny_clip, tmp_path):
    """The export child's encoder (text tower only, fp32, CPU) imports neither transformers'
    modeling nor torch._dynamo (1.6 and 0.7 s of CPU beside the run's encoding), and its
    export gives the two-tower encoder's (transformers') vectors."""
    import subprocess
    import sys

    from itrcli.embed import textonnx
    from itrcli.embed.encoder import Encoder

    code = ("import sys; from pathlib import Path; from itrcli.embed.encoder import Encoder; "
            "from itrcli.embed import textonnx; "
            f"e = Encoder({str(tiny_clip)!r}, device='cpu', precision='fp32', towers='text'); "
            f"textonnx.export(e, Path({str(tmp_path)!r}), release=True); "
            "print(sorted(m for m in ('transformers.modeling_utils', 'torch._dynamo') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[-2] == "[]", r.stdout
    settings = json.loads((tmp_path / "text" / textonnx.SETTINGS_FILE).read_text())
    assert settings["lean"] is True
    both = Encoder(str(tiny_clip), device="cpu", precision="fp32")
    np.testing.assert_allclose(textonnx.OnnxTextEncoder(tmp_path).encode_texts(TEXTS),
                               both.encode_texts(TEXTS), atol=1e-5)


@pytest.mark.parametrize("legacy", [False, True], ids=["first-eos", "argmax"])
def test_the_lean_tower_gives_the_whole_towers_vectors(tiny_clip, legacy):
    import torch

    whole, lean, enc = towers(tiny_clip, eos=2 if legacy else None)
    assert lean is not None
    for texts in ([TEXTS[0]], TEXTS[:4], TEXTS, [TEXTS[4]], [TEXTS[-1]] + TEXTS[:2]):
        t = enc.tokenize(texts)
        ids, mask = t["input_ids"], t["attention_mask"]
        with torch.no_grad():
            want = whole(ids, mask)
            got = lean(ids)  # no mask: the padding comes after the end token
        assert got.shape == want.shape == (len(texts), enc.dim)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)
    assert enc.tokenize([TEXTS[-1]])["input_ids"].shape[1] == enc.text_max_length


def test_the_lean_tower_is_not_made_for_a_tower_it_does_not_know(tiny_clip, tiny_siglip):
    from itrcli.embed import cliptext
    from itrcli.embed.encoder import Encoder

    siglip = Encoder(str(tiny_siglip), device="cpu", precision="fp32", towers="text")
    assert cliptext.fast_tower(*siglip.float32_text_tower(), siglip.tokenizer) is None

    enc = Encoder(str(tiny_clip), device="cpu", precision="fp32", towers="text")
    text_model, proj = enc.float32_text_tower()
    enc.tokenizer.padding_side = "left"  # the start token would not be at position 0
    assert cliptext.fast_tower(text_model, proj, enc.tokenizer) is None
    enc.tokenizer.padding_side = "right"
    assert cliptext.fast_tower(text_model, proj, enc.tokenizer) is not None


def test_the_export_runs_the_lean_tower_and_gives_torchs_vectors(tiny_clip, tmp_path):
    from itrcli.embed import textonnx
    from itrcli.embed.encoder import Encoder

    enc = Encoder(str(tiny_clip), device="cpu", precision="fp32")
    textonnx.export(enc, tmp_path)
    settings = json.loads((tmp_path / "text" / textonnx.SETTINGS_FILE).read_text())
    assert settings["lean"] is True and settings["use_attention_mask"] is False
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "text" / textonnx.MODEL_FILE),
                                providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids"]
    onnx = textonnx.OnnxTextEncoder(tmp_path, warm=True)
    for texts in ([TEXTS[0]], TEXTS, TEXTS[::-1] * 3):
        np.testing.assert_allclose(onnx.encode_texts(texts), enc.encode_texts(texts), atol=1e-5)


def test_a_lean_tower_that_differs_is_not_exported(tiny_clip, tmp_path, monkeypatch):
    import torch

    from itrcli.embed import cliptext, textonnx
    from itrcli.embed.encoder import Encoder

    made = cliptext.fast_tower

    def off(*a, **k):  # the start token's keys a little wrong: vectors move
        lean = made(*a, **k)
        with torch.no_grad():
            lean.start_keys.mul_(1.01)
        return lean

    monkeypatch.setattr(cliptext, "fast_tower", off)
    enc = Encoder(str(tiny_clip), device="cpu", precision="fp32")
    textonnx.export(enc, tmp_path)
    settings = json.loads((tmp_path / "text" / textonnx.SETTINGS_FILE).read_text())
    assert settings["lean"] is False and settings["use_attention_mask"] is True
    np.testing.assert_allclose(textonnx.OnnxTextEncoder(tmp_path).encode_texts(TEXTS),
                               enc.encode_texts(TEXTS), atol=1e-5)


def test_a_cached_export_of_an_older_format_is_made_again(tiny_clip, tmp_path, monkeypatch):
    from itrcli.embed import textonnx, towercache
    from itrcli.embed.encoder import Encoder

    monkeypatch.setenv("ITR_TOWER_CACHE", str(tmp_path / "cache"))
    enc = Encoder(str(tiny_clip), device="cpu", precision="fp32")
    textonnx.export(enc, tmp_path / "a")
    model = str(tiny_clip)
    # an entry as an earlier itr kept it: no format in its marker
    tmp = towercache.staging(model, None, textonnx.CACHE_KIND)
    (tmp / "stale").write_text("x")
    towercache.publish(tmp, model, None, textonnx.CACHE_KIND)
    assert not textonnx.from_cache(tmp_path / "b", model, None)
    assert textonnx.cache_export(tmp_path / "a", model, None)
    entry = towercache.lookup(model, None, textonnx.CACHE_KIND)
    assert not (entry / "stale").exists()
    assert textonnx.from_cache(tmp_path / "b", model, None)
    np.testing.assert_allclose(textonnx.OnnxTextEncoder(tmp_path / "b").encode_texts(TEXTS),
                               enc.encode_texts(TEXTS), atol=1e-5)
