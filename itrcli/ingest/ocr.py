"""Scene text: the words in an upright decoded image, read with RapidOCR (PP-OCR models).

The ``rapidocr`` wheel (``pip install 'itr-search[ocr]'``) bundles its detection, direction and
recognition ONNX models and runs them on onnxruntime, so nothing is downloaded at run time.

What is read: the image as :func:`itrcli.ingest.images.open_image` returns it (EXIF
orientation applied, any mode turned into RGB), scaled down so that its longer side is at
most :data:`MAX_SIDE` pixels (never up).  The text detector looks at it scaled to at most
:data:`DETECT_SIDE` pixels (its cost grows with the area, and a line 20 px high in a 2 MP
photo is still found there); the recogniser reads each line from the :data:`MAX_SIDE` image.
At most :data:`MAX_LINES` lines are recognised per image, which bounds the work on a page
of small print.

Which lines are kept is decided by :func:`keep_lines` (a pure function, tested alone).
"""

from __future__ import annotations

import logging
import threading
import unicodedata
from dataclasses import dataclass
from typing import Any, Sequence

#: The longer side of the image that lines are read from (pixels; smaller images as they are).
MAX_SIDE = 1600
#: The longer side of the image the text detector sees.
DETECT_SIDE = 960
#: Lines recognised per image at most (the detector's best candidates).
MAX_LINES = 200
#: Seconds one image may take; a read that takes longer is given up and remembered as
#: failed (the image keeps its vector).
TIMEOUT = 120.0
#: Lines read with a lower confidence are dropped.
MIN_CONFIDENCE = 0.6
#: A line with at most this many letters and digits is "short" (see :func:`keep_lines`).
SHORT = 3
#: A short line is kept only with at least this confidence.
SHORT_CONFIDENCE = 0.8
#: A line with at least this many letters and digits sets the image's scripts.
LONG = 5

#: The pinned reader; stored with each result, so an upgrade can tell old reads apart.
RAPIDOCR_VERSION = "3.10.0"


class OcrUnavailable(Exception):
    """rapidocr is not installed (``pip install 'itr-search[ocr]'``)."""


@dataclass(frozen=True)
class Line:
    """One line of text: what it says, where (four corners, clockwise from top left, in
    pixels of the upright full-size image) and how sure the recogniser is (0..1)."""

    text: str
    box: tuple[tuple[float, float], ...]
    confidence: float

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "box": [[round(x, 1), round(y, 1)] for x, y in self.box],
                "confidence": round(self.confidence, 4)}


def available() -> bool:
    """Whether rapidocr can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("rapidocr") is not None


def reader_id() -> str:
    """The reader and its settings: text read by another one is read again."""
    return f"rapidocr {RAPIDOCR_VERSION}; {MAX_SIDE}/{DETECT_SIDE} px; {MAX_LINES} lines"


# --- which lines are kept -------------------------------------------------------------------

def _script(ch: str) -> str | None:
    """The script of a letter ("LATIN", "CJK", "HANGUL", ...); None for digits and others."""
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    if not name:
        return None
    first = name.split()[0]
    # CJK ideographs and kana are one writing system for this purpose
    return "CJK" if first in ("CJK", "HIRAGANA", "KATAKANA", "HALFWIDTH", "FULLWIDTH") else first


def _scripts(text: str) -> set[str]:
    return {s for s in map(_script, text) if s is not None}


def _alnum(text: str) -> int:
    return sum(1 for ch in text if ch.isalnum())


def keep_lines(lines: Sequence[Line]) -> list[Line]:
    """The lines worth storing, in their order.  The rule, applied to each line:

    1. Text is whitespace-normalised; a line without any letter or digit is dropped.
    2. A line read with confidence below :data:`MIN_CONFIDENCE` is dropped.
    3. A *short* line (at most :data:`SHORT` letters and digits, e.g. a lone "A" on a
       textured wall) needs confidence :data:`SHORT_CONFIDENCE` or more.
    4. A short line must be in a script of the image's long lines (at least :data:`LONG`
       letters and digits, kept by 1-2); on an image with no long line, in the Latin script
       or digits only.  This drops the typical hallucination of a textless photo: a one-
       or two-character line in another script (a CJK character read in foliage).
    """
    cleaned = []
    for ln in lines:
        text = " ".join(ln.text.split())
        if _alnum(text) == 0 or ln.confidence < MIN_CONFIDENCE:
            continue
        cleaned.append(Line(text, ln.box, ln.confidence))
    main: set[str] = set()
    for ln in cleaned:
        if _alnum(ln.text) >= LONG:
            main |= _scripts(ln.text)
    allowed = main or {"LATIN"}
    out = []
    for ln in cleaned:
        if _alnum(ln.text) <= SHORT:
            if ln.confidence < SHORT_CONFIDENCE or not _scripts(ln.text) <= allowed:
                continue
        out.append(ln)
    return out


# --- reading -------------------------------------------------------------------------------

def scaled(img, max_side: int = MAX_SIDE):
    """``img`` (PIL, RGB) with its longer side at most ``max_side``, and the factor that
    maps its pixels back to the full-size image's."""
    from PIL import Image

    w, h = img.size
    f = max(w, h) / max_side
    if f <= 1:
        return img, 1.0
    small = img.resize((max(1, round(w / f)), max(1, round(h / f))), Image.Resampling.BILINEAR)
    return small, w / small.size[0]


class TextReader:
    """Reads lines of text from images.  The models are loaded on first use; one reader
    may serve several threads (calls are serialised: onnxruntime already uses every core)."""

    def __init__(self) -> None:
        self._engine = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the models now (they load on first use otherwise)."""
        with self._lock:
            self._load()

    def _load(self):
        if self._engine is None:
            try:
                import rapidocr  # noqa: F401
            except ImportError:
                raise OcrUnavailable("reading text needs rapidocr: pip install 'itr-search[ocr]'") from None
            # its INFO lines (one per model loaded) would interleave with our progress
            logging.getLogger("RapidOCR").setLevel(logging.ERROR)
            from rapidocr import RapidOCR

            self._engine = RapidOCR(params={
                "Global.log_level": "error",
                "Global.max_side_len": MAX_SIDE,
                "Det.limit_type": "max",
                "Det.limit_side_len": DETECT_SIDE,
                "Det.max_candidates": MAX_LINES,
            })
            logging.getLogger("RapidOCR").setLevel(logging.ERROR)
        return self._engine

    def read(self, img) -> list[Line]:
        """Every line read in ``img`` (an upright RGB PIL image), unfiltered, boxes in
        ``img``'s pixels.  Raises :class:`OcrUnavailable`; other exceptions mean this image
        could not be read."""
        import numpy as np

        with self._lock:
            engine = self._load()
            small, f = scaled(img)
            bgr = np.ascontiguousarray(np.asarray(small.convert("RGB"))[:, :, ::-1])  # [H, W, 3]
            res = engine(bgr)
        if res.boxes is None or res.txts is None:
            return []
        out = []
        for box, text, score in zip(res.boxes, res.txts, res.scores):
            corners = tuple((float(x) * f, float(y) * f) for x, y in np.asarray(box).reshape(-1, 2))
            out.append(Line(str(text), corners, float(score)))
        return out

    def read_kept(self, img) -> list[Line]:
        """The lines of ``img`` that :func:`keep_lines` keeps."""
        return keep_lines(self.read(img))
