"""`--text-precision int8`: the exported text tower's int8 copy, made once from the float32
export and made again when that changes; its vectors near float32's, one vector per text
however it is asked (alone, in a batch, by `itr search` or `itr serve`); a library whose
folder cannot be written, a failed quantisation, no export at all; bad values."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import run_itr, write_shapes

SPECS = [("red", "circle", "left", 0), ("blue", "square", "right", 1),
         ("green", "triangle", "top", 2), ("yellow", "circle", "bottom", 3),
         ("red", "square", "right", 4), ("blue", "circle", "left", 5)]
TEXTS = ["a red circle on the left", "a blue square", "green", "two children on a lawn",
         "a yellow circle at the bottom of the picture"]
#: The least cosine between an int8 text vector and its float32 one (documented in
#: docs/commands.md; measured 0.9994 on the micro CLIP, 0.9993 on ViT-B/32's shapes).
MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def library(tmp_path_factory, micro_clip):
    root = tmp_path_factory.mktemp("int8")
    write_shapes(root / "photos", SPECS)
    r = run_itr("index", root / "photos", "--db", root / "lib", "-m", micro_clip, "-q")
    assert r.code == 0, r
    return root / "lib"


def scores(db, text: str, *args: str, env: dict | None = None) -> list[tuple[str, float]]:
    old = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        r = run_itr("search", text, "--db", db, "--json", "--exact", "-n", "6", *args)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert r.code == 0, r
    return [(h["path"], h["score"]) for h in r.json()["results"]]


def copy_of(library, tmp_path, *, int8: bool = True) -> Path:
    """A copy of the module's library to change (``int8=False``: without its int8 tower)."""
    import shutil

    db = tmp_path / "lib"
    shutil.copytree(library, db)
    if not int8:
        for name in ("text-int8.onnx", "text-int8.onnx.data", "text-int8.json"):
            (db / "text" / name).unlink(missing_ok=True)
    return db


def encoders(db):
    from itrcli.embed.textonnx import OnnxTextEncoder

    from itrcli.embed import textquant

    return OnnxTextEncoder(db), textquant.encoder(db)


def test_int8_vectors_are_near_float32_and_one_per_text_however_asked(library):
    fp32, int8 = encoders(library)
    a = fp32.encode_texts(TEXTS)  # [n, dim]
    b = int8.encode_texts(TEXTS)
    cos = (a * b).sum(axis=1)
    assert cos.min() >= MIN_COSINE, cos
    assert not np.allclose(a, b, atol=1e-5)  # the int8 tower, not the float32 one
    alone = np.concatenate([int8.encode_texts([t]) for t in TEXTS])
    assert np.array_equal(alone, b)  # batched texts get their own vectors
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)


def test_int8_search_ranks_by_its_vector_and_the_tower_is_made_once(library):
    from itrcli import Library

    d = library / "text"
    fp32 = scores(library, TEXTS[0])
    int8 = scores(library, TEXTS[0], "--text-precision", "int8")
    info = run_itr("info", "--db", library, "--json").json()
    assert info["text_int8"] is True and info["fast_text_search"] is True
    made = (d / "text-int8.onnx").stat().st_mtime_ns
    stamp = json.loads((d / "text-int8.json").read_text())
    assert set(stamp["from"]) == {"text.onnx", "text.onnx.data"}
    assert int8 != fp32
    assert max(abs(s - dict(fp32)[p]) for p, s in int8) < 0.02
    with Library.open(library, readonly=True) as L:
        q = L.text_encoder(text_precision="int8").encode_texts([TEXTS[0]])[0]
        ids, vecs = L.store.vectors()
        by_path = {p: L.store.vectors([L.store.row_by_path(p)["id"]])[1][0] for p, _ in int8}
    assert len(int8) == len(ids) == len(SPECS)
    # the hits' scores are their stored vectors against the int8 vector, best first
    assert [s for _, s in int8] == sorted((s for _, s in int8), reverse=True)
    for p, s in int8:
        assert abs(float(by_path[p] @ q) - s) < 1e-4
    assert scores(library, TEXTS[0], env={"ITR_TEXT_PRECISION": "int8"}) == int8
    assert (d / "text-int8.onnx").stat().st_mtime_ns == made
    assert not list(library.glob(".text.tmp*"))


def test_a_new_float32_export_makes_the_int8_tower_again(library, tmp_path):
    db = copy_of(library, tmp_path)
    before = scores(db, TEXTS[1], "--text-precision", "int8")
    old = (db / "text" / "text-int8.json").read_text()
    st = (db / "text" / "text.onnx").stat()
    os.utime(db / "text" / "text.onnx", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert run_itr("info", "--db", db, "--json").json()["text_int8"] is False  # stale
    assert scores(db, TEXTS[1], "--text-precision", "int8") == before
    assert (db / "text" / "text-int8.json").read_text() != old


def test_a_folder_that_cannot_be_written_keeps_the_tower_for_the_process(library, tmp_path,
                                                                         monkeypatch):
    from itrcli.embed import textquant

    db = copy_of(library, tmp_path, int8=False)
    want = encoders(library)[1].encode_texts(TEXTS)

    def refused(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(textquant.os, "replace", refused)
    got = encoders(db)[1].encode_texts(TEXTS)
    assert np.array_equal(got, want)
    assert not (db / "text" / "text-int8.onnx").exists()


def test_a_failed_quantisation_leaves_nothing_and_float32_answers(library, tmp_path,
                                                                  monkeypatch):
    from itrcli import Library
    from itrcli.embed import textquant

    db = copy_of(library, tmp_path, int8=False)

    tries = []

    def broken(src, out, kind):
        tries.append(out)
        (out / "half-written").write_text("x")
        raise RuntimeError("quantiser failed")

    monkeypatch.setattr(textquant, "_quantise", broken)
    with Library.open(db, readonly=True) as L:
        got = L.text_encoder(text_precision="int8").encode_texts(TEXTS)
        L.text_precision = "int8"  # a server's: its searches name no text precision
        served = L.text_encoder().encode_texts(TEXTS)
        L.text_encoder()
    assert len(tries) == 1  # not tried again at each search of a long-lived library
    from itrcli.embed.textonnx import OnnxTextEncoder

    np.testing.assert_array_equal(got, OnnxTextEncoder(library).encode_texts(TEXTS))
    np.testing.assert_array_equal(served, got)
    assert not list(db.glob(".text.tmp*"))
    assert not (db / "text" / "text-int8.onnx").exists()


def test_without_an_export_float32_answers_and_says_so(library, tmp_path):
    import shutil

    db = copy_of(library, tmp_path)
    shutil.rmtree(db / "text")
    r = run_itr("search", TEXTS[0], "--db", db, "--json", "--exact", "--text-precision",
                "int8", "-v")
    assert r.code == 0, r
    assert "no exported text tower" in r.err
    got = [(h["path"], h["score"]) for h in r.json()["results"]]
    assert got == scores(db, TEXTS[0])[:len(got)]


def test_bad_text_precision_is_a_usage_error(library):
    from itrcli.errors import UsageError
    from itrcli.query.request import SearchRequest

    r = run_itr("search", "x", "--db", library, "--text-precision", "int4")
    assert r.code == 2 and "expected fp32 or int8" in r.err, r
    r = run_itr("serve", "--db", library, "--text-precision", "fp16")
    assert r.code == 2, r
    with pytest.raises(UsageError, match="text-precision"):
        SearchRequest.build("x", text_precision="int4")


def test_serve_int8_gives_the_scores_of_search_int8(library):
    pytest.importorskip("starlette", reason="itr-search[serve] not installed")
    pytest.importorskip("httpx", reason="starlette's TestClient needs httpx")
    from starlette.testclient import TestClient

    from itrcli.serve.app import ServeOptions, create_app
    from itrcli.serve.live import LiveLibrary

    want = {t: scores(library, t, "--text-precision", "int8") for t in TEXTS}
    opts = ServeOptions(Path(library), text_precision="int8")
    with TestClient(create_app(opts), base_url="http://127.0.0.1:8765") as c:
        assert c.get("/api/info").json()["serve"]["text_precision"] == "int8"
        for t in TEXTS:
            r = c.get("/api/search", params={"q": t, "n": 6, "exact": "true"})
            assert r.status_code == 200, r.text
            assert [(h["path"], h["score"]) for h in r.json()["results"]] == want[t]
    # texts embedded together while searches wait (a server under load): the same
    live = LiveLibrary(Path(library), "int8")
    try:
        def primed(lib):
            assert lib.prime_texts(TEXTS) == len(TEXTS)
            return {t: [(h.path, round(h.score, 4)) for h in lib.search(t, top=6, exact=True)]
                    for t in TEXTS}

        assert live.call(primed) == want
    finally:
        live.close()


def test_serve_int8_embeds_texts_beside_the_library_thread(library):
    """Under load the int8 texts are embedded on the embedder's threads while the library's
    thread searches; a vector from an encoder the library no longer uses is not kept."""
    import asyncio
    import threading

    pytest.importorskip("starlette", reason="itr-search[serve] not installed")
    from itrcli.embed.textonnx import OnnxTextEncoder
    from itrcli.query.request import SearchRequest
    from itrcli.serve import answers
    from itrcli.serve.live import LiveLibrary

    want = {t: scores(library, t, "--text-precision", "int8") for t in TEXTS}
    live = LiveLibrary(Path(library), "int8")
    try:
        live.warm()
        enc = live._texts._encoder
        assert isinstance(enc, OnnxTextEncoder) and enc.precision == "int8"
        where: list[str] = []
        encode = enc.encode_texts

        def spy(texts):
            where.append(threading.current_thread().name)
            return encode(texts)

        enc.encode_texts = spy

        async def searches(texts):
            return await asyncio.gather(*(live.run(
                answers.search, SearchRequest.build(text=t, top=6, exact=True), None,
                "http://127.0.0.1:8765", text=t) for t in texts))

        def got(outs):
            return [[(h["path"], h["score"]) for h in o["results"]] for o in outs]

        assert got(asyncio.run(searches(TEXTS))) == [want[t] for t in TEXTS]
        assert len(where) == len(TEXTS) and all(n.startswith("itr-text") for n in where)
        # an encoder that is not the library's (a replaced export): its vector is not
        # kept, and the search embeds its text on the library's thread
        where.clear()
        from itrcli.embed import textquant

        live._texts.use(textquant.encoder(Path(library)))
        new = "a green triangle at the top"  # not asked before: no kept vector
        assert got(asyncio.run(searches([new]))) == [
            scores(library, new, "--text-precision", "int8")]
        assert where and all(n.startswith("itr-library") for n in where)
        assert live._texts._encoder is enc  # handed over again
    finally:
        live.close()


def test_the_kind_of_weights_follows_the_cpu(library, tmp_path, monkeypatch):
    """Signed weights where the CPU multiplies them without overflow, unsigned elsewhere;
    a library that meets the other kind of CPU makes its int8 tower again."""
    from itrcli.embed import textquant

    db = copy_of(library, tmp_path)
    fp32 = encoders(library)[0].encode_texts(TEXTS)
    stamp = db / "text" / "text-int8.json"
    for kind in ("u8", "s8", "u8"):
        monkeypatch.setattr(textquant, "weight_kind", lambda kind=kind: kind)
        got = encoders(db)[1].encode_texts(TEXTS)
        assert json.loads(stamp.read_text())["weights"] == kind
        assert (got * fp32).sum(axis=1).min() >= MIN_COSINE
    monkeypatch.undo()
    assert textquant.weight_kind() in ("s8", "u8")


def test_a_siglip2_export_gets_its_int8_tower_too(tmp_path):
    """SigLIP 2's export takes token embeddings, not ids (its table stays float16 outside
    the graph; Gemma pads on the left): the int8 copy of its tower works the same way."""
    from support import synth

    model = synth.make_tiny_siglip2(tmp_path / "siglip2", padding_side="left")
    write_shapes(tmp_path / "photos", SPECS[:3])
    r = run_itr("index", tmp_path / "photos", "--db", tmp_path / "lib", "-m", model, "-q")
    assert r.code == 0, r
    fp32, int8 = encoders(tmp_path / "lib")
    assert fp32.settings.get("token_table")  # the split export
    a, b = fp32.encode_texts(TEXTS), int8.encode_texts(TEXTS)
    assert (a * b).sum(axis=1).min() >= MIN_COSINE
    assert np.array_equal(np.concatenate([int8.encode_texts([t]) for t in TEXTS]), b)
    r = run_itr("search", TEXTS[0], "--db", tmp_path / "lib", "--json", "--text-precision", "int8")
    assert r.code == 0 and len(r.json()["results"]) == 3, r


def test_eval_embeds_captions_as_search_does(tmp_path, micro_clip, tiny_siglip):
    """`itr eval --text-precision`: fp32 is the exported tower (the ranks of the model's own
    fp32 tower), int8 its copy (recall near it), each kept apart in the embedding cache; a
    model whose text tower cannot be exported is one line, exit 2."""
    from test_eval import draw_set, write_formats

    from itrcli.evaluation import datasets, evaluate

    items = draw_set(tmp_path / "shapes", 40)
    path = write_formats(tmp_path, tmp_path / "shapes", items)["karpathy"]
    ds = datasets.load(path, images=tmp_path / "shapes")
    cache = tmp_path / "eval-cache.sqlite"

    def rows(tp, use_cache=False):
        r = evaluate.evaluate(ds, [str(micro_clip)], precision="fp32", text_precision=tp,
                              cache=cache if use_cache else False).to_json()
        assert r["text_precision"] == tp
        return [(x["t2i"], x["i2t"]) for x in r["results"]]

    own = rows(None)
    assert rows("fp32") == own
    int8 = rows("int8", use_cache=True)
    for (t2i, i2t), (t2i_own, i2t_own) in zip(int8, own):
        assert abs(t2i["R@1"] - t2i_own["R@1"]) <= 5 and abs(i2t["R@1"] - i2t_own["R@1"]) <= 5
    assert rows("fp32", use_cache=True) == own  # not the int8 vectors of the cache
    assert rows("int8", use_cache=True) == int8
    r = run_itr("eval", path, "--images", tmp_path / "shapes", "-m", micro_clip,
                "--text-precision", "int8", "--no-cache", "--precision", "fp32")
    assert r.code == 0 and "captions by the exported text tower, int8" in r.err, r
    r = run_itr("eval", path, "--images", tmp_path / "shapes", "-m", tiny_siglip,
                "--text-precision", "int8", "--no-cache")
    assert r.code == 2 and "cannot be exported" in r.err and "Traceback" not in r.err, r
    assert len(r.err.strip().splitlines()) == 1, r
