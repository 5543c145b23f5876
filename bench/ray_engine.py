"""`itr index --engine ray` against the local engine on one machine, and Ray's start-up.

Uses the photo sets and the random-weight ViT-B/32 of `bench/index_throughput.py` (built
once under bench/out/).  As whole processes, into fresh libraries:

- `itr index` with `--engine local` and with `--engine ray` (a local Ray instance started
  by the run itself) on SMALL and on LARGE photos; net throughput = (LARGE - SMALL) photos
  / extra seconds, so process start, imports, Ray's start and the actors' model load cancel
  and what remains is the steady-state rate (the overhead of Ray's pipeline itself);
- start-up: the seconds `ray.init` takes as itr calls it (a local instance sized to this
  machine, small object store, no dashboard), median of --starts runs, and the whole
  `--engine ray` run on SMALL photos against the local one (the fixed cost a user feels).

    flock /tmp/itr-bench.lock python bench/ray_engine.py [--kind 2mp] [--small 16] [--large 64]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="2mp", choices=sorted(it.SIZES))
    ap.add_argument("--small", type=int, default=16)
    ap.add_argument("--large", type=int, default=64)
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
        small, _ = it.itr_index(paths[: args.small], [*extra, "--engine", engine])
        large, rss = it.itr_index(paths, [*extra, "--engine", engine])
        rate = it.net(small, large, args.small, args.large)
        rows[engine] = (small, large, rate)
        print(f"{engine:5s}: {args.small} photos {small:.1f} s, {args.large} photos {large:.1f} s, "
              f"net {rate:.1f} img/s, driver peak RSS {rss:.0f} MiB", flush=True)
    ratio = rows["ray"][2] / rows["local"][2]
    print(f"\n| engine | {args.small} {args.kind} photos | {args.large} photos | net rate |")
    print("| --- | --- | --- | --- |")
    for engine, (small, large, rate) in rows.items():
        print(f"| {engine} | {small:.1f} s | {large:.1f} s | {rate:.1f} img/s |")
    print(f"\nray / local net rate: {ratio:.2f} (goal >= 0.75); fixed cost of --engine ray "
          f"on {args.small} photos: +{rows['ray'][0] - rows['local'][0]:.1f} s; "
          f"ray.init {init:.1f} s; bench took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
