#!/usr/bin/env python
"""Seconds per re-ranked image of ``itr search --rerank`` with the BLIP base architecture.

Builds (once, in bench/out/) a random-weight BLIP ITM model shaped like
``Salesforce/blip-itm-base-coco`` (``tests/support/synth.make_blip_itm_base``) and K 2 MP
JPEG photos, then times :meth:`itrcli.embed.rerank.Reranker.score_files` on them: decoding
at full size, preprocessing to 384 px, the vision tower and the cross-attention text encoder
with the matching head.  The first call is a warm-up; the median of ``--repeats`` calls is
reported, with the vision tower's share measured separately.  Weights' values do not change
the cost.

    python bench/rerank.py [--k 30] [--repeats 3] [--device cpu] [--precision auto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

QUERY = "two children playing with a dog on a lawn"


def main() -> None:
    import numpy as np

    from index_throughput import OUT, photos
    from itrcli.embed.rerank import Reranker
    from itrcli.ingest.images import decode_file
    from support import synth

    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    a = ap.parse_args()
    d = OUT / "blip-itm-base"
    if not (d / "model.safetensors").exists():
        synth.make_blip_itm_base(d)
    paths = [str(p) for p in photos("2mp", a.k)]
    t = time.perf_counter()
    rr = Reranker(str(d), device=a.device, precision=a.precision)
    load = time.perf_counter() - t
    rr.score_files(QUERY, paths[:8])  # warm-up
    runs, cpu = [], []
    for _ in range(a.repeats):
        t, c = time.perf_counter(), time.process_time()
        scores, errors = rr.score_files(QUERY, paths)
        runs.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        assert not errors and all(s is not None for s in scores)
    px = np.stack([decode_file(p, rr.prep, draft=False)[0] for p in paths[:8]])  # [8, 3, 384, 384]
    t, c = time.perf_counter(), time.process_time()
    rr.image_embeds(px)
    vision, vision_cpu = ((time.perf_counter() - t) / len(px), (time.process_time() - c) / len(px))
    per, per_cpu = statistics.median(runs) / len(paths), statistics.median(cpu) / len(paths)
    print(f"BLIP ITM base architecture, {a.device} {rr.precision}, {os.cpu_count()} CPUs, "
          f"K={len(paths)} 2 MP JPEGs")
    # CPU seconds (all threads) tell the cost when other processes share the cores
    print(f"  model load {load:.1f} s; re-rank {statistics.median(runs):.2f} s median of "
          f"{a.repeats}: {per:.3f} s wall, {per_cpu:.3f} CPU-s per image; vision tower alone "
          f"{vision:.3f} s wall, {vision_cpu:.3f} CPU-s per image")


if __name__ == "__main__":
    main()
