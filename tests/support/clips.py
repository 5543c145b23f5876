"""Synthetic video clips written with PyAV (no ffmpeg binary): shapes that appear at known
times, in H.264, VP9 or MPEG-4, optionally rotated or with a variable frame rate.

Used by tests/test_video.py and bench/video.py.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

#: codec name -> (PyAV encoder, container extension)
CODECS = {"h264": ("libx264", ".mp4"), "vp9": ("libvpx-vp9", ".webm"), "mpeg4": ("mpeg4", ".avi")}


def shape_scenes(scenes: Sequence[tuple[float, tuple[str, str, str]]], size: int = 64):
    """``frame_at(t)`` for scenes ``[(start_seconds, (color, shape, position)), ...]``:
    the drawing of the last scene started at ``t``."""
    from support import synth

    cache = {}

    def frame_at(t: float) -> np.ndarray:
        spec = scenes[0][1]
        for start, s in scenes:
            if t >= start:
                spec = s
        if spec not in cache:
            cache[spec] = np.asarray(synth.draw(*spec, size=size, seed=0).convert("RGB"))
        return cache[spec]

    return frame_at


def write_clip(path: str | Path, frame_at: Callable[[float], np.ndarray], duration: float, *,
               fps: float = 10, codec: str = "h264", gop_s: float | None = 2.0,
               rotation: int = 0, times: Sequence[float] | None = None,
               width: int | None = None, height: int | None = None,
               options: dict[str, str] | None = None, audio: bool = False,
               creation_time: str | None = None) -> Path:
    """Encode ``frame_at(t)`` (an RGB ``[H, W, 3]`` uint8 array) into a clip.

    Args:
        times: presentation times of the frames (variable frame rate); default
            ``0, 1/fps, ...`` up to ``duration``.
        gop_s: seconds between keyframes (None: the encoder's default).
        rotation: display rotation in degrees, counter-clockwise (a phone held upright
            writes -90 or 90); the pixels are stored unrotated.
    """
    import av

    path = Path(path)
    enc, _ext = CODECS[codec]
    first = frame_at(0.0)
    h, w = first.shape[:2]
    w, h = (width or w) // 2 * 2, (height or h) // 2 * 2
    if times is None:
        times = [i / fps for i in range(int(round(duration * fps)))]
    tb = Fraction(1, 1000)
    with av.open(str(path), "w") as out:
        if creation_time:
            out.metadata["creation_time"] = creation_time
        s = out.add_stream(enc, rate=Fraction(int(fps * 1000), 1000) if codec == "mpeg4" else int(round(fps)))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.time_base = tb
        s.codec_context.time_base = tb
        opts = dict(options or {})
        if gop_s is not None:
            s.codec_context.gop_size = max(1, int(round(gop_s * fps)))
            if codec == "h264":
                opts.setdefault("x264-params", f"keyint={max(1, int(round(gop_s * fps)))}:scenecut=0")
        if codec == "h264":
            opts.setdefault("preset", "ultrafast")
        if codec == "vp9":
            opts.setdefault("deadline", "realtime")
            opts.setdefault("cpu-used", "8")
        s.options = opts
        if rotation:
            s.set_display_rotation(rotation)
        if audio:
            a = out.add_stream("aac", rate=8000)
        for t in times:
            img = frame_at(t)
            if img.shape[:2] != (h, w):
                from PIL import Image

                img = np.asarray(Image.fromarray(img).resize((w, h)))
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            f.pts = int(round(t * 1000))
            f.time_base = tb
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
        if audio:
            _mux_silence(out, a, duration)
    return path


def _mux_silence(out, stream, seconds: float) -> None:
    """Encode and mux ``seconds`` of silent 8 kHz mono audio into ``stream`` of ``out``."""
    import av

    for i in range(int(seconds * 8000 / 1024)):
        af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp",
                                        layout="mono")
        af.sample_rate, af.pts = 8000, i * 1024
        for p in stream.encode(af):
            out.mux(p)
    for p in stream.encode(None):
        out.mux(p)


def write_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    """An .mp4 with one silent AAC stream and no video."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as out:
        _mux_silence(out, out.add_stream("aac", rate=8000), seconds)
    return path


def moving(kind: str, width: int = 1920, height: int = 1080, seed: int = 0):
    """``frame_at(t)`` of the benchmark clips: ``static`` (one slide, faint noise), ``slow``
    (a slow pan across a landscape of blobs) or ``busy`` (a new random scene every 1.5 s,
    things moving within it)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.zeros((height, width, 3), dtype=np.uint8)
    for _ in range(12):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(60, 240)
        base[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    wide = np.concatenate([base, base[:, ::-1]], axis=1)  # [H, 2W, 3] for the pan
    scenes: dict[int, np.ndarray] = {}

    def scene(i: int) -> np.ndarray:
        if i not in scenes:
            r = np.random.default_rng(seed * 1000 + i)
            img = np.full((height, width, 3), r.integers(0, 255, 3), dtype=np.uint8)
            for _ in range(6):
                y0, x0 = r.integers(0, height - 200), r.integers(0, width - 300)
                img[y0:y0 + 200, x0:x0 + 300] = r.integers(0, 255, 3)
            scenes.clear()
            scenes[i] = img
        return scenes[i]

    def frame_at(t: float) -> np.ndarray:
        if kind == "static":
            return base
        if kind == "slow":
            x = int(t * 12) % width  # 12 px/s: a minute pans ~40% of the width
            return wide[:, x:x + width]
        img = scene(int(t / 1.5)).copy()
        x = int(t * 400) % (width - 100)
        img[100:200, x:x + 100] = 255
        return img

    return frame_at
