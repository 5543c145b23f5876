#!/usr/bin/env python
"""Benchmark one Hamming-distance query over many binary codes (``itrcli.query.binary``).

Times, for one query against ``--n`` random codes of ``--bits`` bits (median over
``--repeats`` runs after one warm-up, each on a fresh query):

* ``hamming``: XOR + popcount over packed uint64 words (``np.bitwise_count`` on numpy >= 2);
* ``hamming (16-bit LUT)``: the fallback for numpy < 2 (a 65,536-entry popcount table);
* ``hamming_topk``: distances plus top-k selection (argpartition, ties by index);
* ``naive``: a reference measured in the same run: ``np.unpackbits`` of the XOR, a sum
  over the bits, and a full stable argsort for the top k.

and checks that all of them agree.  Nothing is written; ``--json`` prints the figures.

Usage:
    python bench/hamming.py [--n 1000000] [--bits 64] [--k 100] [--repeats 21] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from itrcli.query import binary  # noqa: E402


def naive_distances(query: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Reference: unpack every bit of ``codes XOR query`` and count them."""
    x = np.bitwise_xor(codes, query[None, :])  # [n, words]
    return np.unpackbits(x.view(np.uint8), axis=1).sum(axis=1)  # [n]


def naive_topk(query: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = naive_distances(query, codes)
    order = np.argsort(d, kind="stable")[:k]  # by (distance, index)
    return order, d[order]


def timed(fn, queries: list[np.ndarray]) -> tuple[float, object]:
    """Median seconds of ``fn(query)`` over ``queries`` (the first is a warm-up)."""
    out = fn(queries[0])
    times = []
    for q in queries[1:]:
        t0 = time.perf_counter()
        out = fn(q)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="codes to scan")
    ap.add_argument("--bits", type=int, default=64, help="code length")
    ap.add_argument("--k", type=int, default=100, help="top-k for hamming_topk")
    ap.add_argument("--repeats", type=int, default=21, help="timed queries (median)")
    ap.add_argument("--naive-repeats", type=int, default=5,
                    help="timed queries for the slow reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    words = binary.n_words(args.bits)
    bits = rng.random((args.n, args.bits)) < 0.5 if args.n * args.bits <= 64_000_000 else None
    if bits is not None:
        codes = binary.pack(bits)  # [n, words]
        del bits
    else:  # too big to draw bit by bit: random words, trailing bits cleared
        codes = rng.integers(0, np.iinfo(np.uint64).max, size=(args.n, words), dtype=np.uint64,
                             endpoint=True)
        if args.bits % 64:
            codes[:, -1] &= np.uint64(((1 << (args.bits % 64)) - 1) << (64 - args.bits % 64))
    queries = [binary.pack(rng.random((1, args.bits)) < 0.5)[0] for _ in range(args.repeats + 1)]
    naive_q = queries[: args.naive_repeats + 1]

    t_ham, d_ours = timed(lambda q: binary.hamming(q, codes), queries)
    t_lut, d_lut = timed(lambda q: binary._distances(q, codes, use_lut=True), queries)
    t_topk, (i_ours, dk_ours) = timed(lambda q: binary.hamming_topk(q, codes, args.k), queries)
    t_naive, (i_ref, dk_ref) = timed(lambda q: naive_topk(q, codes, args.k), naive_q)

    # the last query of each timed loop differs; recheck all on one query
    q = queries[0]
    ref = naive_distances(q, codes)
    assert np.array_equal(binary.hamming(q, codes), ref), "hamming != reference"
    assert np.array_equal(binary._distances(q, codes, use_lut=True), ref), "LUT != reference"
    i1, d1 = binary.hamming_topk(q, codes, args.k)
    i2, d2 = naive_topk(q, codes, args.k)
    assert np.array_equal(i1, i2) and np.array_equal(d1, d2), "hamming_topk != reference"

    res = {
        "n": args.n,
        "bits": args.bits,
        "k": args.k,
        "repeats": args.repeats,
        "numpy": np.__version__,
        "bitwise_count": hasattr(np, "bitwise_count"),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "ms": {
            "hamming": round(t_ham * 1e3, 2),
            "hamming_lut": round(t_lut * 1e3, 2),
            "hamming_topk": round(t_topk * 1e3, 2),
            "naive_topk": round(t_naive * 1e3, 2),
        },
        "speedup_topk_vs_naive": round(t_naive / t_topk, 1),
        "codes_mb": round(codes.nbytes / 2**20, 1),
    }
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{args.n:,} codes x {args.bits} bits ({res['codes_mb']} MB), one query, "
          f"median of {args.repeats} (naive: {args.naive_repeats}); numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs")
    rows = [
        ("hamming (XOR + popcount)", t_ham),
        ("hamming (16-bit LUT fallback, numpy < 2)", t_lut),
        (f"hamming_topk (k={args.k})", t_topk),
        (f"naive unpackbits + argsort (k={args.k})", t_naive),
    ]
    for name, t in rows:
        print(f"  {name:<42}{t * 1e3:9.2f} ms")
    print(f"  hamming_topk vs naive: {t_naive / t_topk:.1f}x faster; results identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
