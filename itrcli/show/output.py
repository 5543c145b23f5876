"""Output formatting: results on stdout, progress and messages on stderr.

Decoration (tables, colour, bars) only when the stream is a terminal; otherwise plain,
stable lines.  Nothing here imports rich or tqdm until it draws something.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any, TextIO

from ..ingest.video import format_time  # noqa: F401  (the time column; no PyAV import)


def is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def print_json(obj: Any, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    stream.write(json.dumps(obj, ensure_ascii=False) + "\n")
    stream.flush()


def err(msg: str) -> None:
    """A message line on stderr."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


#: What a terminal acts on: C0 controls, DEL, C1 controls (U+0080-U+009F: ``\x9b`` is a
#: CSI on some terminals), surrogates (a file name's bytes that are not UTF-8), and beyond
#: ls: the Unicode line breaks and the bidi overrides that reorder the rest of a line
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                       "\ud800-\udfff]")
_C_ESCAPES = {"\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v",
              "\f": "\\f", "\r": "\\r"}


def _escape_control(m: re.Match) -> str:
    c = m.group()
    named = _C_ESCAPES.get(c)
    if named is not None:
        return named
    try:
        raw = c.encode("utf-8", "surrogateescape")  # a byte that was not UTF-8: that byte
    except UnicodeEncodeError:
        raw = c.encode("utf-8", "surrogatepass")
    return "".join(f"\\{b:03o}" for b in raw)


def one_line(text: str) -> str:
    r"""``text`` (a path, a word read in an image) safe to print for a person: every control
    character escaped the way ``ls --quoting-style=escape`` shows a file name, so a name
    can neither break a line nor retitle, recolour or clear the terminal.

    ``\n``, ``\t``, ``\r``, ``\a``, ``\b``, ``\v``, ``\f``; any other C0 or C1 control
    and DEL as ``\ooo``, the octal of its UTF-8 bytes (ESC: ``\033``); a byte that is not
    UTF-8 as its own octal (``\377``).  Backslashes are left as they are: this is for
    reading, ``--json`` and ``-0`` give the exact text.
    """
    return _CONTROLS.sub(_escape_control, text) if _CONTROLS.search(text) else text


def for_stream(stream: TextIO):
    """How to show a path or a word on ``stream``: escaped by :func:`one_line` on a
    terminal, as it is otherwise (piped output stays byte-exact)."""
    return one_line if is_tty(stream) else _as_is


def _as_is(text: str) -> str:
    return text


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class BarProgress:
    """tqdm on stderr: files, img/s and ETA.  Only used when stderr is a terminal."""

    def __init__(self, desc: str = "indexing", unit: str = "file", rate: str = "img/s") -> None:
        self.desc = desc
        self.unit, self.rate = unit, rate
        self.bar = None
        self.t0 = time.monotonic()
        self.embedded = 0

    def start(self, total: int) -> None:
        from tqdm import tqdm

        self.t0 = time.monotonic()
        self.embedded = 0
        self.bar = tqdm(total=total, unit=self.unit, file=sys.stderr, dynamic_ncols=True,
                        desc=self.desc, leave=False)

    def advance(self, files: int, embedded: int) -> None:
        if self.bar is None:
            return
        self.embedded += embedded
        dt = time.monotonic() - self.t0
        self.bar.set_postfix_str(f"{self.embedded / dt:.1f} {self.rate}" if dt > 0 else "", refresh=False)
        self.bar.update(files)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LogProgress:
    """Plain periodic lines on stderr for cron and pipes (no terminal codes)."""

    def __init__(self, every: float = 10.0, unit: str = "files", rate: str = "img/s") -> None:
        self.every = every
        self.unit, self.rate = unit, rate
        self.total = 0
        self.done = 0
        self.embedded = 0
        self.t0 = self.last = time.monotonic()

    def start(self, total: int) -> None:
        self.total = total
        self.done = self.embedded = 0
        self.t0 = self.last = time.monotonic()

    def advance(self, files: int, embedded: int) -> None:
        self.done += files
        self.embedded += embedded
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            dt = now - self.t0
            rate = self.embedded / dt if dt > 0 else 0.0
            left = self.total - self.done
            eta = f", ETA {_duration(left / (self.done / dt))}" if self.done and dt > 0 else ""
            err(f"itr: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.rate}{eta}")

    def close(self) -> None:
        pass


def _duration(s: float) -> str:
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def index_summary_line(s) -> str:
    return (
        f"scanned {s.scanned}, added {s.added}, updated {s.updated}, moved {s.moved}, "
        f"removed {s.removed}, unchanged {s.unchanged}, skipped {s.skipped} "
        f"in {s.seconds:.1f}s ({s.images_per_second:.1f} images/s)"
    ) + (_text_part(s.text) if getattr(s, "text", None) is not None else "")


def passed_over_line(counts: dict[str, int]) -> str | None:
    """``passed over 12 files of unsupported types (.dng 4, .heic 8)``, or None; with what
    would read them (``camera RAW needs rawpy``...) when the types say."""
    from ..constants import HEIF_EXTENSIONS, RAW_EXTENSIONS, VIDEO_EXTENSIONS

    n = sum(counts.values())
    if not n:
        return None
    each = ", ".join(f"{ext} {k}" for ext, k in sorted(counts.items()))
    needs = [what for exts, what in ((RAW_EXTENSIONS, "camera RAW needs rawpy (pip install rawpy)"),
                                     (HEIF_EXTENSIONS, "HEIC needs pillow-heif"),
                                     (VIDEO_EXTENSIONS, "videos need PyAV"))
             if exts & set(counts)]
    hint = f"; {', '.join(needs)}" if needs else ""
    return f"passed over {n} file{'s' if n != 1 else ''} of unsupported types ({each}){hint}"


def _text_part(t) -> str:
    """The OCR share of a run (``itr index --ocr``)."""
    part = (f"; text read in {t.read} images ({t.with_text} with text, {t.lines} lines, "
            f"{t.seconds:.1f}s of OCR)")
    if t.failed:
        part += f", {t.failed} failed"
    if t.pending:
        part += f", {t.pending} left for the next run"
    return part
