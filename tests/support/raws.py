"""Camera files made offline for the tests and bench/: a DNG (a TIFF with a Bayer mosaic,
written tag by tag, as LibRaw reads it), with or without an embedded JPEG preview and with
the EXIF a camera writes; motion photos (a JPEG or HEIC with an MP4 appended).

No writer of camera RAW exists in Python (rawpy only reads), so :func:`make_dng` writes
the few TIFF/EP and DNG tags LibRaw needs: a 16-bit RGGB mosaic in IFD0, the preview in a
SubIFD (``NewSubFileType`` 1, baseline JPEG), the Exif and GPS IFDs.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

# TIFF field types
BYTE, ASCII, SHORT, LONG, RATIONAL, UNDEFINED, SRATIONAL = 1, 2, 3, 4, 5, 7, 10
_SIZES = {BYTE: 1, ASCII: 1, SHORT: 2, LONG: 4, RATIONAL: 8, UNDEFINED: 1, SRATIONAL: 8}


def _pack(typ: int, values) -> bytes:
    if typ == ASCII:
        return values.encode("ascii") + b"\0"
    if typ in (BYTE, UNDEFINED):
        return bytes(values)
    if typ == SHORT:
        return struct.pack(f"<{len(values)}H", *values)
    if typ == LONG:
        return struct.pack(f"<{len(values)}I", *values)
    if typ == RATIONAL:
        return b"".join(struct.pack("<II", n, d) for n, d in values)
    if typ == SRATIONAL:
        return b"".join(struct.pack("<ii", n, d) for n, d in values)
    raise ValueError(typ)


class _Tiff:
    """A little-endian TIFF built in memory: blobs appended, IFDs written last."""

    def __init__(self) -> None:
        self.buf = bytearray(b"II*\0\0\0\0\0")

    def blob(self, data: bytes) -> int:
        if len(self.buf) % 2:
            self.buf += b"\0"
        at = len(self.buf)
        self.buf += data
        return at

    def ifd(self, tags: dict[int, tuple[int, object]], next_ifd: int = 0) -> int:
        """Write an IFD (tags sorted); values over 4 bytes go right after it."""
        entries = sorted(tags.items())
        if len(self.buf) % 2:
            self.buf += b"\0"
        at = len(self.buf)
        size = 2 + 12 * len(entries) + 4
        extra = bytearray()
        body = bytearray(struct.pack("<H", len(entries)))
        for tag, (typ, values) in entries:
            data = _pack(typ, values)
            count = len(data) // _SIZES[typ]
            if len(data) <= 4:
                field = data.ljust(4, b"\0")
            else:
                if len(extra) % 2:
                    extra += b"\0"
                field = struct.pack("<I", at + size + len(extra))
                extra += data
            body += struct.pack("<HHI", tag, typ, count) + field
        body += struct.pack("<I", next_ifd)
        self.buf += body + extra
        return at

    def set_first(self, at: int) -> None:
        self.buf[4:8] = struct.pack("<I", at)


def _dms(value: float) -> list[tuple[int, int]]:
    v = abs(value)
    d = int(v)
    m = int((v - d) * 60)
    s = round(((v - d) * 60 - m) * 60 * 100)
    return [(d, 1), (m, 1), (s, 100)]


def mosaic(rgb: np.ndarray, white: int = 4095) -> np.ndarray:
    """An RGGB Bayer mosaic ``[H, W]`` uint16 of an RGB image ``[H, W, 3]`` (values to
    ``white``, linear light)."""
    lin = (rgb.astype(np.float32) / 255.0) ** 2.2 * white
    out = np.empty(rgb.shape[:2], dtype=np.uint16)
    out[0::2, 0::2] = lin[0::2, 0::2, 0]
    out[0::2, 1::2] = lin[0::2, 1::2, 1]
    out[1::2, 0::2] = lin[1::2, 0::2, 1]
    out[1::2, 1::2] = lin[1::2, 1::2, 2]
    return out


def make_dng(path: str | Path, picture: Image.Image, *, preview: int | None = 512,
             orientation: int = 1, make: str = "Canon", model: str = "Canon EOS R5",
             taken: str = "2021:06:05 14:30:00", gps: tuple[float, float] | None = None) -> Path:
    """Write ``picture`` as a DNG: its Bayer mosaic, and unless ``preview`` is None an
    embedded JPEG preview whose long side is ``preview`` pixels.  ``orientation``: the
    TIFF orientation tag (the mosaic and preview are stored as the sensor saw them)."""
    rgb = np.asarray(picture.convert("RGB"))
    h, w = rgb.shape[:2]
    h, w = h - h % 2, w - w % 2
    raw = mosaic(rgb[:h, :w])
    t = _Tiff()
    raw_at = t.blob(raw.tobytes())
    sub_ifds = []
    if preview:
        small = picture.convert("RGB")
        small.thumbnail((preview, preview))
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=92)
        jpg = buf.getvalue()
        jpg_at = t.blob(jpg)
        sub_ifds.append(t.ifd({
            254: (LONG, [1]),  # NewSubFileType: a reduced-resolution preview
            256: (LONG, [small.width]), 257: (LONG, [small.height]),
            258: (SHORT, [8, 8, 8]), 259: (SHORT, [7]),  # JPEG
            262: (SHORT, [6]),  # YCbCr
            273: (LONG, [jpg_at]), 277: (SHORT, [3]), 278: (LONG, [small.height]),
            279: (LONG, [len(jpg)]),
        }))
    exif_tags = {36867: (ASCII, taken), 36868: (ASCII, taken)}
    exif_at = t.ifd(exif_tags)
    gps_at = None
    if gps is not None:
        lat, lon = gps
        gps_at = t.ifd({
            0: (BYTE, [2, 3, 0, 0]),
            1: (ASCII, "N" if lat >= 0 else "S"), 2: (RATIONAL, _dms(lat)),
            3: (ASCII, "E" if lon >= 0 else "W"), 4: (RATIONAL, _dms(lon)),
        })
    tags: dict[int, tuple[int, object]] = {
        254: (LONG, [0]),
        256: (LONG, [w]), 257: (LONG, [h]),
        258: (SHORT, [16]), 259: (SHORT, [1]),
        262: (SHORT, [32803]),  # CFA
        271: (ASCII, make), 272: (ASCII, model),
        273: (LONG, [raw_at]), 274: (SHORT, [orientation]), 277: (SHORT, [1]),
        278: (LONG, [h]), 279: (LONG, [raw.nbytes]), 284: (SHORT, [1]),
        306: (ASCII, taken),
        33421: (SHORT, [2, 2]), 33422: (BYTE, [0, 1, 1, 2]),  # RGGB
        34665: (LONG, [exif_at]),
        50706: (BYTE, [1, 4, 0, 0]), 50707: (BYTE, [1, 1, 0, 0]),
        50708: (ASCII, model),
        50714: (LONG, [0]), 50717: (LONG, [4095]),
        # sRGB-ish camera: XYZ -> camera as the sRGB matrix (D65)
        50721: (SRATIONAL, [(32404542, 10000000), (-15371385, 10000000), (-4985314, 10000000),
                            (-9692660, 10000000), (18760108, 10000000), (415560, 10000000),
                            (556434, 10000000), (-2040259, 10000000), (10572252, 10000000)]),
        50778: (SHORT, [21]),  # CalibrationIlluminant1: D65
        50728: (RATIONAL, [(1, 1), (1, 1), (1, 1)]),  # AsShotNeutral
    }
    if sub_ifds:
        tags[330] = (LONG, sub_ifds)
    if gps_at is not None:
        tags[34853] = (LONG, [gps_at])
    t.set_first(t.ifd(tags))
    path = Path(path)
    path.write_bytes(bytes(t.buf))
    return path


def motion_photo(path: str | Path, still: Image.Image, *, kind: str = "JPEG",
                 clip_frames: int = 12) -> Path:
    """A motion photo: the still (JPEG as Google's ``MotionPhoto`` XMP describes it, or
    HEIC) with a short MP4 appended, as phones write them."""
    import av

    mp4 = io.BytesIO()
    with av.open(mp4, "w", format="mp4") as out:
        s = out.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(clip_frames):
            arr = np.full((48, 64, 3), (i * 20) % 255, dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    clip = mp4.getvalue()
    buf = io.BytesIO()
    if kind == "JPEG":
        xmp = (
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf='
            '"http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
            'xmlns:GCamera="http://ns.google.com/photos/1.0/camera/" GCamera:MotionPhoto="1" '
            f'GCamera:MicroVideo="1" GCamera:MicroVideoOffset="{len(clip)}"/></rdf:RDF></x:xmpmeta>'
        ).encode()
        still.convert("RGB").save(buf, format="JPEG", quality=90, xmp=xmp)
    else:
        import pillow_heif

        pillow_heif.register_heif_opener()
        still.convert("RGB").save(buf, format="HEIF", quality=80)
    path = Path(path)
    path.write_bytes(buf.getvalue() + clip)
    return path
