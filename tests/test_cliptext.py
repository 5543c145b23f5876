"""CLIP's lean text tower (itrcli/embed/cliptext.py): the start token's keys and values held
as constants, the last layer on the end token alone.  It gives transformers' vectors on
batches of any length and padding, the export keeps it only then, and towers it does not
know are left to transformers' own forward."""

from __future__ import annotations

import json

import numpy as np
import pytest

TEXTS = ["a red circle on the left", "a blue square", "green", "two children on a lawn", "",
         "a much longer caption about nothing " * 12]  # the last: truncated at the window


def towers(path, eos: int | None = None):
    """(transformers' whole tower, the lean one, tokenize) of the CLIP checkpoint at ``path``;
    ``eos``: the text model's ``eos_token_id`` set to it (2: the legacy argmax pooling)."""
    from itrcli.embed import cliptext, textonnx
    from itrcli.embed.encoder import Encoder

    enc = Encoder(str(path), device="cpu", precision="fp32", towers="text")
    text_model, proj = enc.float32_text_tower()
    if eos is not None:
        m = getattr(text_model, "text_model", text_model)
        m.eos_token_id = eos
    whole = textonnx._whole_tower(text_model, proj)
    lean = cliptext.fast_tower(text_model, proj, enc.tokenizer)
    return whole, lean, enc


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
