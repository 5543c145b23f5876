"""`itr index --engine ray` against the local engine on one machine, and Ray's start-up.

Uses the photo sets and the random-weight ViT-B/32 of `bench/index_throughput.py` (built
once under bench/out/).  For each engine, one whole `itr index` process into a fresh
library over N photos (`--engine ray` starts its own local Ray instance), while this script
polls the library's committed row count every 0.1 s:

- steady rate: rows committed per second from the first quarter of the photos to the last
  (process start, imports, Ray's start and the actors' model load are excluded: what
  remains is the pipeline itself, i.e. the overhead of Ray's tasks, actors and object
  store against the local thread pool);
- fixed cost: seconds from the process start to the first committed row, and the whole run;
- `ray.init` alone as itr calls it (a local instance sized to this machine, small object
  store, no dashboard), median of --starts fresh processes, with and without shutdown.

    flock /tmp/itr-bench.lock python bench/ray_engine.py [--kind 2mp] [-n 128]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import index_throughput as it  # noqa: E402  (photo sets, model, whole-process runs)

START = r"""
import time, sys
from itrcli.jobs.distributed import ray_session
t = time.perf_counter()
with ray_session() as started:
    pass
print(f"{started:.3f} {time.perf_counter() - t:.3f}")
"""


def ray_start(n: int) -> tuple[float, float]:
    """Median (init seconds, init + shutdown seconds) of n fresh processes."""
    init, total = [], []
    for _ in range(n):
        out = subprocess.run([sys.executable, "-c", START], check=True, capture_output=True,
                             text=True).stdout.split()
        init.append(float(out[0]))
        total.append(float(out[1]))
    return statistics.median(init), statistics.median(total)


def timed_index(paths: list[Path], extra: list[str]) -> dict[str, float]:
    """One `itr index` process over ``paths`` into a fresh library, its commits timed."""
    import os
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "photos"
        d.mkdir()
        for p in paths:
            os.symlink(p, d / p.name)
        db = Path(tmp) / "lib"
        cmd = [sys.executable, "-m", "itrcli", "index", str(d), "--db", str(db), "-m",
               str(it.model_dir()), "-q", *extra]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        seen: list[tuple[float, int]] = []
        while proc.poll() is None:
            time.sleep(0.1)
            try:
                c = sqlite3.connect(f"file:{db / 'itr.db'}?mode=ro", uri=True, timeout=1)
                try:
                    n = c.execute("SELECT count(*) FROM files").fetchone()[0]
                finally:
                    c.close()
            except sqlite3.Error:
                continue
            if not seen or n != seen[-1][1]:
                seen.append((time.perf_counter() - t0, n))
        total = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{cmd[3:]} failed with {proc.returncode}")
    n = len(paths)
    first = next(t for t, k in seen if k > 0)
    q_t, q_n = next((t, k) for t, k in seen if k >= n // 4)
    end_t, end_n = seen[-1]
    assert end_n == n, (end_n, n)
    return {"total": total, "first": first,
            "rate": (end_n - q_n) / (end_t - q_t) if end_t > q_t else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="2mp", choices=sorted(it.SIZES))
    ap.add_argument("-n", type=int, default=128, help="photos per run")
    ap.add_argument("--starts", type=int, default=3, help="Ray start-ups to time")
    ap.add_argument("--itr-args", default="--batch-size 16",
                    help="extra itr index options for both engines")
    args = ap.parse_args()
    extra = args.itr_args.split()
    paths = it.photos(args.kind, args.n)
    it.model_dir()
    t0 = time.perf_counter()
    init, total = ray_start(args.starts)
    print(f"ray.init (local, {args.starts} runs, median): {init:.1f} s; with shutdown "
          f"{total:.1f} s", flush=True)
    rows = {}
    for engine in ("local", "ray"):
        rows[engine] = r = timed_index(paths, [*extra, "--engine", engine])
        print(f"{engine:5s}: {args.n} photos in {r['total']:.1f} s, first row after "
              f"{r['first']:.1f} s, steady {r['rate']:.1f} img/s", flush=True)
    print(f"\n| engine | {args.n} {args.kind} photos, whole run | first row committed after "
          "| steady rate |")
    print("| --- | --- | --- | --- |")
    for engine, r in rows.items():
        print(f"| {engine} | {r['total']:.1f} s | {r['first']:.1f} s | {r['rate']:.1f} img/s |")
    ratio = rows["ray"]["rate"] / rows["local"]["rate"]
    print(f"\nray / local steady rate: {ratio:.2f} (goal >= 0.75); ray.init {init:.1f} s; "
          f"bench took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
