"""The page of `itr serve` in a real headless Firefox (Debian's firefox-esr, driven over
WebDriver BiDi by tests/support/bidi.py, with real key presses and mouse clicks): type a
query, see results, open one, step with the arrow keys, "more like this", the back button,
Escape and "/", an image upload, and a video read with Range requests; the page's log holds
no console error, uncaught exception or CSP violation (and a test shows that the log does
see them).  Under CI=true a missing Firefox fails; elsewhere the tests skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import find_firefox, missing_browser, write_shapes

#: Bounded waits, in seconds: no assertion is about time.
WAIT = 60


@pytest.fixture(scope="module")
def firefox():
    try:
        import websocket  # noqa: F401
    except ImportError:
        missing_browser("websocket-client is not installed (pip install -e '.[test]')")
    exe = find_firefox()
    if exe is None:
        missing_browser("firefox is not installed (apt-get install firefox-esr)")
    from support import bidi

    with bidi.launch(exe) as browser:
        yield browser


@pytest.fixture
def tab(firefox, served_page):
    t = firefox.new_tab(1200, 800)
    try:
        yield t
    finally:
        t.close()


def cards(tab) -> list[str]:
    """The paths of the result cards, in order."""
    return tab.evaluate("[...document.querySelectorAll('.card .thumb')].map(e => e.title)")


def status_says(tab, words: str) -> None:
    tab.wait_for(f"document.getElementById('status').textContent.includes({json.dumps(words)})",
                 WAIT)


def viewer_shows(tab, path: str) -> None:
    tab.wait_for("!document.getElementById('viewer').hidden && document.getElementById("
                 f"'v-title').textContent === {json.dumps(Path(path).name)}", WAIT,
                 what=f"the viewer showing {Path(path).name}")


def test_type_a_query_see_results_open_one_and_more_like_this(tab, served_page):
    tab.navigate(served_page.url + "/")
    assert tab.evaluate("!document.getElementById('empty').hidden")
    assert tab.evaluate("document.activeElement.id") == "q"
    tab.click("#q")
    tab.type("a red circle")
    tab.press("Enter")
    status_says(tab, "result")
    want = served_page.get_json("/api/search?q=a+red+circle&n=40")["results"]
    assert cards(tab) == [h["path"] for h in want]
    assert "q=a+red+circle" in tab.url
    assert tab.text(".card .score") == f"{want[0]['score']:.3f}"
    tab.wait_for("[...document.querySelectorAll('.card img')].slice(0, 6)"
                 ".every(i => i.complete && i.naturalWidth > 0)", WAIT,
                 what="the first thumbnails decoded (served by /api/thumb)")

    tab.click(".card .thumb")
    viewer_shows(tab, want[0]["path"])
    assert want[0]["path"] in tab.text("#v-meta")
    tab.wait_for("(() => { const i = document.querySelector('#v-media img');"
                 " return i && i.complete && i.naturalWidth > 0; })()", WAIT,
                 what="the large image decoded")
    assert tab.evaluate("document.querySelector('#v-media img').src").endswith(want[0]["large"])
    tab.press("ArrowRight")
    viewer_shows(tab, want[1]["path"])
    tab.press("ArrowLeft")
    viewer_shows(tab, want[0]["path"])

    tab.click("#v-like")
    tab.wait_for(f"location.search.includes('like={want[0]['id']}')", WAIT)
    status_says(tab, "more like this")
    liked = served_page.get_json(f"/api/search?like={want[0]['id']}&n=40")["results"]
    assert cards(tab) == [h["path"] for h in liked] and want[0]["path"] not in cards(tab)
    assert tab.evaluate("document.getElementById('viewer').hidden")

    tab.back()
    tab.wait_for("location.search.includes('q=a+red+circle') && document.querySelector("
                 f"'.card .thumb') && document.querySelector('.card .thumb').title === "
                 f"{json.dumps(want[0]['path'])}", WAIT, what="the query's results again")
    assert tab.evaluate("document.getElementById('q').value") == "a red circle"
    assert not tab.problems(), tab.problems()


def test_keys_escape_and_slash(tab, served_page):
    tab.navigate(served_page.url + "/?q=a+blue+square")
    tab.click(".card:nth-child(2) .thumb")
    viewer_shows(tab, cards(tab)[1])
    tab.press("Escape")
    tab.wait_for("document.getElementById('viewer').hidden", WAIT, what="the viewer closed")
    tab.click("#status")
    tab.press("/")
    tab.wait_for("document.activeElement.id === 'q'", WAIT, what="the search box focused")
    assert tab.evaluate("document.getElementById('q').value") == "a blue square"
    assert not tab.problems(), tab.problems()


def test_search_by_an_uploaded_image(tab, served_page, tmp_path):
    [img] = write_shapes(tmp_path / "mine", [("green", "circle", "left", 77)])
    tab.navigate(served_page.url + "/")
    tab.set_files("#image", [img])
    status_says(tab, "the image")
    assert len(cards(tab)) >= 1 and "green-circle" in cards(tab)[0]
    assert not tab.problems(), tab.problems()


def test_a_video_from_its_time(tab, served_page):
    if served_page.video is None:
        pytest.skip("PyAV is not installed: no video in the library")
    tab.navigate(served_page.url + "/?q=a+blue+circle&kind=video")
    tab.click(".card .thumb")
    tab.wait_for("document.querySelector('#v-media video')", WAIT, what="the video element")
    hit = served_page.get_json("/api/search?q=a+blue+circle&kind=video")["results"][0]
    assert cards(tab) == [str(served_page.video)]
    src = tab.evaluate("document.querySelector('#v-media video').src")
    assert src.endswith(f"#t={hit['time']:.3f}")
    # Firefox reads the VP9 video through /api/file with Range requests
    tab.wait_for("document.querySelector('#v-media video').readyState >= 1", WAIT,
                 what="the video's metadata loaded")
    assert tab.evaluate("document.querySelector('#v-media video').error") is None
    assert not tab.problems(), tab.problems()


def test_the_log_sees_what_the_csp_blocks(tab, served_page):
    """The control for the other tests' empty logs: an inline script the page's CSP blocks
    is reported, and does not run."""
    tab.navigate(served_page.url + "/")
    assert not tab.problems(), tab.problems()
    tab.evaluate("document.head.append(Object.assign(document.createElement('script'),"
                 " {textContent: 'window.__ran = 1'}))")
    tab.browser.wait_for_log(lambda e: e.get("source", {}).get("context") == tab.context
                             and "Content-Security-Policy" in e.get("text", ""), WAIT,
                             what="report of the blocked script")
    assert tab.evaluate("window.__ran") is None
    assert tab.problems()
