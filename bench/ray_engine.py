"""`itr index --engine ray` against the local engine on one machine, and Ray's start-up.

Uses the photo sets and the random-weight ViT-B/32 of `bench/index_throughput.py` (built
once under bench/out/).  For each engine, whole `itr index` processes into fresh libraries
over SMALL and LARGE photos (`--engine ray` starts its own local Ray instance each time),
while this script polls the library's committed row count every 0.1 s:

- net rate = (LARGE - SMALL) photos / extra seconds of the whole run: process start,
  imports, Ray's start and the actors' model load cancel, what remains is the pipeline
  itself (the overhead of Ray's tasks, actors and object store against the local threads);
- fixed cost: seconds from the process start to the first committed row;
- `ray.init` alone as itr calls it (a local instance sized to this machine, small object
  store, no dashboard), median of --starts fresh processes, with and without shutdown.

(Rows/s after the first commit is no measure of the pipeline with Ray: its decode tasks run
ahead while the embedding actor loads the model, so the first row arrives late and the
rest quickly.)

    flock /tmp/itr-bench.lock python bench/ray_engine.py [--kind 2mp] [--small 32] [--large 256]
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

        def poll() -> None:
            from itrcli.store.db import sqlite_uri

            try:
                c = sqlite3.connect(sqlite_uri(db / "itr.db", mode="ro"), uri=True, timeout=1)
                try:
                    n = c.execute("SELECT count(*) FROM files").fetchone()[0]
                finally:
                    c.close()
            except sqlite3.Error:
                return
            if not seen or n != seen[-1][1]:
                seen.append((time.perf_counter() - t0, n))

        while proc.poll() is None:
            time.sleep(0.1)
            poll()
        total = time.perf_counter() - t0
        poll()
        if proc.returncode != 0:
            raise SystemExit(f"{cmd[3:]} failed with {proc.returncode}")
    first = next(t for t, k in seen if k > 0)
    assert seen[-1][1] == len(paths), (seen[-1], len(paths))
    return {"total": total, "first": first}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="2mp", choices=sorted(it.SIZES))
    ap.add_argument("--small", type=int, default=32)
    ap.add_argument("--large", type=int, default=256)
    ap.add_argument("--starts", type=int, default=3, help="Ray start-ups to time")
    ap.add_argument("--itr-args", default="--batch-size 16",
                    help="extra itr index options for both engines")
    args = ap.parse_args()
    extra = args.itr_args.split()
    paths = it.photos(args.kind, args.large)
    it.model_dir()
    t0 = time.perf_counter()
    init, total = ray_start(args.starts)
    print(f"ray.init (local, {args.starts} runs, median): {init:.1f} s; with shutdown "
          f"{total:.1f} s", flush=True)
    rows = {}
    for engine in ("local", "ray"):
        small = timed_index(paths[: args.small], [*extra, "--engine", engine])
        large = timed_index(paths, [*extra, "--engine", engine])
        rate = it.net(small["total"], large["total"], args.small, args.large)
        rows[engine] = (small, large, rate)
        print(f"{engine:5s}: {args.small} photos {small['total']:.1f} s (first row "
              f"{small['first']:.1f} s), {args.large} photos {large['total']:.1f} s (first row "
              f"{large['first']:.1f} s), net {rate:.1f} img/s", flush=True)
    print(f"\n| engine | {args.small} {args.kind} photos | {args.large} photos | net rate "
          "| first row committed after |")
    print("| --- | --- | --- | --- | --- |")
    for engine, (small, large, rate) in rows.items():
        print(f"| {engine} | {small['total']:.1f} s | {large['total']:.1f} s | {rate:.1f} img/s "
              f"| {small['first']:.1f} s, {large['first']:.1f} s |")
    ratio = rows["ray"][2] / rows["local"][2]
    print(f"\nray / local net rate: {ratio:.2f} (goal >= 0.75); ray.init {init:.1f} s; "
          f"bench took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
