"""What every image decoder shares (:mod:`.images` for Pillow's formats, :mod:`.raw` for
camera RAW): the pixel limit, the one-line error, the record kept beside the vector, RGB as
transformers makes it, and EXIF read without trusting it (orientation, capture time,
camera, place: hostile EXIF costs the metadata, never the image)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from PIL import Image

#: Images with more pixels than this (width x height as declared in the header) are refused
#: before any pixel is allocated: 16,384 x 16,384 = 268 MP.  Larger real photos are rare
#: (panoramas stitched at full size); decompression bombs declare far more.
MAX_PIXELS = 16384 * 16384


class DecodeError(Exception):
    """A file that cannot be turned into an image; the message is the one-line reason.

    It depends only on the file's bytes (and the limits below), so a file that failed once
    fails again until it changes: the library remembers such files (see ``decoder_id``).
    """


@dataclass
class ImageMeta:
    """What we keep about an image besides its vector."""

    width: int  #: after EXIF rotation, at full size
    height: int
    taken_at: str | None = None  #: ISO 8601 capture time from EXIF, no time zone
    camera: str | None = None
    lat: float | None = None
    lon: float | None = None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB the way transformers does it (alpha composited onto white), 16-bit scaled down."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "F":
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.nan_to_num(arr).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def exif_of(img: Image.Image):
    try:
        return img.getexif()
    except Exception:  # hostile EXIF must not stop decoding
        return None


def exif_orientation(exif) -> int:
    try:
        o = int(exif.get(0x0112, 1)) if exif is not None else 1
    except Exception:
        return 1
    return o if 1 <= o <= 8 else 1


_TRANSPOSE = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


def apply_orientation(img: Image.Image, orientation: int) -> Image.Image:
    # Same mapping as ImageOps.exif_transpose, without re-parsing (possibly hostile) EXIF.
    for op in _TRANSPOSE.get(orientation, ()):
        img = img.transpose(op)
    return img


def exif_meta(exif) -> dict[str, Any]:
    try:
        return _exif_meta(exif)
    except Exception:  # hostile EXIF costs the metadata, never the image
        return {}


def _exif_meta(exif) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if exif is None:
        return out
    try:
        sub = exif.get_ifd(0x8769)  # Exif IFD: DateTimeOriginal lives here
    except Exception:
        sub = {}
    out["taken_at"] = exif_time(sub.get(0x9003) or sub.get(0x9004) or exif.get(0x0132))
    make, model = _clean(exif.get(0x010F)), _clean(exif.get(0x0110))
    if model and make and not model.lower().startswith(make.split()[0].lower()):
        model = f"{make} {model}"
    out["camera"] = model or make
    try:
        gps = exif.get_ifd(0x8825)
    except Exception:
        gps = {}
    lat = _gps_coord(gps.get(2), gps.get(1))
    lon = _gps_coord(gps.get(4), gps.get(3))
    if lat is not None and lon is not None and abs(lat) <= 90 and abs(lon) <= 180:
        out["lat"], out["lon"] = lat, lon
    return out


def _clean(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    s = str(v).replace("\x00", "").strip()
    return s[:100] or None


def exif_time(v: Any) -> str | None:
    s = _clean(v)
    if not s:
        return None
    for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y:%m:%d %H:%M", "%Y:%m:%d"):
        try:
            return datetime.strptime(s[:19], fmt).isoformat()
        except ValueError:
            continue
    return None


def _gps_coord(value: Any, ref: Any) -> float | None:
    try:
        d, m, s = (float(x) for x in value)
        coord = d + m / 60 + s / 3600
    except Exception:
        return None
    if not math.isfinite(coord):
        return None
    ref_s = _clean(ref) or ""
    return -coord if ref_s.upper() in ("S", "W") else coord
