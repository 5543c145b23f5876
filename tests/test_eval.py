"""itr eval: dataset formats, bad data, the methods (exact, HNSW, binary codes), the
embedding cache, and retrieval quality of the trained micro CLIP on held-out drawings."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from itrcli.evaluation import datasets

from itrcli.evaluation import evaluate

from itrcli.evaluation import metrics

from support import synth
from itrcli.errors import UsageError

# --- writing one set of images + captions in every format -------------------------------

FORMATS = ("karpathy", "coco", "csv", "folder")


def draw_set(directory: Path, n: int, seed: int = 2_000_000, extra_every: int = 3):
    """``n`` distinct synthetic images with 1 or 2 captions each.

    Seeds from 2,000,000 on: the micro CLIP was trained on seeds 0-95 and its own held-out
    report uses 1,000,000+, so these drawings are unseen.  Returns [(file name, captions)].
    """
    directory.mkdir(parents=True, exist_ok=True)
    combos = synth.combinations()
    random.Random(seed).shuffle(combos)
    items = []
    for i, (color, shape, pos) in enumerate(combos[:n]):
        name = f"img{i:03d}.png"
        synth.draw(color, shape, pos, seed=seed + i).save(directory / name)
        caps = [synth.caption(color, shape, pos)]
        if i % extra_every == 0:  # a variable number of captions per image
            caps.append(caps[0].removeprefix("a "))
        items.append((name, caps))
    return items


def write_formats(root: Path, image_dir: Path, items) -> dict[str, Path]:
    """The same set as Karpathy JSON, COCO JSON, CSV and a txt folder (in ``image_dir``)."""
    root.mkdir(parents=True, exist_ok=True)
    karpathy = {"dataset": "shapes", "images": [
        {"filename": name, "split": "test", "sentences": [{"raw": c} for c in caps]}
        for name, caps in items]}
    # a training image that --split test must leave out
    karpathy["images"].insert(1, {"filename": "not-there.png", "split": "train",
                                  "sentences": [{"raw": "a blue star at the top"}]})
    (root / "dataset_shapes.json").write_text(json.dumps(karpathy))
    coco = {"images": [{"id": 100 + i, "file_name": name} for i, (name, _) in enumerate(items)],
            "annotations": []}
    # annotations in another order than the images: captions are grouped per image
    for i, (_name, caps) in reversed(list(enumerate(items))):
        coco["annotations"] += [{"id": len(coco["annotations"]), "image_id": 100 + i, "caption": c}
                                for c in caps]
    (root / "captions_shapes.json").write_text(json.dumps(coco))
    with open(root / "shapes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for name, caps in items:
            w.writerows([name, c] for c in caps)
    for name, caps in items:
        (image_dir / name).with_suffix(".txt").write_text("\n".join(caps) + "\n")
    return {"karpathy": root / "dataset_shapes.json", "coco": root / "captions_shapes.json",
            "csv": root / "shapes.csv", "folder": image_dir}


def load_format(fmt: str, paths: dict[str, Path], image_dir: Path, **kw) -> datasets.Dataset:
    images = None if fmt == "folder" else image_dir
    return datasets.load(paths[fmt], images=images, **kw)


# --- datasets ---------------------------------------------------------------------------


def test_every_format_loads_the_same_set(tmp_path):
    items = draw_set(tmp_path / "imgs", 7)
    paths = write_formats(tmp_path / "ann", tmp_path / "imgs", items)
    expected_images = [str((tmp_path / "imgs" / name).absolute()) for name, _ in items]
    expected_caps = [caps for _, caps in items]
    for fmt in FORMATS:
        assert datasets.detect_format(paths[fmt]) == fmt
        ds = load_format(fmt, paths, tmp_path / "imgs")
        assert ds.format == fmt
        assert ds.images == expected_images, fmt
        assert ds.captions == expected_caps, fmt
        assert not ds.missing
    assert load_format("karpathy", paths, tmp_path / "imgs").split == "test"
    assert load_format("karpathy", paths, tmp_path / "imgs").name == "shapes"
    ds = load_format("karpathy", paths, tmp_path / "imgs", limit=3)
    assert len(ds.images) == 3


def test_missing_images_are_reported_with_a_count(tmp_path):
    items = draw_set(tmp_path / "imgs", 3)
    paths = write_formats(tmp_path / "ann", tmp_path / "imgs", items)
    (tmp_path / "imgs" / "img001.png").unlink()
    ds = datasets.load(paths["csv"], images=tmp_path / "imgs")
    assert len(ds.images) == 2
    assert ds.missing == [str(tmp_path / "imgs" / "img001.png")]
    report = ds.missing_report()
    assert report.startswith("1 image(s) listed in") and "img001.png" in report
    # the folder format: an image without its .txt is left out and reported too
    (tmp_path / "imgs" / "img000.txt").unlink()
    ds = datasets.load(paths["folder"])
    assert [Path(p).name for p in ds.images] == ["img002.png"]
    assert "without captions" in ds.missing_report()


def test_karpathy_filepath_and_splits(tmp_path):
    (tmp_path / "val2014").mkdir()
    synth.draw("red", "circle", "left").save(tmp_path / "val2014" / "a.jpg")
    synth.draw("red", "circle", "left").save(tmp_path / "b.jpg")  # flat layout works too
    data = {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": [{"raw": "x"}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "test", "sentences": [{"raw": "y"}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "val", "sentences": [{"raw": "z"}]},
    ]}
    p = tmp_path / "dataset_coco.json"
    p.write_text(json.dumps(data))
    ds = datasets.load(p)
    assert [Path(x).name for x in ds.images] == ["a.jpg", "b.jpg"]
    assert ds.name == "coco"
    with pytest.raises(UsageError, match=r"no images in split 'train' \(splits: test, val\)"):
        datasets.load(p, split="train")


def test_csv_unquoted_commas_and_grouping(tmp_path):
    synth.draw("red", "circle", "left").save(tmp_path / "a.png")
    synth.draw("blue", "star", "top").save(tmp_path / "b.png")
    (tmp_path / "c.csv").write_text(
        "image,caption\n"
        "a.png,a red circle, on the left, small\n"
        'b.png,"a blue star, at the top"\n'
        "\n"
        "a.png,  a   red   circle \n"
    )
    ds = datasets.load(tmp_path / "c.csv")
    assert ds.captions == [["a red circle, on the left, small", "a red circle"],
                           ["a blue star, at the top"]]


@pytest.mark.parametrize("name, content, message", [
    ("bad.json", '{"images": [\n  {"filename": "a.png",\n', r"bad\.json: malformed JSON at line 3"),
    ("k.json", '{"images": [{"filename": "a.png", "split": "test", "sentences": [{"raw": " "}]}]}',
     r"k\.json: images\[0\]\.sentences\[0\]\.raw \(a\.png\): empty caption"),
    ("c.json", '{"images": [{"id": 1, "file_name": "a.png"}], "annotations": '
               '[{"image_id": 1, "caption": "ok"}, {"image_id": 2, "caption": "x"}]}',
     r"c\.json: annotations\[1\]: image_id 2 is not in images\[\]"),
    ("c2.json", '{"images": [{"id": 1, "file_name": "a.png"}], "annotations": '
                '[{"image_id": 1, "caption": ""}]}',
     r"c2\.json: annotations\[0\] \(image_id 1\): empty caption"),
    ("x.json", '{"something": 1}', r"x\.json: JSON is neither"),
    ("e.csv", "image,caption\na.png,ok\na.png,\n", r"e\.csv:3 \(a\.png\): empty caption"),
    ("h.csv", "file,text\na.png,ok\n", r"h\.csv:1: header must name 'image' and 'caption'"),
    ("f.csv", "caption,image,extra\nok,a.png\n", r"f\.csv:2: expected 3 fields, got 2"),
])
def test_bad_data_names_the_file_and_entry(tmp_path, name, content, message):
    synth.draw("red", "circle", "left").save(tmp_path / "a.png")
    (tmp_path / name).write_text(content)
    with pytest.raises(UsageError, match=message) as e:
        datasets.load(tmp_path / name)
    assert "\n" not in str(e.value)


def test_bad_folder_and_options(tmp_path):
    synth.draw("red", "circle", "left").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("\n  \n")
    with pytest.raises(UsageError, match=r"a\.txt: no caption"):
        datasets.load(tmp_path)
    (tmp_path / "a.txt").write_text("a red circle\n")
    with pytest.raises(UsageError, match="the folder format has no splits"):
        datasets.load(tmp_path, split="test")
    with pytest.raises(UsageError, match="no such file"):
        datasets.load(tmp_path / "nope.json")
    with pytest.raises(UsageError, match="--format"):
        datasets.load(tmp_path, format="parquet")
    (tmp_path / "a.png").unlink()
    (tmp_path / "l.csv").write_text("image,caption\na.png,x\n")
    with pytest.raises(UsageError, match=r"no image with captions.*1 image\(s\) listed"):
        datasets.load(tmp_path / "l.csv")


def test_parse_int_list():
    assert evaluate.parse_int_list("10,1,5,5", "--recall") == (1, 5, 10)
    assert evaluate.parse_int_list(None, "--recall", (1, 5)) == (1, 5)
    for bad in ("1,x", "0", ","):
        with pytest.raises(UsageError, match="--recall"):
            evaluate.parse_int_list(bad, "--recall")


# --- methods without a model ------------------------------------------------------------


def _fake_hashing() -> types.ModuleType:
    """A stand-in with the interface of itrcli.query.binary: random-hyperplane LSH."""
    mod = types.ModuleType("itrcli.query.binary")

    class Hasher:
        def __init__(self, planes):
            self.planes = planes  # [dim, bits]

        def codes(self, vectors):
            bits = np.asarray(vectors, np.float64) @ self.planes > 0  # [n, bits]
            n, b = bits.shape
            words = (b + 63) // 64
            padded = np.zeros((n, words * 64), dtype=bool)
            padded[:, :b] = bits
            packed = np.packbits(padded.reshape(n, words, 64), axis=2, bitorder="little")
            return packed.view(np.uint64).reshape(n, words)  # [n, words]

    def fit(vectors, bits, method="itq", seed=0):
        if bits < 1:
            raise ValueError("bits must be positive")
        return Hasher(np.random.default_rng(seed).standard_normal((vectors.shape[1], bits)))

    def hamming_topk(query_code, codes, k):
        d = np.bitwise_count(codes ^ query_code[None, :]).sum(axis=1)  # [n]
        order = np.lexsort((np.arange(len(codes)), d))[:k]
        return order.astype(np.int64), d[order]

    mod.fit, mod.Hasher, mod.hamming_topk = fit, Hasher, hamming_topk
    return mod


@pytest.fixture
def fake_hashing(monkeypatch):
    import itrcli

    mod = _fake_hashing()
    monkeypatch.setitem(sys.modules, "itrcli.query.binary", mod)
    monkeypatch.setattr(itrcli, "binary", mod, raising=False)
    return mod


def _naive_hash_ranks(item_codes, query_codes, item_vecs, query_vecs, relevant, c):
    """Plain loops: rank by (popcount of xor, index); re-rank the first c by (-cos, index)."""
    pure, reranked = [], []
    for q in range(len(query_codes)):
        dist = [sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(query_codes[q], item_codes[j]))
                for j in range(len(item_codes))]
        order = sorted(range(len(item_codes)), key=lambda j: (dist[j], j))
        first = next(p for p, j in enumerate(order) if relevant(q, j))
        pure.append(first)
        cos = {j: float(np.dot(item_vecs[j], query_vecs[q])) for j in order[:c]}
        top = sorted(order[:c], key=lambda j: (-cos[j], j))
        reranked.append(next((p for p, j in enumerate(top) if relevant(q, j)), first))
    return pure, reranked


def _dyadic(rng, n, dim):
    # small dyadic entries: dot products are exact, so cosine ties are real ties
    return rng.integers(-2, 3, (n, dim)).astype(np.float32) / 4


def test_hash_method_matches_naive(fake_hashing):
    rng = np.random.default_rng(1)
    n_images, dim = 30, 6
    caption_image = rng.permutation(np.repeat(np.arange(n_images), rng.integers(1, 4, n_images)))
    img, txt = _dyadic(rng, n_images, dim), _dyadic(rng, len(caption_image), dim)
    hasher = fake_hashing.fit(img, 70)  # two words, the second partly used
    ic, tc = hasher.codes(img), hasher.codes(txt)
    for c in (5, 1000):
        p, r, _, _ = evaluate.hash_method(fake_hashing.hamming_topk, ic, tc, img, txt,
                                          lambda q, order: order == caption_image[q], c)
        np_, nr = _naive_hash_ranks(ic, tc, img, txt, lambda q, j: j == caption_image[q], c)
        assert p.tolist() == np_ and r.tolist() == nr
        p, r, _, _ = evaluate.hash_method(fake_hashing.hamming_topk, tc, ic, txt, img,
                                          lambda q, order: caption_image[order] == q, c)
        np_, nr = _naive_hash_ranks(tc, ic, txt, img, lambda q, j: caption_image[j] == q, c)
        assert p.tolist() == np_ and r.tolist() == nr
    # re-ranking every candidate is exact search
    p, r, _, _ = evaluate.hash_method(fake_hashing.hamming_topk, ic, tc, img, txt,
                                      lambda q, order: order == caption_image[q], 10_000)
    assert r.tolist() == metrics.exact_ranks(img, txt, caption_image)[0].tolist()


def test_hnsw_method_agrees_with_exact_on_a_small_set():
    rng = np.random.default_rng(2)
    n_images, dim = 200, 16
    caption_image = np.repeat(np.arange(n_images), 2)
    img = rng.standard_normal((n_images, dim)).astype(np.float32)
    txt = img[caption_image] + 0.8 * rng.standard_normal((len(caption_image), dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    exact = metrics.summarise(*metrics.exact_ranks(img, txt, caption_image), (1, 5, 10))
    approx = metrics.summarise(*evaluate.hnsw_method(img, txt, caption_image, (1, 5, 10)), (1, 5, 10))
    assert exact["t2i"]["R@1"] < 95  # not a trivial set
    for d in ("t2i", "i2t"):
        for k in ("R@1", "R@5", "R@10"):
            assert abs(exact[d][k] - approx[d][k]) <= 1.0, (d, k)


# --- with a model -----------------------------------------------------------------------


def _strip_seconds(result_json):
    out = dict(result_json)
    out["results"] = [{k: v for k, v in r.items() if k != "seconds"} for r in out["results"]]
    return {k: v for k, v in out.items() if k not in ("encoded", "dataset", "format", "split")}


@pytest.fixture
def any_hashing():
    """The binary codes module (itrcli.query.binary)."""
    from itrcli.query import binary

    return binary


def test_plumbing_cache_and_rows(tmp_path, tiny_clip, any_hashing):
    items = draw_set(tmp_path / "imgs", 12)
    paths = write_formats(tmp_path / "ann", tmp_path / "imgs", items)
    (tmp_path / "imgs" / "img004.png").write_bytes(b"not an image")
    ds = datasets.load(paths["csv"], images=tmp_path / "imgs")
    result = evaluate.evaluate(ds, [str(tiny_clip)], ann=True, hash_bits=[16, 64], ks=(1, 3),
                               precision="fp32")
    j = result.to_json()
    assert j["images"] == 11 and j["captions"] == 15  # img004 left out with its caption
    assert j["skipped"] == [{"path": str((tmp_path / "imgs" / "img004.png").absolute()),
                             "error": "not an image (unknown format)"}]
    assert [r["method"] for r in j["results"]] == [
        "exact", "hnsw", "hash-16", "hash-16+rerank", "hash-64", "hash-64+rerank"]
    for r in j["results"]:
        assert set(r["t2i"]) == set(r["i2t"]) == {"R@1", "R@3", "medr"}
        assert r["model"] == str(tiny_clip)
    assert j["results"][0]["rsum"] == j["results"][1]["rsum"]  # HNSW is exact at this size
    assert j["results"][3]["rsum"] == j["results"][0]["rsum"]  # re-ranking all 11 is exact
    stats = j["encoded"][str(tiny_clip)]
    assert stats["images_encoded"] == 11 and stats["captions_encoded"] == 16

    # a second run encodes nothing, and gives the same figures
    cache_file = Path(os.environ["XDG_CACHE_HOME"]) / "itr" / "embeddings.db"
    assert cache_file.is_file()
    again = evaluate.evaluate(ds, [str(tiny_clip)], ann=True, hash_bits=[16, 64], ks=(1, 3),
                              precision="fp32").to_json()
    assert again["encoded"][str(tiny_clip)]["images_encoded"] == 0
    assert again["encoded"][str(tiny_clip)]["captions_encoded"] == 0
    assert _strip_seconds(again) == _strip_seconds(j)
    fresh = evaluate.evaluate(ds, [str(tiny_clip)], ks=(1, 3), precision="fp32", cache=False)
    assert fresh.encoded[str(tiny_clip)]["images_encoded"] == 11
    assert fresh.results[0].to_json()["t2i"] == j["results"][0]["t2i"]

    # folds: the mean of per-fold figures
    folded = evaluate.evaluate(ds, [str(tiny_clip)], folds=2, precision="fp32")
    assert folded.folds == 2 and folded.images == 11
    table = evaluate.format_table(folded)
    assert "text->image" in table and "image->text" in table and "retrieval" not in table
    tsv = evaluate.format_table(folded, aligned=False).splitlines()
    assert tsv[0].split("\t")[:3] == ["model", "method", "text->image R@1"]
    assert len(tsv) == 2 and tsv[1].split("\t")[:2] == [tiny_clip.name, "exact"]


def test_missing_hashing_module_is_a_clear_error(tmp_path, monkeypatch):
    import itrcli.query

    monkeypatch.setitem(sys.modules, "itrcli.query.binary", None)  # import fails
    monkeypatch.delattr(itrcli.query, "binary", raising=False)
    ds = datasets.Dataset("x", "csv", "x.csv", None, ["a.png"], [["a"]])
    with pytest.raises(evaluate.ItrError, match="--hash-bits needs itrcli.query.binary"):
        evaluate.evaluate(ds, ["whatever"], hash_bits=[64])


def test_real_hashing_module_fits_the_interface():
    from itrcli.query import binary

    rng = np.random.default_rng(0)
    img = rng.standard_normal((300, 32)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    caption_image = np.arange(300)
    txt = img + 0.3 * rng.standard_normal(img.shape).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    h = binary.fit(img, 64, method="itq", seed=0)
    ic = h.codes(img)
    assert ic.dtype == np.uint64 and ic.shape == (300, 1)
    idx, dist = binary.hamming_topk(h.codes(txt[:1])[0], ic, 5)
    assert len(idx) == 5 and list(dist) == sorted(dist)
    exact = metrics.summarise(*metrics.exact_ranks(img, txt, caption_image), (1,))
    p, r, _, _ = evaluate.hash_method(binary.hamming_topk, ic, h.codes(txt), img, txt,
                                      lambda q, order: order == q, 100)
    assert metrics.recall_at(p, 1) <= metrics.recall_at(r, 1) <= exact["t2i"]["R@1"] + 1e-9
    assert metrics.recall_at(r, 1) >= exact["t2i"]["R@1"] - 5


def test_micro_clip_far_above_chance_and_same_in_every_format(tmp_path, micro_clip):
    if not (micro_clip / "README.md").exists():  # train_micro_clip.py writes it last
        pytest.skip("tests/fixtures/micro-clip is incomplete (training not finished: no README.md)")
    n = 60
    items = draw_set(tmp_path / "imgs", n)
    paths = write_formats(tmp_path / "ann", tmp_path / "imgs", items)
    out = {}
    for fmt in FORMATS:
        ds = load_format(fmt, paths, tmp_path / "imgs")
        out[fmt] = evaluate.evaluate(ds, [str(micro_clip)], precision="fp32").to_json()
    first = _strip_seconds(out["karpathy"])
    for fmt in FORMATS[1:]:
        assert _strip_seconds(out[fmt]) == first, fmt
    r = out["karpathy"]["results"][0]
    assert out["karpathy"]["images"] == n and out["karpathy"]["captions"] == n + n // 3
    # chance: R@1 = 1/60 = 1.7 %, R@5 = 8.3 %, R@10 = 16.7 % in both directions
    assert r["t2i"]["R@1"] > 30 and r["t2i"]["R@5"] > 60 and r["t2i"]["R@10"] > 75, r
    assert r["i2t"]["R@1"] > 30 and r["i2t"]["R@5"] > 60 and r["i2t"]["R@10"] > 75, r
    print(json.dumps(r))


# --- the command line ---------------------------------------------------------------------




def _run_cli(*args, env_home: Path):
    env = dict(os.environ, XDG_CACHE_HOME=str(env_home / "cache"), HOME=str(env_home),
               HF_HUB_OFFLINE="1")
    env.pop("ITR_DB", None)
    env.pop("ITR_MODEL", None)
    return subprocess.run([sys.executable, "-m", "itrcli", "eval", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_eval_json_and_reports(tmp_path, tiny_clip):
    items = draw_set(tmp_path / "imgs", 6)
    paths = write_formats(tmp_path / "ann", tmp_path / "imgs", items)
    (tmp_path / "imgs" / "img002.png").unlink()
    p = _run_cli(paths["karpathy"], "--images", tmp_path / "imgs", "-m", tiny_clip,
                 "--precision", "fp32", "-k", "1,5", "--ann", "--json", env_home=tmp_path)
    assert p.returncode == 0, p.stderr
    j = json.loads(p.stdout)
    assert j["dataset"] == "shapes" and j["split"] == "test"
    assert j["images"] == 5 and j["missing"] == 1
    assert [r["method"] for r in j["results"]] == ["exact", "hnsw"]
    assert set(j["results"][0]["t2i"]) == {"R@1", "R@5", "medr"}
    assert "1 image(s) listed in" in p.stderr and "img002.png" in p.stderr
    assert p.stderr.rstrip().endswith("shapes test: 5 images, 7 captions; 1 missing image(s) left out")


def test_cli_eval_bad_data_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "bad.csv").write_text("image,caption\na.png,fine\nb.png,\n")
    p = _run_cli(tmp_path / "bad.csv", env_home=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"Error: {tmp_path / 'bad.csv'}:3 (b.png): empty caption"]
