"""Terminal previews: the kitty, iTerm2 and sixel sequences checked against their
specifications, detection, thumbnails (draft mode, EXIF rotation) and their cache."""

from __future__ import annotations

import base64
import io
import os
import re
import threading
import time

import numpy as np
import pytest
from PIL import Image

from itrcli.show import preview

from itrcli.show import thumbs
from itrcli.show.preview import Previewer, detect, kitty_sequence, iterm_sequence, sixel_sequence
from itrcli.show.thumbs import Source, ThumbnailCache

ESC = "\x1b"


class FakeTTY(io.StringIO):
    """A terminal-looking stdout (no file descriptor: the probe never runs on it)."""

    def isatty(self) -> bool:
        return True


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()




# --- kitty ------------------------------------------------------------------------------

def test_kitty_chunks_follow_the_protocol():
    png = png_bytes(noise(64, 48))  # ~9 KB: base64 needs several 4096-byte chunks
    seq = kitty_sequence(png, rows=8)
    chunks = re.findall(r"\x1b_G([^;\x1b]*);([^\x1b]*)\x1b\\", seq)
    assert "".join(f"{ESC}_G{k};{p}{ESC}\\" for k, p in chunks) == seq  # nothing else
    assert len(chunks) >= 3
    first = dict(kv.split("=") for kv in chunks[0][0].split(","))
    assert first["a"] == "T" and first["f"] == "100" and first["r"] == "8" and first["q"] == "2"
    for i, (keys, payload) in enumerate(chunks):
        last = i == len(chunks) - 1
        if i:
            assert keys == f"m={0 if last else 1}"  # later chunks carry only m
        else:
            assert first["m"] == "1"
        assert 0 < len(payload) <= 4096 and re.fullmatch(r"[A-Za-z0-9+/=]+", payload)
        if not last:
            assert len(payload) % 4 == 0  # chunks split on base64 quanta
    data = base64.b64decode("".join(p for _, p in chunks), validate=True)
    assert data == png and Image.open(io.BytesIO(data)).size == (64, 48)


def test_kitty_single_chunk_is_final():
    seq = kitty_sequence(png_bytes(Image.new("RGB", (2, 2), "red")), rows=3)
    assert seq.startswith(f"{ESC}_Ga=T,") and seq.count(f"{ESC}_G") == 1
    assert ",m=0;" in seq and seq.endswith(f"{ESC}\\")


# --- iTerm2 -----------------------------------------------------------------------------

def test_iterm_inline_image_sequence():
    data = png_bytes(noise(20, 10))
    seq = iterm_sequence(data, rows=6, name="a photo.jpg")
    m = re.fullmatch(r"\x1b\]1337;File=([^:]*):([A-Za-z0-9+/=]*)\x07", seq)
    assert m, seq[:80]
    args = dict(kv.split("=", 1) for kv in m.group(1).split(";"))
    assert args["inline"] == "1" and args["height"] == "6" and args["preserveAspectRatio"] == "1"
    assert int(args["size"]) == len(data)
    assert base64.b64decode(args["name"]).decode() == "a photo.jpg"
    assert base64.b64decode(m.group(2), validate=True) == data


# --- sixel ------------------------------------------------------------------------------

def decode_sixel(seq: str) -> np.ndarray:
    """A naive sixel decoder (VT340 manual, ch. 14): returns the ``[H, W, 3]`` image."""
    m = re.fullmatch(r"\x1bP([0-9;]*)q(.*)\x1b\\", seq, re.S)
    assert m, "not a DCS ... q ... ST sequence"
    body = m.group(2)
    ra = re.match(r'"(\d+);(\d+);(\d+);(\d+)', body)
    assert ra, "no raster attributes"
    w, h = int(ra.group(3)), int(ra.group(4))
    body = body[ra.end():]
    out = np.full((h, w, 3), -1, dtype=np.int32)
    palette: dict[int, tuple[int, int, int]] = {}
    colour, x, y, i = 0, 0, 0, 0
    num = re.compile(r"\d+")
    while i < len(body):
        c = body[i]
        if c == "#":
            nums = re.match(r"#(\d+)(?:;(\d+);(\d+);(\d+);(\d+))?", body[i:])
            colour = int(nums.group(1))
            if nums.group(2) is not None:
                assert nums.group(2) == "2", "colours in RGB percent"
                rgb = tuple(int(nums.group(k)) for k in (3, 4, 5))
                assert all(0 <= v <= 100 for v in rgb)
                palette[colour] = rgb  # type: ignore[assignment]
            i += nums.end()
            continue
        count = 1
        if c == "!":
            n = num.match(body, i + 1)
            count = int(n.group())
            i = n.end()
            c = body[i]
        if c == "$":
            x = 0
        elif c == "-":
            x, y = 0, y + 6
        else:
            bits = ord(c) - 63
            assert 0 <= bits <= 63, repr(c)
            assert colour in palette, "colour used before it was defined"
            for r in range(6):
                if bits >> r & 1:
                    assert y + r < h and x + count <= w, "sixel outside the raster"
                    out[y + r, x : x + count] = palette[colour]
            x += count
        i += 1
    assert len(palette) <= 256
    assert (out >= 0).all(), "pixels left undrawn"
    return out


def test_sixel_round_trips_through_a_reference_decoder():
    img = noise(23, 17, seed=3)  # height not a multiple of 6: a partial last band
    seq = sixel_sequence(img)
    assert seq.startswith(f"{ESC}P") and seq.endswith(f"{ESC}\\")
    decoded = decode_sixel(seq)
    assert decoded.shape == (17, 23, 3)
    want = np.asarray(img.quantize(256, method=Image.Quantize.FASTOCTREE).convert("RGB"), np.int32)
    # percent units: decode back to 0..255 and allow the rounding of 255/100
    got = np.round(decoded * 255 / 100)
    assert np.abs(got - want).max() <= 2


def test_sixel_run_length_encodes_flat_areas():
    img = Image.new("RGB", (100, 12), (255, 0, 0))
    seq = sixel_sequence(img)
    assert "!100~" in seq and seq.count("#0;2;100;0;0") == 1
    assert (decode_sixel(seq) == [100, 0, 0]).all()


# --- detection --------------------------------------------------------------------------

@pytest.mark.parametrize("env,want", [
    ({"TERM": "xterm-kitty"}, "kitty"),
    ({"TERM": "xterm-256color", "KITTY_WINDOW_ID": "1"}, "kitty"),
    ({"TERM": "xterm-ghostty"}, "kitty"),
    ({"TERM_PROGRAM": "iTerm.app"}, "iterm"),
    ({"TERM": "xterm-256color", "LC_TERMINAL": "iTerm2"}, "iterm"),
    ({"TERM_PROGRAM": "WezTerm"}, "iterm"),
    ({"WEZTERM_PANE": "0"}, "iterm"),
    ({"TERM": "foot"}, "sixel"),
    ({"TERM": "mlterm"}, "sixel"),
    ({"TERM": "xterm-256color"}, None),
    ({"TERM": "tmux-256color", "KITTY_WINDOW_ID": "1"}, None),  # tmux: outer env not trusted
    ({"TERM": "screen", "TMUX": "/tmp/t,1,0", "TERM_PROGRAM": "iTerm.app"}, None),
])
def test_protocol_from_env(env, want):
    assert preview.protocol_from_env(env) == want


def test_no_protocol_when_stdout_is_piped_even_when_forced():
    for force in (None, "kitty", "iterm", "sixel"):
        d = detect(io.StringIO(), force=force, env={"TERM": "xterm-kitty"})
        assert d.protocol is None and "not a terminal" in d.reason
        previewer, _ = preview.for_terminal(io.StringIO(), force=force)
        assert previewer is None


def test_detect_on_a_terminal():
    tty = FakeTTY()
    assert detect(tty, force="sixel", env={}).protocol == "sixel"
    assert detect(tty, env={"TERM": "xterm-kitty"}).protocol == "kitty"
    d = detect(tty, env={"TERM": "dumb"}, stdin=io.StringIO())  # cannot probe: no answer
    assert d.protocol is None and "--preview-protocol" in d.reason
    with pytest.raises(ValueError):
        detect(tty, force="vt100", env={})
    assert tty.getvalue() == ""  # detection wrote nothing


def test_parse_probe_reply():
    r = preview.parse_probe_reply(b"\x1b_Gi=31;OK\x1b\\\x1b[6;18;9t\x1b[?62;22c")
    assert r.kitty and not r.sixel and r.cell == (9, 18) and r.answered
    r = preview.parse_probe_reply(b"\x1b[?63;1;2;4;6;9;15;22c")
    assert r.sixel and not r.kitty and r.cell is None
    r = preview.parse_probe_reply(b"\x1b[?64;14c")  # 14 is not 4
    assert not r.sixel and r.answered
    assert not preview.parse_probe_reply(b"").answered


@pytest.mark.skipif(os.name != "posix", reason="pseudo-terminals are POSIX")
def test_probe_talks_to_a_terminal_and_restores_its_mode():
    import termios

    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)

        def terminal():  # answer like a sixel-capable xterm
            got = b""
            while b"\x1b[c" not in got:
                got += os.read(master, 1024)
            os.write(master, b"\x1b[6;20;10t\x1b[?62;4;22c")

        t = threading.Thread(target=terminal, daemon=True)
        t.start()
        r = preview.probe_terminal(slave, slave, timeout=5)
        t.join(1)
        assert r.sixel and not r.kitty and r.cell == (10, 20)
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


# --- thumbnails and previews -------------------------------------------------------------

def test_thumbnail_is_exif_rotated_and_drafted(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    # left half red, right half blue; EXIF orientation 6: shown rotated 90 degrees clockwise
    arr = np.zeros((300, 400, 3), np.uint8)
    arr[:, :200] = (230, 20, 20)
    arr[:, 200:] = (20, 20, 230)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)

    requests = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        r = real_draft(self, mode, size)
        requests.append((size, self.size))
        return r

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    t = thumbs.make_thumbnail(str(path), (60, 60))
    assert t.mode == "RGB" and t.size == (45, 60)  # portrait after rotation, fits the box
    assert requests and requests[0][1][0] < 400  # libjpeg decoded at a reduced scale
    top, bottom = np.asarray(t)[3, 22], np.asarray(t)[-4, 22]
    assert top[0] > 150 and top[2] < 100  # red ends up on top
    assert bottom[2] > 150 and bottom[0] < 100


def test_cache_keys_by_hash_and_box_and_evicts_least_recently_used(tmp_path):
    photos = []
    for i in range(4):
        p = tmp_path / f"p{i}.jpg"
        noise(200, 150, seed=i).save(p, quality=90)
        photos.append(p)
    cache = ThumbnailCache(tmp_path / "thumbs", cap_bytes=10**9)
    srcs = [Source(str(p), f"{i:02d}" + "ab" * 15) for i, p in enumerate(photos)]
    first = cache.get(srcs[0], (64, 64))
    assert Image.open(io.BytesIO(first)).size == (64, 48)
    assert cache.stats()["thumbnails"] == 1
    photos[0].unlink()  # the cached copy answers now
    assert cache.get(srcs[0], (64, 64)) == first
    with pytest.raises(OSError):
        cache.get(srcs[0], (32, 32))  # another size is another key
    assert cache.get(Source(str(photos[1])), (64, 64))  # no hash: not cached
    assert cache.stats()["thumbnails"] == 1

    for s in srcs[1:]:
        cache.get(s, (64, 64))
    files = {e[2]: e for e in cache.entries()}
    assert len(files) == 4
    # age them: srcs[1] is the least recently used, srcs[0] was used last
    now = time.time()
    for age, s in zip((10, 400, 300, 200), srcs):
        f = cache._file(s.content_hash, (64, 64))
        os.utime(f, (now - age, now - age))
    sizes = sorted(e[1] for e in files.values())
    cache.cap_bytes = sum(sizes) - 1  # one too many
    assert cache.trim(force=True) >= 1
    left = {os.path.basename(e[2])[:2] for e in cache.entries()}
    assert "01" not in left and "00" in left
    assert thumbs.cache_stats(tmp_path) == cache.stats()  # <library>/thumbs
    st = ThumbnailCache.for_library(tmp_path / "nolib").stats()
    assert st == {"thumbnails": 0, "bytes": 0}


def test_cache_off_and_unwritable(tmp_path, monkeypatch):
    p = tmp_path / "a.jpg"
    noise(50, 50).save(p)
    monkeypatch.setenv("ITR_THUMB_CACHE_MIB", "0")
    off = ThumbnailCache(tmp_path / "thumbs")
    assert off.get(Source(str(p), "ab" * 16), (20, 20)) and not (tmp_path / "thumbs").exists()
    monkeypatch.delenv("ITR_THUMB_CACHE_MIB")
    (tmp_path / "file").write_text("not a directory")
    broken = ThumbnailCache(tmp_path / "file" / "thumbs")
    assert broken.get(Source(str(p), "ab" * 16), (20, 20))  # still a thumbnail


def test_previewer_sequences_in_order_with_failures(tmp_path):
    good = tmp_path / "good.jpg"
    noise(120, 80).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    for proto, start in (("kitty", f"{ESC}_G"), ("iterm", f"{ESC}]1337;"), ("sixel", f"{ESC}P")):
        pv = Previewer(proto, rows=4, cell=(8, 16))
        assert pv.box == (192, 64)
        out = list(pv.sequences([str(good), str(bad), str(tmp_path / "missing.jpg"), str(good)]))
        assert out[0].startswith(start) and out[3] == out[0]
        assert isinstance(out[1], Exception) and isinstance(out[2], OSError)
    sixel = Previewer("sixel", rows=4, cell=(8, 16)).sequence(str(good))
    assert decode_sixel(sixel).shape[0] == 64  # rows x cell height pixels


# --- the command line --------------------------------------------------------------------

@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_clip):
    from conftest import run_itr, write_shapes

    d = tmp_path_factory.mktemp("preview")
    write_shapes(d / "photos", [("red", "circle", "left", 1), ("blue", "square", "right", 2),
                                ("green", "star", "top", 3)])
    r = run_itr("index", d / "photos", "--db", d / "lib", "-m", tiny_clip, "-q")
    assert r.code == 0, r
    return d / "lib"


def test_cli_writes_no_image_codes_when_piped(itr, library):
    plain = itr("search", "a red circle", "--db", library)
    for extra in (["--preview"], ["--preview-protocol", "kitty"], ["--preview-protocol", "sixel"]):
        r = itr("search", "a red circle", "--db", library, *extra)
        assert r.code == 0, r
        assert r.out == plain.out and ESC not in r.out
        assert r.err.count("no image previews") == 1 and "not a terminal" in r.err
    r = itr("search", "a red circle", "--db", library, "--preview-protocol", "vt100")
    assert r.code == 2 and "--preview-protocol" in r.err


def test_cli_previews_on_a_terminal_and_info_counts_the_cache(itr, library, monkeypatch):
    import sys

    tty = FakeTTY()
    monkeypatch.setattr(sys, "stdout", tty)
    from itrcli.cli import main

    with pytest.raises(SystemExit) as e:
        main(["search", "a red circle", "--db", str(library), "-n", "2",
              "--preview-protocol", "iterm"])
    assert e.value.code == 0
    lines = tty.getvalue().split("\n")
    assert lines[0].startswith("1  ") and lines[1].startswith(f"{ESC}]1337;File=")
    assert lines[2].startswith("2  ") and lines[3].startswith(f"{ESC}]1337;File=")
    monkeypatch.undo()
    info = itr("info", "--db", library, "--json").json()
    assert info["thumbnail_cache"]["thumbnails"] == 2 and info["thumbnail_cache"]["bytes"] > 0
    assert "thumbs:" in itr("info", "--db", library).out
