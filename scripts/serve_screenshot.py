#!/usr/bin/env python3
"""The screenshot of the README (docs/serve.png): `itr serve` over a library of drawings,
searched in headless Chromium.

    python scripts/serve_screenshot.py [--out docs/serve.png]

Offline: the drawings and the micro CLIP come with the repository (tests/support,
tests/fixtures/micro-clip); the browser is the system's chromium, driven by Playwright.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _exif(n: int):
    """A capture date, a camera and a place (around Marseille), as a phone writes them."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Google", "Pixel 8"
    when = f"2024:07:{1 + n % 28:02d} {8 + n % 12:02d}:30:00"
    exif.get_ifd(0x8769)[0x9003] = when  # DateTimeOriginal
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (43.0, 17.0 + n % 20, 45.0)
    gps[3], gps[4] = "E", (5.0, 22.0 + n % 15, 12.0)
    return exif


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "serve.png"))
    ap.add_argument("--query", default="a red circle")
    args = ap.parse_args()

    from PIL import Image
    from playwright.sync_api import sync_playwright

    from conftest import MICRO_CLIP, run_itr
    from support import serving, synth

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.update(HOME=str(tmp / "home"), XDG_CACHE_HOME=str(tmp / "cache"),
                          HF_HUB_OFFLINE="1")
        photos = tmp / "photos" / "2024 summer"
        photos.mkdir(parents=True)
        n = 0
        for color in ("red", "blue", "green"):
            for shape in ("circle", "square"):
                for pos in ("left", "right"):
                    for seed in range(2):
                        synth.draw(color, shape, pos, size=192, seed=seed + n).save(
                            photos / f"{color}-{shape}-{pos}-{seed}.jpg", quality=88,
                            exif=_exif(n))
                        n += 1
        r = run_itr("index", tmp / "photos", "--db", tmp / "lib", "-m", MICRO_CLIP, "-q")
        assert r.code == 0, r
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        with serving.start(tmp / "lib") as s, sync_playwright() as p:
            b = p.chromium.launch(executable_path=exe, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            pg = b.new_page(viewport={"width": 1000, "height": 600},
                            color_scheme="light")
            pg.goto(f"{s.url}/?q={args.query.replace(' ', '+')}")
            pg.wait_for_selector(".card img")
            pg.evaluate("() => new Promise(r => { const t = () => [...document.images]"
                        ".every(i => i.complete) ? r() : setTimeout(t, 50); t(); })")
            png = pg.screenshot()
            b.close()
    img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=64, dither=Image.Dither.NONE)
    img.save(args.out, optimize=True)
    print(f"{args.out}: {Path(args.out).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
