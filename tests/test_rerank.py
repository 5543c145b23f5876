"""`itr search --rerank`: BLIP image-text matching re-scores the first K results.

The reference scores come from transformers' own ``BlipProcessor`` and
``BlipForImageTextRetrieval(use_itm_head=True)`` on the same files, independently of
:mod:`itrcli.embed.rerank`.
"""

from __future__ import annotations

import pytest

from conftest import index_shapes

SPECS = [(c, s, p, i) for i, (c, s, p) in enumerate(
    [(c, s, p) for c in ("red", "blue", "green") for s in ("circle", "square") for p in ("left", "right")]
)]
QUERY = "a red circle on the left"


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    from support import synth

    return synth.make_tiny_blip_itm(tmp_path_factory.mktemp("models") / "tiny-blip-itm")


@pytest.fixture
def lib(itr, tiny_clip, tmp_path):
    return index_shapes(itr, tmp_path, SPECS, tiny_clip)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models: two OpenMP threads on a busy machine cost ~1 s per forward in
    synchronisation (0.01 s with one).  The re-ranker sets its own count when it loads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def itm_probabilities(model_dir, text: str, paths) -> dict[str, float]:
    """Match probabilities by transformers alone: processor + model forward + softmax."""
    import torch
    from PIL import Image
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    torch.set_num_threads(1)  # the re-ranker under test may have set more (see above)
    processor = BlipProcessor.from_pretrained(model_dir)
    model = BlipForImageTextRetrieval.from_pretrained(model_dir).eval()
    images = [Image.open(p).convert("RGB") for p in paths]
    inputs = processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs, use_itm_head=True)
    probs = torch.softmax(out.itm_score, dim=-1)[:, 1]
    return {str(p): float(v) for p, v in zip(paths, probs)}


def assert_in_order_of(paths: list[str], reference: dict[str, float]) -> None:
    """``paths`` is sorted by descending reference probability (ties within float noise)."""
    values = [reference[p] for p in paths]
    for a, b in zip(values, values[1:]):
        assert a >= b - 1e-5, (paths, values)
    assert len(set(round(v, 4) for v in values)) > 1  # the check could fail: scores differ


def test_rerank_order_equals_transformers_itm(itr, lib, tiny_blip):
    db, _ = lib
    first = itr("search", QUERY, "--db", db, "--json", "-n", "9", "--exact").json()["results"]
    # like with like: the reference runs in fp32, so does the re-ranker here (--precision
    # auto would pick bf16 on CPUs with native bf16)
    r = itr("search", QUERY, "--db", db, "--json", "-n", "9", "--exact", "--rerank",
            "--rerank-k", "6", "--rerank-model", tiny_blip, "--precision", "fp32")
    assert r.code == 0, r
    got = r.json()["results"]
    head, tail = got[:6], got[6:]
    ref = itm_probabilities(tiny_blip, QUERY, [h["path"] for h in first[:6]])
    # the same six candidates, now in the order of the ITM probabilities
    assert {h["path"] for h in head} == {h["path"] for h in first[:6]}
    assert_in_order_of([h["path"] for h in head], ref)
    for h in head:
        assert h["rerank_score"] == pytest.approx(ref[h["path"]], abs=1e-4)
    # past K: the first order, cosine kept, no re-rank score
    assert [h["path"] for h in tail] == [h["path"] for h in first[6:]]
    assert all(h["rerank_score"] is None for h in tail)
    cos = {h["path"]: h["score"] for h in first}
    assert all(h["score"] == cos[h["path"]] for h in got)
    assert [h["rank"] for h in got] == list(range(1, 10))


def test_rerank_k_larger_than_the_results_and_top_smaller_than_k(itr, lib, tiny_blip, monkeypatch):
    db, paths = lib
    monkeypatch.setenv("ITR_RERANK_MODEL", str(tiny_blip))  # the option's variable
    r = itr("search", QUERY, "--db", db, "--json", "-n", "50", "--rerank", "--rerank-k", "100")
    assert r.code == 0, r
    got = [h["path"] for h in r.json()["results"]]
    assert sorted(got) == sorted(map(str, paths))  # every image, each re-scored
    ref = itm_probabilities(tiny_blip, QUERY, got)
    assert_in_order_of(got, ref)
    # -n 3 of K 12: the three best by the re-ranker, not the cosine's top 3 re-sorted
    r3 = itr("search", QUERY, "--db", db, "--json", "-n", "3", "--rerank", "--rerank-k", "12")
    assert [h["path"] for h in r3.json()["results"]] == got[:3]


def test_piped_and_table_output(itr, lib, tiny_blip):
    db, _ = lib
    r = itr("search", QUERY, "--db", db, "-n", "5", "--rerank", "--rerank-k", "3",
            "--rerank-model", tiny_blip)
    assert r.code == 0, r
    lines = [line.split("\t") for line in r.out.splitlines()]
    assert len(lines) == 5 and all(len(f) == 3 for f in lines)
    match = [f[0] for f in lines]
    assert all(m != "-" for m in match[:3]) and match[3:] == ["-", "-"]
    assert [float(m) for m in match[:3]] == sorted((float(m) for m in match[:3]), reverse=True)


def test_vanished_and_unreadable_files(itr, lib, tiny_blip):
    db, paths = lib
    first = itr("search", QUERY, "--db", db, "--json", "-n", "12").json()["results"]
    gone, broken = first[0]["path"], first[1]["path"]
    import os

    os.remove(gone)
    with open(broken, "wb") as f:
        f.write(b"not a jpeg any more")
    r = itr("search", QUERY, "--db", db, "--json", "-n", "5", "--rerank", "--rerank-k", "5",
            "--rerank-model", tiny_blip)
    assert r.code == 0, r
    got = r.json()["results"]
    assert gone not in [h["path"] for h in got] and len(got) == 5
    # the unreadable one follows the re-scored ones, with no score and a line on stderr
    assert got[4]["path"] == broken and got[4]["rerank_score"] is None
    assert all(h["rerank_score"] is not None for h in got[:4])
    assert "not re-ranked" in r.err and broken in r.err
    ref = itm_probabilities(tiny_blip, QUERY, [h["path"] for h in got[:4]])
    assert_in_order_of([h["path"] for h in got[:4]], ref)


def test_a_video_hit_is_reranked_at_its_frame(itr, tiny_clip, tiny_blip, tmp_path):
    pytest.importorskip("av", reason="PyAV not installed: pip install 'itr-search[video]'")
    from conftest import write_shapes
    from support import clips

    from itrcli.ingest.video import frame_at

    d = tmp_path / "media"
    write_shapes(d, [("red", "circle", "left", 1), ("blue", "square", "right", 2)])
    clip = clips.write_clip(d / "shots.mp4", clips.shape_scenes(
        [(0.0, ("green", "square", "left")), (2.0, ("red", "circle", "right")),
         (4.0, ("blue", "circle", "left"))]), 6, gop_s=1)
    db = tmp_path / "lib"
    assert itr("index", d, "--db", db, "-m", tiny_clip, "-q").code == 0
    args = ("search", QUERY, "--db", db, "--json", "-n", "5", "--exact", "--frames", "--rerank",
            "--rerank-k", "5", "--rerank-model", tiny_blip, "--precision", "fp32")
    r = itr(*args)
    assert r.code == 0 and "not re-ranked" not in r.err, r
    got = r.json()["results"]
    frames = [h for h in got if h["path"] == str(clip)]
    assert sorted(h["time"] for h in frames) == [0.0, 2.0, 4.0]
    # each frame scored as the image shown at its time, like a photo of it
    shots = {}
    for h in frames:
        shots[h["time"]] = tmp_path / f"frame-{h['time']}.png"
        frame_at(str(clip), h["time"]).save(shots[h["time"]])
    ref = itm_probabilities(tiny_blip, QUERY, [*(h["path"] for h in got if h["time"] is None),
                                               *map(str, shots.values())])
    key = {h["path"] if h["time"] is None else str(shots[h["time"]]): h for h in got}
    for k, h in key.items():
        assert h["rerank_score"] == pytest.approx(ref[k], abs=1e-4), (k, h)
    assert_in_order_of(list(key), ref)
    # one cache entry per frame (its video's hash and its time), the same scores from it
    cached = list((tmp_path / "xdg-cache" / "itr" / "rerank").glob("*/*.npy"))
    assert len(cached) == 5
    again = itr(*args).json()["results"]
    assert [(h["path"], h["time"], h["rerank_score"]) for h in again] == [
        (h["path"], h["time"], h["rerank_score"]) for h in got]


def test_broken_or_wrong_model_is_one_line_exit_1(itr, lib, tiny_blip, tiny_clip, tmp_path):
    db, _ = lib
    broken = tmp_path / "broken-blip"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "processor_config.json"):
        (broken / name).write_bytes((tiny_blip / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)  # truncated weights
    for model, words in ((broken, "cannot load re-rank model"),
                         (tmp_path / "nowhere", "cannot load model"),
                         (tiny_clip, "'clip' checkpoint")):
        r = itr("search", QUERY, "--db", db, "--rerank", "--rerank-model", model)
        assert r.code == 1, r
        assert r.err.startswith("Error: ") and r.err.count("\n") == 1 and words in r.err, r.err
        assert r.out == ""


def test_image_query_and_combined_query_are_refused(itr, lib, tiny_blip):
    db, paths = lib
    for args in ([str(paths[0])], [QUERY, "--add", "blue"], [QUERY, "--subtract", "green"]):
        r = itr("search", *args, "--db", db, "--rerank", "--rerank-model", tiny_blip)
        assert r.code == 2 and "--rerank" in r.err and "text" in r.err, r


def test_without_matching_head_is_refused(itr, lib, tiny_blip, tmp_path):
    """A BLIP checkpoint whose weights lack itm_head would run with random weights: refused."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "no-head"
    d.mkdir()
    for f in tiny_blip.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(tiny_blip / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("itm_head")},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    db, _ = lib
    r = itr("search", QUERY, "--db", db, "--rerank", "--rerank-model", d)
    assert r.code == 1 and "matching" in r.err and "itm_head" in r.err, r


def test_models_lists_rerankers(itr):
    r = itr("models")
    assert r.code == 0 and "blip-itm-base-coco" in r.out and "Re-rankers" in r.out
    rows = itr("models", "--json").json()
    rr = [m for m in rows if m["kind"] == "reranker"]
    assert rr[0]["name"] == "blip-itm-base-coco" and rr[0]["revision"] == "refs/pr/5"
    assert rr[0]["model"] == "Salesforce/blip-itm-base-coco" and rr[0]["default"]


def test_reorder_puts_unscored_last_and_keeps_ties_in_first_order():
    from itrcli.embed.rerank import reorder

    assert reorder([0.2, None, 0.9, 0.2, None, 0.5]) == [2, 5, 0, 3, 1, 4]
    assert reorder([]) == []


def test_preset_resolves_to_the_safetensors_revision(monkeypatch):
    from itrcli.embed import models

    assert models.resolve_reranker("blip-itm-base-coco") == ("Salesforce/blip-itm-base-coco", "refs/pr/5")
    assert models.resolve_reranker("Salesforce/blip-itm-base-coco")[1] == "refs/pr/5"
    monkeypatch.delenv("ITR_RERANK_MODEL", raising=False)
    assert models.resolve_reranker(None)[0] == "Salesforce/blip-itm-base-coco"
    assert models.resolve_reranker("someone/else") == ("someone/else", None)


# --- itr eval --rerank ------------------------------------------------------------------


def _caption_set(directory):
    """8 drawings, captions as in the synthetic set (two for every third image)."""
    from support import synth

    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (c, s, p) in enumerate(synth.combinations()[::17][:8]):
        name = directory / f"img{i}.png"
        synth.draw(c, s, p, seed=500 + i).save(name)
        caps = [synth.caption(c, s, p)] + ([f"{c} {s}"] if i % 3 == 0 else [])
        rows += [(name.name, cap) for cap in caps]
    csv = directory / "captions.csv"
    csv.write_text("image,caption\n" + "".join(f"{n},{c}\n" for n, c in rows))
    return csv, rows


def _naive_reranked_ranks(tiny_clip, tiny_blip, directory, rows, k):
    """Ranks by brute force: cosine from transformers' CLIP, ITM from transformers' BLIP."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import (BlipForImageTextRetrieval, BlipProcessor, CLIPModel,
                              CLIPProcessor)

    torch.set_num_threads(1)
    names = list(dict.fromkeys(n for n, _ in rows))
    texts = [c for _, c in rows]
    owner = np.array([names.index(n) for n, _ in rows])
    images = [Image.open(directory / n).convert("RGB") for n in names]
    clip, cproc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        iv = clip.get_image_features(**cproc(images=images, return_tensors="pt"))
        tv = clip.get_text_features(**cproc(text=texts, return_tensors="pt", padding=True))
    iv = getattr(iv, "pooler_output", iv)
    tv = getattr(tv, "pooler_output", tv)
    iv = (iv / iv.norm(dim=-1, keepdim=True)).numpy()
    tv = (tv / tv.norm(dim=-1, keepdim=True)).numpy()
    sims = tv @ iv.T  # [captions, images]
    blip, bproc = BlipForImageTextRetrieval.from_pretrained(tiny_blip).eval(), BlipProcessor.from_pretrained(tiny_blip)

    def itm(i, c):
        inputs = bproc(images=images[i], text=texts[c], return_tensors="pt")
        with torch.no_grad():
            return float(torch.softmax(blip(**inputs).itm_score, -1)[0, 1])

    t2i = []
    for c in range(len(texts)):
        order = sorted(range(len(names)), key=lambda i: (-sims[c, i], i))
        head = sorted(order[:k], key=lambda i: -itm(i, c))
        t2i.append((head + order[k:]).index(owner[c]))
    i2t = []
    for i in range(len(names)):
        order = sorted(range(len(texts)), key=lambda c: (-sims[c, i], c))
        head = sorted(order[:k], key=lambda c: -itm(i, c))
        i2t.append(next(r for r, c in enumerate(head + order[k:]) if owner[c] == i))
    return np.array(t2i), np.array(i2t)


def test_eval_rerank_rows_equal_a_brute_force_reference(tmp_path, tiny_clip, tiny_blip):
    from itrcli.evaluation import datasets, evaluate, metrics

    csv, rows = _caption_set(tmp_path / "set")
    ds = datasets.load(csv)
    ks = (1, 2, 5)
    result = evaluate.evaluate(ds, [str(tiny_clip)], ks=ks, precision="fp32", cache=False,
                               rerank=True, rerank_k=3, rerank_model=str(tiny_blip))
    got = {r.method: r for r in result.results}
    assert list(got) == ["exact", "exact+rerank"]
    t2i, i2t = _naive_reranked_ranks(tiny_clip, tiny_blip, tmp_path / "set", rows, 3)
    want = metrics.summarise(t2i, i2t, ks)
    assert got["exact+rerank"].t2i == pytest.approx(want["t2i"])
    assert got["exact+rerank"].i2t == pytest.approx(want["i2t"])
    assert got["exact+rerank"].rsum != got["exact"].rsum or got["exact"].rsum == 600
    assert any("exact+rerank" in n and "image-text pairs" in n for n in result.notes)


def test_cli_eval_rerank_json(itr, tmp_path, tiny_clip, tiny_blip):
    csv, _ = _caption_set(tmp_path / "set")
    r = itr("eval", csv, "-m", tiny_clip, "--precision", "fp32", "--rerank", "--rerank-k", "2",
            "--rerank-model", tiny_blip, "--json", "--no-cache", "-k", "1,5")
    assert r.code == 0, r
    rows = r.json()["results"]
    assert [x["method"] for x in rows] == ["exact", "exact+rerank"]
    # re-ranking 2 candidates moves nothing past rank 2: R@5 is that of exact
    assert rows[1]["t2i"]["R@5"] == rows[0]["t2i"]["R@5"]
    assert rows[1]["i2t"]["R@5"] == rows[0]["i2t"]["R@5"]
    assert "note: exact+rerank" in r.err
