"""Recall of filtered graph search against exact search, per filter selectivity.

`itr search` with a metadata filter (`--camera`, `--near`, `--glob`, `--min-size`, `--in`,
dates) scores the candidates exactly when at most ``EXACT_BELOW`` pass it; above that it
searches the HNSW graph with the filter, the way `itr search` does (the saved graph file,
memory-mapped, hnswlib's filtered beam search).  This measures that path's recall@10
against exact search over the same allowed set, for filters that keep a share of a
library of N synthetic clustered unit vectors (see ``bench/search_latency.py``):

- ``random``: a random share of the files (a filter unrelated to content: camera, glob);
- ``clusters``: whole clusters (a filter that follows content, e.g. one trip's place), so
  the query's own neighbourhood is often entirely filtered out: the hard case.

Queries: 100 text-like queries (cosine 0.3 to a stored vector, as `itr index`'s ef
calibration makes them).  Also the time per query of both paths (exact: reading the
allowed vectors from SQLite and one matrix product, as `itr search` does; timed on 10).

    python bench/filtered_recall.py [--n 100000] [--dim 512] [--ef 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import numpy as np

    from bench.search_latency import clustered
    from itrcli.query.search import EXACT_BELOW, _exact
    from itrcli.store.db import Store
    from itrcli.store.vindex import EF_SEARCH, VectorIndex, text_like_queries

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ef", type=int, default=EF_SEARCH)
    ap.add_argument("--queries", type=int, default=100)
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="itr-filtered-"))
    vecs = clustered(a.n, a.dim, seed=0)  # [n, dim]
    ids = np.arange(1, a.n + 1, dtype=np.int64)
    store = Store(tmp, create=True)
    store.set_meta(dim=a.dim)
    mrng = np.random.default_rng(3)
    t = time.time()
    with store.transaction() as c:
        for i in range(a.n):
            store.insert_file(c, f"/x/{('2021', '2022', '2023')[i % 3]}/{i:06d}.jpg",
                              {"size": 0, "mtime_ns": 0, "hash": f"{i:032x}",
                               "width": (640, 1920, 4032)[i % 3], "height": (480, 1080, 3024)[i % 3],
                               "camera": ("Apple iPhone 12", "Pixel 7", None, "Canon EOS R")[i % 4],
                               "lat": float(mrng.uniform(35, 60)) if i % 2 else None,
                               "lon": float(mrng.uniform(-10, 30)) if i % 2 else None}, vecs[i])
    vi = VectorIndex(tmp, a.dim)
    vi.rebuild(store)
    vi.save(store.last_seq())
    graph = VectorIndex(tmp, a.dim).open_mapped(store)
    assert graph.mapped is not None
    print(f"library: {a.n} x {a.dim}, built in {time.time() - t:.0f}s; ef {a.ef}; "
          f"EXACT_BELOW {EXACT_BELOW}", file=sys.stderr)

    # the cost of evaluating filters over every row (before any vector is read)
    from itrcli.query.filters import meta_filter
    from itrcli.query.search import Filters, allowed_ids

    for opts in ({"camera": "iphone"}, {"near": "48.85,2.35,100"}, {"globs": ["2023/*"]},
                 {"min_size": "1920x1080"}, {"camera": "pixel", "near": "48.85,2.35,300"}):
        f = Filters(meta=meta_filter(**opts))
        t0 = time.perf_counter()
        for _ in range(5):
            n_allowed = len(allowed_ids(store, f))
        print(f"filter {opts}: {n_allowed} pass, {1000 * (time.perf_counter() - t0) / 5:.0f} ms",
              file=sys.stderr)

    rng = np.random.default_rng(1)
    queries = text_like_queries(vecs[rng.choice(a.n, a.queries, replace=False)], 0.3, seed=2)
    # cluster of each vector: nearest of 1,000 centres is unknown here, so use the id
    # blocks of a k-means-free proxy: the sign pattern of 10 random projections (1,024 cells)
    proj = vecs @ rng.standard_normal((a.dim, 10)).astype(np.float32)
    cell = ((proj > 0) * (1 << np.arange(10))).sum(1)  # [n]
    print(f"{'filter':<9} {'share':>6} {'allowed':>8} {'recall@10':>9} {'graph ms':>9} {'exact ms':>9}")
    for kind in ("random", "clusters"):
        for share in (0.5, 0.2, 0.1, 0.02):
            if kind == "random":
                keep = rng.random(a.n) < share
            else:
                cells = rng.permutation(1024)
                sizes = np.bincount(cell, minlength=1024)[cells]
                chosen = cells[: int(np.searchsorted(np.cumsum(sizes), share * a.n)) + 1]
                keep = np.isin(cell, chosen)
            allowed = set(ids[keep].tolist())
            sub_ids, sub = ids[keep], vecs[keep]  # exact truth, in memory
            found = 0
            tg = te = 0.0
            for j, q in enumerate(queries):
                t0 = time.perf_counter()
                labels, scores = graph.search(q, 10, a.n, ef=a.ef, filter=lambda x: int(x) in allowed)
                tg += time.perf_counter() - t0
                assert all(int(x) in allowed for x in labels)
                kth = np.partition(sub @ q, len(sub_ids) - 10)[-10]
                found += int(np.sum(scores >= kth - 1e-5))  # ties count as found
                if j < 10:  # the exact path as `itr search` runs it: SQLite read + product
                    t0 = time.perf_counter()
                    _exact(store, q, 10, allowed)
                    te += time.perf_counter() - t0
            n = len(queries)
            print(f"{kind:<9} {share:>6.0%} {len(allowed):>8} {found / (10 * n):>9.3f} "
                  f"{1000 * tg / n:>9.1f} {1000 * te / min(n, 10):>9.1f}", flush=True)
    store.close()


if __name__ == "__main__":
    main()
