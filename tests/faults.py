"""Fault-injection helpers for the reliability tests.

- :func:`make_bad_corpus` writes every kind of hostile or broken file an unattended
  ``itr index`` meets on a real disk, and says what must happen to each.
- :class:`Zygote` runs ``itr`` in real child processes that can be ``kill -9``-ed at any
  moment, without paying the torch/transformers import (tens of seconds on a busy CI box)
  for every child: one helper process imports everything once, then ``fork()`` s a child
  per run that calls :func:`itrcli.cli.main` exactly as ``python -m itrcli`` does.  The
  helper never runs a torch operation itself, so forked children start with no thread pools.
- ``ITR_FAULTS`` (read by :func:`install`, in children only) slows the encoder down or kills
  the process at a named point (``commit``, ``graph-tmp``, ``graph-replace``, ...).
- :func:`tmpfs` mounts a small real file system (disk-full and read-only tests) when the
  tests run with the privilege to mount; the tests fall back to monkeypatching otherwise.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# --- a corpus of bad files -----------------------------------------------------------------

INDEXED = "indexed"
SKIPPED = "skipped"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels and holds almost no data (a bomb)."""
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return png + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + _png_chunk(b"IEND", b"")


def gif_header_only(width: int, height: int) -> bytes:
    """A GIF whose logical screen and first frame declare ``width x height``."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00" * 6
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame + b"\x3b"


def jpeg_with_huge_sof(jpeg: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame size in a JPEG's SOF0 marker."""
    i = jpeg.index(b"\xff\xc0")
    return jpeg[: i + 5] + struct.pack(">HH", height, width) + jpeg[i + 9 :]


def tiff_ifd(entries: list[tuple[int, int, int, bytes]], next_offset: int = 0) -> bytes:
    """A little-endian TIFF header + one IFD.  ``entries``: (tag, type, count, value bytes);
    values longer than 4 bytes are placed after the IFD."""
    n = len(entries)
    data_at = 8 + 2 + 12 * n + 4
    head, tail = b"", b""
    for tag, typ, count, value in entries:
        if len(value) <= 4:
            head += struct.pack("<HHI", tag, typ, count) + value.ljust(4, b"\x00")
        else:
            head += struct.pack("<HHII", tag, typ, count, data_at + len(tail))
            tail += value
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", n) + head + struct.pack("<I", next_offset) + tail


def jpeg_with_exif(jpeg: bytes, exif: bytes) -> bytes:
    """Insert an APP1 Exif segment holding ``exif`` (raw TIFF bytes) after SOI."""
    body = b"Exif\x00\x00" + exif
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def hostile_exifs() -> dict[str, bytes]:
    """Raw TIFF/EXIF blocks that lie about offsets, counts, types and values."""
    rational = lambda n, d: struct.pack("<II", n, d)  # noqa: E731
    return {
        # IFD offset far outside the block
        "exif-bad-offset": b"II*\x00" + struct.pack("<I", 0xFFFFFF00),
        # an IFD that claims 65,535 entries and holds one
        "exif-huge-count": b"II*\x00" + struct.pack("<IH", 8, 0xFFFF) + b"\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00\x00\x00",
        # orientation 9 (invalid) as a LONG, a date that is not one, a camera name with NULs
        "exif-bad-values": tiff_ifd([
            (0x0112, 4, 1, struct.pack("<I", 9)),
            (0x0132, 2, 20, b"9999:99:99 99:99:99\x00"),
            (0x0110, 2, 12, b"Cam\x00\x00\xff\xfeera\x00\x00\x00"),
        ]),
        # orientation as ASCII, and GPS / Exif sub-IFD pointers into nowhere
        "exif-bad-pointers": tiff_ifd([
            (0x0112, 2, 4, b"six\x00"),
            (0x8769, 4, 1, struct.pack("<I", 0x7FFFFFF0)),
            (0x8825, 4, 1, struct.pack("<I", 3)),
        ]),
        # a GPS IFD with zero denominators (infinite / NaN coordinates)
        "exif-gps-zero-div": tiff_ifd([(0x8825, 4, 1, struct.pack("<I", 26))]) + struct.pack("<H", 2)
        + struct.pack("<HHII", 1, 2, 2, ord("N")) + struct.pack("<HHII", 2, 5, 3, 26 + 2 + 24 + 4)
        + struct.pack("<I", 0) + rational(1, 0) + rational(0, 0) + rational(5, 0),
    }


def make_bad_corpus(d: Path, size: int = 48) -> dict[str, tuple[str, str | None]]:
    """Write the hostile corpus into ``d``.

    Returns ``{path: (INDEXED or SKIPPED, reason substring or None)}`` for every path that a
    run over ``d`` must report; files that must be silently ignored are not listed.
    """
    import numpy as np
    from PIL import Image

    from support import synth

    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[str, str | None]] = {}
    base = synth.draw("red", "circle", "center", size=size, seed=1)

    def save(name: str, data: bytes, expect: str, reason: str | None = None) -> Path:
        p = d / name
        p.write_bytes(data)
        out[str(p)] = (expect, reason)
        return p

    def encoded(img, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    jpeg = encoded(base, "JPEG", quality=90)
    png = encoded(base, "PNG")
    # -- empty, truncated, not images --
    save("empty.jpg", b"", SKIPPED, "empty file")
    save("cut.jpg", jpeg[: len(jpeg) // 2], SKIPPED, "truncated")
    save("cut.png", png[: len(png) // 2], SKIPPED, None)
    frames = [synth.draw(c, "square", "left", size=size, seed=i) for i, c in enumerate(["red", "blue", "green"])]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    save("cut.gif", gif[: len(gif) // 3], SKIPPED, None)
    webp = encoded(base, "WEBP", quality=80)
    save("cut.webp", webp[: len(webp) // 2], SKIPPED, None)
    save("text.png", b"this is a text file, not a picture\n" * 20, SKIPPED, "not an image")
    save("html.jpg", b"<!doctype html><html><body>404</body></html>", SKIPPED, "not an image")
    save("zeros.webp", b"\x00" * 4096, SKIPPED, "not an image")
    save("header-only.jpg", jpeg[:20], SKIPPED, None)
    # -- decompression bombs: refused from the header --
    save("bomb.png", png_header_only(100_000, 100_000), SKIPPED, "too large")
    save("bomb.gif", gif_header_only(65_535, 65_535), SKIPPED, "too large")
    save("bomb.jpg", jpeg_with_huge_sof(jpeg, 65_000, 65_000), SKIPPED, "too large")
    # a thin strip: few pixels, but the model's resize would make it gigantic
    save("strip.png", encoded(Image.new("RGB", (1_000_000, 1), "red"), "PNG"), SKIPPED, "aspect ratio")
    # -- modes that must be converted, not refused --
    rng = np.random.default_rng(0)
    arr = np.asarray(base)
    save("cmyk.jpg", encoded(base.convert("CMYK"), "JPEG"), INDEXED)
    save("cmyk.tif", encoded(base.convert("CMYK"), "TIFF"), INDEXED)
    save("grey16.png", encoded(Image.fromarray((arr[..., 0].astype(np.uint16) * 257)), "PNG"), INDEXED)
    save("grey16.tif", encoded(Image.fromarray((arr[..., 1].astype(np.uint16) * 257)), "TIFF"), INDEXED)
    save("float.tif", encoded(Image.fromarray(rng.random((size, size), dtype=np.float32)), "TIFF"), INDEXED)
    save("palette.png", encoded(base.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), INDEXED)
    pt = base.convert("P", palette=Image.Palette.ADAPTIVE)
    save("palette-transparent.png", encoded(pt, "PNG", transparency=0), INDEXED)
    save("palette.gif", encoded(pt, "GIF", transparency=0), INDEXED)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)))
    save("alpha.png", encoded(rgba, "PNG"), INDEXED)
    save("alpha.webp", encoded(rgba, "WEBP"), INDEXED)
    save("la.png", encoded(base.convert("LA"), "PNG"), INDEXED)
    save("bilevel.png", encoded(base.convert("1"), "PNG"), INDEXED)
    save("bilevel.tif", encoded(base.convert("1"), "TIFF", compression="group4"), INDEXED)
    save("grey.bmp", encoded(base.convert("L"), "BMP"), INDEXED)
    save("tiny.png", encoded(Image.new("RGB", (1, 1), "blue"), "PNG"), INDEXED)
    save("animated.gif", gif, INDEXED)
    save("animated.webp", encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100), INDEXED)
    save("progressive.jpg", encoded(base, "JPEG", progressive=True), INDEXED)
    # -- hostile EXIF: the pixels are fine, so the image is indexed --
    for name, exif in hostile_exifs().items():
        save(f"{name}.jpg", jpeg_with_exif(jpeg, exif), INDEXED)
    # -- names --
    save("with space.jpg", jpeg, INDEXED)
    save("new\nline.jpg", encoded(frames[1], "JPEG"), INDEXED)
    save("tab\tand\u00e9\u6f22.jpg", encoded(frames[2], "JPEG"), INDEXED)
    raw = os.path.join(os.fsencode(d), b"latin1-\xe9\xff.jpg")
    with open(raw, "wb") as f:
        f.write(encoded(synth.draw("blue", "circle", "top", size=size, seed=5), "JPEG"))
    out[os.fsdecode(raw)] = (INDEXED, None)
    # -- links: broken, loops (files and directories) --
    os.symlink(d / "no-such-file.jpg", d / "broken-link.jpg")
    out[str(d / "broken-link.jpg")] = (SKIPPED, "broken symlink")
    os.symlink(d / "loop-b.jpg", d / "loop-a.jpg")
    os.symlink(d / "loop-a.jpg", d / "loop-b.jpg")
    out[str(d / "loop-a.jpg")] = (SKIPPED, "symlink loop")
    out[str(d / "loop-b.jpg")] = (SKIPPED, "symlink loop")
    (d / "sub").mkdir()
    os.symlink(d, d / "sub" / "back-to-top")  # a directory loop: not followed, not reported
    os.symlink(d / "with space.jpg", d / "sub" / "link-to-file.jpg")  # a good link
    out[str(d / "sub" / "link-to-file.jpg")] = (INDEXED, None)
    # -- things that are not regular files, and files that are ignored --
    os.mkfifo(d / "fifo.jpg")  # reading it would block forever: never opened
    (d / "dir.jpg").mkdir()  # a directory with an image name: walked into, nothing there
    (d / "notes.txt").write_text("not an image extension: ignored\n")
    return out


# --- the zygote: fast, killable itr processes ------------------------------------------------

_PRELOAD = (
    "itrcli.cli", "itrcli.library", "itrcli.jobs.indexer", "itrcli.embed.encoder", "itrcli.embed.textonnx",
    "itrcli.query.search", "itrcli.store.vindex", "itrcli.jobs.check", "torch", "transformers", "hnswlib",
    "onnxruntime", "sqlite_utils",
)


class Child:
    def __init__(self, zygote: "Zygote", pid: int, out: Path, err: Path) -> None:
        self.zygote, self.pid, self.out_path, self.err_path = zygote, pid, out, err
        self.code: int | None = None

    def wait(self, timeout: float = 120.0) -> int:
        if self.code is None:
            self.code = self.zygote._call({"op": "wait", "pid": self.pid, "timeout": timeout})["code"]
        return self.code

    def poll(self) -> int | None:
        if self.code is None:
            r = self.zygote._call({"op": "poll", "pid": self.pid})["code"]
            self.code = r
        return self.code

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    @property
    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def json(self):
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"Child(pid={self.pid}, code={self.code}, out={self.out[-300:]!r}, err={self.err[-1500:]!r})"


class Zygote:
    """A process that has imported itr's heavy dependencies and forks ``itr`` runs."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]))
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(Path(__file__)), "--zygote"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, text=True, cwd=str(workdir),
        )
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"zygote failed to start: {ready!r}")
        self.n = 0

    def _call(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("zygote died")
        return json.loads(line)

    def spawn(self, *args, env: dict[str, str] | None = None, faults: str = "") -> Child:
        """Start ``itr ARGS`` in a forked child; ``faults``: an ``ITR_FAULTS`` spec."""
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        full_env = {k: v for k, v in os.environ.items() if k.startswith(("HOME", "XDG_", "HF_", "ITR_"))}
        full_env.update(env or {})
        full_env["ITR_FAULTS"] = faults
        r = self._call({"op": "spawn", "args": [str(a) for a in args], "env": full_env,
                        "out": str(out), "err": str(err), "cwd": os.getcwd()})
        return Child(self, r["pid"], out, err)

    def run(self, *args, timeout: float = 120.0, **kw) -> Child:
        c = self.spawn(*args, **kw)
        c.wait(timeout)
        return c

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _zygote_main() -> None:
    import importlib

    for m in _PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(m)
    from transformers import CLIPModel, CLIPProcessor, SiglipModel  # noqa: F401  (lazy modules)

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    reaped: dict[int, int] = {}

    def reap(pid: int, flags: int) -> int | None:
        if pid in reaped:
            return reaped[pid]
        p, status = os.waitpid(pid, flags)
        if p == 0:
            return None
        reaped[pid] = os.waitstatus_to_exitcode(status)
        return reaped[pid]

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "spawn":
            pid = os.fork()
            if pid == 0:
                _child(req)
            resp = {"pid": pid}
        elif req["op"] == "wait":
            deadline = time.monotonic() + req["timeout"]
            code = reap(req["pid"], os.WNOHANG)
            while code is None and time.monotonic() < deadline:
                time.sleep(0.02)
                code = reap(req["pid"], os.WNOHANG)
            if code is None:  # hung: kill it so that the test fails instead of hanging
                os.kill(req["pid"], signal.SIGKILL)
                code = reap(req["pid"], 0)
                code = f"timeout ({code})"
            resp = {"code": code}
        else:  # poll
            resp = {"code": reap(req["pid"], os.WNOHANG)}
        sys.stdout.write(json.dumps(resp) + "\n")
        sys.stdout.flush()


def _child(req: dict) -> None:
    code = 1
    try:
        os.setpgid(0, 0)
        os.chdir(req["cwd"])
        for k in [k for k in os.environ if k.startswith(("ITR_", "XDG_", "HF_"))]:
            del os.environ[k]
        os.environ.update(req["env"])
        fd_out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fd_err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fd_in = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd_in, 0)
        os.dup2(fd_out, 1)
        os.dup2(fd_err, 2)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        install(os.environ.get("ITR_FAULTS", ""))
        from itrcli.cli import main

        try:
            main(req["args"])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# --- faults inside a child ---------------------------------------------------------------------

def install(spec: str) -> None:
    """Apply an ``ITR_FAULTS`` spec: comma-separated ``slow=SECONDS`` (per encoder batch),
    ``kill=POINT:N`` (SIGKILL at the Nth time POINT is reached), ``enospc=POINT:N``,
    ``hang=POINT:N`` (that thread blocks for good there: the run stays at that point).

    Points: ``encode`` (before a batch is encoded), ``commit`` (right after a COMMIT),
    ``graph-tmp`` (graph written to its temporary file, not renamed),
    ``graph-replace`` (renamed, older graphs not yet removed), ``truncate`` (before the
    log is truncated), ``export`` (before the text tower is exported, or its child process
    started), ``ocr`` (before an image's text is read, in the OCR thread).
    """
    if not spec:
        return
    actions: dict[str, tuple[str, int]] = {}
    slow = 0.0
    for part in spec.split(","):
        key, _, val = part.partition("=")
        if key == "slow":
            slow = float(val)
        elif key in ("kill", "enospc", "hang"):
            point, _, n = val.partition(":")
            actions[point] = (key, int(n or 1))
    hits: dict[str, int] = {}

    def at(point: str) -> None:
        if point not in actions:
            return
        hits[point] = hits.get(point, 0) + 1
        what, n = actions[point]
        if hits[point] == n:
            if what == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if what == "hang":
                import threading

                threading.Event().wait()
            import errno

            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    from itrcli.embed import encoder, textonnx
    from itrcli.store import db as store, vindex

    enc_cls = encoder.Encoder
    orig_encode = enc_cls.encode_pixels

    def encode_pixels(self, pixels):
        at("encode")
        if slow:
            time.sleep(slow)
        return orig_encode(self, pixels)

    enc_cls.encode_pixels = encode_pixels

    orig_tx = store.Store.transaction

    @contextlib.contextmanager
    def transaction(self):
        with orig_tx(self) as c:
            yield c
        at("commit")

    store.Store.transaction = transaction
    orig_trunc = store.Store.truncate_log

    def truncate_log(self, upto):
        at("truncate")
        return orig_trunc(self, upto)

    store.Store.truncate_log = truncate_log

    class _Os:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            if str(dst).endswith(".bin"):
                at("graph-tmp")
                os.replace(src, dst)
                at("graph-replace")
            else:
                os.replace(src, dst)

    vindex.os = _Os()
    orig_export, orig_start = textonnx.export, textonnx.start

    def export(*a, **k):
        at("export")
        return orig_export(*a, **k)

    def start(*a, **k):  # the export in a child process (large towers, ITR_TEXT_EXPORT=child)
        at("export")
        return orig_start(*a, **k)

    textonnx.export, textonnx.start = export, start

    from itrcli.jobs import textread

    orig_read_one = textread.read_for_text

    def read_one(*a, **k):
        at("ocr")
        return orig_read_one(*a, **k)

    textread.read_for_text = read_one


# --- a small real file system ------------------------------------------------------------------

def can_mount() -> bool:
    """True when this process may mount a tmpfs (root with CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return False
    import tempfile

    d = tempfile.mkdtemp(prefix="itr-mnt-")
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d],
                           capture_output=True)
        if r.returncode != 0:
            return False
        subprocess.run(["umount", d], capture_output=True)
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(d)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (e.g. ``"4m"``) on ``path`` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, mode: str) -> None:
    """``mode``: ``ro`` or ``rw``."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the file system holding ``directory`` until at most ``leave`` bytes are free."""
    p = directory / "filler"
    with open(p, "ab") as f:
        chunk = b"\x00" * 65536
        while True:
            st = os.statvfs(directory)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                break
            try:
                f.write(chunk[: max(1, min(len(chunk), free - leave))])
                f.flush()
            except OSError:
                break
    return p


if __name__ == "__main__" and sys.argv[1:] == ["--zygote"]:
    _zygote_main()


def damage_index_page(db: Path, index: str = "files_hash") -> None:
    """Overwrite the root page of one of itr.db's indexes with garbage (its header kept):
    damage that ``itr check`` finds and ``--repair`` mends by rebuilding the file."""
    import sqlite3

    c = sqlite3.connect(db / "itr.db")
    try:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = c.execute("PRAGMA page_size").fetchone()[0]
        root = c.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (index,)).fetchone()[0]
    finally:
        c.close()
    data = bytearray((db / "itr.db").read_bytes())
    start = (root - 1) * page
    data[start + 8 : start + page] = bytes(((i * 13) & 0xFF) for i in range(page - 8))
    (db / "itr.db").write_bytes(bytes(data))

