"""Every file a phone or camera makes: HEIC, AVIF, camera RAW (a DNG written by the test,
with and without its embedded preview), motion photos, RAW+JPEG twins and Live Photos;
read the same way by indexing and by every reader (thumbnails, --preview, --html, the
server's thumbnails, re-ranking)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import synth
from support.raws import make_dng, motion_photo

pytest.importorskip("rawpy", reason="rawpy (LibRaw) not installed")

RED = ("red", "circle", "center")
BLUE = ("blue", "square", "left")


def picture(spec=RED, size=(600, 400), seed=0) -> Image.Image:
    """A drawing on a landscape canvas (the shape centred in it)."""
    img = synth.draw(*spec, size=min(size), seed=seed).convert("RGB")
    canvas = Image.new("RGB", size, img.getpixel((1, 1)))
    canvas.paste(img, ((size[0] - img.width) // 2, (size[1] - img.height) // 2))
    return canvas


def exif(orientation: int = 1, camera=("Apple", "iPhone 12"), taken="2020:01:02 03:04:05",
         gps=(48.8583, 2.2945)) -> bytes:
    e = Image.Exif()
    e[0x010F], e[0x0110], e[0x0112] = camera[0], camera[1], orientation
    e[0x0132] = taken
    ifd = e.get_ifd(0x8769)
    ifd[0x9003] = taken
    g = e.get_ifd(0x8825)
    lat, lon = gps
    g[1], g[3] = "N", "E"
    g[2] = (int(lat), int(lat * 60) % 60, (lat * 3600) % 60)
    g[4] = (int(lon), int(lon * 60) % 60, (lon * 3600) % 60)
    return e.tobytes()


def save_heic(path: Path, img: Image.Image, **kw) -> Path:
    import pillow_heif

    pillow_heif.register_heif_opener()
    img.save(path, format="HEIF", quality=85, exif=exif(**kw))
    return path


def save_avif(path: Path, img: Image.Image, **kw) -> Path:
    img.save(path, format="AVIF", quality=85, exif=exif(**kw))
    return path


def portrait_left_red(img: Image.Image) -> bool:
    """Upright check of :func:`two_tone` turned by its orientation: tall, red on top."""
    img = img.convert("RGB")
    w, h = img.size
    top, bottom = img.getpixel((w // 2, h // 8)), img.getpixel((w // 2, h * 7 // 8))
    return h > w and top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]


def two_tone(size=(600, 400)) -> Image.Image:
    """Landscape: red left half, blue right half.  Stored so, with orientation 6 (turn 90
    degrees clockwise to view) it shows tall with red on top."""
    img = Image.new("RGB", size, (220, 30, 30))
    img.paste((30, 30, 220), (size[0] // 2, 0, size[0], size[1]))
    return img


@pytest.fixture
def camera_files(tmp_path) -> dict[str, Path]:
    """One file of each kind, each stored sideways with orientation 6 and carrying EXIF."""
    d = tmp_path / "camera"
    d.mkdir()
    img = two_tone()
    return {
        "heic": save_heic(d / "phone.heic", img, orientation=6),
        "avif": save_avif(d / "web.avif", img, orientation=6),
        # a preview covering the model's input and a thumbnail's box
        "dng": make_dng(d / "camera.dng", img, preview=512, orientation=6, gps=(48.8583, 2.2945),
                        taken="2021:06:05 14:30:00"),
        # no preview at all: LibRaw's half-size demosaic
        "raw": make_dng(d / "old.dng", img, preview=None, orientation=6, make="Kodak",
                        model="DCS Pro 14N", taken="2004:02:03 10:11:12"),
    }


# --- decoding ---------------------------------------------------------------------------------

def test_heic_avif_and_raw_decode_upright_with_their_exif(camera_files):
    from itrcli.ingest.images import Preprocess, decode_file, open_image

    for kind, p in camera_files.items():
        img, meta = open_image(p.read_bytes(), name=str(p))
        assert portrait_left_red(img), kind
        assert (meta.width, meta.height) == (400, 600), kind
        assert meta.taken_at and meta.camera, (kind, meta)
        px, _, _ = decode_file(str(p), Preprocess())
        assert px.shape == (3, 224, 224), kind
    _, m = open_image(camera_files["heic"].read_bytes())
    assert (m.camera, m.taken_at) == ("Apple iPhone 12", "2020-01-02T03:04:05")
    assert m.lat == pytest.approx(48.8583, abs=1e-3) and m.lon == pytest.approx(2.2945, abs=1e-3)
    _, m = open_image(camera_files["dng"].read_bytes(), name="camera.dng")
    assert (m.camera, m.taken_at) == ("Canon EOS R5", "2021-06-05T14:30:00")
    assert m.lat == pytest.approx(48.8583, abs=1e-3)
    _, m = open_image(camera_files["raw"].read_bytes(), name="old.DNG")  # extension case
    assert (m.camera, m.taken_at) == ("Kodak DCS Pro 14N", "2004-02-03T10:11:12")


def test_raw_uses_its_preview_when_it_covers_the_request_else_demosaics(tmp_path):
    from itrcli.ingest.images import Preprocess, open_image

    img = two_tone((1200, 800))
    big = make_dng(tmp_path / "big.dng", img, preview=900)  # 900x600 preview
    small = make_dng(tmp_path / "small.dng", img, preview=160)  # a 160x107 thumbnail only
    none = make_dng(tmp_path / "none.dng", img, preview=None)
    prep = Preprocess()  # shortest edge 224
    got, meta = open_image(big.read_bytes(), draft_for=prep, name="big.dng")
    # JPEG draft mode on the preview: the smallest DCT scale covering 336x224
    assert got.size == (450, 300) and (meta.width, meta.height) == (1200, 800)
    got, _ = open_image(small.read_bytes(), draft_for=prep, name="small.dng")
    assert got.size == (600, 400)  # too small a preview: half-size demosaic
    got, _ = open_image(none.read_bytes(), draft_for=prep, name="none.dng")
    assert got.size == (600, 400)
    # a full-size reader (no request): the preview only when it covers the half-size image
    got, _ = open_image(big.read_bytes(), name="big.dng")
    assert got.size == (900, 600)
    # the preview and the demosaic are the same picture (colours within a rendering's drift)
    a = np.asarray(open_image(big.read_bytes(), name="big.dng")[0].resize((60, 40)), float)
    b = np.asarray(open_image(none.read_bytes(), name="none.dng")[0].resize((60, 40)), float)
    assert np.argmax(a[20, 10]) == np.argmax(b[20, 10]) == 0  # red on the left
    assert np.argmax(a[20, 50]) == np.argmax(b[20, 50]) == 2  # blue on the right


def test_bad_raw_and_heic_are_one_line_decode_errors(tmp_path, camera_files, monkeypatch):
    import itrcli.ingest.images as images
    import itrcli.ingest.raw as raw
    from itrcli.ingest.images import DecodeError, open_image

    cases = {
        "garbage.cr2": b"II*\x00" + b"\x01" * 500,
        "truncated.dng": camera_files["raw"].read_bytes()[:20000],
        "empty.nef": b"",
    }
    for name, data in cases.items():
        with pytest.raises(DecodeError) as e:
            open_image(data, name=name)
        assert "\n" not in str(e.value) and str(e.value), name
    with pytest.raises(DecodeError):
        open_image(camera_files["heic"].read_bytes()[:400])
    # the pixel guard holds for HEIC, AVIF and RAW as for any image
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)
    monkeypatch.setattr(raw, "MAX_PIXELS", 100 * 100)
    for kind, p in camera_files.items():
        with pytest.raises(DecodeError, match="too large"):
            open_image(p.read_bytes(), name=str(p))


# --- every reader -----------------------------------------------------------------------------

def test_every_reader_decodes_what_indexing_decodes(camera_files, tmp_path):
    """Thumbnails (and so the server's and --html's), --preview, the server's upload check
    and the re-ranker's loader read HEIC, AVIF and RAW, upright."""
    from itrcli.embed.rerank import Reranker
    from itrcli.ingest.images import Preprocess
    from itrcli.show.preview import Previewer
    from itrcli.show.thumbs import Source, ThumbnailCache, make_thumbnail

    rr = Reranker.__new__(Reranker)  # its loader alone, no model
    rr.prep, rr.cache_namespace = Preprocess(shortest_edge=None, height=64, width=64,
                                             center_crop=False), None
    cache = ThumbnailCache(tmp_path / "thumbs")
    for kind, p in camera_files.items():
        thumb = make_thumbnail(str(p), (128, 128))
        assert portrait_left_red(thumb) and max(thumb.size) == 128, kind
        jpeg = cache.get(Source(str(p), "ab" * 16), (128, 128))
        assert portrait_left_red(Image.open(io.BytesIO(jpeg))), kind
        seq = Previewer("kitty", rows=4).sequence(str(p))
        assert seq.startswith("\x1b_G"), kind
        key, pixels, _, error = rr.load_file(str(p))
        assert error is None and pixels.shape == (3, 64, 64), (kind, error)


def test_index_search_html_and_server_read_every_format(itr, tiny_clip, camera_files, tmp_path):
    """Indexed with their capture time and camera; a bad RAW, HEIC and video are one skip
    line each, exit 0, remembered; the contact sheet and the server show every one."""
    d = camera_files["heic"].parent
    motion_photo(d / "motion.jpg", picture(BLUE))
    motion_photo(d / "motion-heic.heic", picture(BLUE, seed=3), kind="HEIC")
    (d / "bad.nef").write_bytes(b"II*\x00" + b"\x00" * 300)
    (d / "bad.heic").write_bytes(camera_files["heic"].read_bytes()[:300])
    (d / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    lib = tmp_path / "lib"
    r = itr("index", d, "--db", lib, "-m", tiny_clip, "--json")
    assert r.code == 0, r
    s = r.json()
    assert (s["added"], s["skipped"], s["passed_over"]) == (6, 3, {}), s
    bad = {Path(e["path"]).name for e in s["errors"]}
    assert bad == {"bad.nef", "bad.heic", "bad.mp4"}
    assert all("\n" not in e["error"] for e in s["errors"])
    again = itr("index", d, "--db", lib, "--json").json()
    assert (again["unchanged"], again["skipped"], again["added"]) == (6, 3, 0)
    assert sorted(e["error"] for e in again["errors"]) == sorted(e["error"] for e in s["errors"])

    from itrcli.store.db import Store

    st = Store(lib, readonly=True)
    try:
        rows = {Path(r["path"]).name: r for r in st.rows(st.file_ids()).values()}
    finally:
        st.close()
    assert (rows["phone.heic"]["camera"], rows["phone.heic"]["taken_at"]) == (
        "Apple iPhone 12", "2020-01-02T03:04:05")
    assert (rows["camera.dng"]["camera"], rows["camera.dng"]["taken_at"]) == (
        "Canon EOS R5", "2021-06-05T14:30:00")
    assert rows["camera.dng"]["lat"] == pytest.approx(48.8583, abs=1e-3)
    assert (rows["old.dng"]["width"], rows["old.dng"]["height"]) == (400, 600)
    assert rows["motion.jpg"]["duration"] is None  # the still of a motion photo

    sheet = tmp_path / "sheet.html"
    r = itr("search", "a red circle", "--db", lib, "-n", "20", "--html", sheet, "--json")
    assert r.code == 0, r
    assert len(r.json()["results"]) == 6
    html = sheet.read_text()
    assert "no preview" not in html and html.count("data:image/jpeg;base64,") >= 6

    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from itrcli.serve.app import ServeOptions, create_app

    with TestClient(create_app(ServeOptions(Path(lib))), base_url="http://127.0.0.1:8765") as c:
        hits = c.get("/api/search", params={"q": "a red circle", "n": 20}).json()["results"]
        assert len(hits) == 6
        for h in hits:
            got = c.get(h["thumb"])
            assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg", h
            if Path(h["path"]).name in ("phone.heic", "web.avif", "camera.dng", "old.dng"):
                assert portrait_left_red(Image.open(io.BytesIO(got.content))), h["path"]


# --- twins --------------------------------------------------------------------------------------

def test_primaries_rule():
    from itrcli.query.twins import primaries

    got = primaries([("/a/IMG_1.JPG", None), ("/a/IMG_1.CR2", None),  # RAW + JPEG
                     ("/a/IMG_2.HEIC", None), ("/a/IMG_2.MOV", 2.9),  # Live Photo
                     ("/a/IMG_3.jpg", None), ("/a/IMG_3.png", None), ("/a/IMG_3.nef", None),
                     ("/a/IMG_4.jpg", None), ("/a/IMG_4.mp4", 60.0),  # a video of its own
                     ("/a/IMG_5.mov", 2.0), ("/a/IMG_5.mp4", 2.0),  # videos alone
                     ("/b/IMG_1.CR2", None), ("/a/IMG_1.edit.jpg", None)])
    assert got == {"/a/IMG_1.JPG": "/a/IMG_1.JPG", "/a/IMG_1.CR2": "/a/IMG_1.JPG",
                   "/a/IMG_2.HEIC": "/a/IMG_2.HEIC", "/a/IMG_2.MOV": "/a/IMG_2.HEIC"}


def test_raw_jpeg_twins_and_live_photos_are_one_photo(itr, tiny_clip, tmp_path):
    from support import clips

    d = tmp_path / "dcim"
    d.mkdir()
    red = picture(RED, seed=1)
    red.save(d / "IMG_0001.JPG", quality=92)
    make_dng(d / "IMG_0001.CR2", red, preview=None)  # DNG bytes: LibRaw reads by content
    save_heic(d / "IMG_0002.HEIC", picture(BLUE, seed=2))
    clips.write_clip(d / "IMG_0002.MOV", clips.shape_scenes([(0, BLUE)]), 2.5, fps=5)
    picture(("green", "triangle", "top"), seed=4).save(d / "IMG_0003.JPG", quality=92)
    lib = tmp_path / "lib"
    r = itr("index", d, "--db", lib, "-m", tiny_clip, "--json")
    assert r.code == 0 and r.json()["added"] == 5, r

    hits = itr("search", "a red circle", "--db", lib, "--json", "-n", "10").json()["results"]
    names = [Path(h["path"]).name for h in hits]
    assert sorted(names) == ["IMG_0001.JPG", "IMG_0002.HEIC", "IMG_0003.JPG"], names
    by = {Path(h["path"]).name: h for h in hits}
    assert by["IMG_0001.JPG"]["alternates"] == [str(d / "IMG_0001.CR2")]
    assert by["IMG_0002.HEIC"]["alternates"] == [str(d / "IMG_0002.MOV")]
    assert by["IMG_0002.HEIC"]["time"] is None and "alternates" not in by["IMG_0003.JPG"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    one = itr("search", "a red circle", "--db", lib, "--json", "-n", "1").json()["results"]
    assert len(one) == 1 and Path(one[0]["path"]).suffix in (".JPG", ".HEIC")

    every = itr("search", "a red circle", "--db", lib, "--json", "-n", "10", "--all-files")
    names = sorted(Path(h["path"]).name for h in every.json()["results"])
    assert names == ["IMG_0001.CR2", "IMG_0001.JPG", "IMG_0002.HEIC", "IMG_0002.MOV", "IMG_0003.JPG"]
    # filters choose which files may stand for a photo
    vids = itr("search", "blue", "--db", lib, "--json", "--kind", "video").json()["results"]
    assert [Path(h["path"]).name for h in vids] == ["IMG_0002.MOV"]
    assert vids[0]["alternates"] == [str(d / "IMG_0002.HEIC")]
    raws = itr("search", "red", "--db", lib, "--json", "--glob", "*.CR2").json()["results"]
    assert [Path(h["path"]).name for h in raws] == ["IMG_0001.CR2"]
    # an image query by the JPEG does not return its own RAW
    like = itr("search", d / "IMG_0001.JPG", "--db", lib, "--json").json()["results"]
    assert all(Path(h["path"]).stem != "IMG_0001" for h in like)

    # itr hash --dupes: the pair is one photo, not two copies; a real copy still is
    r = itr("hash", d, "--db", lib, "--dupes", "--json")
    assert r.code == 0, r
    assert "IMG_0001.CR2" not in r.out and "IMG_0002.MOV" not in r.out
    (d / "copy").mkdir()
    (d / "copy" / "IMG_0001.JPG").write_bytes((d / "IMG_0001.JPG").read_bytes())
    itr("index", d, "--db", lib, "-q")
    r = itr("hash", d, "--db", lib, "--dupes", "--json")
    groups = [g for g in json.loads(r.out)["groups"]] if r.out.strip().startswith("{") else [
        json.loads(line) for line in r.out.splitlines() if line.strip()]
    flat = json.dumps(groups)
    assert "copy/IMG_0001.JPG" in flat and "IMG_0001.CR2" not in flat, r.out
