"""One request in, one result out: the CLI and the Python API search through the same
SearchRequest and get the same SearchResult (hits, adapter, cache figures, timings)."""

from __future__ import annotations

import json

import pytest

from conftest import index_shapes
from support import synth

SPECS = [(c, s, p, i) for i, (c, s, p) in enumerate(
    (c, s, p) for c in list(synth.COLORS)[:4] for s in synth.SHAPES[:3] for p in synth.POSITIONS[:2])]


@pytest.fixture(scope="module")
def lib(tmp_path_factory, tiny_clip):
    from conftest import run_itr

    db, _ = index_shapes(run_itr, tmp_path_factory.mktemp("req"), SPECS, tiny_clip)
    return db


def test_the_cli_prints_the_result_the_api_returns(itr, lib):
    from itrcli import Library, SearchRequest, SearchResult

    r = itr("search", "a red circle", "--db", lib, "--json", "-n", "5", "--sort", "path")
    assert r.code == 0, r
    with Library.open(lib, readonly=True) as L:
        got = L.search(SearchRequest(query="a red circle", top=5, sort="path"))
    assert isinstance(got, SearchResult)
    assert json.loads(r.out) == json.loads(json.dumps(got.to_json()))
    assert set(got.timings) >= {"embed", "rank", "total"} and got.timings["total"] > 0
    assert got.adapter is None and got.rerank_cache is None and got.model


def test_keyword_options_build_the_same_request(lib):
    from itrcli import Library, SearchRequest

    with Library.open(lib, readonly=True) as L:
        a = L.search("a blue square", top=4, globs=["*.jpg"])
        b = L.search(SearchRequest(query="a blue square", top=4, globs=("*.jpg",)))
        assert a.request == b.request
        assert [(h.path, h.score) for h in a] == [(h.path, h.score) for h in b]
        assert len(a) == 4 and a[0].rank == 1 and bool(a)


def test_pages_follow_one_another(lib):
    from itrcli import Library, SearchRequest

    with Library.open(lib, readonly=True) as L:
        whole = L.search("a green triangle", top=len(SPECS), exact=True)
        req = SearchRequest(query="a green triangle", top=7, exact=True)
        pages, more = [], True
        while more:
            page = L.search(req)
            pages += page.hits
            more = page.more
            req = req.replace(offset=req.offset + req.top)
    assert not whole.more
    assert [(h.rank, h.path) for h in pages] == [(h.rank, h.path) for h in whole]
    assert [h.rank for h in pages] == list(range(1, len(SPECS) + 1))


@pytest.mark.parametrize("options, message", [
    ({"top": 0}, "--top must be at least 1"),
    ({"offset": -1}, "offset must be at least 0"),
    ({"text_match": "maybe"}, "expected auto, only or none"),
    ({"rerank_k": 0}, "--rerank-k must be at least 1"),
    ({"at": -2.0}, "--at must be at least 0"),
    ({"colour": "red"}, "unknown search option(s): colour"),
])
def test_a_bad_request_is_one_usage_error(options, message):
    from itrcli import SearchRequest
    from itrcli.errors import UsageError

    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SearchRequest.build("a dog", **options)


def test_a_request_is_plain_data():
    from itrcli import SearchRequest

    r = SearchRequest.build("a dog", add=["a ball"], in_dirs=["/x"], top=3)
    assert r.add == ("a ball",) and r.in_dirs == ("/x",)
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d and d["add"] == ["a ball"]
    assert SearchRequest.build(**d) == r
    assert r.label == "a dog" and SearchRequest(image="/p.jpg").label == "/p.jpg"
