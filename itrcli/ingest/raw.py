"""Camera RAW (CR2, CR3, NEF, ARW, DNG, RAF, ORF, RW2, ... : ``constants.RAW_EXTENSIONS``)
through rawpy, which bundles LibRaw.

Two ways to pixels, the cheaper first (``bench/raw_decode.py`` measures both):

- the **embedded preview**: nearly every camera stores a JPEG of the photo in its RAW file
  (full size on most Canon, Nikon and Fuji bodies; 1.6 MP on Sony's).  It is used when,
  turned upright, it covers the size the reader asked for (the model's resize for
  indexing, the box of a thumbnail) and has the sensor's aspect ratio.  It is decoded
  with JPEG draft mode like any JPEG, and LibRaw does not unpack the sensor data at all;
- otherwise LibRaw's **half-size demosaic** (each 2x2 Bayer block becomes one RGB pixel:
  no interpolation, camera white balance, 8 bits), upright.

Metadata comes from the RAW itself: most RAW formats are TIFF inside, whose IFD0, Exif
and GPS directories Pillow reads without decoding anything; the others (CR3, RAF, ...)
give the EXIF of their preview, and LibRaw's capture time.  The orientation is LibRaw's
(``sizes.flip``, which it reads from the maker's tags where the TIFF has none).

``rawpy`` is imported only here, when a RAW file is decoded.
"""

from __future__ import annotations

import io
from typing import Any

from .decoded import (MAX_PIXELS, DecodeError, ImageMeta, apply_orientation, exif_meta,
                      exif_time, to_rgb)

#: LibRaw's ``flip`` -> the EXIF orientation that turns the image upright (LibRaw reads
#: EXIF orientation ``o`` as ``"50132467"[o & 7]``).
_FLIP_TO_ORIENTATION = {0: 1, 1: 2, 2: 4, 3: 3, 4: 5, 5: 8, 6: 6, 7: 7}
#: An embedded preview is used only if its aspect ratio is the sensor's within this.
ASPECT_TOLERANCE = 0.02
#: TIFF-like headers of RAW formats with their own magic (Olympus ORF, Panasonic RW2):
#: the directories are TIFF's, so Pillow reads them once the magic is the standard one.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_OTHER_MAGIC = {b"IIRO": b"II*\x00", b"IIRS": b"II*\x00", b"MMOR": b"MM\x00*",
                b"IIU\x00": b"II*\x00"}


def available() -> bool:
    """Whether rawpy (LibRaw) can be imported."""
    try:
        import rawpy  # noqa: F401
    except Exception:
        return False
    return True


def decoder_id() -> str:
    """rawpy's and LibRaw's versions (a remembered RAW failure is retried when they change)."""
    try:
        import rawpy

        return f"rawpy {rawpy.__version__}; LibRaw {'.'.join(map(str, rawpy.libraw_version))}"
    except Exception:
        return "rawpy not installed"


def open_raw(data: bytes, *, draft_for: Any = None) -> tuple[Any, ImageMeta]:
    """Decode a camera RAW file's bytes into an upright RGB ``PIL.Image`` and its metadata.

    ``draft_for``: what :func:`itrcli.ingest.images.open_image` takes (a ``Preprocess``, or
    anything with ``draft_request(width, height)``): the embedded preview is used when it
    covers that size; without it, when it covers the half-size demosaic.
    Raises :class:`DecodeError` with a one-line reason.
    """
    try:
        import rawpy
    except Exception:
        raise DecodeError("camera RAW needs rawpy, which is not installed: pip install rawpy") from None
    try:
        raw = rawpy.imread(io.BytesIO(data))
    except rawpy.LibRawFileUnsupportedError:
        raise DecodeError("not a camera RAW that LibRaw reads (unsupported or damaged)") from None
    except (rawpy.LibRawError, rawpy.NotSupportedError) as e:
        raise DecodeError(f"cannot read camera RAW: {_reason(e)}") from None
    except MemoryError:
        raise
    except Exception as e:  # a hostile header: whatever it provokes is one line
        raise DecodeError(f"cannot read camera RAW: {_reason(e)}") from None
    try:
        with raw:
            return _decode(raw, data, draft_for, rawpy)
    except (DecodeError, MemoryError):
        raise
    except Exception as e:
        raise DecodeError(f"cannot decode camera RAW: {_reason(e)}") from None


def _decode(raw, data: bytes, draft_for: Any, rawpy) -> tuple[Any, ImageMeta]:
    from PIL import Image

    s = raw.sizes
    if s.raw_width * s.raw_height > MAX_PIXELS or s.width * s.height > MAX_PIXELS:
        raise DecodeError(f"image too large: {s.width}x{s.height} pixels (limit {MAX_PIXELS:,})")
    if s.width <= 0 or s.height <= 0:
        raise DecodeError("image has no pixels")
    orientation = _FLIP_TO_ORIENTATION.get(int(s.flip or 0), 1)
    turned = orientation in (5, 6, 7, 8)
    fw, fh = (s.height, s.width) if turned else (s.width, s.height)
    exif = _tiff_exif(data)
    want = draft_for.draft_request(fw, fh) if draft_for is not None else (fw // 2, fh // 2)
    img = None
    preview_exif = None
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawError, rawpy.NotSupportedError, ValueError):
        thumb = None  # no preview, or one LibRaw cannot hand out: demosaic
    if thumb is not None:
        img, preview_exif = _preview(thumb, rawpy, want, orientation, (fw, fh))
    if img is None:
        rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)  # [H, W, 3], upright
        img = Image.fromarray(rgb)
    meta = exif_meta(exif if exif is not None else preview_exif)
    if not meta.get("taken_at"):
        meta["taken_at"] = _libraw_time(raw)
    return to_rgb(img), ImageMeta(width=fw, height=fh, **meta)


def _preview(thumb, rawpy, want: tuple[int, int], orientation: int, full: tuple[int, int]):
    """The embedded preview, upright, when it covers ``want`` (width, height, upright) and
    has the sensor's aspect; else (None, None).  Returns (image, the preview's EXIF)."""
    from PIL import Image

    if thumb.format == rawpy.ThumbFormat.JPEG:
        img = Image.open(io.BytesIO(thumb.data))
        if img.format != "JPEG":
            return None, None
    elif thumb.format == rawpy.ThumbFormat.BITMAP:
        img = Image.fromarray(thumb.data)
    else:
        return None, None
    turned = orientation in (5, 6, 7, 8)
    pw, ph = (img.height, img.width) if turned else img.size
    if pw * ph > MAX_PIXELS or pw < want[0] or ph < want[1]:
        return None, None
    if abs(pw / ph - full[0] / full[1]) > ASPECT_TOLERANCE * full[0] / full[1]:
        return None, None  # a crop, or a different frame: not the photo as the sensor saw it
    exif = None
    if img.format == "JPEG":
        try:
            exif = img.getexif()
        except Exception:
            exif = None
        # draft mode in the preview's own orientation (it is stored as the sensor saw it)
        img.draft("RGB", (want[1], want[0]) if turned else want)
    img.load()
    if orientation != 1:
        img = apply_orientation(img, orientation)
    return img, exif


def _tiff_exif(data: bytes):
    """The TIFF directories of a TIFF-based RAW (IFD0 with Make, Model, DateTime,
    Orientation; the Exif and GPS IFDs under it), or None."""
    from PIL import Image

    head = data[:4]
    if head not in _TIFF_MAGIC:
        if head not in _OTHER_MAGIC:
            return None
        data = _OTHER_MAGIC[head] + data[4:]
    try:
        exif = Image.Exif()
        exif.load(data)
        return exif if len(exif) else None
    except Exception:  # hostile directories cost the metadata, never the image
        return None


def _libraw_time(raw) -> str | None:
    try:
        t = raw.other.timestamp
    except Exception:
        return None
    if t is None or getattr(t, "year", 0) < 1971:
        return None
    return exif_time(t.strftime("%Y:%m:%d %H:%M:%S"))


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]
