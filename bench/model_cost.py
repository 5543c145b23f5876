"""CPU cost of every model preset's image tower, relative to laion-b32, on the real
architectures with random weights (cost does not depend on the weight values).

Each preset's image tower encodes batches of 32 random images at its own input size for at
least --seconds; laion-b32's (open_clip "ViT-B-32", the same architecture) is measured
between every two presets and the ratio is taken against the mean of its two neighbours,
so a change of load moves both.  open_clip presets are built with open_clip from its
built-in configs (needs open_clip: run with the environment .ci/run makes for it);
transformers presets with ``Encoder`` on a random-weight checkpoint (tests/support/synth).

    python bench/model_cost.py [--precision fp32] [--seconds 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

OUT = Path(__file__).resolve().parent / "out"
#: preset -> open_clip architecture name (open_clip's model_configs)
OPENCLIP_ARCH = {
    "laion-b32": "ViT-B-32",
    "mobileclip-s0": "MobileCLIP2-S0",  # the same image tower (fastvit_mci0) at 256 px
    "mobileclip-s1": "MobileCLIP-S1", "mobileclip-s2": "MobileCLIP-S2",
    "mobileclip-b": "MobileCLIP-B",
    "mobileclip2-s0": "MobileCLIP2-S0", "mobileclip2-s2": "MobileCLIP2-S2",
    "mobileclip2-b": "MobileCLIP2-B", "mobileclip2-s3": "MobileCLIP2-S3",
    "mobileclip2-s4": "MobileCLIP2-S4", "mobileclip2-l14": "MobileCLIP2-L-14",
    "dfn-b16": "ViT-B-16-quickgelu", "dfn-l14": "ViT-L-14-quickgelu",
    "datacomp-b32-256": "ViT-B-32-256",
}


def openclip_runner(arch: str, precision: str):
    import open_clip
    import torch

    from timm.utils.model import reparameterize_model

    model = open_clip.create_model(arch, pretrained=None).eval()
    reparameterize_model(model.visual, inplace=True)  # as itr runs MobileCLIP (a no-op for ViTs)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = model.to(dtype)
    x = torch.randn(32, 3, size, size, dtype=dtype)

    def run() -> int:
        with torch.inference_mode():
            model.encode_image(x)
        return len(x)

    return run


def hf_runner(arch: str, precision: str):
    import numpy as np

    from itrcli.embed.encoder import Encoder
    from support import synth

    enc = Encoder(str(synth.bench_model(arch, OUT)), device="cpu", precision=precision, towers="image")
    p = enc.prep
    x = np.random.default_rng(0).standard_normal(
        (32, 3, p.crop_height or p.height, p.crop_width or p.width)).astype(np.float32)

    def run() -> int:
        enc.encode_pixels(x)
        return len(x)

    return run


def rate(run, seconds: float) -> float:
    run()  # warm-up
    t, n = time.perf_counter(), 0
    while n < 64 or time.perf_counter() - t < seconds:
        n += run()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--only", default="", help="comma-separated presets")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    names = [n for n in a.only.split(",") if n] or (list(OPENCLIP_ARCH)[1:] + ["siglip2-b32"])
    ref = openclip_runner("ViT-B-32", a.precision)
    before = rate(ref, a.seconds)
    out = {}
    for name in names:
        run = hf_runner(name, a.precision) if name == "siglip2-b32" else openclip_runner(OPENCLIP_ARCH[name], a.precision)
        r = rate(run, a.seconds)
        after = rate(ref, a.seconds)
        base = (before + after) / 2
        out[name] = {"img_s": round(r, 2), "laion_b32_img_s": round(base, 2),
                     "cpu_cost": round(base / r, 2)}
        print(f"{name:<18} {r:7.2f} img/s  laion-b32 {base:6.2f} img/s  cost {base / r:5.2f}x",
              file=sys.stderr, flush=True)
        before = after
        del run
    if a.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
