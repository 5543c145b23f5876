"""The page of `itr serve` in a real headless Chromium (Debian's, driven by Playwright):
type a query, see results, open one, step with the arrow keys, "more like this", the back
button, an image upload, filters, a video from its time, and hostile file names shown as
text.  Under CI=true a missing browser or Playwright fails; elsewhere the tests skip."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import HOSTILE_NAME, find_chromium, missing_browser, write_shapes
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
#: Bounded waits (milliseconds for Playwright): no assertion is about time.
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_browser("playwright is not installed (pip install -e '.[test]')")
    exe = find_chromium()
    if exe is None:
        missing_browser("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, served_page):
    ctx = browser.new_context(viewport={"width": 1200, "height": 800})
    pg = ctx.new_page()
    pg.set_default_timeout(WAIT_MS)
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
          if m.type == "error" else None)
    pg.problems = problems
    yield pg
    ctx.close()


def wait_js(pg, expr: str, deadline: float = WAIT_MS / 1000) -> None:
    """Poll a JavaScript expression until true, within a bounded wait (Playwright's own
    wait_for_function evaluates strings with eval, which the page's CSP forbids: good)."""
    end = time.monotonic() + deadline
    while not pg.evaluate(f"() => Boolean({expr})"):
        if time.monotonic() > end:
            raise AssertionError(f"still false after {deadline:.0f} s: {expr}")
        pg.wait_for_timeout(100)


def cards(pg) -> list[str]:
    """The paths of the result cards, in order."""
    return pg.eval_on_selector_all(".card .thumb", "els => els.map(e => e.title)")


def search(pg, served_page, text: str) -> None:
    pg.fill("#q", text)
    pg.press("#q", "Enter")
    pg.wait_for_selector(".card")
    wait_js(pg, "document.getElementById('status').textContent.includes('result')")


def test_type_a_query_see_results_open_one_and_more_like_this(page, served_page):
    pg = page
    pg.goto(served_page.url + "/")
    assert pg.is_visible("#empty")
    assert pg.evaluate("document.activeElement.id") == "q"
    search(pg, served_page, "a red circle")
    want = served_page.get_json("/api/search?q=a+red+circle&n=40")["results"]
    assert cards(pg) == [h["path"] for h in want]
    assert "q=a+red+circle" in pg.url
    first_score = pg.text_content(".card .score")
    assert first_score == f"{want[0]['score']:.3f}"
    # every thumbnail decoded (served by /api/thumb)
    wait_js(pg, "[...document.querySelectorAll('.card img')].slice(0, 6)"
                         ".every(i => i.complete && i.naturalWidth > 0)")

    pg.click(".card .thumb")
    pg.wait_for_selector("#viewer:not([hidden])")
    assert pg.text_content("#v-title") == Path(want[0]["path"]).name
    assert want[0]["path"] in pg.text_content("#v-meta")
    pg.keyboard.press("ArrowRight")
    wait_js(pg, f"document.getElementById('v-title').textContent === {json.dumps(Path(want[1]['path']).name)}")
    pg.keyboard.press("ArrowLeft")
    wait_js(pg, f"document.getElementById('v-title').textContent === {json.dumps(Path(want[0]['path']).name)}")

    pg.click("#v-like")
    pg.wait_for_url(f"**like={want[0]['id']}**")
    wait_js(pg, "document.getElementById('status').textContent.includes('more like this')")
    liked = served_page.get_json(f"/api/search?like={want[0]['id']}&n=40")["results"]
    assert cards(pg) == [h["path"] for h in liked] and want[0]["path"] not in cards(pg)
    assert pg.is_hidden("#viewer")

    pg.go_back()
    pg.wait_for_url("**q=a+red+circle**")
    wait_js(pg, f"document.querySelector('.card .thumb') && document.querySelector('.card .thumb').title === {json.dumps(want[0]['path'])}")
    assert pg.input_value("#q") == "a red circle"
    assert not pg.problems, pg.problems


def test_keys_escape_and_slash(page, served_page):
    pg = page
    pg.goto(served_page.url + "/?q=a+blue+square")
    pg.wait_for_selector(".card")
    pg.click(".card:nth-child(2) .thumb")
    pg.wait_for_selector("#viewer:not([hidden])")
    pg.keyboard.press("Escape")
    pg.wait_for_selector("#viewer", state="hidden")
    pg.click("#status")
    pg.keyboard.press("/")
    assert pg.evaluate("document.activeElement.id") == "q"
    assert not pg.problems, pg.problems


def test_hostile_names_are_shown_as_text(page, served_page):
    pg = page
    pg.goto(served_page.url + "/?q=a+red+circle+on+the+right")
    pg.wait_for_selector(".card")
    hostile = str(served_page.photos / HOSTILE_NAME)
    assert hostile in cards(pg)
    i = cards(pg).index(hostile)
    pg.click(f".card:nth-child({i + 1}) .thumb")
    pg.wait_for_selector("#viewer:not([hidden])")
    assert pg.text_content("#v-title") == HOSTILE_NAME
    assert hostile in pg.text_content("#v-meta")
    assert pg.evaluate("window.__xss") is None
    assert pg.query_selector("img[src='x']") is None
    assert not pg.problems, pg.problems


def test_search_by_an_uploaded_image(page, served_page, tmp_path):
    [img] = write_shapes(tmp_path / "mine", [("green", "circle", "left", 77)])
    pg = page
    pg.goto(served_page.url + "/")
    pg.set_input_files("#image", str(img))
    wait_js(pg, "document.getElementById('status').textContent.includes('the image')")
    assert len(cards(pg)) >= 1 and "green-circle" in cards(pg)[0]
    assert not pg.problems, pg.problems


def test_filters_and_a_video_from_its_time(page, served_page):
    if served_page.video is None:
        pytest.skip("PyAV is not installed: no video in the library")
    pg = page
    pg.goto(served_page.url + "/")
    pg.click("#toggle-filters")
    pg.select_option("#f-kind", "video")
    pg.fill("#q", "a blue circle")
    pg.press("#q", "Enter")
    pg.wait_for_selector(".card")
    assert "kind=video" in pg.url and cards(pg) == [str(served_page.video)]
    pg.click(".card .thumb")
    pg.wait_for_selector("#v-media video")
    src = pg.get_attribute("#v-media video", "src")
    hit = served_page.get_json("/api/search?q=a+blue+circle&kind=video")["results"][0]
    assert src.endswith(f"#t={hit['time']:.3f}")
    # the browser reads the video through /api/file with Range requests
    wait_js(pg, "document.querySelector('#v-media video').readyState >= 1")
    assert not [p for p in pg.problems if "video" not in p.lower()], pg.problems


def test_the_page_says_what_is_wrong(page, served_page):
    pg = page
    pg.goto(served_page.url + "/?q=red&after=not-a-date")
    wait_js(pg, "document.getElementById('status').classList.contains('error')")
    assert "YYYY-MM-DD" in pg.text_content("#status")
