"""Thumbnails: decoded fast, EXIF-rotated, and cached in the library by content hash.

A thumbnail is the image scaled to fit a box (``width x height`` pixels), never enlarged,
stored as a JPEG.  Decoding uses JPEG *draft mode* (libjpeg scales by 1/2, 1/4 or 1/8 in
the DCT domain), so a 12 MP photo becomes a 256-pixel thumbnail in a few milliseconds.

The cache lives in ``<library>/thumbs/<hash[:2]>/<hash>-<W>x<H>.jpg``: keyed by the file's
content hash (the ``files.hash`` column) and the box, so a moved or renamed photo keeps its
thumbnails and an edited one gets new ones.  It is capped at :data:`DEFAULT_CAP_BYTES`
(256 MiB; ``ITR_THUMB_CACHE_MIB`` overrides it, 0 turns the cache off): after a run that
added thumbnails, the least recently used ones are deleted until the cache is under 90% of
the cap.  "Used" is the file's mtime, refreshed on every hit (atime is unreliable under
``noatime``/``relatime``).  Files are written atomically, so concurrent runs are safe; a
library directory that cannot be written simply means no caching.
"""

from __future__ import annotations

import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, NamedTuple

from .. import lrufiles
from ..constants import THUMBS_DIR

if TYPE_CHECKING:  # Pillow and the decoders load when a thumbnail is made, not for `itr info`
    from PIL import Image

#: Default size cap of a library's thumbnail cache.
DEFAULT_CAP_BYTES = 256 * 1024 * 1024
#: Environment variable overriding the cap, in MiB (0: do not cache).
CAP_ENV = "ITR_THUMB_CACHE_MIB"
#: After a trim the cache holds at most this fraction of the cap, so that the next few
#: runs do not trim again.
TRIM_TO = 0.9
#: The cache's directory inside a library.
JPEG_QUALITY = 85

_HASH_RE = re.compile(r"[0-9a-f]{8,128}")


class Source(NamedTuple):
    """An image to thumbnail: the path to open, and its content hash when it is known to
    match the file (None: do not cache); for a video, the time of the frame to show."""

    path: str
    content_hash: str | None = None
    time: float | None = None


class _DraftBox:
    """Duck-types :class:`itrcli.ingest.images.Preprocess` for :func:`open_image`'s draft request:
    the decoded image must still cover the box (after EXIF rotation)."""

    def __init__(self, box: tuple[int, int]) -> None:
        self.box = box

    def draft_request(self, width: int, height: int) -> tuple[int, int]:
        w, h = fit(width, height, self.box)
        return max(w, 1), max(h, 1)


def fit(width: int, height: int, box: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of an image scaled to fit ``box``, aspect kept, never enlarged."""
    bw, bh = box
    scale = min(bw / width, bh / height, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def make_thumbnail(path: str, box: tuple[int, int], time: float | None = None) -> Image.Image:
    """Decode ``path`` (JPEG draft mode, EXIF rotation, RGB) and scale it to fit ``box``;
    with ``time``, the video frame shown then (rotation applied).

    Raises:
        OSError: the file cannot be read.
        DecodeError: it is not a usable image (or video).
    """
    from PIL import Image

    from ..ingest.files import Unreadable, read_file
    from ..ingest.images import DecodeError, open_image

    if time is not None:
        from ..ingest.video import VideoError, frame_at

        try:
            img = frame_at(path, time, short_side=max(box))
        except VideoError as e:
            raise DecodeError(str(e)) from None
        size = fit(img.width, img.height, box)
        return img.resize(size, Image.Resampling.LANCZOS) if size != img.size else img
    try:
        _st, data = read_file(path)  # the guards of an index run: no FIFO, no huge file
    except Unreadable as e:  # st set: the file's own fault (too large); else it cannot be read
        raise (DecodeError if e.st is not None else OSError)(str(e)) from None
    img, _meta = open_image(data, draft_for=_DraftBox(box), name=path)  # type: ignore[arg-type]
    size = fit(img.width, img.height, box)
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def cap_bytes_from_env(default: int = DEFAULT_CAP_BYTES) -> int:
    """The cache cap: ``$ITR_THUMB_CACHE_MIB`` MiB if set and valid, else ``default``."""
    v = os.environ.get(CAP_ENV, "").strip()
    if not v:
        return default
    try:
        return max(0, int(float(v) * 1024 * 1024))
    except ValueError:
        return default


class ThumbnailCache:
    """Thumbnails as JPEG bytes, cached on disk under ``directory`` (None: no cache).

    Use as a context manager (or call :meth:`trim`) so that a run that added thumbnails
    evicts the least recently used ones beyond the cap.
    """

    def __init__(self, directory: str | os.PathLike | None, cap_bytes: int | None = None) -> None:
        self.cap_bytes = cap_bytes_from_env() if cap_bytes is None else cap_bytes
        self.directory = Path(directory) if directory is not None else None
        self.enabled = self.directory is not None and self.cap_bytes > 0
        self.wrote = False

    @classmethod
    def for_library(cls, library_dir: str | os.PathLike,
                    cap_bytes: int | None = None) -> "ThumbnailCache":
        """The cache of the library at ``library_dir``."""
        return cls(Path(library_dir) / THUMBS_DIR, cap_bytes)

    def __enter__(self) -> "ThumbnailCache":
        return self

    def __exit__(self, *exc) -> None:
        self.trim()

    def _file(self, content_hash: str, box: tuple[int, int], time: float | None = None) -> Path | None:
        if not self.enabled or not _HASH_RE.fullmatch(content_hash or ""):
            return None
        at = "" if time is None else f"-t{int(round(time * 1000))}"  # a frame: keyed by its ms
        return self.directory / content_hash[:2] / f"{content_hash}{at}-{box[0]}x{box[1]}.jpg"

    def get(self, source: Source | str, box: tuple[int, int]) -> bytes:
        """JPEG bytes of the thumbnail of ``source`` fitting ``box``: cached, else made
        (and cached when the source has a content hash).

        Raises:
            OSError, DecodeError: the image cannot be read.
        """
        if isinstance(source, str):
            source = Source(source)
        f = self._file(source.content_hash or "", box, source.time)
        if f is not None:
            try:
                data = f.read_bytes()
                if data:
                    lrufiles.touch(f)
                    return data
            except OSError:
                pass
        data = encode_jpeg(make_thumbnail(source.path, box, source.time))
        if f is not None:
            self._put(f, data)
        return data

    def get_many(self, sources: Iterable[Source | str], box: tuple[int, int],
                 workers: int | None = None) -> Iterator[bytes | Exception]:
        """:meth:`get` for each source, in order, a few decoded in parallel; a failure is
        yielded as its exception instead of bytes."""
        from ..ingest.images import DecodeError

        sources = list(sources)

        def one(s):
            try:
                return self.get(s, box)
            except (OSError, DecodeError) as e:
                return e

        n = workers or max(1, min(4, os.cpu_count() or 1))
        if n == 1 or len(sources) <= 1:
            yield from map(one, sources)
            return
        with ThreadPoolExecutor(max_workers=n) as pool:  # PIL decodes without the GIL
            yield from pool.map(one, sources)

    def _put(self, f: Path, data: bytes) -> None:
        try:
            lrufiles.write_atomic(f, data)
            self.wrote = True
        except OSError:
            pass  # a read-only or full library: previews still work, uncached

    def entries(self) -> list[tuple[float, int, str]]:
        """(mtime, bytes, path) of every cached thumbnail."""
        return lrufiles.entries(self.directory, ".jpg")

    def stats(self) -> dict[str, int]:
        """``{"thumbnails": count, "bytes": total size}``."""
        e = self.entries()
        return {"thumbnails": len(e), "bytes": sum(n for _, n, _ in e)}

    def trim(self, force: bool = False) -> int:
        """Delete least recently used thumbnails while the cache exceeds its cap (only
        after this run wrote some, unless ``force``).  Returns the number deleted."""
        if not self.enabled or not (self.wrote or force):
            return 0
        self.wrote = False
        return lrufiles.trim(self.entries(), self.cap_bytes, int(self.cap_bytes * TRIM_TO))[0]


def cache_stats(library_dir: str | os.PathLike) -> dict[str, int]:
    """``{"thumbnails": count, "bytes": n}`` of a library's thumbnail cache (for ``itr info``)."""
    return ThumbnailCache.for_library(library_dir).stats()


def source_for(store, path: str, time: float | None = None) -> Source:
    """The :class:`Source` of a library path (a hit's ``path``; ``time``: a video frame's):
    the path to open, with the content hash only while the file's size and mtime still
    match the library's row."""
    from ..store.db import fs_path_of

    r = store.row_by_shown_path(path)
    if r is None:
        return Source(path, None, time)
    fs_path = fs_path_of(r["path"], r["fsname"])
    try:
        st = os.stat(fs_path)
    except OSError:
        return Source(fs_path, None, time)
    fresh = st.st_size == r["size"] and st.st_mtime_ns == r["mtime_ns"]
    return Source(fs_path, r["hash"] if fresh else None, time)


__all__ = [
    "DEFAULT_CAP_BYTES", "Source", "ThumbnailCache", "cache_stats", "encode_jpeg", "fit",
    "make_thumbnail", "source_for",
]
