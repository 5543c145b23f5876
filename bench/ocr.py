"""Scene text: retrieval on a text-in-photo set, and OCR speed.

The set (made here, reproducibly, under bench/out/ocr-set-SEED/): --words photos with a
word or a short phrase and as many photos without text, 640x480.  Every photo is a
coloured shape of the micro model's world (tests/support/synth.draw: "a red circle on the
left") over a photo-like background (gradient, texture, noise).  The words are English
words of 4-10 letters, none of them a colour, shape or position, drawn with one of several
fonts (DejaVu Sans/Serif/Mono, bold, italic, condensed), 12-60 px high (height of the
rendered word's box, measured), dark, light or low-contrast colours, rotated up to 30
degrees, a third of them with a perspective warp.

Queries, each against its own relevant photos:
- word: the word (lower case) -> the photo with it;
- prefix: its first 5 letters (words of 6+ letters) -> that photo;
- descriptive: the caption of each textless photo's shape -> every photo drawn with it.

R@1 / R@5 for cosine alone (--no-text), text alone (--text-only) and fused, with the
micro model (tests/fixtures/micro-clip), through the Library API.  Goals (issue 14):
fused word R@1 >= 0.95 for words of 4+ letters at least 20 px high; prefix R@5 >= 0.9;
fused never worse than cosine on the descriptive queries.

Speed: OCR of 2 MP photos (1632x1224, bench/index_throughput's photo generator) with a
word and without text (the detector alone, nothing recognised), images/s over all cores;
and `itr index` of the same photos into fresh libraries with and without --ocr.

    python bench/ocr.py [--words 100] [--speed 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

OUT = HERE / "out"
MICRO = HERE.parent / "tests" / "fixtures" / "micro-clip"
SIZE = (640, 480)
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf",
         "DejaVuSansMono.ttf", "DejaVuSansCondensed-Bold.ttf", "DejaVuSerifCondensed.ttf"]
WORDS = """
harbour bakery station invoice receipt museum library pharmacy garage theatre cinema market
bridge airport hospital school office kitchen garden village mountain river castle church
tower palace hotel coffee pizza burger noodle sushi bread butter cheese lemon orange mango
apple banana cherry grape melon peach plum tomato potato carrot onion pepper garlic ginger
honey sugar flour salt vinegar olive walnut almond peanut cookie candle lantern mirror
window ladder hammer anchor rocket planet comet galaxy dragon tiger zebra monkey rabbit
turtle parrot falcon salmon lobster oyster shrimp jacket sweater boots gloves scarf helmet
wallet ticket passport camera guitar violin piano trumpet drum record poster magazine
journal letter parcel stamp sticker marble granite copper silver bronze velvet cotton
""".split()
PHRASE_TAILS = ["open daily", "est 1984", "sale today", "north gate", "room 12", "exit only"]


# --- the set ---------------------------------------------------------------------------------

def background(color: str, shape: str, pos: str, seed: int):
    """A shape of the micro model's world over a photo-like background."""
    import numpy as np
    from PIL import Image

    from support import synth

    rng = np.random.default_rng(seed)
    shape_img = synth.draw(color, shape, pos, size=SIZE[1], seed=seed).resize(SIZE)
    low = Image.fromarray(rng.integers(150, 250, size=(3, 4, 3), dtype=np.uint8), "RGB")
    grad = np.asarray(low.resize(SIZE, Image.Resampling.BICUBIC), dtype=np.float32)
    arr = np.asarray(shape_img, dtype=np.float32)
    light = arr.mean(axis=2, keepdims=True) > 200  # the drawing's background
    mixed = np.where(light, 0.5 * arr + 0.5 * grad, arr)
    mixed += rng.normal(0, 6, size=mixed.shape)
    return Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8), "RGB")


def _font(name: str, px: int):
    from PIL import ImageFont

    p = FONT_DIR / name
    return ImageFont.truetype(str(p), px) if p.exists() else ImageFont.load_default(size=px)


def draw_words(img, text: str, rng) -> dict:
    """Draw ``text`` on ``img`` (in place) with a random style; returns the style."""
    import numpy as np
    from PIL import Image, ImageDraw

    font_name = FONTS[int(rng.integers(len(FONTS)))]
    want = int(rng.choice([14, 17] + [22, 26, 30, 36, 44, 52, 60] * 3))  # word box height
    px = want
    for _ in range(4):  # font size that gives the wanted box height
        font = _font(font_name, px)
        l, t, r, b = font.getbbox(text)
        px = max(8, round(px * want / max(1, b - t)))
    font = _font(font_name, px)
    l, t, r, b = font.getbbox(text)
    height = b - t
    layer = Image.new("RGBA", (r - l + 16, b - t + 16), (0, 0, 0, 0))
    kind = rng.choice(["dark", "light", "low"], p=[0.5, 0.25, 0.25])
    angle = float(rng.uniform(-30, 30))
    warp = bool(rng.random() < 1 / 3)
    # where it goes: the local background decides the colour
    lw, lh = layer.size
    diag = int(math.hypot(lw, lh)) + 4
    x = int(rng.integers(0, max(1, SIZE[0] - diag)))
    y = int(rng.integers(0, max(1, SIZE[1] - diag)))
    bg = np.asarray(img.crop((x, y, x + diag, y + diag)), dtype=np.float32).mean(axis=(0, 1))
    if kind == "dark":
        fill = tuple(int(v) for v in rng.integers(0, 70, size=3))
    elif kind == "light":
        fill = tuple(int(v) for v in rng.integers(235, 256, size=3))
        plate = Image.new("RGBA", layer.size, tuple(int(v) for v in rng.integers(20, 90, size=3)) + (255,))
        layer = plate  # light letters on a dark sign
    else:  # low contrast: 45-60 levels darker than what is behind
        d = float(rng.uniform(45, 60))
        fill = tuple(int(max(0, v - d)) for v in bg)
    ImageDraw.Draw(layer).text((8 - l, 8 - t), text, font=font, fill=fill + (255,))
    if warp:  # keystone: one side shrunk by up to 25%
        w, h = layer.size
        k = float(rng.uniform(0.1, 0.25)) * h
        coeffs = _perspective([(0, 0), (w, k), (w, h - k), (0, h)], [(0, 0), (w, 0), (w, h), (0, h)])
        layer = layer.transform(layer.size, Image.Transform.PERSPECTIVE, coeffs,
                                Image.Resampling.BICUBIC)
    layer = layer.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
    img.paste(layer, (x, y), layer)
    return {"font": font_name, "height": int(height), "colour": str(kind),
            "angle": round(angle, 1), "perspective": warp}


def _perspective(dst, src):
    """Coefficients for Image.transform(PERSPECTIVE) mapping output points ``dst`` to
    input points ``src``."""
    import numpy as np

    a = []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    b = [c for pt in src for c in pt]
    return np.linalg.solve(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)).tolist()


def make_set(n_words: int, seed: int) -> tuple[Path, list[dict]]:
    import numpy as np

    from support import synth

    d = OUT / f"ocr-set-{seed}-{n_words}"
    manifest = d / "manifest.json"
    if manifest.exists():
        return d, json.loads(manifest.read_text())
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    combos = synth.combinations()
    words = list(rng.permutation(WORDS))[:n_words]
    if len(words) < n_words:
        raise SystemExit(f"--words at most {len(WORDS)}")
    items = []
    for i in range(2 * n_words):
        color, shape, pos = combos[int(rng.integers(len(combos)))]
        img = background(color, shape, pos, seed * 100_000 + i)
        item = {"file": f"{i:04d}.jpg", "caption": synth.caption(color, shape, pos)}
        if i < n_words:
            word = str(words[i])
            text = word.upper() if rng.random() < 0.4 else word.capitalize()
            if rng.random() < 0.3:
                text = f"{text} {PHRASE_TAILS[int(rng.integers(len(PHRASE_TAILS)))]}"
            item.update(word=word, text=text, **draw_words(img, text, rng))
        img.save(d / item["file"], quality=90)
        items.append(item)
    manifest.write_text(json.dumps(items, indent=1))
    return d, items


# --- retrieval ---------------------------------------------------------------------------------

def recall(lib, queries: list[tuple[str, set[str]]], mode: str) -> tuple[float, float]:
    from itrcli.errors import ItrError

    r1 = r5 = 0
    for q, relevant in queries:
        try:
            hits = lib.search(q, top=5, text_match=mode)
        except ItrError:  # e.g. --text-only on a query with no word to match
            hits = []
        names = [os.path.basename(h.path) for h in hits]
        r1 += bool(names[:1] and names[0] in relevant)
        r5 += any(n in relevant for n in names[:5])
    n = max(1, len(queries))
    return r1 / n, r5 / n


def retrieval(n_words: int, seed: int) -> dict:
    from itrcli import Library

    d, items = make_set(n_words, seed)
    lib_dir = Path(tempfile.mkdtemp(prefix="itr-ocr-bench-"))
    with Library.open(lib_dir, create=True) as lib:
        t = time.perf_counter()
        s = lib.index([str(d)], model=str(MICRO), ocr=True)
        index_s = time.perf_counter() - t
    texted = [it for it in items if "word" in it]
    by_caption: dict[str, set[str]] = {}
    for it in items:
        by_caption.setdefault(it["caption"], set()).add(it["file"])
    groups = {
        "word (all)": [(it["word"], {it["file"]}) for it in texted],
        "word 4+ letters, >= 20 px": [(it["word"], {it["file"]}) for it in texted
                                      if len(it["word"]) >= 4 and it["height"] >= 20],
        "word < 20 px": [(it["word"], {it["file"]}) for it in texted if it["height"] < 20],
        "prefix (5 letters)": [(it["word"][:5], {it["file"]}) for it in texted
                               if len(it["word"]) >= 6 and it["height"] >= 20],
        "descriptive": sorted({(it["caption"], frozenset(by_caption[it["caption"]]))
                               for it in items if "word" not in it}),
    }
    rows = {}
    with Library.open(lib_dir, readonly=True) as lib:
        for name, qs in groups.items():
            qs = [(q, set(rel)) for q, rel in qs]
            rows[name] = {"queries": len(qs)}
            for mode, label in (("none", "cosine"), ("only", "text"), ("auto", "fused")):
                r1, r5 = recall(lib, qs, mode)
                rows[name][label] = {"R@1": round(r1, 3), "R@5": round(r5, 3)}
    # what the reader missed, for the record
    misses = []
    with Library.open(lib_dir, readonly=True) as lib:
        for it in texted:
            hits = lib.search(it["word"], top=1, text_match="only")
            if not hits or os.path.basename(hits[0].path) != it["file"]:
                misses.append({k: it[k] for k in ("file", "text", "height", "colour", "angle",
                                                  "perspective", "font")})
    return {"set": str(d), "photos": len(items), "with_text": len(texted),
            "index_seconds": round(index_s, 1), "ocr": s.text.to_json() if s.text else None,
            "recall": rows, "word_misses": misses}


# --- speed ---------------------------------------------------------------------------------------

def speed(n: int) -> dict:
    import numpy as np
    from PIL import Image

    from index_throughput import photos
    from itrcli import Library
    from itrcli.ingest.images import open_image
    from itrcli.ingest.ocr import TextReader

    plain = photos("2mp", n)
    worded_dir = OUT / "photos-2mp-words"
    worded_dir.mkdir(parents=True, exist_ok=True)
    worded = []
    rng = np.random.default_rng(1)
    for i, p in enumerate(plain):
        q = worded_dir / p.name
        if not q.exists():
            img = Image.open(p).convert("RGB")
            for j in range(3):  # three signs per photo
                sub = img.crop((0, 0, 640, 480))
                draw_words(sub, f"{WORDS[(3 * i + j) % len(WORDS)].upper()} {WORDS[(i + 7 * j) % len(WORDS)]}", rng)
                img.paste(sub, (j * 480 % 1000, j * 380))
            img.save(q, quality=90)
        worded.append(q)
    reader = TextReader()
    reader.read(open_image(plain[0].read_bytes())[0])  # load the models
    out = {}
    for name, paths in (("2mp_with_text", worded), ("2mp_without_text", plain)):
        imgs = [open_image(p.read_bytes())[0] for p in paths]
        t = time.perf_counter()
        lines = sum(len(reader.read_kept(im)) for im in imgs)
        dt = time.perf_counter() - t
        out[name] = {"images": len(imgs), "images_per_second": round(len(imgs) / dt, 2),
                     "seconds_per_image": round(dt / len(imgs), 3), "lines": lines}
    runs = {}
    for flag in ("--no-ocr", "--ocr"):
        lib_dir = Path(tempfile.mkdtemp(prefix="itr-ocr-speed-"))
        with Library.open(lib_dir, create=True) as lib:
            t = time.perf_counter()
            lib.index([str(p) for p in worded], model=str(MICRO), ocr=flag == "--ocr")
            runs[flag] = round(time.perf_counter() - t, 2)
    out["index_seconds"] = runs
    out["index_extra_seconds_per_image"] = round((runs["--ocr"] - runs["--no-ocr"]) / len(worded), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--words", type=int, default=100, help="photos with text (as many without)")
    ap.add_argument("--speed", type=int, default=8, help="2 MP photos timed (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res = {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0]}
    res["retrieval"] = retrieval(a.words, a.seed)
    if a.speed:
        res["speed"] = speed(a.speed)
    if a.json:
        print(json.dumps(res, indent=1))
        return
    r = res["retrieval"]
    print(f"set: {r['photos']} photos ({r['with_text']} with text), {r['set']}; "
          f"index --ocr {r['index_seconds']}s; load average at start {res['load_average_at_start']:.1f}")
    print(f"{'queries':<28}{'n':>4}  {'cosine R@1/R@5':>15}  {'text R@1/R@5':>13}  {'fused R@1/R@5':>14}")
    for name, row in r["recall"].items():
        cells = [f"{row[m]['R@1']:.3f}/{row[m]['R@5']:.3f}" for m in ("cosine", "text", "fused")]
        print(f"{name:<28}{row['queries']:>4}  {cells[0]:>15}  {cells[1]:>13}  {cells[2]:>14}")
    print(f"words the reader missed (text-only R@1): {len(r['word_misses'])}")
    for m in r["word_misses"][:15]:
        print(f"  {m}")
    if "speed" in res:
        s = res["speed"]
        for k in ("2mp_with_text", "2mp_without_text"):
            print(f"OCR {k}: {s[k]['images_per_second']} images/s ({s[k]['seconds_per_image']} s "
                  f"each, {s[k]['lines']} lines, {s[k]['images']} photos)")
        print(f"itr index of {s['2mp_with_text']['images']} 2 MP photos, micro model: "
              f"{s['index_seconds']['--no-ocr']}s without OCR, {s['index_seconds']['--ocr']}s with "
              f"(+{s['index_extra_seconds_per_image']} s per photo)")


if __name__ == "__main__":
    main()
