#!/usr/bin/env python
"""`itr hash --dupes` at a million images: time and peak memory, and a check that the groups
equal the exhaustive method's.

Builds (once, cached under bench/out/dupes-N/) a library of N synthetic clustered unit
vectors (``clustered()`` of bench/search_latency.py: 1,000 clusters in a 48-d subspace)
of which 1% are replaced by noisy copies of other rows (planted near-duplicates, cosine
0.96-0.995, some copies of copies), each row pointing at an empty file under files/, with a
stand-in model name (no model is loaded: nothing needs embedding), and its HNSW graph as
`itr index` leaves it (the longest part of a build at 10^6).  Then, each in a fresh
process, reporting wall seconds and peak RSS (``ru_maxrss``):

1. the library call on every file, with no saved hash (``Library.near_duplicates``: fit
   the hasher on a sample, code every vector in chunks and save the codes, then the groups);
2. the library call again (saved codes);
3. the whole command, ``itr hash --dupes FILES --db LIB`` (walk N files, find them
   unchanged, then 2.), unless ``--no-cli``.

``--check M`` builds a library of M vectors the same way and compares, through the library,
the groups of :func:`itrcli.query.dupes.find_dupes` with the exhaustive method
(:func:`itrcli.query.binary.dupe_groups` on every stored vector), printing whether they are
identical and both times.

    python bench/dupes.py [--n 1000000] [--check 20000] [--bits 64] [--no-cli]

Run it alone: flock /tmp/itr-bench.lock python bench/dupes.py ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
MODEL = "bench-synthetic"  # a stand-in: nothing is embedded, no model is loaded


def build(n: int) -> Path:
    """The cached library of ``n`` planted vectors (built in a child: ~6 GB transient)."""
    base = OUT / f"dupes-{n}"
    if (base / "ready").exists():
        return base
    t = time.time()
    subprocess.run([sys.executable, __file__, "--_build", str(n)], check=True)
    print(f"built {base} in {time.time() - t:.0f}s", file=sys.stderr)
    return base


def _build(n: int) -> None:
    import numpy as np

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    from search_latency import clustered, measure_ef

    from itrcli.store.db import Store
    from itrcli.store.vindex import VectorIndex

    base = OUT / f"dupes-{n}"
    if base.exists():
        shutil.rmtree(base)
    files = base / "files"
    files.mkdir(parents=True)
    x = clustered(n, 512, seed=0)  # [n, 512] unit vectors
    rng = np.random.default_rng(1)
    k = max(1, n // 100)
    src, dst = rng.choice(n, k), rng.choice(n, k, replace=False)
    sigma = rng.uniform(0.004, 0.012, (k, 1)).astype(np.float32)  # cosine ~0.96-0.995
    x[dst] = x[src] + sigma * rng.standard_normal((k, 512)).astype(np.float32)
    x[dst] /= np.linalg.norm(x[dst], axis=1, keepdims=True)
    store = Store(base / "lib", create=True)
    store.set_meta(model=MODEL, dim=512, text_export_failed=MODEL)
    with store.transaction() as c:
        for i in range(n):
            p = files / f"{i:07d}.jpg"
            p.touch()
            st = p.stat()
            store.insert_file(c, str(p), {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                          "hash": f"{i:032x}", "width": 1, "height": 1}, x[i])
    del x
    # a library as `itr index` leaves it: with its graph and measured search ef (without
    # them the first `itr hash PATH` would build them, minutes at 10^6)
    vi = VectorIndex(base / "lib", 512)
    vi.rebuild(store)
    vi.save(store.last_seq())
    store.truncate_log(vi.seq)
    store.close()
    measure_ef(base / "lib")
    (base / "ready").write_text("planted: %d copies\n" % k)


def _library_call(lib: str, bits: int, forget: bool) -> None:
    """Child: ``Library.near_duplicates`` on every file; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    from itrcli.library import Library

    with Library.open(lib) as l:
        if forget:  # no saved hash: the call fits, codes and saves (bench-only SQL)
            with l.store.transaction() as c:
                for table in ("hash_codes", "hashers"):
                    try:
                        c.execute(f"DELETE FROM {table}")
                    except Exception:
                        pass
        files = [(p, i) for i, p in l.store.conn.execute("SELECT id, path FROM files ORDER BY path")]
        t = time.perf_counter()
        groups = l.near_duplicates(files, bits=bits)
        dt = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"seconds": dt, "peak_rss_gib": rss, "groups": len(groups),
                      "in_groups": sum(map(len, groups)), "files": len(files)}))


def _check(m: int, bits: int) -> None:
    """Child: find_dupes against the exhaustive method on a library of ``m`` vectors."""
    sys.path.insert(0, str(ROOT))
    from itrcli.query.dupes import find_dupes
    from itrcli.query.binary import dupe_groups, library_codes
    from itrcli.store.db import Store

    base = build(m)
    store = Store(base / "lib")
    lc = library_codes(store, bits)
    ids, mat = store.vectors()
    t = time.perf_counter()
    fast = find_dupes(store, ids.tolist(), bits)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    ref = [[int(ids[r]) for r in g] for g in dupe_groups(mat, lc.codes, bits)]
    t_ref = time.perf_counter() - t
    store.close()
    print(json.dumps({"identical": fast == ref, "groups": len(ref), "in_groups": sum(map(len, ref)),
                      "fast_seconds": t_fast, "exhaustive_seconds": t_ref}))


def child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"child {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def whole_command(base: Path, bits: int) -> dict:
    """`itr hash --dupes FILES --db LIB` as users run it; peak RSS from /usr/bin/time when
    present, else from this process's children."""
    out = Path(tempfile.mkstemp(suffix=".txt")[1])
    cmd = [sys.executable, "-m", "itrcli", "hash", "--dupes", str(base / "files"),
           "--db", str(base / "lib"), "--bits", str(bits), "-q"]
    timer = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if timer:
        cmd = [timer, "-f", "%M", "-o", str(out), *cmd]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    dt = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"itr hash --dupes failed:\n{r.stderr[-3000:]}")
    kib = int(out.read_text().split()[-1]) if timer else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out.unlink()
    groups = r.stdout.count("\n\n") + (1 if r.stdout.strip() else 0)
    return {"seconds": dt, "peak_rss_gib": kib / 2**20, "groups": groups}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--check", type=int, default=0, metavar="M",
                    help="also compare with the exhaustive method on M vectors")
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--no-cli", action="store_true", help="skip the whole-command timing")
    ap.add_argument("--_build", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_call", help=argparse.SUPPRESS)
    ap.add_argument("--_forget", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_check", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._build:
        return _build(a._build)
    if a._call:
        return _library_call(a._call, a.bits, a._forget)
    if a._check:
        return _check(a._check, a.bits)

    import numpy as np

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy "
          f"{np.__version__}, load average {os.getloadavg()[0]:.1f} at start")
    if a.check:
        r = child(["--_check", str(a.check), "--bits", str(a.bits)])
        print(f"check, {a.check:,} vectors, {a.bits} bits: groups identical to the exhaustive "
              f"method: {'yes' if r['identical'] else 'NO'} ({r['groups']} groups, "
              f"{r['in_groups']} images); pruned {r['fast_seconds']:.2f}s, exhaustive "
              f"{r['exhaustive_seconds']:.2f}s")
    if a.n:
        base = build(a.n)
        lib = str(base / "lib")
        for label, extra in (("library call, no saved hash (fit + code + save + groups)", ["--_forget"]),
                             ("library call, saved codes", [])):
            r = child(["--_call", lib, "--bits", str(a.bits), *extra])
            print(f"{a.n:,} vectors, {a.bits} bits: {label}: {r['seconds']:.1f}s, peak RSS "
                  f"{r['peak_rss_gib']:.2f} GiB; {r['groups']} groups, {r['in_groups']} images")
        if not a.no_cli:
            r = whole_command(base, a.bits)
            print(f"{a.n:,} vectors: itr hash --dupes FILES (whole command, saved codes): "
                  f"{r['seconds']:.1f}s, peak RSS {r['peak_rss_gib']:.2f} GiB; {r['groups']} groups")
    print(f"load average {os.getloadavg()[0]:.1f} at the end (a shared machine)")


if __name__ == "__main__":
    main()
