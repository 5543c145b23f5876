"""`itr serve`: the API in-process and over a real socket, the same answers as
`itr search --json`, every security case, a library that changes under the server, and
`--watch` with new, changed, moved and deleted files."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="itr-search[serve] not installed")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx")

from starlette.testclient import TestClient  # noqa: E402

from conftest import main_in_fresh_python, run_itr, write_shapes  # noqa: E402

SPECS = [(c, s, p, i) for i, (c, s, p) in enumerate(
    [(c, s, p) for c in ("red", "blue", "green") for s in ("circle", "square") for p in ("left", "right")]
)]
BASE = "http://127.0.0.1:8765"
#: Bounded waits: polls end there (no test waits on a timing it asserts).
DEADLINE = 90.0
EXTRA = {"id", "thumb", "large", "file", "date", "camera", "lat", "lon", "kind", "duration"}


def _env(mp, root: Path) -> None:
    mp.setenv("HOME", str(root / "home"))
    mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
    mp.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def library(tmp_path_factory, micro_clip):
    """Twelve drawings indexed with the micro CLIP (read only: tests that change a library
    make their own)."""
    root = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as mp:
        _env(mp, root)
        paths = write_shapes(root / "photos", SPECS)
        r = run_itr("index", root / "photos", "--db", root / "lib", "-m", micro_clip, "-q")
        assert r.code == 0, r
    return root / "lib", paths


def small_library(tmp_path: Path, model, specs=SPECS[:4]) -> tuple[Path, list[Path]]:
    paths = write_shapes(tmp_path / "photos", specs)
    r = run_itr("index", tmp_path / "photos", "--db", tmp_path / "lib", "-m", model, "-q")
    assert r.code == 0, r
    return tmp_path / "lib", paths


def make_client(db: Path, **options) -> TestClient:
    from itrcli.serve.app import ServeOptions, create_app

    return TestClient(create_app(ServeOptions(Path(db), **options)), base_url=BASE)


@pytest.fixture
def client(library):
    with make_client(library[0]) as c:
        yield c


def cli_json(db, *args) -> dict:
    r = run_itr("search", *args, "--db", db, "--json")
    assert r.code == 0, r
    return r.json()


def plain(results: list[dict]) -> list[dict]:
    """API hits without the keys the server adds: what itr search --json prints."""
    return [{k: v for k, v in h.items() if k not in EXTRA} for h in results]


def poll(check, what: str, deadline: float = DEADLINE, every: float = 0.2):
    """``check()`` until it returns something true, up to ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"still not {what} after {deadline:.0f} s")
        time.sleep(every)


# --- the search API ---------------------------------------------------------------------------

@pytest.mark.parametrize("http, cli", [
    ({"q": "a red circle"}, ["a red circle"]),
    ({"q": "a blue square on the right", "n": "5"}, ["a blue square on the right", "-n", "5"]),
    ({"q": "green", "n": "4", "offset": "2"}, None),
    ({"q": "a shape", "glob": ["*left*"], "sort": "path"},
     ["a shape", "--glob", "*left*", "--sort", "path"]),
    ({"q": "a circle", "threshold": "0.2", "exact": "1", "n": "20"},
     ["a circle", "--threshold", "0.2", "--exact", "-n", "20"]),
    ({"q": "red", "after": "2000-01-01", "before": "2999-01-01", "kind": "image"},
     ["red", "--after", "2000-01-01", "--before", "2999-01-01", "--kind", "image"]),
    ({"q": "red", "add": "circle", "subtract": "square"},
     ["red", "--add", "circle", "--subtract", "square"]),
    ({"q": "a red circle", "auto_cut": "true", "no_adapt": "1"},
     ["a red circle", "--auto-cut", "--no-adapt"]),
])
def test_the_same_hits_and_scores_as_itr_search_json(client, library, http, cli):
    db = library[0]
    got = client.get("/api/search", params=http)
    assert got.status_code == 200, got.text
    j = got.json()
    if cli is None:  # a page: the CLI's whole list, cut
        want = cli_json(db, http["q"], "-n", "6")
        assert plain(j["results"]) == want["results"][2:6]
        return
    want = cli_json(db, *cli)
    assert {k: j[k] for k in ("query", "model", "adapter")} == \
        {k: want[k] for k in ("query", "model", "adapter")}
    assert plain(j["results"]) == want["results"]
    for h in j["results"]:
        assert h["thumb"].startswith(BASE + f"/api/thumb/{h['id']}") and \
            h["file"] == BASE + f"/api/file/{h['id']}"


def test_pages_by_offset_and_next_token(client):
    whole = client.get("/api/search", params={"q": "a shape", "n": 12}).json()
    got, token, pages = [], None, 0
    while True:
        p = {"q": "a shape", "n": 5, **({"next": token} if token else {})}
        j = client.get("/api/search", params=p).json()
        got += j["results"]
        pages += 1
        token = j["next"]
        assert j["more"] == (token is not None)
        if not token:
            break
    assert pages == 3 and [h["id"] for h in got] == [h["id"] for h in whole["results"]]
    assert [h["rank"] for h in got] == list(range(1, 13))
    r = client.get("/api/search", params={"q": "another query", "n": 5, "next": token or
                                          client.get("/api/search", params={"q": "a shape", "n": 5}).json()["next"]})
    assert r.status_code == 400 and "another query" in r.json()["error"]
    r = client.get("/api/search", params={"q": "a shape", "next": "!!!"})
    assert r.status_code == 400


def test_like_id_is_more_like_a_file_the_library_holds(client, library):
    db, paths = library
    first = client.get("/api/search", params={"q": "a red circle", "n": 1}).json()["results"][0]
    j = client.get("/api/search", params={"like": first["id"], "n": 5}).json()
    want = cli_json(db, first["path"], "-n", "5")
    assert plain(j["results"]) == want["results"] and j["query"] == first["path"]
    assert first["id"] not in [h["id"] for h in j["results"]]  # never the query itself
    r = client.get("/api/search", params={"like": 987654})
    assert r.status_code == 404 and "987654" in r.json()["error"]


def test_search_by_an_uploaded_image(client, library, tmp_path):
    db, _ = library
    [new] = write_shapes(tmp_path / "elsewhere", [("red", "circle", "left", 99)])
    data = new.read_bytes()
    j = client.post("/api/search?n=4", files={"image": ("mine.jpg", data, "image/jpeg")})
    assert j.status_code == 200, j.text
    want = cli_json(db, "--image", new, "-n", "4")
    assert plain(j.json()["results"]) == want["results"] and j.json()["query"] == "mine.jpg"
    raw = client.post("/api/search?n=4", content=data, headers={"content-type": "image/jpeg"})
    assert plain(raw.json()["results"]) == want["results"]
    # not an image: 415 with a message; no field: 400; a text too: 400
    r = client.post("/api/search", files={"image": ("x.jpg", b"GIF89a but not really", "image/gif")})
    assert r.status_code == 415 and r.json()["error"].startswith("not an image")
    r = client.post("/api/search", files={"picture": ("x.jpg", data, "image/jpeg")})
    assert r.status_code == 400
    r = client.post("/api/search?q=red", files={"image": ("x.jpg", data, "image/jpeg")})
    assert r.status_code == 400
    r = client.post("/api/search", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_uploads_are_capped(library, tmp_path):
    [img] = write_shapes(tmp_path / "x", [("red", "circle", "left", 5)], size=256)
    with make_client(library[0], max_upload=2000) as c:
        assert len(img.read_bytes()) > 2000
        r = c.post("/api/search", files={"image": ("big.jpg", img.read_bytes(), "image/jpeg")})
        assert r.status_code == 413 and "2,000" in r.json()["error"]
        r = c.post("/api/search", content=img.read_bytes(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 413
        # the server lives on
        assert c.get("/api/search", params={"q": "red"}).status_code == 200


def test_a_decompression_bomb_is_refused_as_indexing_refuses_it(client):
    import io
    import struct
    import zlib

    # a PNG claiming 40000 x 40000 pixels (over MAX_PIXELS), a few bytes long
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))
    r = client.post("/api/search", files={"image": ("bomb.png", io.BytesIO(png), "image/png")})
    assert r.status_code == 415 and "too large" in r.json()["error"]


@pytest.mark.parametrize("params, needle", [
    ({}, "q=TEXT"),
    ({"q": "  "}, "empty"),
    ({"q": "x", "n": "0"}, "n=0"),
    ({"q": "x", "n": "ten"}, "whole number"),
    ({"q": "x", "n": "100000"}, "n=100000"),
    ({"q": "x", "offset": "-1"}, "offset"),
    ({"q": "x", "after": "yesterday"}, "YYYY-MM-DD"),
    ({"q": "x", "threshold": "nan"}, "finite"),
    ({"q": "x", "exact": "maybe"}, "true or false"),
    ({"q": "x", "kind": "sound"}, "kind"),
    ({"q": "x", "sort": "colour"}, "sort"),
    ({"q": "x", "near": "north"}, "near"),
    ({"q": "x", "min_size": "big"}, "size"),
    ({"q": "x", "bogus": "1"}, "bogus"),
    ({"q": "x", "like": "3"}, "exclude each other"),
    ({"q": "x", "add": "/etc/passwd.jpg"}, "picture"),
    ({"q": "x", "at": "3"}, "like=ID"),
    ({"q": "x", "hash_bits": "64"}, "hash=true"),
    ({"q": "x", "text_only": "1", "no_text": "1"}, "exclude each other"),
    ({"like": "abc"}, "whole number"),
])
def test_malformed_parameters_get_400_and_one_message(client, params, needle):
    r = client.get("/api/search", params=params)
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) == {"error"} and needle in body["error"] and "Traceback" not in r.text
    assert client.get("/api/search", params={"q": "red"}).status_code == 200  # lives on


def test_a_query_naming_a_file_is_a_text_not_a_path(client, library):
    """`itr search FILE` makes an image query of an existing file; over HTTP q stays a text."""
    db, paths = library
    j = client.get("/api/search", params={"q": str(paths[0]), "n": 3}).json()
    assert plain(j["results"]) == cli_json(db, "--text", str(paths[0]), "-n", "3")["results"]


def test_thumbnails_and_files_with_ranges(client, library):
    from PIL import Image
    import io

    db, paths = library
    h = client.get("/api/search", params={"q": "a red circle", "n": 1}).json()["results"][0]
    r = client.get(h["thumb"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert "immutable" in r.headers["cache-control"]  # the URL carries the content hash
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)  # never enlarged
    big = paths[0].parent / "big.jpg"
    assert client.get(f"/api/thumb/{h['id']}", params={"size": 128}).status_code == 200
    assert client.get(f"/api/thumb/{h['id']}", params={"size": 300}).status_code == 400
    assert client.get(f"/api/thumb/{h['id']}", params={"t": "soon"}).status_code == 400
    data = Path(h["path"]).read_bytes()
    r = client.get(h["file"])
    assert r.status_code == 200 and r.content == data and r.headers["accept-ranges"] == "bytes"
    r = client.get(h["file"], headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
    r = client.get(h["file"], headers={"Range": f"bytes={len(data) + 5}-"})
    assert r.status_code == 416
    for path in ("/api/file/424242", "/api/thumb/424242", "/api/item/424242"):
        r = client.get(path)
        assert r.status_code == 404 and "424242" in r.json()["error"]
    assert client.get("/api/file/..%2F..%2Fetc%2Fpasswd").status_code in (400, 404)
    assert client.get("/api/file/-1").status_code == 404
    assert not big.exists()


def test_a_file_gone_since_indexing_is_404(tmp_path, micro_clip):
    db, paths = small_library(tmp_path, micro_clip)
    with make_client(db) as c:
        hits = c.get("/api/search", params={"q": "a shape", "n": 4}).json()["results"]
        gone = hits[0]
        os.remove(gone["path"])
        for url in (gone["file"], f"/api/thumb/{gone['id']}?size=512"):
            r = c.get(url)
            assert r.status_code == 404 and "gone" in r.json()["error"], r.text
        r = c.get("/api/search", params={"like": gone["id"]})
        assert r.status_code == 404 and "gone" in r.json()["error"]
        item = c.get(f"/api/item/{gone['id']}").json()
        assert item["exists"] is False
        # searches skip it, as itr search does
        ids = [h["id"] for h in c.get("/api/search", params={"q": "a shape"}).json()["results"]]
        assert gone["id"] not in ids and len(ids) == 3


def test_item_and_info(client, library):
    db, _ = library
    h = client.get("/api/search", params={"q": "blue", "n": 1}).json()["results"][0]
    item = client.get(f"/api/item/{h['id']}").json()
    assert item["path"] == h["path"] and item["kind"] == "image" and item["exists"]
    assert item["size"] == Path(h["path"]).stat().st_size and item["text"] is None
    info = client.get("/api/info").json()
    want = run_itr("info", "--db", db, "--json").json()
    for k in ("library", "model", "dim", "files", "vectors", "roots", "adapter", "ocr", "storage"):
        assert info[k] == want[k], k
    assert set(want) <= set(info) and info["serve"]["watch"] is None


def test_openapi_and_docs(client):
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/api/search" in spec["paths"]
    names = {p["name"] for p in spec["paths"]["/api/search"]["get"]["parameters"]}
    from itrcli.serve.params import NAMES

    assert NAMES - {"top"} <= names
    r = client.get("/docs")
    assert r.status_code == 200 and "openapi.json" in r.text and "<script src=" in r.text


def test_errors_are_json_and_never_a_traceback(client, monkeypatch):
    from itrcli.library import Library

    def boom(self, *a, **k):
        raise ZeroDivisionError("deliberate")

    monkeypatch.setattr(Library, "search", boom)
    r = client.get("/api/search", params={"q": "red"})
    assert r.status_code == 500 and set(r.json()) == {"error"}
    assert "Traceback" not in r.text and "ZeroDivisionError" in r.json()["error"]
    monkeypatch.undo()
    assert client.get("/api/search", params={"q": "red"}).status_code == 200
    assert client.get("/nowhere").json() == {"error": "no such route: /nowhere"}
    assert client.put("/api/search").status_code == 405


def test_a_missing_or_empty_library_is_503_with_the_reason(tmp_path):
    with make_client(tmp_path / "none") as c:
        r = c.get("/api/search", params={"q": "red"})
        assert r.status_code == 503 and "no library" in r.json()["error"]
        assert c.get("/").status_code == 200  # the page still loads, and says so


# --- clip-retrieval's clip back -------------------------------------------------------------

def test_clip_back_routes(client, library):
    assert client.get("/indices-list").json() == ["lib"]
    api = client.get("/api/search", params={"q": "a red circle", "n": 3}).json()["results"]
    body = {"text": "a red circle", "image": None, "image_url": None, "embedding_input": None,
            "deduplicate": False, "use_safety_model": True, "use_violence_detector": True,
            "indice_name": "lib", "use_mclip": False, "aesthetic_score": 9,
            "aesthetic_weight": 0.5, "modality": "image", "num_images": 3, "num_result_ids": 3}
    r = client.post("/knn-service", content=json.dumps(body))  # ClipClient sends no content type
    assert r.status_code == 200, r.text
    got = r.json()
    assert [(g["id"], g["similarity"], g["url"], g["caption"]) for g in got] == \
        [(h["id"], h["score"], h["file"], h["path"]) for h in api]
    img = base64.b64encode(Path(api[0]["path"]).read_bytes()).decode()
    r = client.post("/knn-service", json={**body, "text": None, "image": img})
    assert r.status_code == 200 and r.json()[0]["id"] == api[0]["id"]  # its own copy first
    assert r.json()[0]["similarity"] > 0.99
    dedup = client.post("/knn-service", json={**body, "num_images": 12, "deduplicate": True}).json()
    assert 1 <= len(dedup) <= 12
    meta = client.post("/metadata", json={"ids": [api[0]["id"], 999999], "indice_name": "lib"}).json()
    assert meta[0]["id"] == api[0]["id"] and meta[0]["metadata"]["caption"] == api[0]["path"]
    assert meta[1] == {"id": 999999, "metadata": {}}
    for bad, status in (({**body, "image_url": "http://example.com/a.jpg", "text": None}, 400),
                        ({**body, "indice_name": "laion5B"}, 400),
                        ({**body, "modality": "text"}, 400),
                        ({**body, "num_images": "many"}, 400),
                        ({**body, "text": None}, 400),
                        ({**body, "text": None, "image": "bm90IGFuIGltYWdl"}, 415)):
        r = client.post("/knn-service", json=bad)
        assert r.status_code == status and "error" in r.json(), (bad, r.text)
    assert client.post("/knn-service", content=b"{not json").status_code == 400


# --- security ---------------------------------------------------------------------------------

def test_binding_beyond_loopback_needs_a_token(library):
    db = library[0]
    for host in ("0.0.0.0", "192.168.1.10", "::"):
        r = run_itr("serve", "--db", db, "--host", host)
        assert r.code == 2 and "--token" in r.err and len(r.err.strip().splitlines()) == 1, r
    r = run_itr("serve", "--db", db, "--host", "0.0.0.0", "--token", "short")
    assert r.code == 2 and "8 characters" in r.err
    r = run_itr("serve", "--db", db.parent / "nothing-here")
    assert r.code == 1 and "no library" in r.err


def test_the_token(library):
    with make_client(library[0], token="s3cret-token") as c:
        r = c.get("/api/search", params={"q": "red"})
        assert r.status_code == 401 and "token" in r.json()["error"]
        assert c.get("/api/info").status_code == 401
        assert c.get("/api/thumb/1").status_code == 401
        assert c.post("/knn-service", json={"text": "red"}).status_code == 401
        r = c.get("/api/search", params={"q": "red"}, headers={"Authorization": "Bearer wrong-token"})
        assert r.status_code == 401
        r = c.get("/api/search", params={"q": "red"}, headers={"Authorization": "Bearer s3cret-token"})
        assert r.status_code == 200
        assert c.get("/").status_code == 200  # the page holds no data; it asks for the token
        assert c.get("/?token=nope", follow_redirects=False).status_code == 401
        r = c.get("/?token=s3cret-token&q=red", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/?q=red"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "itr_token_8765=" in cookie
        # the client keeps the cookie: from now on it is let in
        assert c.get("/api/search", params={"q": "red"}).status_code == 200


def test_host_header_against_dns_rebinding(library):
    with make_client(library[0], allow_hosts=("photos.example.org",)) as c:
        for host, status in (("127.0.0.1:8765", 200), ("localhost:8765", 200), ("[::1]:8765", 200),
                             ("LOCALHOST", 200), ("photos.example.org", 200),
                             ("evil.example.com", 403), ("evil.example.com:8765", 403),
                             ("127.0.0.1.evil.example", 403), ("", 403)):
            r = c.get("/api/search", params={"q": "red"}, headers={"host": host})
            assert r.status_code == status, (host, r.text)
            r = c.get("/", headers={"host": host})
            assert r.status_code == status, host


def test_other_sites_are_refused_and_cors_only_for_its_origin(library):
    with make_client(library[0]) as c:
        r = c.get("/api/search", params={"q": "red"},
                  headers={"sec-fetch-site": "cross-site", "origin": "https://evil.example"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        r = c.get("/api/thumb/1", headers={"sec-fetch-site": "same-site"})
        assert r.status_code == 403
        r = c.get("/", headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"})
        assert r.status_code == 200  # a link to the page
        r = c.get("/api/search", params={"q": "red"}, headers={"sec-fetch-site": "same-origin"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert r.headers["cross-origin-resource-policy"] == "same-origin"
    front = "https://rom1504.github.io"
    with make_client(library[0], cors=front) as c:
        r = c.options("/knn-service", headers={"origin": front, "sec-fetch-site": "cross-site",
                                               "access-control-request-method": "POST"})
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == front
        r = c.post("/knn-service", json={"text": "red", "num_images": 2},
                   headers={"origin": front, "sec-fetch-site": "cross-site"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == front
        r = c.get("/api/search", params={"q": "red"},
                  headers={"origin": "https://evil.example", "sec-fetch-site": "cross-site"})
        assert r.status_code == 403


def test_every_answer_carries_the_security_headers(client):
    for r in (client.get("/"), client.get("/static/app.js"),
              client.get("/api/search", params={"q": "red"}), client.get("/api/search"),
              client.get("/nowhere")):
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/static/nothing.js").status_code == 404


def test_the_page_builds_no_html_from_data():
    """Library strings reach the page through textContent and attributes only."""
    from itrcli.serve.app import STATIC

    for name in ("app.js", "docs.js"):
        js = (STATIC / name).read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                     "new Function"):
            assert sink not in js, (name, sink)
    html = (STATIC / "index.html").read_text()
    import re

    assert "<script>" not in html and not re.search(r"\son[a-z]+\s*=", html)  # no inline code


# --- a library that changes under the server ------------------------------------------------

def test_a_concurrent_index_run_is_seen_by_the_next_search(tmp_path, micro_clip):
    db, paths = small_library(tmp_path, micro_clip)
    with make_client(db) as c:
        assert len(c.get("/api/search", params={"q": "a shape", "n": 20}).json()["results"]) == 4
        write_shapes(tmp_path / "photos", SPECS[4:8])
        r = run_itr("index", tmp_path / "photos", "--db", db, "-q")  # as cron would
        assert r.code == 0, r
        j = c.get("/api/search", params={"q": "a shape", "n": 20}).json()
        assert len(j["results"]) == 8
        assert plain(j["results"]) == cli_json(db, "a shape", "-n", "20")["results"]
        # a reindex swaps in another database file: the server opens it again
        r = run_itr("index", tmp_path / "photos", "--db", db, "--reindex", "-q")
        assert r.code == 0, r
        j = c.get("/api/search", params={"q": "a shape", "n": 20}).json()
        assert plain(j["results"]) == cli_json(db, "a shape", "-n", "20")["results"]
        assert c.get("/api/info").json()["serve"]["reopened"] >= 1


def test_searches_during_commits_see_whole_states(tmp_path, micro_clip):
    """Searches while another writer commits: each answer is one state of the library
    (its hits all exist in it, no error), old or new."""
    db, paths = small_library(tmp_path, micro_clip)
    stop = threading.Event()
    errors: list[str] = []

    def writer():
        n = 0
        while not stop.is_set() and n < 6:
            extra = write_shapes(tmp_path / "photos", [SPECS[4 + n % 8]])
            r = run_itr("index", tmp_path / "photos", "--db", db, "-q")
            if r.code != 0:
                errors.append(r.err)
            if n % 2:
                for p in extra:
                    os.remove(p)
            n += 1

    with make_client(db) as c:
        t = threading.Thread(target=writer)
        t.start()
        try:
            answers = 0
            while t.is_alive() or answers < 5:
                j = c.get("/api/search", params={"q": "a shape", "n": 20})
                assert j.status_code == 200, j.text
                res = j.json()["results"]
                assert [h["rank"] for h in res] == list(range(1, len(res) + 1))
                assert len({h["id"] for h in res}) == len(res) >= 4
                answers += 1
                if answers > 400:
                    break
        finally:
            stop.set()
            t.join(120)
    assert not errors, errors


@pytest.mark.parametrize("kind", ["mapped", "loaded", "compact", "no room"])
def test_a_library_kept_open_follows_commits_without_loading_the_graph_again(
        tmp_path, micro_clip, kind, monkeypatch):
    """Commits between two saves of the graph (an index run saves it every few minutes):
    the mapped file answers with the logged changes beside it, scored exactly, and a
    library kept open follows further commits in place.  A long-lived one (itr serve)
    loads a graph within LOADED_GRAPH_MAX whole and replays the commits into it; past
    that it searches the file's compact copy, built on a thread, with the same delta
    (unless the copy would not fit the memory the system has free: the mapped file)."""
    import numpy as np

    from itrcli.library import Library
    from itrcli.store import vindex
    from itrcli.store.compactgraph import CompactGraph
    from itrcli.store.graphfile import GraphFile
    from itrcli.store.vindex import graph_files

    if kind in ("compact", "no room"):
        monkeypatch.setattr(vindex, "LOADED_GRAPH_MAX", 0)
    if kind == "no room":
        from itrcli.store import compactgraph

        monkeypatch.setattr(compactgraph, "available_memory", lambda: 1)
    db, paths = small_library(tmp_path, micro_clip, SPECS[:6])
    saved = graph_files(db)[0]
    with Library.open(db) as writer, Library.open(db, readonly=True) as reader:
        reader.long_lived = kind != "mapped"
        q = reader.text_encoder().encode_texts(["a red circle"])[0]
        first = reader._search_graph()
        if kind == "loaded":
            assert first.mapped is None and first.index is not None
        else:
            assert isinstance(first.mapped, GraphFile)  # answers at once
        reader.settle_graph()
        assert isinstance(first.mapped, CompactGraph if kind == "compact" else GraphFile) \
            or kind == "loaded"

        def commit(n: int, delete: int | None = None) -> list[int]:
            rng = np.random.default_rng(n)
            ids = []
            with writer.store.transaction() as c:
                for i in range(n):
                    v = q + 0.05 * rng.standard_normal(q.shape).astype(np.float32)
                    p = tmp_path / "photos" / f"extra-{n}-{i}.jpg"
                    shutil.copy(paths[0], p)
                    st = p.stat()
                    ids.append(writer.store.insert_file(c, str(p), {
                        "size": st.st_size, "mtime_ns": st.st_mtime_ns, "hash": f"{n:08x}{i:024x}",
                        "width": 64, "height": 64}, v / np.linalg.norm(v)))
                if delete is not None:
                    writer.store.delete_files(c, [delete])
            return ids

        def exact():
            return [(h.id, h.score) for h in reader.search(text="a red circle", top=8, exact=True)]

        def graph():
            return [(h.id, h.score) for h in reader.search(text="a red circle", top=8)]

        added = commit(3)
        got = graph()
        assert reader._search_graph() is first and first.seq == reader.store.last_seq()
        assert graph_files(db)[0] == saved  # no graph saved: the delta answered
        assert [i for i, _ in got] == [i for i, _ in exact()] and set(added) <= {i for i, _ in got}
        gone = got[0][0]
        more = commit(2, delete=gone)
        got = graph()
        assert reader._search_graph() is first  # followed in place
        assert gone not in [i for i, _ in got] and set(more) <= {i for i, _ in got}
        assert [i for i, _ in got] == [i for i, _ in exact()]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in exact()], atol=1e-4)
        # the writer saves the graph (and removes the file the reader holds) and commits
        # again: the next search maps the new file at once, and a long-lived reader
        # builds its copy anew
        writer.vector_index().save(writer.store.last_seq())
        saved_at = writer.store.last_seq()
        more += commit(1)
        got = graph()
        assert [i for i, _ in got] == [i for i, _ in exact()] and more[-1] in {i for i, _ in got}
        second = reader._search_graph()
        if kind != "loaded":
            assert second is not first and second.file_seq == saved_at
        reader.settle_graph()
        assert isinstance(second.mapped, CompactGraph) or kind != "compact"
        assert graph() == got



def test_a_server_told_to_stop_while_it_builds_the_compact_copy_does_not_wait_for_it(
        tmp_path, micro_clip, monkeypatch):
    """SIGTERM while ``itr serve`` starts on a large graph: the signal handler's
    :meth:`LiveLibrary.interrupt` stops the copy being built, the start-up returns without
    the text tower's first run, and the library still answers from the mapped file."""
    from itrcli.serve.live import LiveLibrary
    from itrcli.store import vindex
    from itrcli.store.compactgraph import CompactGraph
    from itrcli.store.graphfile import GraphFile

    monkeypatch.setattr(vindex, "LOADED_GRAPH_MAX", 0)
    building = threading.Event()
    real = CompactGraph._build

    def held(self, f, dim, cancel):  # a build that lasts until it is told to stop
        building.set()
        assert cancel.wait(30), "the build was never told to stop"
        return real(self, f, dim, cancel)

    monkeypatch.setattr(CompactGraph, "_build", held)
    db, _ = small_library(tmp_path, micro_clip)
    live = LiveLibrary(db)
    warmed = []
    warm = threading.Thread(target=lambda: (live.warm(), warmed.append(1)))
    warm.start()
    assert building.wait(30)
    live.interrupt()
    warm.join(30)
    assert warmed == [1]

    def state(lib):
        return type(lib._search_graph().mapped), lib.knows_text("a photo")

    assert live.call(state) == (GraphFile, False)  # no copy, no warm-up search
    hits = live.call(lambda lib: [h.id for h in lib.search(text="a red circle", top=3)])
    assert len(hits) == 3
    live.close()


# --- a real server ----------------------------------------------------------------------------

def _get(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_real_server_on_a_free_port_answers_then_stops_cleanly(library, sig):
    from support import serving

    db = library[0]
    with serving.start(db) as s:
        assert s.url.startswith("http://127.0.0.1:")
        status, body, _ = _get(s.url + "/api/search?q=a+red+circle&n=3")
        assert status == 200
        assert plain(json.loads(body)["results"]) == cli_json(db, "a red circle", "-n", "3")["results"]
        status, body, headers = _get(s.url + "/")
        assert status == 200 and b'src="/static/app.js"' in body
        assert "content-security-policy" in {k.lower() for k in headers}
        port = s.url.rsplit(":", 1)[1]
        status, body, _ = _get(s.url + "/api/search?q=red", {"Host": f"attacker.example:{port}"})
        assert status == 403
        status, body, _ = _get(s.url + "/api/search?n=nope&q=x")
        assert status == 400 and json.loads(body)["error"]
        code = s.stop(sig)
    assert code == 0, s.stderr
    assert "Traceback" not in s.stderr and "stopped" in s.stderr


def test_a_taken_port_is_one_line_and_exit_1(library):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = run_itr("serve", "--db", library[0], "--port", str(port))
    assert r.code == 1 and "cannot listen" in r.err and len(r.err.strip().splitlines()) == 1, r


def test_nothing_of_the_server_is_imported_by_help_or_search(library):
    heavy = ("fastapi", "starlette", "uvicorn", "watchfiles", "multipart", "anyio",
             "itrcli.serve")
    r = main_in_fresh_python(["--help"], heavy, timeout=60)
    assert "HEAVY []" in r.stderr, r.stderr
    r = main_in_fresh_python(["search", "a red circle", "--db", str(library[0])], heavy)
    assert "HEAVY []" in r.stderr, r.stderr
    r = main_in_fresh_python(["serve", "--help"], heavy + ("torch", "numpy"), timeout=60)
    assert "HEAVY []" in r.stderr, r.stderr


# --- --watch ----------------------------------------------------------------------------------

def _paths(db) -> dict[str, int]:
    from itrcli.library import Library

    with Library.open(db, readonly=True) as lib:
        return {p: i for p, (_, i) in lib.store.shown_paths().items()}


def _row(db, path):
    from itrcli.library import Library

    with Library.open(db, readonly=True) as lib:
        return lib.store.row_by_path(str(path))


def _watcher(db, roots, model, **options):
    from itrcli.serve.watch import WatchOptions, Watcher

    lines: list[str] = []
    w = Watcher(db, WatchOptions([str(r) for r in roots], model=str(model), debounce=0.3,
                                 **options), log=lines.append)
    w.lines = lines
    return w.start()


def test_watch_indexes_new_changed_moved_and_deleted_files(tmp_path, micro_clip):
    photos = tmp_path / "photos"
    first = write_shapes(photos, SPECS[:2])
    db = tmp_path / "lib"
    w = _watcher(db, [photos], micro_clip, exclude=["skip-*"])
    try:
        poll(lambda: w.runs >= 1 and len(_paths(db)) == 2, "indexed at start")
        poll(lambda: w.status()["events"] == "file events", "watching events")
        with make_client(db, watcher=w) as c:
            # new
            (photos / "sub").mkdir()
            [new] = write_shapes(photos / "sub", [SPECS[5]])
            poll(lambda: str(new) in _paths(db), "a new file indexed")
            hits = c.get("/api/search", params={"q": "a shape", "n": 10}).json()["results"]
            assert str(new) in [h["path"] for h in hits]
            assert c.get("/api/info").json()["serve"]["watch"]["runs"] >= 2
            # changed: other content under the same name
            before = _row(db, first[0])
            from support import synth

            synth.draw("green", "square", "right", size=64, seed=7).save(first[0])
            poll(lambda: (_row(db, first[0]) or before)["hash"] != before["hash"], "a change seen")
            # moved: same content, new name, same row (its vector kept)
            moved_id = _paths(db)[str(first[1])]
            target = photos / "sub" / "renamed.jpg"
            os.rename(first[1], target)
            poll(lambda: _paths(db).get(str(target)) == moved_id and str(first[1]) not in _paths(db),
                 "a move followed")
            # a folder moved: everything under it follows
            os.rename(photos / "sub", photos / "moved-folder")
            poll(lambda: all(p.startswith(str(photos / "moved-folder")) for p in _paths(db)
                             if "sub" in p or "moved-folder" in p)
                 and str(photos / "moved-folder" / "renamed.jpg") in _paths(db), "a folder move")
            # excluded names: never indexed (a later file proves a run came after them)
            [skipped] = write_shapes(photos, [SPECS[6]])
            os.rename(skipped, photos / "skip-me.jpg")
            [later] = write_shapes(photos, [SPECS[7]])
            poll(lambda: str(later) in _paths(db), "the later file")
            assert str(photos / "skip-me.jpg") not in _paths(db)
            # deleted
            os.remove(later)
            poll(lambda: str(later) not in _paths(db), "a deletion seen")
            hits = c.get("/api/search", params={"q": "a shape", "n": 10}).json()["results"]
            assert str(later) not in [h["path"] for h in hits]
    finally:
        w.stop()
    assert w.status()["state"] == "stopped" and w.status()["last_error"] is None


def test_watch_falls_back_to_rescans_when_events_fail(tmp_path, micro_clip, monkeypatch):
    """No events (a CIFS mount, an inotify limit reached): the rescans find the changes."""
    import watchfiles

    def no_inotify(*a, **k):
        raise OSError(28, "inotify watch limit reached")
        yield  # a generator, as watchfiles.watch is

    monkeypatch.setattr(watchfiles, "watch", no_inotify)
    photos = tmp_path / "photos"
    write_shapes(photos, SPECS[:1])
    db = tmp_path / "lib"
    w = _watcher(db, [photos], micro_clip, rescan=1.0)
    try:
        poll(lambda: "rescans only" in w.status()["events"], "the fallback said")
        assert "inotify watch limit" in w.status()["events"]
        [new] = write_shapes(photos, [SPECS[3]])
        poll(lambda: str(new) in _paths(db), "a new file found by a rescan")
    finally:
        w.stop()
    assert any("rescanning every 1 s" in line for line in w.lines), w.lines


def test_watch_ignores_the_library_itself_and_excluded_or_hidden_names(tmp_path):
    from itrcli.serve.watch import WatchOptions, Watcher

    photos = tmp_path / "photos"
    (photos / "lib" / "thumbs").mkdir(parents=True)
    w = Watcher(photos / "lib", WatchOptions([str(photos)], exclude=["*.tmp", "raw"]))
    assert w.wanted(str(photos / "a.jpg")) and w.wanted(str(photos / "x" / "b.HEIC"))
    assert w.wanted(str(photos / "a folder"))  # a folder moved or deleted
    for p in ("lib/thumbs/ab/abc-256x256.jpg", "lib/itr.db-wal", "a.jpg.tmp", "raw/c.jpg",
              ".hidden/d.jpg", ".e.jpg", "notes.txt", "photo.xmp"):
        assert not w.wanted(str(photos / p)), p
    assert not w.wanted(str(tmp_path / "elsewhere.jpg"))


def test_the_server_watches_through_the_command_line(tmp_path, micro_clip):
    """`itr serve --watch` in a real process: indexes the folder, serves it, stops with 0."""
    from support import serving

    photos = tmp_path / "photos"
    write_shapes(photos, SPECS[:2])
    db = tmp_path / "lib"
    env = {"HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1"}
    with serving.start(db, "--watch", photos, "-m", micro_clip, env=env) as s:
        def found():
            status, body, _ = _get(s.url + "/api/search?q=a+shape&n=10")
            return status == 200 and len(json.loads(body)["results"]) == 2
        poll(found, "served after the first run")
        [new] = write_shapes(photos, [SPECS[9]])

        def has_new():
            status, body, _ = _get(s.url + "/api/search?q=a+shape&n=10")
            return status == 200 and str(new) in [h["path"] for h in json.loads(body)["results"]]
        poll(has_new, "the new file served")
        code = s.stop(signal.SIGTERM)
    assert code == 0, s.stderr
    assert "Traceback" not in s.stderr


@pytest.mark.parametrize("per_batch", [16, 2])
def test_waiting_text_searches_are_embedded_together_with_the_same_results(library, per_batch,
                                                                           monkeypatch):
    """Under load the texts queued for the library's thread are embedded together (in
    batches of like length): each search still gives the hits and scores of itr search (the
    batch's float rounding is far below the 4 decimals shown).  A search whose text is kept
    leaves the queue to grow into the next batch."""
    import asyncio
    import threading

    import itrcli.library
    from itrcli.query.request import SearchRequest
    from itrcli.serve.live import LiveLibrary

    monkeypatch.setattr(itrcli.library, "PRIME_BATCH", per_batch)
    db = library[0]
    texts = ["warm up", "a red circle", "a blue square", "a green triangle on the left",
             "a yellow star", "a purple cross at the top", "an orange circle"]
    live = LiveLibrary(db)
    gate = threading.Event()
    try:
        live.call(lambda lib: lib.search(text="warm up", top=1))

        async def go():
            blocked = asyncio.ensure_future(live.run(lambda lib: gate.wait(60)))
            await asyncio.sleep(0)  # the library's thread is now held by that job
            runs = [asyncio.ensure_future(live.run(lambda lib, t: lib.search(
                SearchRequest(text=t, top=5)).to_json(), t, text=t)) for t in texts]
            await asyncio.sleep(0.2)
            gate.set()
            await blocked
            return await asyncio.gather(*runs)

        got = asyncio.run(go())
        assert live.batched == len(texts) - 1  # all the others at once ("warm up" is kept)
    finally:
        gate.set()
        live.close()
    for t, res in zip(texts, got):
        alone = cli_json(db, "--text", t, "-n", "5")
        assert [(h["path"], h["score"]) for h in res["results"]] == \
            [(h["path"], h["score"]) for h in alone["results"]], t


@pytest.mark.parametrize("late", [["a yellow star", "a purple cross", "an orange circle"],
                                  ["a yellow star"]], ids=["several", "one"])
def test_texts_that_come_while_a_batch_is_embedded_are_embedded_before_its_searches(
        library, late, monkeypatch):
    """Under load, the texts of searches that reach the server while a batch is being
    embedded are embedded right after it, before any search of the batch runs: they no
    longer wait for that batch's searches and then for a batch of their own.  A single
    late text too."""
    import threading

    from itrcli.library import Library
    from itrcli.query.request import SearchRequest
    from itrcli.serve.live import LiveLibrary

    db = library[0]
    first = ["a red circle", "a blue square", "a green triangle on the left"]
    events: list = []
    live = LiveLibrary(db)
    prime = Library.prime_texts

    def search(lib, t):
        events.append(("search", t))
        return lib.search(SearchRequest(text=t, top=5)).to_json()

    futures = []

    def submit(t):  # as LiveLibrary.run does it, from the event loop
        with live._waiting_lock:
            live._waiting.append(t)
        futures.append(live._pool.submit(live._in_snapshot, search, (t,), t))

    def spy(lib, texts, *a, **k):
        n = prime(lib, texts, *a, **k)
        events.append(("prime", sorted(texts), n))
        if len(events) == 1:  # while the first batch was embedded, others came
            for t in late:
                submit(t)
        return n

    monkeypatch.setattr(Library, "prime_texts", spy)
    gate = threading.Event()
    try:
        live.call(lambda lib: None)  # opened
        held = live._pool.submit(gate.wait, 60)
        for t in first:
            submit(t)
        gate.set()
        held.result(60)
        got = [f.result(60) for f in futures]
    finally:
        gate.set()
        live.close()
    assert events[:2] == [("prime", sorted(first), len(first)),
                          ("prime", sorted(late), len(late))], events
    assert [e[1] for e in events[2:]] == first + late  # the searches, in their order
    assert live.batched == len(first) + len(late)
    for t, res in zip(first + late, got):
        alone = cli_json(db, "--text", t, "-n", "5")
        assert [(h["path"], h["score"]) for h in res["results"]] == \
            [(h["path"], h["score"]) for h in alone["results"]], t


def test_search_by_an_uploaded_camera_raw(client, library, tmp_path):
    """A RAW is told by its name, not its bytes: the upload keeps its extension."""
    pytest.importorskip("rawpy", reason="rawpy (LibRaw) not installed")
    from PIL import Image

    from support.raws import make_dng

    db, _ = library
    [jpg] = write_shapes(tmp_path / "src", [("red", "circle", "left", 99)])
    (tmp_path / "raw").mkdir()
    dng = make_dng(tmp_path / "raw" / "mine.dng", Image.open(jpg).convert("RGB"), preview=None)
    r = client.post("/api/search?n=4", files={"image": ("mine.dng", dng.read_bytes(),
                                                         "image/x-adobe-dng")})
    assert r.status_code == 200, r.text
    want = cli_json(db, "--image", dng, "-n", "4")
    assert plain(r.json()["results"]) == want["results"] and r.json()["query"] == "mine.dng"
    # the same bytes under a name that is no image's: not an image, as before
    r = client.post("/api/search", files={"image": ("mine.bin", dng.read_bytes(), "image/x")})
    assert r.status_code == 415
