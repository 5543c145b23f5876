#!/usr/bin/env python
"""Seconds per re-ranked image of ``itr search --rerank`` with the BLIP base architecture.

Builds (once, in bench/out/) a random-weight BLIP ITM model shaped like
``Salesforce/blip-itm-base-coco`` (``tests/support/synth.make_blip_itm_base``) and K 2 MP
JPEG photos, then times :meth:`itrcli.embed.rerank.Reranker.score_files` on them: decoding
at full size, preprocessing to 384 px, the vision tower and the cross-attention text encoder
with the matching head.  The first call is a warm-up; the median of ``--repeats`` calls is
reported, with the vision tower's share measured separately.  Weights' values do not change
the cost.

Then the feature cache (:mod:`itrcli.store.feature_cache`, in a temporary directory): the
same re-ranking with an empty cache (it runs everything and writes K entries), then again
with the cache filled (a second identical ``itr search --rerank``: decoding and the vision
tower skipped), and the bytes each cached image takes.

    python bench/rerank.py [--k 30] [--repeats 3] [--device cpu] [--precision auto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
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
    from itrcli.store.feature_cache import FeatureCache
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
    cold, warm, cold_cpu, warm_cpu, want = [], [], [], [], scores
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            cache = FeatureCache(Path(tmp) / f"cold{r}", max_bytes=1 << 40)
            t, c = time.perf_counter(), time.process_time()
            got, _ = rr.score_files(QUERY, paths, cache=cache)
            cold.append(time.perf_counter() - t)
            cold_cpu.append(time.process_time() - c)
            assert cache.writes == len(paths), cache.writes
        for _ in range(a.repeats):
            t, c = time.perf_counter(), time.process_time()
            got, _ = rr.score_files(QUERY, paths, cache=cache)
            warm.append(time.perf_counter() - t)
            warm_cpu.append(time.process_time() - c)
            assert cache.hits >= len(paths) and max(abs(x - y) for x, y in zip(got, want)) < 1e-6
        entry = cache.size() / len(paths)
    print(f"BLIP ITM base architecture, {a.device} {rr.precision}, {os.cpu_count()} CPUs, "
          f"K={len(paths)} 2 MP JPEGs")
    # CPU seconds (all threads) tell the cost when other processes share the cores
    print(f"  model load {load:.1f} s; re-rank {statistics.median(runs):.2f} s median of "
          f"{a.repeats}: {per:.3f} s wall, {per_cpu:.3f} CPU-s per image; vision tower alone "
          f"{vision:.3f} s wall, {vision_cpu:.3f} CPU-s per image")
    n = len(paths)
    cold_s, warm_s = statistics.median(cold) / n, statistics.median(warm) / n
    cold_c, warm_c = statistics.median(cold_cpu) / n, statistics.median(warm_cpu) / n
    print(f"  feature cache: empty {cold_s:.3f} s wall, {cold_c:.3f} CPU-s per image (writes "
          f"{n}); filled (the same search again) {warm_s:.3f} s wall, {warm_c:.3f} CPU-s per "
          f"image: {cold_s / warm_s:.1f}x less wall, {cold_c / warm_c:.1f}x less CPU; same "
          f"scores (< 1e-6); {entry / 1e6:.2f} MB per cached image "
          f"({rr.feature_shape[0]} x {rr.feature_shape[1]} {rr.feature_dtype})")


if __name__ == "__main__":
    main()
