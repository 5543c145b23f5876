"""Videos -> a few frames each, with their times in seconds (PyAV, which bundles FFmpeg).

Frame selection reads every packet but decodes few of them:

- keyframe packets only, picked by ``packet.is_keyframe`` (the decoder's ``skip_frame``
  option is unreliable for VP9 and HEVC);
- where keyframes are more than :data:`GAP_S` apart, the packets after the last keyframe
  are decoded up to the next 10 s mark, so that a long shot still gets one frame per 10 s;
- each candidate becomes a small grey thumbnail; a frame nearly identical to the last kept
  one (mean absolute difference below :data:`DUP_DIFF`) is dropped, and so are blank frames
  (black fades) unless nothing else is kept;
- the display rotation of the stream is applied; attached pictures (cover art) are ignored.

A file that cannot be opened raises :class:`VideoError` (the reason depends only on the
bytes: the indexer remembers it until the file changes).  Damaged packets are skipped and
the frames that decode are kept; a file taking longer than its time budget is cut short
(``Video.note`` says why).  ``av`` is imported only here, and only when a video is read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction
from typing import Any, Callable

from ..constants import VIDEO_EXTENSIONS

#: Where keyframes are farther apart than this (seconds), one more frame per this interval.
GAP_S = 10.0
#: Seconds one file may take to select its frames; the frames found by then are kept.
BUDGET_S = 120.0
#: Side of the grey thumbnail compared between frames (pixels).
THUMB = 16
#: Mean absolute difference (0-255 grey levels) below which a frame repeats the last kept one
#: (10: a slow pan keeps about one frame in two of a 2 s GOP; see bench/video.py).
DUP_DIFF = 10.0
#: Standard deviation of the grey thumbnail below which a frame is blank (a fade, black).
BLANK_STD = 2.0
#: At most this many frames per video (evenly thinned beyond it), which bounds the memory a
#: long film takes while its frames wait for the encoder (float16: about 170 MiB at 224 px).
MAX_FRAMES = 600
#: Damaged packets in a row after which the rest of the file is given up.
MAX_ERRORS = 50


class VideoError(Exception):
    """A file that cannot be read as a video; the message is the one-line reason."""


@dataclass
class Frame:
    time: float  #: seconds from the start of the video
    image: Any  #: PIL RGB image, display rotation applied, short side about ``short_side``


@dataclass
class Video:
    frames: list[Frame] = field(default_factory=list)
    width: int | None = None  #: displayed size (after rotation), full resolution
    height: int | None = None
    duration: float | None = None  #: seconds
    taken_at: str | None = None  #: the container's creation time, ISO 8601, no time zone
    note: str | None = None  #: why only part of the file was read (budget, damage)
    decoded: int = 0  #: frames the decoder produced (work done)
    packets: int = 0  #: video packets demuxed


def is_video(path: str) -> bool:
    """Whether ``path`` has a video extension (:data:`itrcli.constants.VIDEO_EXTENSIONS`)."""
    import os

    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def available() -> bool:
    """Whether PyAV can be imported (``pip install 'itr-search[video]'``)."""
    try:
        import av  # noqa: F401
    except Exception:
        return False
    return True


def decoder_id() -> str:
    """What a remembered video failure depends on besides the bytes."""
    import av

    from .. import __version__

    return f"itr {__version__}; PyAV {av.__version__}; FFmpeg {av.ffmpeg_version_info}"


def _open(path: str):
    import av

    try:
        return av.open(path, metadata_errors="ignore")
    except av.FFmpegError as e:
        if isinstance(e, av.InvalidDataError) and _mp4_without_moov(path):
            raise VideoError("not a playable video: no index (moov atom); an interrupted "
                             "recording or copy?") from None
        raise VideoError(_reason(e)) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise VideoError(f"cannot open as a video: {e}") from None


def _mp4_without_moov(path: str) -> bool:
    """An MP4/MOV whose top-level boxes start with ``ftyp`` and hold no ``moov`` (FFmpeg
    says so only in its log)."""
    import os
    import struct

    try:
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            pos, kinds = 0, []
            while pos + 8 <= end and len(kinds) < 1000:
                f.seek(pos)
                size, kind = struct.unpack(">I4s", f.read(8))
                if size == 1:
                    size = struct.unpack(">Q", f.read(8))[0]
                elif size == 0:
                    size = end - pos
                kinds.append(kind)
                if size < 8:
                    break
                pos += size
    except (OSError, struct.error):
        return False
    return bool(kinds) and kinds[0] == b"ftyp" and b"moov" not in kinds


def _reason(e: BaseException) -> str:
    import os

    text = getattr(e, "strerror", None) or str(e)
    text = " ".join(str(text).split())
    low = text.lower()
    if "moov atom not found" in low:
        return "not a playable video: no index (moov atom); an interrupted recording or copy?"
    if "invalid data" in low:
        return "not a readable video (invalid data)"
    fn = getattr(e, "filename", None)
    if fn and isinstance(fn, str):
        text = text.replace(f": '{fn}'", "").replace(fn, os.path.basename(fn))
    return f"cannot read video: {text[:200]}"


def video_stream(container):
    """The first video stream that is not an attached picture (cover art), or None."""
    from av.stream import Disposition

    for s in container.streams.video:
        if not (int(s.disposition) & int(Disposition.attached_pic)):
            return s
    return None


def _created(container) -> str | None:
    v = (container.metadata or {}).get("creation_time")
    if not v:
        return None
    try:
        t = datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.year < 1971:  # 1904/1970 epoch defaults of cameras without a clock
        return None
    return t.replace(tzinfo=None, microsecond=0).isoformat()


def _scaled(w: int, h: int, short_side: int) -> tuple[int, int]:
    s = min(1.0, short_side / max(1, min(w, h)))
    # swscale wants even sizes for yuv420p sources
    return max(2, int(round(w * s / 2)) * 2), max(2, int(round(h * s / 2)) * 2)


def _rotate(arr, rotation: float):
    import numpy as np

    k = int(round((rotation or 0) / 90.0)) % 4  # counter-clockwise quarter turns
    return np.ascontiguousarray(np.rot90(arr, k)) if k else arr


def grey_thumb(arr):
    """``[THUMB, THUMB]`` float32 grey levels of an RGB array ``[H, W, 3]`` (block means)."""
    import numpy as np

    g = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # [H, W]
    h, w = g.shape
    ys = (np.arange(THUMB + 1) * h) // THUMB
    xs = (np.arange(THUMB + 1) * w) // THUMB
    sums = np.add.reduceat(np.add.reduceat(g, ys[:-1], axis=0), xs[:-1], axis=1)
    counts = np.outer(np.maximum(np.diff(ys), 1), np.maximum(np.diff(xs), 1))
    return sums / counts


#: The clock of time budgets (a test replaces it).
_clock: Callable[[], float] = time.monotonic


def select_frames(path: str, *, short_side: int = 256, gap: float = GAP_S,
                  budget: float | None = None, dup_diff: float = DUP_DIFF,
                  clock: Callable[[], float] | None = None) -> Video:
    """The frames of the video at ``path`` worth embedding, in time order (see module doc).

    Args:
        short_side: decoded frames are scaled (never enlarged) so that their short side is
            about this many pixels (enough for the model's preprocessing).
        budget: seconds after which reading stops; the frames found so far are kept
            (default :data:`BUDGET_S`).
    Raises:
        VideoError: not a video, no video stream, or no frame could be decoded.
    """
    import av
    import numpy as np
    from PIL import Image

    budget = BUDGET_S if budget is None else budget
    clock = clock or _clock
    deadline = clock() + budget
    container = _open(path)
    try:
        vs = video_stream(container)
        if vs is None:
            if container.streams.audio:
                raise VideoError("no video stream (audio only)")
            raise VideoError("no video stream")
        out = Video(taken_at=_created(container))
        if container.duration:
            out.duration = container.duration / 1_000_000
        elif vs.duration and vs.time_base:
            out.duration = float(vs.duration * vs.time_base)
        tb = float(vs.time_base or Fraction(1, 1000))  # float: thousands of packets
        start = vs.start_time if vs.start_time is not None else 0
        cc = vs.codec_context
        cc.thread_type = "AUTO"  # independent keyframes decode in parallel
        # mark: time of the last frame asked for (a keyframe fed, or a 10 s mark reached)
        state = {"mark": -math.inf, "thumb": None, "blank": None}
        wanted: set[int] = set()  # pts of non-key frames decoded for a 10 s mark
        errors = 0

        def seconds(ts) -> float | None:
            return None if ts is None else max(0.0, float((ts - start) * tb))

        def consider(frame) -> None:
            t = seconds(frame.pts if frame.pts is not None else frame.dts)
            if t is None:
                return
            if not frame.key_frame and frame.pts not in wanted:
                return  # decoded only on the way to a 10 s mark
            rot = getattr(frame, "rotation", 0) or 0
            if out.width is None:
                w, h = frame.width, frame.height
                out.width, out.height = (h, w) if int(round(rot / 90)) % 2 else (w, h)
            sw, sh = _scaled(frame.width, frame.height, short_side)
            # AREA: an anti-aliased downscale, as fast as swscale's default here
            arr = _rotate(frame.reformat(width=sw, height=sh, format="rgb24",
                                         interpolation="AREA").to_ndarray(), rot)
            g = grey_thumb(arr)
            if float(g.std()) < BLANK_STD:
                if state["blank"] is None:
                    state["blank"] = Frame(t, Image.fromarray(arr))
                return
            last = state["thumb"]
            if last is not None and last.shape == g.shape and float(np.abs(g - last).mean()) < dup_diff:
                return
            state["thumb"] = g
            out.frames.append(Frame(t, Image.fromarray(arr)))

        def feed(packet) -> None:
            nonlocal errors
            try:
                frames = cc.decode(packet)
            except av.FFmpegError:
                errors += 1  # a damaged packet: go on with the next ones
                return
            except (MemoryError, ValueError):
                errors += 1
                return
            errors = 0
            for f in frames:
                out.decoded += 1
                consider(f)

        gop: list = []  # packets after the current keyframe, not yet decoded
        have_key = False
        try:
            for packet in container.demux(vs):
                if packet.size == 0 or packet.dts is None and packet.pts is None:
                    continue
                out.packets += 1
                if clock() > deadline:
                    out.note = f"time budget of {budget:g} s spent"
                    break
                if errors >= MAX_ERRORS:
                    out.note = "too many damaged packets"
                    break
                t = seconds(packet.pts if packet.pts is not None else packet.dts)
                if packet.is_keyframe:
                    gop = []
                    have_key = True
                    if t is not None:
                        state["mark"] = max(state["mark"], t)
                    feed(packet)
                    continue
                if not have_key:
                    continue  # nothing to decode it against
                gop.append(packet)
                if t is not None and t >= state["mark"] + gap:
                    state["mark"] = t
                    if packet.pts is not None:
                        wanted.add(packet.pts)
                    for p in gop:
                        feed(p)
                    gop = []
        except av.FFmpegError as e:
            out.note = f"stopped at damaged data ({_reason(e)})"
        try:
            for f in cc.decode(None):  # frames still inside the decoder
                out.decoded += 1
                consider(f)
        except av.FFmpegError:
            pass
    finally:
        container.close()
    if not out.frames and state["blank"] is not None:
        out.frames.append(state["blank"])  # a blank video still gets one frame
    if not out.frames:
        if out.note:
            raise VideoError(f"no frame decoded before: {out.note}")
        raise VideoError("no frame could be decoded" if out.packets else "no video data")
    out.frames.sort(key=lambda f: f.time)
    if len(out.frames) > MAX_FRAMES:
        keep = np.linspace(0, len(out.frames) - 1, MAX_FRAMES).round().astype(int)
        out.frames = [out.frames[i] for i in sorted(set(keep.tolist()))]
    if out.note and out.frames:
        out.note = f"partly indexed: {len(out.frames)} frames up to {format_time(out.frames[-1].time)}, {out.note}"
    return out


def frame_at(path: str, at: float, *, short_side: int | None = None, budget: float = 30.0):
    """The frame shown at ``at`` seconds (the last one starting at or before it), as a PIL
    RGB image with the rotation applied; full size unless ``short_side``.

    Raises:
        VideoError: not a video, or no frame there.
    """
    import av
    from PIL import Image

    deadline = time.monotonic() + budget
    container = _open(path)
    try:
        vs = video_stream(container)
        if vs is None:
            raise VideoError("no video stream")
        tb = vs.time_base or Fraction(1, 1000)
        start = vs.start_time if vs.start_time is not None else 0
        target = start + int(max(0.0, at) / tb)
        try:
            container.seek(target, stream=vs, backward=True, any_frame=False)
        except av.FFmpegError:
            container.seek(0)
        best = None
        try:
            for frame in container.decode(vs):
                if frame.pts is None:
                    continue
                if frame.pts <= target or best is None:
                    best = frame
                if frame.pts >= target or time.monotonic() > deadline:
                    break
        except av.FFmpegError:
            pass
        if best is None:
            raise VideoError(f"no frame at {format_time(at)}")
        rot = getattr(best, "rotation", 0) or 0
        if short_side:
            sw, sh = _scaled(best.width, best.height, short_side)
            arr = best.reformat(width=sw, height=sh, format="rgb24", interpolation="AREA").to_ndarray()
        else:
            arr = best.to_ndarray(format="rgb24")
        return Image.fromarray(_rotate(arr, rot))
    finally:
        container.close()


def format_time(seconds: float) -> str:
    """``83.4`` -> ``1:23.4``; ``3725`` -> ``1:02:05.0``."""
    tenths = int(round(max(0.0, seconds) * 10))
    s, t = divmod(tenths, 10)
    m, s = divmod(s, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}.{t}" if h else f"{m}:{s:02d}.{t}"
