"""How far bf16 (and fp16 on CUDA) embeddings are from fp32, on the real ViT-B/32 architecture.

Encodes the same photos and texts in fp32 and in a lower precision with a random-weight
model of the laion ViT-B/32 architecture (built by bench/index_throughput.py's helpers) and
prints the cosine between the two embeddings of each item (target: >= 0.999), and the
speed of each precision.  On CPUs without native bf16 the bf16 run is emulated and slow,
which is why `--precision auto` picks fp32 there.

    python bench/precision.py [--precision bf16] [--device cpu] [--n 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TEXTS = ["two children on a lawn", "a dog on a beach at sunset", "a red car", "receipt"]


def main() -> None:
    import numpy as np

    from index_throughput import model_dir, photos
    from itrcli.embed.encoder import Encoder
    from itrcli.ingest.images import decode_file

    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=16)
    a = ap.parse_args()
    paths = photos("2mp", a.n)
    ref = Encoder(str(model_dir()), a.device, "fp32")
    px = np.stack([decode_file(str(p), ref.prep, draft=True)[0] for p in paths])  # [n, 3, H, W]
    t = time.perf_counter()
    img32 = ref.encode_pixels(px)
    s32 = len(paths) / (time.perf_counter() - t)
    txt32 = ref.encode_texts(TEXTS)
    del ref
    low = Encoder(str(model_dir()), a.device, a.precision)
    t = time.perf_counter()
    img_lo = low.encode_pixels(px)
    s_lo = len(paths) / (time.perf_counter() - t)
    txt_lo = low.encode_texts(TEXTS)
    ci, ct = (img32 * img_lo).sum(1), (txt32 * txt_lo).sum(1)
    print(f"{a.device} {a.precision} vs fp32, {len(paths)} photos, {len(TEXTS)} texts:")
    print(f"  image cosine min {ci.min():.5f} mean {ci.mean():.5f}; text cosine min {ct.min():.5f}")
    print(f"  encoder speed: fp32 {s32:.1f} img/s, {a.precision} {s_lo:.1f} img/s")


if __name__ == "__main__":
    main()
