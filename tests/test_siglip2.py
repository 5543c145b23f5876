"""SigLIP 2 (fixed resolution): Gemma fast tokenizer, processor parity, ONNX text tower,
queries in other scripts end to end; NaFlex checkpoints refused with a clear message."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import index_shapes, write_shapes

SPECS = [("red", "circle", "left", 0), ("blue", "square", "right", 1),
         ("green", "star", "top", 2), ("yellow", "triangle", "center", 3)]
#: Japanese and Russian words the tokenizer holds, Arabic and Hindi through byte fallback,
#: an emoji, mixed scripts, and a text longer than the 16 positions (truncated).
QUERIES = ["a red circle on the left", "赤い円", "красный круг", "círculo rojo über",
           "ein roter Kreis über dem Quadrat", "كلب أحمر في الحديقة", "कुत्ता", "🐶 dog",
           "青い 四角 синий квадрат a blue square on the right"]


@pytest.fixture(scope="module", params=["right", "left"])
def siglip2(request, tmp_path_factory):
    from support import synth

    side = request.param  # Gemma pads on the left unless the checkpoint says otherwise
    return synth.make_tiny_siglip2(tmp_path_factory.mktemp("models") / f"siglip2-{side}",
                                   padding_side=side)


@pytest.fixture
def lib(itr, siglip2, tmp_path):
    return index_shapes(itr, tmp_path, SPECS, siglip2)[0]


def test_tokens_and_pixels_equal_the_processor(siglip2):
    import torch
    from transformers import AutoProcessor

    from itrcli.embed.encoder import Encoder
    from support import synth

    enc = Encoder(str(siglip2), device="cpu", precision="fp32")
    processor = AutoProcessor.from_pretrained(siglip2)
    assert type(processor.tokenizer).__name__ == "GemmaTokenizer"
    assert enc.model_type == "siglip" and enc.text_padding == "max_length"
    ours = enc.tokenize(QUERIES)
    ref = processor(text=QUERIES, padding="max_length", max_length=16, truncation=True,
                    return_tensors="pt")
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    img = synth.draw("purple", "cross", "bottom", size=90, seed=5).resize((90, 57))
    px = processor(images=img, return_tensors="pt")["pixel_values"][0].numpy()
    np.testing.assert_allclose(enc.prep(img.convert("RGB")), px, atol=1e-5)


def test_onnx_tower_equals_torch_in_every_script(lib):
    from itrcli import Library
    from itrcli.embed.textonnx import OnnxTextEncoder

    assert OnnxTextEncoder.available(lib)  # the Gemma tokenizer exports: fast cold search
    with Library.open(lib, readonly=True) as L:
        onnx = OnnxTextEncoder(lib)
        ids, _mask = onnx.tokenize(QUERIES)
        fp32 = L.encoder(precision="fp32")  # the ONNX tower is fp32: like with like
        torch_ids = fp32.tokenize(QUERIES)["input_ids"].numpy()
        np.testing.assert_array_equal(ids, torch_ids)  # same pieces, padding side and length
        # the token embedding table is float16 (read row by row from a memory map): the
        # rest of the tower is float32, so the vectors differ by that rounding alone
        assert onnx.table is not None and onnx.table.dtype == np.float16
        assert isinstance(onnx.table, np.memmap)
        got, want = onnx.encode_texts(QUERIES), fp32.encode_texts(QUERIES)
        np.testing.assert_allclose(got, want, atol=5e-4)
        assert (got * want).sum(-1).min() > 0.99999


def test_queries_in_other_scripts_end_to_end(itr, lib):
    from itrcli import Library

    with Library.open(lib, readonly=True) as L:
        ids, vecs = L.store.vectors()
        rows = L.store.rows(int(i) for i in ids)
        torch_enc = L.encoder(precision="fp32")  # searches use the fp32 ONNX tower
        for q in QUERIES[1:]:
            r = itr("search", q, "--db", lib, "--json", "-n", "4", "--exact")
            assert r.code == 0, r
            j = r.json()
            assert j["query"] == q and q in r.out  # UTF-8 as is, not \\u escapes
            v = torch_enc.encode_texts([q])[0]
            want = [rows[int(i)]["path"] for i in ids[np.argsort(-(vecs @ v), kind="stable")]]
            assert [h["path"] for h in j["results"]] == want
            piped = itr("search", q, "--db", lib, "-n", "2").out.splitlines()
            assert [line.split("\t")[1] for line in piped] == want[:2]


def test_naflex_checkpoint_names_the_fixed_resolution_one(itr, tmp_path):
    from transformers import Siglip2Config

    d = tmp_path / "siglip2-naflex"
    Siglip2Config().save_pretrained(d)
    write_shapes(tmp_path / "photos", SPECS[:1])
    r = itr("index", tmp_path / "photos", "--db", tmp_path / "lib", "-m", d)
    assert r.code == 1 and r.err.count("\n") == 1, r
    assert "NaFlex" in r.err and "google/siglip2-base-patch16-224" in r.err


def test_exported_table_is_read_row_by_row(siglip2, tmp_path):
    """The export keeps SigLIP's token table out of the ONNX graph: float16 rows gathered
    by the search, then the rest of the tower (position embeddings on) in ONNX; its vectors
    equal the torch tower's in German, Japanese and Arabic within float16 rounding."""
    import onnx as onnx_lib

    from itrcli.embed import textonnx
    from itrcli.embed.encoder import Encoder

    enc = Encoder(str(siglip2), device="cpu", precision="fp32", towers="text")
    out = textonnx.export(enc, tmp_path)
    table = np.load(out / textonnx.TABLE_FILE, mmap_mode="r")
    weight = enc.float32_text_tower()[0].embeddings.token_embedding.weight.detach().numpy()
    assert table.shape == weight.shape and table.dtype == np.float16
    np.testing.assert_array_equal(table, weight.astype(np.float16))
    graph = onnx_lib.load(str(out / textonnx.MODEL_FILE), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["token_embeds"]
    assert not any(tuple(t.dims) == weight.shape for t in graph.initializer)  # not in the graph
    queries = ["ein roter Kreis über dem Quadrat", "赤い円", "كلب أحمر في الحديقة"]
    got = textonnx.OnnxTextEncoder(tmp_path).encode_texts(queries)
    want = enc.encode_texts(queries)
    assert (got * want).sum(-1).min() > 0.99999
    np.testing.assert_allclose(got, want, atol=5e-4)
