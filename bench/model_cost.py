"""CPU cost of every model preset's image tower, relative to laion-b32, on the real
architectures with random weights (cost does not depend on the weight values).

Each preset's image tower encodes batches of 32 random images (8 for towers of over 250 M
parameters) at its own input size for at least --seconds; laion-b32's (open_clip
"ViT-B-32", the same architecture) is measured between every two presets and the ratio is
taken against the mean of its two neighbours, so a change of load moves both.  Every tower
is built with open_clip from its built-in configs, at the preset's own image size (needs
open_clip: run with the environment .ci/run makes for it): the open_clip presets' own, and
for the transformers presets (CLIP, SigLIP, SigLIP 2) the open_clip twin of their image
tower, the same architecture; siglip2-b32 with ``Encoder`` on a random-weight checkpoint
(tests/support/synth), itr's own path.

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
#: preset -> (open_clip architecture, image size): the preset's own image tower for the
#: open_clip presets, and for the transformers presets the open_clip twin of their image
#: tower (the same architecture: layers, width, patch, resolution), at the preset's size
OPENCLIP_ARCH = {
    "laion-b32": ("ViT-B-32", 224),
    "openai-b32": ("ViT-B-32", 224),
    "openai-l14-336": ("ViT-L-14-336", 336),
    "siglip-b16": ("ViT-B-16-SigLIP", 224),
    "siglip2-b16": ("ViT-B-16-SigLIP2", 224), "siglip2-b16-256": ("ViT-B-16-SigLIP2-256", 256),
    "siglip2-b16-384": ("ViT-B-16-SigLIP2-384", 384),
    "siglip2-b16-512": ("ViT-B-16-SigLIP2-512", 512),
    "siglip2-l16-256": ("ViT-L-16-SigLIP2-256", 256),
    "siglip2-l16-384": ("ViT-L-16-SigLIP2-384", 384),
    "siglip2-l16-512": ("ViT-L-16-SigLIP2-512", 512),
    "siglip2-so400m14-224": ("ViT-SO400M-14-SigLIP2", 224),
    "siglip2-so400m14-384": ("ViT-SO400M-14-SigLIP2-378", 384),
    "siglip2-so400m16-256": ("ViT-SO400M-16-SigLIP2-256", 256),
    "siglip2-so400m16-384": ("ViT-SO400M-16-SigLIP2-384", 384),
    "siglip2-so400m16-512": ("ViT-SO400M-16-SigLIP2-512", 512),
    "siglip2-g16-256": ("ViT-gopt-16-SigLIP2-256", 256),
    "siglip2-g16-384": ("ViT-gopt-16-SigLIP2-384", 384),
    "mobileclip-s0": ("MobileCLIP2-S0", 256),  # the same image tower (fastvit_mci0) at 256 px
    "mobileclip-s1": ("MobileCLIP-S1", 256), "mobileclip-s2": ("MobileCLIP-S2", 256),
    "mobileclip-b": ("MobileCLIP-B", 224),
    "mobileclip2-s0": ("MobileCLIP2-S0", 256), "mobileclip2-s2": ("MobileCLIP2-S2", 256),
    "mobileclip2-b": ("MobileCLIP2-B", 224), "mobileclip2-s3": ("MobileCLIP2-S3", 256),
    "mobileclip2-s4": ("MobileCLIP2-S4", 256), "mobileclip2-l14": ("MobileCLIP2-L-14", 224),
    "dfn-b16": ("ViT-B-16-quickgelu", 224), "dfn-l14": ("ViT-L-14-quickgelu", 224),
    "datacomp-b32-256": ("ViT-B-32-256", 256),
}
#: Towers of more parameters than this run batches of 8 (a batch of 32 of the largest takes
#: minutes; the cost per image of so large a tower hardly depends on the batch)
LARGE_PARAMS = 250_000_000


def openclip_runner(arch: str, size: int | None, precision: str):
    import open_clip
    import torch

    from timm.utils.model import reparameterize_model

    model = open_clip.create_model(arch, pretrained=None, force_image_size=size).eval()
    reparameterize_model(model.visual, inplace=True)  # as itr runs MobileCLIP (a no-op for ViTs)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = model.to(dtype)
    params = sum(p.numel() for p in model.visual.parameters())
    x = torch.randn(8 if params > LARGE_PARAMS else 32, 3, size, size, dtype=dtype)

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
    while n < 16 or time.perf_counter() - t < seconds:
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
    ref = openclip_runner("ViT-B-32", 224, a.precision)
    before = rate(ref, a.seconds)
    out = {}
    for name in names:
        run = (hf_runner(name, a.precision) if name == "siglip2-b32"
               else openclip_runner(*OPENCLIP_ARCH[name], a.precision))
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
