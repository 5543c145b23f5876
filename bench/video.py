#!/usr/bin/env python
"""Benchmark video frame selection (``itrcli.ingest.video.select_frames``).

1. Speed: a ``--minutes``-minute 1080p H.264 clip at 25 fps with a keyframe every 2 s
   (a phone's GOP), of the ``busy`` kind.  Frame selection (demux every packet, decode
   keyframes only, scale, rotate, near-duplicate test) is timed, median of ``--repeats``
   runs after one warm-up, and reported as a multiple of real time.  The encoder is not
   included: it sees only the frames kept.
2. Frames kept per minute on three synthetic clips with the same encoding: ``static``
   (one slide, as a filmed talk), ``slow`` (a slow pan) and ``busy`` (a new scene every
   1.5 s, something moving within it); each is also encoded with x264's default GOP and
   scene-cut detection (keyframes at scene changes, at most 10 s apart).

The clips are written once with PyAV into ``--dir`` (default: a temporary directory).
``--json`` prints the figures.

Usage:
    python bench/video.py [--minutes 2] [--repeats 3] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from itrcli.ingest.video import select_frames  # noqa: E402
from support import clips  # noqa: E402

FPS = 25


def clip(directory: Path, kind: str, minutes: float, gop_s: float | None) -> Path:
    name = f"{kind}-{minutes:g}min-1080p-{'gop%gs' % gop_s if gop_s else 'scenecut'}.mp4"
    path = directory / name
    if not path.exists():
        t = time.monotonic()
        tmp = path.with_suffix(".part.mp4")
        opts = {"preset": "ultrafast"} if gop_s else {"preset": "veryfast"}
        clips.write_clip(tmp, clips.moving(kind), minutes * 60, fps=FPS, gop_s=gop_s, options=opts)
        os.replace(tmp, path)
        print(f"wrote {name} in {time.monotonic() - t:.0f} s", file=sys.stderr)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    directory = a.dir or Path(tempfile.mkdtemp(prefix="itr-bench-video-"))
    directory.mkdir(parents=True, exist_ok=True)
    seconds = a.minutes * 60

    speed_clip = clip(directory, "busy", a.minutes, 2.0)
    select_frames(str(speed_clip))  # warm-up: file cache, codec init
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        v = select_frames(str(speed_clip))
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "speed": {"clip": speed_clip.name, "seconds_of_video": seconds, "median_s": round(med, 3),
                  "times_real_time": round(seconds / med, 1), "packets": v.packets,
                  "decoded": v.decoded, "kept": len(v.frames)},
        "kept_per_minute": {},
    }
    for gop in (2.0, None):
        label = "gop 2 s" if gop else "x264 default (scene cuts)"
        row = {}
        for kind in ("static", "slow", "busy"):
            v = select_frames(str(clip(directory, kind, a.minutes, gop)))
            row[kind] = round(len(v.frames) / a.minutes, 1)
        result["kept_per_minute"][label] = row
    if a.json:
        print(json.dumps(result, indent=2))
        return
    s = result["speed"]
    print(f"frame selection: {s['clip']}: {s['median_s']:.2f} s for {seconds:g} s of video "
          f"= {s['times_real_time']:.0f}x real time ({s['packets']} packets, {s['decoded']} "
          f"decoded, {s['kept']} kept; median of {a.repeats}; {result['machine']})")
    print(f"{'frames kept per minute':<28}{'static':>8}{'slow':>8}{'busy':>8}")
    for label, row in result["kept_per_minute"].items():
        print(f"{label:<28}{row['static']:>8}{row['slow']:>8}{row['busy']:>8}")


if __name__ == "__main__":
    main()
