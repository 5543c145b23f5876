"""Indexing throughput of `itr index` against a straightforward reference pipeline.

Builds (once, cached under bench/out/) a real-architecture random-weight ViT-B/32 model
directory (cost does not depend on the weight values) and reproducible photo sets of
12 MP (4000x3000) and 2 MP (1632x1224) JPEGs.  For each set it runs, as whole processes:

- `itr index` into a fresh library, on 24 and on 96 photos;
- the reference: the model's own processor on fully decoded images, fp32, batches of 16.

Net throughput = 72 extra photos / extra seconds between the 24- and the 96-photo run, so
process start, imports, model load and warm-up cancel.  Also reports peak RSS, and the time
of a re-run of `itr index` over N unchanged files (walk + change detection only), and with
`--rss N` the peak RSS of one `itr index` run over N distinct 2 MP photos.

    python bench/index_throughput.py [--sizes 12mp,2mp] [--unchanged 100000] [--rss 10000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# test support (model factories, drawings) lives beside the tests, not in the wheel
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SIZES = {"12mp": (4000, 3000), "2mp": (1632, 1224)}

REFERENCE = r"""
import sys, torch
from PIL import Image, ImageOps
from transformers import AutoModel, AutoProcessor
model_dir, paths = sys.argv[1], sys.argv[2:]
model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
proc = AutoProcessor.from_pretrained(model_dir)
torch.set_num_threads(%d)
with torch.inference_mode():
    for i in range(0, len(paths), 16):
        imgs = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths[i:i + 16]]
        x = proc(images=imgs, return_tensors="pt")["pixel_values"]
        f = model.get_image_features(pixel_values=x).pooler_output
        f = f / f.norm(dim=-1, keepdim=True)
"""


def _make(job: tuple[Path, int, int, int]) -> None:
    from support import synth

    p, w, h, seed = job
    synth.make_photo(p, w, h, seed=seed)


def photos(kind: str, n: int) -> list[Path]:
    from multiprocessing import Pool

    w, h = SIZES[kind]
    d = OUT / f"photos-{kind}"
    d.mkdir(parents=True, exist_ok=True)
    out = [d / (f"{i:04d}.jpg" if i < 10_000 else f"{i}.jpg") for i in range(n)]
    todo = [(p, w, h, i) for i, p in enumerate(out) if not p.exists()]
    if todo:
        with Pool(os.cpu_count() or 1) as pool:
            pool.map(_make, todo, chunksize=16)
    return out


def model_dir() -> Path:
    from support import synth

    d = OUT / "vit-b32"
    if not (d / "model.safetensors").exists():
        synth.make_vit_b32(d)
    return d


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB of this child alone)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed with {proc.returncode}")
    return dt, usage.ru_maxrss / 1024


def itr_index(paths: list[Path], extra: list[str]) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "photos"
        d.mkdir()
        for p in paths:
            os.symlink(p, d / p.name)
        return run([sys.executable, "-m", "itrcli", "index", str(d), "--db", str(Path(tmp) / "lib"),
                    "-m", str(model_dir()), "-q", *extra])


def reference(paths: list[Path]) -> tuple[float, float]:
    code = REFERENCE % (os.cpu_count() or 1)
    return run([sys.executable, "-c", code, str(model_dir()), *map(str, paths)])


def net(small: float, large: float, n_small: int, n_large: int) -> float:
    return (n_large - n_small) / (large - small)


def unchanged_rerun(n: int) -> float:
    """Seconds for `itr index` over n unchanged (tiny, already indexed) files."""
    import numpy as np

    from itrcli.library import Library

    d = OUT / f"unchanged-{n}"
    lib_dir = OUT / f"unchanged-lib-{n}"
    if not (lib_dir / "itr.db").exists():
        d.mkdir(parents=True, exist_ok=True)
        lib = Library.open(lib_dir, create=True)
        enc = lib.encoder(str(model_dir()), "cpu", "fp32")
        lib._bind(enc)
        vec = np.ones(enc.dim, dtype=np.float32) / np.sqrt(enc.dim)
        with lib.store.transaction() as c:
            for i in range(n):
                sub = d / f"{i // 1000:03d}"
                sub.mkdir(exist_ok=True)
                p = sub / f"{i:06d}.jpg"
                p.write_bytes(b"")
                st = p.stat()
                lib.store.insert_file(c, str(p), {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                   "hash": f"{i:032x}"}, vec)
        lib.store.set_meta(roots=[str(d)])
        lib.close()
    cmd = [sys.executable, "-m", "itrcli", "index", str(d), "--db", str(lib_dir), "-q"]
    subprocess.run(cmd, check=True)  # brings a new library up to date (graph saved, ef measured)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="12mp,2mp")
    ap.add_argument("--small", type=int, default=24)
    ap.add_argument("--large", type=int, default=96)
    ap.add_argument("--unchanged", type=int, default=100_000)
    ap.add_argument("--rss", type=int, default=0, metavar="N",
                    help="also index N distinct 2 MP photos in one run and report its peak RSS")
    ap.add_argument("--itr-args", default="", help="extra itr index options, e.g. '--precision bf16'")
    a = ap.parse_args()
    model_dir()
    extra = a.itr_args.split()
    print(f"cpus: {os.cpu_count()}, model: random-weight ViT-B/32 ({model_dir()})")
    for kind in filter(None, a.sizes.split(",")):
        ps = photos(kind, a.large)
        i_s, _ = itr_index(ps[: a.small], extra)
        i_l, i_rss = itr_index(ps, extra)
        r_s, _ = reference(ps[: a.small])
        r_l, r_rss = reference(ps)
        itr_net, ref_net = net(i_s, i_l, a.small, a.large), net(r_s, r_l, a.small, a.large)
        print(f"{kind}: itr index {itr_net:.1f} img/s net ({a.small}: {i_s:.1f}s, {a.large}: {i_l:.1f}s, "
              f"end to end {a.large / i_l:.1f} img/s, peak RSS {i_rss:.0f} MiB)")
        print(f"{kind}: reference {ref_net:.1f} img/s net ({a.small}: {r_s:.1f}s, {a.large}: {r_l:.1f}s, "
              f"peak RSS {r_rss:.0f} MiB)")
        print(f"{kind}: ratio itr / reference: {itr_net / ref_net:.2f}x")
    if a.rss:
        ps = photos("2mp", a.rss)
        dt, rss = itr_index(ps, extra)
        print(f"itr index of {a.rss} distinct 2 MP photos: {dt:.0f}s end to end "
              f"({a.rss / dt:.1f} img/s), peak RSS {rss:.0f} MiB")
    if a.unchanged:
        print(f"re-run over {a.unchanged} unchanged files: {unchanged_rerun(a.unchanged):.2f}s")


if __name__ == "__main__":
    main()
