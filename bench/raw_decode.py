#!/usr/bin/env python
"""Benchmark camera RAW decoding (``itrcli.ingest.raw``) against a JPEG of the same size.

Each file is decoded and preprocessed as an index run does it (``open_image`` with the
model's preprocessing as the draft request, then ``Preprocess`` to ``[3, 224, 224]``):

- ``jpeg``: a JPEG of ``--mp`` megapixels (quality 92), the camera's own JPEG twin;
- ``raw-preview``: a DNG of the same size whose embedded preview is that JPEG, full size
  (as Canon, Nikon and Fuji bodies write them): the preview path;
- ``raw-demosaic``: the same DNG without a preview (an old or stripped RAW): LibRaw's
  half-size demosaic of the 16-bit mosaic;
- ``raw-demosaic-full``: for scale, what a reader asking for full size would cost
  (``draft_for=None`` on the preview-less DNG is still half size: this row is LibRaw's
  full AHD demosaic, which itr never does).

The picture is a drawn scene with texture (gradients, shapes, noise), so that the JPEG's
entropy decoding costs what a photo's does.  Median of ``--repeats`` after one warm-up, one
file at a time (one decode worker; rawpy's wheel builds LibRaw with OpenMP, which may use
every core in the demosaic).

Usage:
    python bench/raw_decode.py [--mp 24] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from itrcli.ingest.images import Preprocess, open_image  # noqa: E402
from support.raws import make_dng  # noqa: E402


def scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like picture: a sky gradient, a textured ground, shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    r = 90 + 120 * y + 20 * np.sin(x * 40)
    g = 140 + 60 * y * x + 25 * np.sin(y * 90 + x * 13)
    b = 220 - 150 * y + 15 * np.cos(x * 70)
    img = np.stack([r + 0 * x, g + 0 * x, b + 0 * x], axis=2)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    pic = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pic)
    for _ in range(40):
        cx, cy = rng.integers(0, width), rng.integers(height // 3, height)
        s = int(rng.integers(width // 60, width // 8))
        d.ellipse((cx - s, cy - s, cx + s, cy + s), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return pic


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mp", type=float, default=24.0, help="megapixels (3:2)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import rawpy

    h = int((args.mp * 1e6 / 1.5) ** 0.5) // 2 * 2
    w = int(h * 1.5) // 2 * 2
    prep = Preprocess()  # CLIP ViT-B/32: shortest edge 224, centre crop 224
    pic = scene(w, h)
    with tempfile.TemporaryDirectory() as d:
        jpg = Path(d) / "IMG_0001.JPG"
        pic.save(jpg, quality=92)
        with_preview = make_dng(Path(d) / "IMG_0001.DNG", pic, preview=max(w, h))
        bare = make_dng(Path(d) / "OLD_0001.DNG", pic, preview=None)
        files = {"jpeg": jpg, "raw-preview": with_preview, "raw-demosaic": bare}
        data = {k: p.read_bytes() for k, p in files.items()}

        def index_decode(kind):
            def run():
                img, meta = open_image(data[kind], draft_for=prep, name=str(files[kind]))
                prep(img, (meta.width, meta.height))
            return run

        def full_demosaic():
            with rawpy.imread(io.BytesIO(data["raw-demosaic"])) as raw:
                raw.postprocess(use_camera_wb=True, output_bps=8)

        rows = {k: timed(index_decode(k), args.repeats) for k in files}
        rows["raw-demosaic-full"] = timed(full_demosaic, max(1, args.repeats // 2))
        sizes = {k: len(v) for k, v in data.items()}
    base = rows["jpeg"]
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}, rawpy {rawpy.__version__}, LibRaw "
                   f"{'.'.join(map(str, rawpy.libraw_version))}",
        "size": f"{w}x{h}",
        "seconds": {k: round(v, 4) for k, v in rows.items()},
        "vs_jpeg": {k: round(v / base, 2) for k, v in rows.items()},
        "file_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()},
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{out['machine']}; {out['size']} ({args.mp:g} MP), median of {args.repeats}")
    print(f"{'path':<20} {'s/file':>8} {'x JPEG':>7} {'file MB':>8}")
    for k, v in rows.items():
        mb = out["file_mb"].get(k, out["file_mb"]["raw-demosaic"])
        print(f"{k:<20} {v:8.3f} {v / base:7.2f} {mb:8.1f}")


if __name__ == "__main__":
    main()
