"""Inline image previews in terminals: the kitty graphics protocol, iTerm2 inline images
(also WezTerm) and sixel; which one a terminal speaks; and the escape sequences themselves.

Data flow: a :class:`~itrcli.show.thumbs.Source` -> a cached JPEG thumbnail
(:mod:`itrcli.show.thumbs`) -> one escape sequence (:meth:`Previewer.sequence`), written after
the result line.

Detection (:func:`detect`) never writes anything when stdout is not a terminal.  It reads
the environment first (``KITTY_WINDOW_ID``, ``TERM``, ``TERM_PROGRAM``, ``LC_TERMINAL``,
``WEZTERM_*``); when that is inconclusive and stdin and stdout are the same terminal, with
this process in its foreground, it asks the terminal: a kitty graphics query, a cell-size
report (``CSI 16 t``) and a primary device attributes request (DA1, ``CSI c``, answered by
every terminal, so the wait ends as soon as it arrives; attribute 4 means sixel), with a
short timeout.  This is the detection method the kitty protocol's documentation gives.

References: kitty, https://sw.kovidgoyal.net/kitty/graphics-protocol/ ; iTerm2,
https://iterm2.com/documentation-images.html ; sixel, the DEC VT330/VT340 Programmer
Reference Manual, chapter 14 ("Sixel Graphics").
"""

from __future__ import annotations

import base64
import io
import os
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, TextIO

from PIL import Image

from .thumbs import Source, ThumbnailCache

#: Protocols ``--preview-protocol`` accepts (besides ``auto``).
PROTOCOLS: tuple[str, ...] = ("kitty", "iterm", "sixel")
#: Text rows an inline preview spans by default (``--preview-height``).
DEFAULT_ROWS = 8
#: Cell size in pixels (width, height) when the terminal does not report one.
DEFAULT_CELL = (10, 20)
#: A preview is at most this many times as wide as it is high (panoramas).
MAX_ASPECT = 3.0
#: The kitty protocol's limit on one chunk of base64 payload.
KITTY_CHUNK = 4096
#: How long to wait for the terminal's answers (DA1 ends the wait as soon as it arrives).
PROBE_TIMEOUT = 0.3
#: Colours of a sixel image (a register count every sixel terminal offers).
SIXEL_COLORS = 256

ESC = "\x1b"
ST = ESC + "\\"  # string terminator
BEL = "\x07"

# kitty query (1x1 RGB pixel, action query, id 31), cell size in pixels, then DA1
_PROBE_QUERY = (ESC + "_Gi=31,s=1,v=1,a=q,t=d,f=24;AAAA" + ST + ESC + "[16t" + ESC + "[c").encode()
_KITTY_OK = re.compile(rb"\x1b_Gi=31;OK\x1b\\")
_CELL_REPLY = re.compile(rb"\x1b\[6;(\d+);(\d+)t")
_DA1_REPLY = re.compile(rb"\x1b\[\?([\d;]*)c")


@dataclass
class Detection:
    """The protocol to use (None: no previews) and why, in a few words."""

    protocol: str | None
    reason: str
    cell: tuple[int, int] | None = None  #: the cell size the terminal reported, if asked


@dataclass
class ProbeReply:
    """What a terminal said to the probe."""

    kitty: bool = False
    sixel: bool = False
    cell: tuple[int, int] | None = None  #: (width, height) in pixels
    answered: bool = False  #: the DA1 reply arrived


# --- detection --------------------------------------------------------------------------

def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _multiplexed(env: Mapping[str, str]) -> bool:
    term = env.get("TERM", "")
    return bool(env.get("TMUX") or env.get("STY")) or term.startswith(("screen", "tmux"))


def protocol_from_env(env: Mapping[str, str]) -> str | None:
    """The protocol the environment names a terminal for, or None when it does not say.

    Inside tmux or screen the outer terminal's variables leak in but its protocols do not
    pass through, so the environment is not trusted there (the probe asks tmux itself).
    """
    if _multiplexed(env):
        return None
    term = env.get("TERM", "")
    program = env.get("TERM_PROGRAM", "")
    if env.get("KITTY_WINDOW_ID") or term == "xterm-kitty":
        return "kitty"
    if term == "xterm-ghostty" or program.lower() == "ghostty":
        return "kitty"
    if program == "iTerm.app" or env.get("LC_TERMINAL") == "iTerm2":
        return "iterm"
    if program == "WezTerm" or any(k.startswith("WEZTERM_") for k in env):
        return "iterm"
    if term.startswith(("foot", "mlterm", "contour")) or "sixel" in term:
        return "sixel"
    return None


def parse_probe_reply(data: bytes) -> ProbeReply:
    """Read the terminal's answers to the probe (any order, any noise in between)."""
    r = ProbeReply()
    r.kitty = bool(_KITTY_OK.search(data))
    m = _CELL_REPLY.search(data)
    if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
        r.cell = (int(m.group(2)), int(m.group(1)))
    m = _DA1_REPLY.search(data)
    if m:
        r.answered = True
        r.sixel = "4" in m.group(1).decode().split(";")
    return r


def probe_terminal(fd_in: int, fd_out: int, timeout: float = PROBE_TIMEOUT) -> ProbeReply:
    """Ask the terminal on ``fd_in``/``fd_out`` what it supports (POSIX only).

    The caller checks that both are the same terminal and that we are in its foreground
    process group (else changing its mode would stop us with SIGTTOU).
    """
    import select
    import termios
    import time

    old = termios.tcgetattr(fd_in)
    buf = b""
    try:
        new = termios.tcgetattr(fd_in)
        new[3] &= ~(termios.ICANON | termios.ECHO)  # lflag: raw reads, no echo of the replies
        new[6][termios.VMIN] = 0
        new[6][termios.VTIME] = 0
        termios.tcsetattr(fd_in, termios.TCSANOW, new)
        os.write(fd_out, _PROBE_QUERY)
        deadline = time.monotonic() + timeout
        while not _DA1_REPLY.search(buf):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([fd_in], [], [], left)
            if not ready:
                break
            chunk = os.read(fd_in, 1024)
            if not chunk:
                break
            buf += chunk
    finally:
        termios.tcsetattr(fd_in, termios.TCSADRAIN, old)
    return parse_probe_reply(buf)


def _can_probe(stdin, stdout) -> bool:
    if os.name != "posix" or not (_is_tty(stdin) and _is_tty(stdout)):
        return False
    try:
        fi, fo = stdin.fileno(), stdout.fileno()
        return os.ttyname(fi) == os.ttyname(fo) and os.tcgetpgrp(fi) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def detect(stdout: TextIO, *, force: str | None = None, stdin: TextIO | None = None,
           env: Mapping[str, str] | None = None, probe: bool = True) -> Detection:
    """Decide which image protocol to write to ``stdout``.

    Args:
        force: a protocol from :data:`PROTOCOLS` to use without detecting (``None`` or
            ``"auto"``: detect).  Still nothing when stdout is not a terminal.
        stdin: the terminal to read answers from (default ``sys.stdin``).
        env: the environment (default ``os.environ``).
        probe: ask the terminal when the environment does not tell.
    Returns:
        a :class:`Detection`; ``protocol`` is None when no previews should be written.
    """
    import sys

    if not _is_tty(stdout):
        return Detection(None, "stdout is not a terminal")
    if force and force != "auto":
        if force not in PROTOCOLS:
            raise ValueError(f"unknown image protocol {force!r}")
        return Detection(force, "forced")
    env = os.environ if env is None else env
    found = protocol_from_env(env)
    if found:
        return Detection(found, "environment")
    stdin = sys.stdin if stdin is None else stdin
    if probe and _can_probe(stdin, stdout):
        try:
            stdout.flush()
            reply = probe_terminal(stdin.fileno(), stdout.fileno())
        except (OSError, ValueError, ImportError):
            reply = ProbeReply()
        if reply.kitty:
            return Detection("kitty", "terminal answer", reply.cell)
        if reply.sixel:
            return Detection("sixel", "terminal answer", reply.cell)
        if reply.answered:
            return Detection(None, "the terminal supports none of kitty, iTerm2 or sixel images")
    where = " inside tmux/screen" if _multiplexed(env) else ""
    return Detection(None, f"no kitty, iTerm2 or sixel image support detected{where} "
                           "(--preview-protocol forces one)")


def cell_size(stream: TextIO) -> tuple[int, int] | None:
    """(width, height) of a character cell in pixels, from the terminal's window size."""
    try:
        import fcntl
        import struct
        import termios

        packed = fcntl.ioctl(stream.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
        rows, cols, xpx, ypx = struct.unpack("HHHH", packed)
    except (ImportError, OSError, ValueError, AttributeError):
        return None
    if rows and cols and xpx and ypx:
        return max(1, xpx // cols), max(1, ypx // rows)
    return None


# --- escape sequences -------------------------------------------------------------------

def kitty_sequence(png: bytes, rows: int) -> str:
    """Transmit-and-display a PNG with the kitty graphics protocol, ``rows`` cells high.

    The base64 payload is split into chunks of at most :data:`KITTY_CHUNK` bytes; every
    chunk but the last carries ``m=1``, the last ``m=0``; control keys go in the first
    chunk only.  ``q=2``: the terminal sends no replies (they would land in the shell).
    """
    payload = base64.standard_b64encode(png).decode("ascii")
    chunks = [payload[i : i + KITTY_CHUNK] for i in range(0, len(payload), KITTY_CHUNK)] or [""]
    out = []
    for i, chunk in enumerate(chunks):
        more = 1 if i < len(chunks) - 1 else 0
        keys = f"a=T,f=100,t=d,r={rows},q=2,m={more}" if i == 0 else f"m={more}"
        out.append(f"{ESC}_G{keys};{chunk}{ST}")
    return "".join(out)


def iterm_sequence(data: bytes, rows: int, name: str | None = None) -> str:
    """An iTerm2 inline image (also WezTerm, mintty, VS Code): ``OSC 1337 ; File=... BEL``,
    ``rows`` cells high, aspect ratio kept."""
    args = [f"size={len(data)}", "inline=1", "width=auto", f"height={rows}",
            "preserveAspectRatio=1"]
    if name:
        raw = name.encode("utf-8", "backslashreplace")
        args.insert(0, "name=" + base64.b64encode(raw).decode("ascii"))
    return f"{ESC}]1337;File={';'.join(args)}:{base64.b64encode(data).decode('ascii')}{BEL}"


def sixel_sequence(img: Image.Image, colors: int = SIXEL_COLORS) -> str:
    """A DEC sixel image: the picture quantised to at most ``colors`` colours (fast octree,
    Floyd-Steinberg), palette as ``#n;2;r;g;b`` in percent, then bands six pixels high,
    one ``#n`` pass per colour in the band separated by ``$``, bands by ``-``, runs of four
    or more equal sixels as ``!<count><sixel>`` (trailing empty sixels dropped)."""
    import numpy as np

    rgb = img.convert("RGB")
    q = rgb.quantize(colors=max(1, min(256, colors)), method=Image.Quantize.FASTOCTREE,
                     dither=Image.Dither.FLOYDSTEINBERG)
    idx = np.asarray(q, dtype=np.uint8)  # [H, W] palette indices
    h, w = idx.shape
    n = int(idx.max()) + 1
    pal = (q.getpalette() or [])[: 3 * n]
    pal += [0] * (3 * n - len(pal))
    # P1=0, P2=1 (pixels not drawn keep the background), P3=0; raster attributes: 1:1
    # pixel aspect, then the size
    parts = [f'{ESC}P0;1;0q"1;1;{w};{h}']
    for c in range(n):
        r, g, b = (round(v * 100 / 255) for v in pal[3 * c : 3 * c + 3])
        parts.append(f"#{c};2;{r};{g};{b}")
    cols = np.arange(w)
    bands = []
    for y0 in range(0, h, 6):
        band = idx[y0 : y0 + 6]  # [<=6, W]
        bits = np.zeros((n, w), dtype=np.uint8)  # [colour, x]: the sixel of each column
        for r in range(band.shape[0]):
            bits[band[r], cols] |= np.uint8(1 << r)
        used = np.flatnonzero(bits.any(axis=1))
        chars = bits[used] + np.uint8(63)  # [k, W] sixel characters '?'..'~'
        passes = [b"#%d%s" % (c, _RUN.sub(_run_repl, row.tobytes().rstrip(b"?")))
                  for c, row in zip(used.tolist(), chars)]
        bands.append(b"$".join(passes))
    parts.append(b"-".join(bands).decode("ascii"))
    parts.append(ST)
    return "".join(parts)


_RUN = re.compile(rb"([?-~])\1{3,}")  # four or more equal sixels


def _run_repl(m: re.Match) -> bytes:
    return b"!%d%c" % (len(m.group(0)), m.group(1)[0])


# --- previews -----------------------------------------------------------------------------

class Previewer:
    """Turns images into inline escape sequences for one protocol and size.

    Args:
        protocol: one of :data:`PROTOCOLS`.
        rows: text rows an image spans.
        cache: where thumbnails come from (default: uncached).
        cell: the terminal's cell size in pixels, (width, height) (default
            :data:`DEFAULT_CELL`); sets the thumbnail's resolution.
    """

    def __init__(self, protocol: str, rows: int = DEFAULT_ROWS, cache: ThumbnailCache | None = None,
                 cell: tuple[int, int] | None = None) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown image protocol {protocol!r}")
        self.protocol = protocol
        self.rows = max(1, int(rows))
        self.cache = cache or ThumbnailCache(None)
        self.cell = cell or DEFAULT_CELL

    @property
    def box(self) -> tuple[int, int]:
        """The thumbnail's bounding box in pixels."""
        h = self.rows * self.cell[1]
        return int(h * MAX_ASPECT), h

    def encode(self, jpeg: bytes, name: str | None = None) -> str:
        """The escape sequence showing a JPEG thumbnail."""
        if self.protocol == "iterm":
            return iterm_sequence(jpeg, self.rows, name)
        img = Image.open(io.BytesIO(jpeg))
        if self.protocol == "kitty":
            buf = io.BytesIO()
            img.save(buf, format="PNG")  # kitty takes PNG or raw pixels only
            return kitty_sequence(buf.getvalue(), self.rows)
        return sixel_sequence(img)

    def sequence(self, source: Source | str) -> str:
        """The escape sequence for one image (raises OSError / DecodeError)."""
        src = Source(source) if isinstance(source, str) else source
        return self.encode(self.cache.get(src, self.box), os.path.basename(src.path))

    def sequences(self, sources: Iterable[Source | str]) -> Iterator[str | Exception]:
        """:meth:`sequence` for each source in order (thumbnails made a few at a time in
        parallel); a failure is yielded as its exception."""
        srcs = [Source(s) if isinstance(s, str) else s for s in sources]
        for src, jpeg in zip(srcs, self.cache.get_many(srcs, self.box)):
            if isinstance(jpeg, Exception):
                yield jpeg
            else:
                yield self.encode(jpeg, os.path.basename(src.path))


def for_terminal(stdout: TextIO, *, force: str | None = None, rows: int = DEFAULT_ROWS,
                 cache: ThumbnailCache | None = None, stdin: TextIO | None = None,
                 env: Mapping[str, str] | None = None) -> tuple[Previewer | None, Detection]:
    """:func:`detect` and, when a protocol is available, a :class:`Previewer` sized to the
    terminal's cells (the window size, else the probe's answer, else the default)."""
    det = detect(stdout, force=force, stdin=stdin, env=env)
    if det.protocol is None:
        return None, det
    return Previewer(det.protocol, rows, cache, cell_size(stdout) or det.cell), det


__all__ = [
    "DEFAULT_ROWS", "Detection", "PROTOCOLS", "Previewer", "ProbeReply", "cell_size", "detect",
    "for_terminal", "iterm_sequence", "kitty_sequence", "parse_probe_reply", "probe_terminal",
    "protocol_from_env", "sixel_sequence",
]
