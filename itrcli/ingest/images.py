"""Decoding image files and preprocessing them exactly as the model's own processor does.

Data flow: file bytes -> :func:`decode` (PIL image, EXIF-rotated, RGB, with metadata) ->
:meth:`Preprocess.__call__` (float32 array ``[3, H, W]``, resized, cropped and normalised).

Preprocessing re-implements the Hugging Face PIL image processors (CLIP, SigLIP) from their
saved configuration, so decode workers never import transformers; ``tests/test_images.py``
checks it against the real processor.  JPEG *draft mode* lets libjpeg decode at 1/2, 1/4 or
1/8 scale in the DCT domain: we ask for the smallest scale that still covers the model's
input size, which makes a 12 MP photo decode about 4x faster and changes the pixels fed to
the model only slightly (see :data:`DRAFT_TOLERANCE`).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from .decoded import (MAX_PIXELS, DecodeError, ImageMeta, apply_orientation, exif_meta,
                      exif_of, exif_orientation, to_rgb)
from .files import MAX_FILE_BYTES, Unreadable, content_hash, read_file
from ..constants import (AVIF_EXTENSIONS, HEIF_EXTENSIONS, IMAGE_EXTENSIONS,  # noqa: F401
                         RAW_EXTENSIONS, VIDEO_EXTENSIONS)

#: Largest absolute difference (in normalised pixel units, i.e. after ``(x/255-mean)/std``)
#: that we accept between draft-mode and full-size preprocessing, on average per pixel.
DRAFT_TOLERANCE = 0.05

# Pillow's process-wide settings are the program's, not this module's: Pillow refuses
# truncated files unless the program set ImageFile.LOAD_TRUNCATED_IMAGES (itr itself never
# does: a truncated file is reported, not silently half-grey), and its bomb guard
# (Image.MAX_IMAGE_PIXELS) stays as the program set it: an image it refuses is reported
# "too large" like one over MAX_PIXELS, which itr checks itself, per image.  Pillow's
# warnings (corrupt EXIF, odd palettes) are silenced by the itr command (cli.main), not here.

_HEIF_REGISTERED: bool | None = None


def heif_available() -> bool:
    """Register the HEIC/HEIF opener if ``pillow-heif`` is installed; say whether it is."""
    global _HEIF_REGISTERED
    if _HEIF_REGISTERED is None:
        try:
            from pillow_heif import register_heif_opener

            register_heif_opener()
            _HEIF_REGISTERED = True
        except Exception:  # not installed, or a broken install: HEIC files are then not listed
            _HEIF_REGISTERED = False
    return _HEIF_REGISTERED


def avif_available() -> bool:
    """Whether this Pillow decodes AVIF (one built with libavif, as recent wheels are)."""
    from PIL import features

    try:
        return bool(features.check("avif"))
    except Exception:  # an older Pillow: no such feature
        return False


def raw_available() -> bool:
    """Whether camera RAW decodes here (rawpy, which bundles LibRaw; see :mod:`.raw`)."""
    from .raw import available

    return available()


def supported_extensions() -> frozenset[str]:
    """The image extensions to index: HEIC/HEIF too when pillow-heif is available (a
    dependency), AVIF when Pillow decodes it, camera RAW when rawpy is installed."""
    exts = IMAGE_EXTENSIONS
    if heif_available():
        exts |= HEIF_EXTENSIONS
    if avif_available():
        exts |= AVIF_EXTENSIONS
    if raw_available():
        exts |= RAW_EXTENSIONS
    return exts


def is_raw(path: str | None) -> bool:
    """Whether ``path`` names a camera RAW file (:data:`itrcli.constants.RAW_EXTENSIONS`)."""
    if not path:
        return False
    i = path.rfind(".")
    return i > 0 and path[i:].lower() in RAW_EXTENSIONS


def decoder_id() -> str:
    """What a remembered decode failure depends on besides the bytes: versions and limits.

    A failure recorded under another id (itr or Pillow upgraded, limits changed) is retried.
    """
    import PIL

    from .. import __version__

    pillow = Image.MAX_IMAGE_PIXELS  # the program's own bomb guard, 2x this refused
    return (f"itr {__version__}; Pillow {PIL.__version__}; {MAX_PIXELS} px"
            f"{'' if pillow is None else f' (Pillow {pillow})'}; {MAX_FILE_BYTES} B")


def decoder_for(path: str) -> str:
    """The decoder id a remembered failure of the file at ``path`` is recorded under: the
    image decoder's (:func:`decoder_id`), with pillow-heif's or LibRaw's version for the
    files they decode, or the video decoder's (:func:`itrcli.ingest.video.decoder_id`)."""
    i = path.rfind(".")
    ext = path[i:].lower() if i > 0 else ""
    if ext in VIDEO_EXTENSIONS:
        from .video import decoder_id as video_decoder_id

        return video_decoder_id()
    base = decoder_id()
    if ext in RAW_EXTENSIONS:
        from .raw import decoder_id as raw_decoder_id

        return f"{base}; {raw_decoder_id()}"
    if ext in HEIF_EXTENSIONS:
        try:
            import pillow_heif

            return f"{base}; pillow-heif {pillow_heif.__version__}"
        except Exception:
            return base
    return base


@dataclass
class Preprocess:
    """The numeric recipe of a Hugging Face image processor (CLIP- and SigLIP-style).

    Build it with :meth:`from_config` from ``image_processor.to_dict()``.
    """

    resize: bool = True
    shortest_edge: int | None = 224  #: CLIP: resize the short side to this, keep aspect
    height: int | None = None  #: SigLIP: resize to exactly height x width
    width: int | None = None
    resample: int = Image.Resampling.BICUBIC
    center_crop: bool = True
    crop_height: int = 224
    crop_width: int = 224
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    #: the crop's offset rounded as torchvision's ``CenterCrop`` (open_clip), not floored
    crop_round: bool = False
    _scale: Any = field(default=None, repr=False, compare=False)
    _shift: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "Preprocess":
        """Read a processor's ``to_dict()`` / ``preprocessor_config.json``."""
        size = cfg.get("size") or {}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = cfg.get("crop_size") or {}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        p = cls(
            resize=bool(cfg.get("do_resize", True)),
            shortest_edge=size.get("shortest_edge"),
            height=size.get("height"),
            width=size.get("width"),
            resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
            center_crop=bool(cfg.get("do_center_crop", False)),
            crop_height=int(crop.get("height", 0) or 0),
            crop_width=int(crop.get("width", 0) or 0),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            do_normalize=bool(cfg.get("do_normalize", True)),
            mean=_triple(cfg.get("image_mean", (0.5, 0.5, 0.5))),
            std=_triple(cfg.get("image_std", (0.5, 0.5, 0.5))),
            crop_round=bool(cfg.get("crop_round", False)),
        )
        if p.resize and not p.shortest_edge and not (p.height and p.width):
            raise ValueError(f"unsupported image processor size {size!r}")
        return p

    def to_config(self) -> dict[str, Any]:
        """The inverse of :meth:`from_config` (stored in the library's meta table)."""
        size = (
            {"shortest_edge": self.shortest_edge}
            if self.shortest_edge
            else {"height": self.height, "width": self.width}
        )
        extra = {"crop_round": True} if self.crop_round else {}  # older libraries: absent
        return {
            **extra,
            "do_resize": self.resize,
            "size": size,
            "resample": self.resample,
            "do_center_crop": self.center_crop,
            "crop_size": {"height": self.crop_height, "width": self.crop_width},
            "rescale_factor": self.rescale_factor,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step, as transformers computes it."""
        if not self.resize:
            return width, height
        if self.shortest_edge:
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_short, new_long) if width <= height else (new_long, new_short)
        return int(self.width), int(self.height)  # type: ignore[arg-type]

    def draft_request(self, width: int, height: int) -> tuple[int, int]:
        """The size to ask JPEG draft mode for: the result must still cover the resize."""
        rw, rh = self.resized_size(width, height)
        # Draft scales are powers of two; asking for the resize target keeps every
        # scaled dimension >= the size the processor resizes to.
        return max(rw, 1), max(rh, 1)

    def __call__(self, img: Image.Image, full_size: tuple[int, int] | None = None):
        """Resize, crop, rescale and normalise an RGB image into ``[3, H, W]`` float32
        (:meth:`crop`, then :meth:`normalise`).

        ``full_size``: the (width, height) of the image before draft-mode downscaling, so
        that the output geometry is exactly that of a full-size decode.
        """
        return self.normalise(self.crop(img, full_size)[None])[0]

    def crop(self, img: Image.Image, full_size: tuple[int, int] | None = None):
        """The resize and crop steps: ``[H, W, 3]`` uint8, a quarter of the memory of the
        float32 it becomes (what waits in an index run's queue)."""
        import numpy as np

        if self.resize:
            w, h = self.resized_size(*(full_size or img.size))
            if w * h > MAX_PIXELS:
                # a thin strip (say 200,000 x 1) resized to the model's short side
                fw, fh = full_size or img.size
                raise DecodeError(f"extreme aspect ratio: {fw}x{fh} pixels would resize to {w}x{h}")
            if (w, h) != img.size:
                img = img.resize((w, h), resample=self.resample)
        arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
        if self.center_crop:
            arr = _center_crop(arr, self.crop_height, self.crop_width, rounded=self.crop_round)
        return arr

    def normalise(self, arr):
        """Rescale and normalise :meth:`crop`'s pictures, ``[n, H, W, 3]`` uint8, into the
        model's input, ``[n, 3, H, W]`` float32."""
        import numpy as np

        if self._scale is None:
            scale = self.rescale_factor if self.do_rescale else 1.0
            mean = np.asarray(self.mean, dtype=np.float32) if self.do_normalize else np.zeros(3, np.float32)
            std = np.asarray(self.std, dtype=np.float32) if self.do_normalize else np.ones(3, np.float32)
            # (x * scale - mean) / std folded into one multiply-add per pixel
            self._scale = (np.float32(scale) / std).astype(np.float32)
            self._shift = (-mean / std).astype(np.float32)
        # one channel at a time into the output: no [n, H, W, 3] float32 copy beside it
        out = np.empty((arr.shape[0], 3, *arr.shape[1:3]), dtype=np.float32)  # [n, 3, H, W]
        for c in range(3):
            np.multiply(arr[..., c], self._scale[c], out=out[:, c], dtype=np.float32)
            out[:, c] += self._shift[c]
        return out


def _triple(v: Any) -> tuple[float, float, float]:
    if isinstance(v, (int, float)):
        return (float(v),) * 3  # type: ignore[return-value]
    a, b, c = (float(x) for x in v)
    return a, b, c


def _center_crop(arr, ch: int, cw: int, rounded: bool = False):
    """Centre crop of an ``[H, W, C]`` array; pads with zeros when the image is smaller,
    as transformers' ``center_crop`` does.  ``rounded``: the offset rounded (half to even)
    as torchvision's ``CenterCrop`` computes it, instead of floored."""
    import numpy as np

    h, w = arr.shape[:2]
    if h < ch or w < cw:
        ph, pw = max(ch, h), max(cw, w)
        padded = np.zeros((ph, pw, arr.shape[2]), dtype=arr.dtype)
        top, left = (ph - h) // 2, (pw - w) // 2
        padded[top : top + h, left : left + w] = arr
        arr, h, w = padded, ph, pw
    if rounded:
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    else:
        top, left = (h - ch) // 2, (w - cw) // 2
    return arr[top : top + ch, left : left + cw]


def open_image(data: bytes, *, draft_for: Preprocess | None = None,
               name: str | None = None) -> tuple[Image.Image, ImageMeta]:
    """Decode image bytes into an EXIF-rotated RGB image and its metadata: the one decoder
    of every reader (indexing, thumbnails, previews, contact sheets, the server, re-ranking).

    ``draft_for``: when given and the file is a JPEG, decode at the smallest DCT scale that
    still covers that preprocessing's resize (much faster for large photos); a camera RAW
    then uses its embedded preview when that covers it (:func:`itrcli.ingest.raw.open_raw`).
    ``name``: the file's name, which says a camera RAW (its bytes are read by LibRaw, not
    Pillow); HEIC/HEIF and AVIF are recognised by their bytes.
    Raises :class:`DecodeError` with a one-line reason for anything that is not a usable image.
    """
    if not data:
        raise DecodeError("empty file")
    if is_raw(name):
        from .raw import open_raw

        return open_raw(data, draft_for=draft_for)
    heif_available()  # every reader decodes HEIC, not only those that listed extensions first
    if data[4:8] == b"ftyp":
        data = still_of_motion_photo(data)
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image (unknown format)") from None
    except Image.DecompressionBombError as e:  # over Pillow's guard, as the program set it
        raise DecodeError(_reason(e)) from None
    except Exception as e:  # Pillow raises many types for hostile headers
        raise DecodeError(f"cannot read image header: {_reason(e)}") from None
    try:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise DecodeError("image has no pixels")
        if w * h > MAX_PIXELS:
            raise DecodeError(f"image too large: {w}x{h} pixels (limit {MAX_PIXELS:,})")
        exif = exif_of(img)
        orientation = exif_orientation(exif)
        fw, fh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        meta = ImageMeta(width=fw, height=fh, **exif_meta(exif))
        if draft_for is not None and img.format == "JPEG":
            # ask in the file's own orientation: rotation happens after decoding
            rw, rh = draft_for.draft_request(fw, fh)
            req = (rh, rw) if orientation in (5, 6, 7, 8) else (rw, rh)
            img.draft("RGB", req)
        img.load()
        if orientation and orientation != 1:
            img = apply_orientation(img, orientation)
        return to_rgb(img), meta
    except (DecodeError, MemoryError):
        raise  # MemoryError: not the file's fault, so not remembered as a bad file
    except Exception as e:
        raise DecodeError(_reason(e)) from None


def still_of_motion_photo(data: bytes) -> bytes:
    """The HEIC/AVIF still of a motion photo: the file's ISO-BMFF boxes up to an appended
    MP4 (a second top-level ``ftyp`` box), which libheif would otherwise take for the
    image's own sequence track and refuse.  Other files are returned as they are."""
    import struct

    pos, end = 0, len(data)
    for _ in range(10_000):  # a bounded walk: hostile sizes cannot loop
        if pos + 8 > end:
            return data
        size, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"ftyp" and pos > 0:
            return data[:pos]
        if size == 1:
            if pos + 16 > end:
                return data
            size = struct.unpack_from(">Q", data, pos + 8)[0]
        elif size == 0:
            return data  # to the end of the file
        if size < 8:
            return data
        pos += size
    return data


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, Image.DecompressionBombError):  # Pillow's guard (header, a frame, a tile)
        m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", msg)
        return (f"image too large: {int(m[1]):,} pixels (limit {int(m[2]):,})" if m
                else f"image too large: {msg[:200]}")
    if "truncated" in msg.lower() or isinstance(e, (EOFError,)):
        return "truncated or corrupt image data"
    return msg[:200]


@dataclass
class ReadImage:
    """One image file read with every guard, hashed and opened (:func:`read_image`)."""

    path: str
    st: Any = None  #: ``os.stat_result`` as read (None: the file could not be read)
    content_hash: str = ""  #: ``files.hash``; "" when the file could not be read
    image: Any = None  #: the upright RGB ``PIL.Image``; None when skipped or failed
    meta: ImageMeta | None = None
    error: str | None = None  #: why it could not be read or decoded (one line)
    #: the error depends only on the file's bytes: remember it until the file changes
    remember: bool = False
    unreadable: bool = False  #: the file itself could not be read (not its image)


def read_image(path: str, *, draft_for: Preprocess | Any | None = None,
               skip: Callable[[str], bool] | None = None) -> ReadImage:
    """Read ``path`` (:func:`itrcli.ingest.files.read_file`: FIFOs, huge and changing files
    refused), hash its content, and unless ``skip(content_hash)`` decode it upright (JPEG draft mode for
    ``draft_for``'s size).  The one way itr reads an image file: for its vector (indexing)
    and for its words (OCR).  Never raises for a bad file or image: see ``error``."""
    r = ReadImage(path)
    try:
        r.st, data = read_file(path)
    except Unreadable as e:
        r.error, r.st, r.remember, r.unreadable = str(e), e.st, e.st is not None, True
        return r
    r.content_hash = content_hash(data)
    if skip is not None and skip(r.content_hash):
        return r
    try:
        r.image, r.meta = open_image(data, draft_for=draft_for, name=path)
    except DecodeError as e:
        r.error, r.remember = str(e), True
    except MemoryError:
        r.error = "not enough memory to decode"
    except Exception as e:  # whatever a hostile file provokes, it must not stop the run
        r.error = f"cannot decode: {type(e).__name__}: {str(e)[:200]}"
    return r


def decode_file(path: str, prep: Preprocess | None, *, draft: bool = True):
    """Read and preprocess one file: returns (pixels ``[3, H, W]`` or None, meta, bytes).

    The one decode path outside indexing (which hashes before it decodes): the same file
    guards (:func:`itrcli.ingest.files.read_file`) and pixel limit as an index run.
    Raises :class:`DecodeError` with a one-line reason.
    """
    try:
        _st, data = read_file(path)
    except Unreadable as e:
        raise DecodeError(str(e)) from None
    img, meta = open_image(data, draft_for=prep if draft else None, name=path)
    return (prep(img, (meta.width, meta.height)) if prep is not None else None), meta, data
