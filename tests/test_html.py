"""The HTML contact sheet: self-contained, escaped, every result a thumbnail and a link,
and it renders (headless Chromium, when available)."""

from __future__ import annotations

import io
import os
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote_to_bytes

import numpy as np
import pytest
from PIL import Image

from itrcli.show.contact_sheet import file_url, query_terms, write_dupes_html, write_search_html
from itrcli.query.search import Hit
from itrcli.show.thumbs import Source, ThumbnailCache

COLOURS = [(220, 30, 30), (30, 70, 220), (30, 160, 50), (235, 205, 20)]


class Page(HTMLParser):
    """Collects what the tests look at: figures with their img/links, every URL."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[dict] = []
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.header_imgs = 0
        self.sections = 0
        self.title = ""
        self._in = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._in.append(tag)
        for k, v in attrs:
            if k in ("href", "src", "srcset", "action", "poster", "data", "formaction"):
                self.urls.append((tag, k, v or ""))
        if tag == "figure":
            self.figures.append({"imgs": [], "links": []})
        elif tag == "img":
            if self.figures and "figure" in self._in:
                self.figures[-1]["imgs"].append(a.get("src", ""))
            elif "header" in self._in:
                self.header_imgs += 1
        elif tag == "a" and self.figures and "figure" in self._in:
            self.figures[-1]["links"].append(a.get("href", ""))
        elif tag == "section":
            self.sections += 1
        if tag in ("img", "meta", "link", "br", "input"):
            self._in.pop()  # void elements

    def handle_endtag(self, tag):
        while self._in:
            if self._in.pop() == tag:
                break

    def handle_data(self, data):
        if self._in and self._in[-1] == "title":
            self.title += data


def parse(text: str) -> Page:
    p = Page()
    p.feed(text)
    p.close()
    return p


def assert_self_contained(text: str, page: Page) -> None:
    for tag, attr, url in page.urls:
        assert url.startswith(("data:image/jpeg;base64,", "file:///")), (tag, attr, url[:60])
    rest = text
    for _, _, url in page.urls:
        rest = rest.replace(url, "")
    low = rest.lower()
    assert "http:" not in low and "https:" not in low and "//" not in low
    for active in ("<script", "<link", "<iframe", "url(", "@import"):
        assert active not in low, active


def make_photos(directory: Path, names: list[str], size=(120, 90)) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i, name in enumerate(names):
        arr = np.full((size[1], size[0], 3), 245, np.uint8)
        arr[10:-10, 20:-20] = COLOURS[i % len(COLOURS)]
        p = Path(os.fsdecode(os.path.join(os.fsencode(directory), os.fsencode(name))))
        Image.fromarray(arr).save(p, format="JPEG")
        out.append(p)
    return out


NAMES = ["plain.jpg", "a b#c?d%e&f.jpg", "<script>alert(1)<\\script>.jpg",
         "caf\u00e9 \u65e5\u672c.jpg"]


@pytest.fixture
def photos(tmp_path):
    names = list(NAMES)
    if os.name == "posix" and not os.uname().sysname == "Darwin":
        names.append(os.fsdecode(b"raw\xff\xfename.jpg"))  # not UTF-8: a surrogate-escaped str
    return make_photos(tmp_path / "photos", names)


def hits_for(paths: list[Path]) -> list[Hit]:
    return [Hit(i + 1, 0.5 - i / 100, str(p).encode("utf-8", "backslashreplace").decode(),
                120, 90, None, i + 1) for i, p in enumerate(paths)]


def search_html(tmp_path, photos, terms=(("text", "red <b>things</b> & \"more\"", 1.0),),
                term_sources=()) -> str:
    buf = io.StringIO()
    cache = ThumbnailCache(tmp_path / "lib" / "thumbs")
    write_search_html(buf, hits_for(photos), [Source(str(p)) for p in photos], terms=list(terms),
                      term_sources=list(term_sources), cache=cache, model="tiny <model>")
    return buf.getvalue()


def test_every_result_has_a_thumbnail_and_a_link(tmp_path, photos):
    text = search_html(tmp_path, photos)
    page = parse(text)
    assert len(page.figures) == len(photos)
    for fig, path in zip(page.figures, photos):
        assert len(fig["imgs"]) == 1 and fig["imgs"][0].startswith("data:image/jpeg;base64,")
        assert fig["links"] and all(h == file_url(path) for h in fig["links"])
        # the link is the file, byte for byte, and percent-encoded
        href = fig["links"][0]
        assert unquote_to_bytes(href[len("file://"):]) == os.fsencode(path)
        assert not set(href[len("file://"):]) & set(" #?&<>\"'")
    assert_self_contained(text, page)
    assert "red &lt;b&gt;things&lt;/b&gt; &amp; &quot;more&quot;" in text
    assert "tiny &lt;model&gt;" in text and "<script>alert" not in text
    assert page.title.startswith("itr: ")
    assert "#1 \u00b7 0.5000" in text


def test_thumbnails_are_small_and_decodable(tmp_path):
    import base64

    big = make_photos(tmp_path / "big", ["big.jpg"], size=(2000, 1000))
    page = parse(search_html(tmp_path, big))
    src = page.figures[0]["imgs"][0]
    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert img.format == "JPEG" and max(img.size) <= 320 and img.size[0] == 2 * img.size[1]


def test_image_query_is_shown_at_the_top(tmp_path, photos):
    q = photos[0]
    text = search_html(tmp_path, photos[1:], terms=[("image", str(q), 1.0), ("text", "dog", -1.0)],
                       term_sources=[Source(str(q)), None])
    page = parse(text)
    assert page.header_imgs == 1 and len(page.figures) == len(photos) - 1
    assert any(u == file_url(q) for _, _, u in page.urls)
    assert "\u2212 " in text  # the subtracted term is marked
    assert_self_contained(text, page)


def test_query_terms_follow_the_search_classification(tmp_path, photos):
    terms = query_terms(str(photos[0]), add=["  sunny   day "], subtract=[str(photos[1])])
    assert terms == [("image", str(photos[0]), 1.0), ("text", "sunny day", 1.0),
                     ("image", str(photos[1]), -1.0)]


def test_missing_files_get_a_placeholder_not_a_broken_page(tmp_path, photos):
    gone = tmp_path / "photos" / "gone.jpg"
    page = parse(search_html(tmp_path, [photos[0], gone]))
    assert len(page.figures) == 2 and page.figures[1]["imgs"] == []
    assert page.figures[1]["links"] == [file_url(gone)] * 2


def test_dupes_page_has_one_row_per_group(tmp_path, photos):
    groups = [[str(photos[0]), str(photos[1])], [str(photos[2]), str(photos[3]), str(photos[0])]]
    out = tmp_path / "dupes.html"
    write_dupes_html(groups, str(out))
    text = out.read_text(encoding="utf-8")
    page = parse(text)
    assert page.sections == 2 and len(page.figures) == 5
    assert all(len(f["imgs"]) == 1 for f in page.figures)
    assert_self_contained(text, page)




def test_search_page_through_the_cli(itr, tiny_clip, tmp_path):
    from conftest import write_shapes

    write_shapes(tmp_path / "photos",
                 [("red", "circle", "left", 1), ("blue", "square", "right", 2)])
    lib = tmp_path / "lib"
    assert itr("index", tmp_path / "photos", "--db", lib, "-m", tiny_clip, "-q").code == 0
    r = itr("search", "a red circle", "--db", lib, "--html", "-")
    assert r.code == 0 and r.out.startswith("<!doctype html>")
    assert len(parse(r.out).figures) == 2
    out = tmp_path / "sheet.html"
    r = itr("search", "a red circle", "--db", lib, "--html", out)
    assert r.code == 0 and len(r.out.splitlines()) == 2  # the usual lines too
    assert len(parse(out.read_text()).figures) == 2
    r = itr("search", "a red circle", "--db", lib, "--html", "-", "--json")
    assert r.code == 2


# --- rendering ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless Chromium found on PATH (the tests never install anything).  CI installs
    it, so under CI=true a missing one fails the test instead of skipping it silently."""
    from conftest import find_chromium, page_tests_required

    exe = find_chromium()
    if exe:
        return exe
    if page_tests_required():
        pytest.fail("chromium is not on PATH, and CI=true: CI must install it "
                    "(apt-get install chromium) so that the rendering test runs", pytrace=False)
    pytest.skip("chromium is not on PATH (apt-get install chromium): the page is not rendered")


def screenshot(chromium: str, page: Path, tmp: Path) -> Image.Image:
    png = tmp / "shot.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}",
           f"--screenshot={png}", "--window-size=1000,800", page.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.exists(), f"no screenshot (exit {r.returncode}): {r.stderr[-1000:]}"
    return Image.open(png).convert("RGB")


def test_page_renders_in_headless_chromium(chromium, tmp_path, photos):
    page = tmp_path / "sheet.html"
    page.write_text(search_html(tmp_path, photos), encoding="utf-8")
    shot = np.asarray(screenshot(chromium, page, tmp_path), dtype=np.float64)  # [H, W, 3]
    assert shot.shape[:2] == (800, 1000)
    assert shot.std() > 20, "blank screenshot"
    # the thumbnails' colours are on screen (the images decoded and were laid out)
    for colour in COLOURS[:3]:
        near = (np.abs(shot - colour).max(axis=2) < 40).sum()
        assert near > 500, f"colour {colour} not rendered ({near} pixels)"
