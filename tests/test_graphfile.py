"""The memory-mapped graph search finds what hnswlib's own search finds."""

from __future__ import annotations

import hnswlib
import numpy as np
import pytest

from itrcli.store.graphfile import GraphFile, GraphFileError

DIM = 24


def clustered(rng, n: int) -> np.ndarray:
    centres = rng.standard_normal((40, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """3,000 vectors under labels that need both u32 words, some marked deleted."""
    rng = np.random.default_rng(7)
    x = clustered(rng, 3000)
    labels = (1 << 33) + 7 * np.arange(3000)
    idx = hnswlib.Index(space="cosine", dim=DIM)
    idx.init_index(max_elements=4000, ef_construction=100, M=8, random_seed=100)
    idx.add_items(x, labels, num_threads=1)
    path = tmp_path_factory.mktemp("graph") / "3000.bin"
    idx.save_index(str(path))
    deleted = labels[rng.choice(3000, 150, replace=False)]
    for lab in deleted:
        idx.mark_deleted(int(lab))
    path_del = path.with_name("deleted.bin")
    idx.save_index(str(path_del))
    queries = clustered(rng, 60) + 0.05 * rng.standard_normal((60, DIM)).astype(np.float32)
    return path, path_del, labels, set(deleted.tolist()), x, queries


def hnswlib_search(path, q, k, ef, allowed=None):
    idx = hnswlib.Index(space="cosine", dim=DIM)
    idx.load_index(str(path))
    idx.set_ef(ef)
    labels, dist = idx.knn_query(q[None], k=k, filter=allowed)
    return labels[0].astype(np.int64).tolist(), dist[0]


@pytest.mark.parametrize("ef", [10, 40, 200])
def test_same_neighbours_as_hnswlib(graph, ef):
    path, _, labels, _, x, queries = graph
    g = GraphFile(path, DIM)
    assert g.count == 3000 and sorted(g.labels.tolist()) == labels.tolist()
    for q in queries:
        got, dist = g.search(q, 10, ef)
        want, want_dist = hnswlib_search(path, q, 10, ef)
        assert got.tolist() == want
        np.testing.assert_allclose(dist, want_dist, atol=1e-5)
    # and the distances are cosine distances of the stored vectors
    q = queries[0] / np.linalg.norm(queries[0])
    got, dist = g.search(queries[0], 5, 200)
    np.testing.assert_allclose(1 - dist, x[(got - (1 << 33)) // 7] @ q, atol=1e-5)


def test_deleted_marks_and_filters_as_hnswlib(graph):
    _, path, labels, deleted, _, queries = graph
    g = GraphFile(path, DIM)
    assert set(labels[g.deleted].tolist()) == deleted
    keep = set(labels[::3].tolist())
    for q in queries[:30]:
        got, _ = g.search(q, 10, 40)
        assert got.tolist() == hnswlib_search(path, q, 10, 40)[0]
        assert not deleted & set(got.tolist())
        got, _ = g.search(q, 10, 40, allowed=keep.__contains__)
        assert got.tolist() == hnswlib_search(path, q, 10, 40, keep.__contains__)[0]
        assert set(got.tolist()) <= keep - deleted
    # fewer elements pass than asked for: it returns what there is, hnswlib raises
    few = set(labels[:3].tolist()) - deleted
    got, _ = g.search(queries[0], 10, 40, allowed=few.__contains__)
    assert set(got.tolist()) <= few


def test_damaged_files_are_refused_or_fail_loudly(graph, tmp_path):
    path = graph[0]
    raw = path.read_bytes()
    for name, data, msg in [("short", raw[:50], "shorter than the header"),
                            ("cut", raw[:-8], "truncated"),
                            ("tail", raw + b"\0\0\0\0\0", "trailing garbage")]:
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(GraphFileError, match=msg):
            GraphFile(p, DIM)
    with pytest.raises(GraphFileError, match="24-dimensional vectors, the library 32"):
        GraphFile(path, 32)
    # a link pointing past the end is not read at open (that would touch every page) but
    # stops a search that reaches it
    g = GraphFile(path, DIM)
    bad = bytearray(raw)
    rec = 4 * g._w.shape[1]
    for i in range(g.count):  # every element's first level-0 neighbour
        bad[96 + i * rec + 4: 96 + i * rec + 8] = (0x7FFFFFF0).to_bytes(4, "little")
    p = tmp_path / "garbled"
    p.write_bytes(bytes(bad))
    g = GraphFile(p, DIM)
    with pytest.raises(GraphFileError, match="link points past"):
        g.validate()
    with pytest.raises((IndexError, KeyError)):
        g.search(graph[5][0], 10, 40)


def naive_upper(raw: bytes, n: int, body_end: int, block: int, maxlevel: int) -> dict[int, int] | str:
    """The upper-layer offsets by visiting every element's size in turn (or the error)."""
    pos, found = body_end, {}
    for elem in range(n):
        if pos + 4 > len(raw):
            return "truncated in the link lists"
        size = int.from_bytes(raw[pos: pos + 4], "little")
        if size:
            if size % block or size // block > maxlevel:
                return "garbled or truncated link lists"
            found[elem] = (pos - body_end) // 4 + 1
        pos += 4 + size
    if pos > len(raw):
        return "truncated in the link lists"
    return found if pos == len(raw) else "trailing garbage"


def test_upper_layers_are_found_as_a_walk_over_every_element_finds_them(graph, tmp_path,
                                                                        monkeypatch):
    path = graph[0]
    raw = path.read_bytes()
    plain: list[bool] = []  # whether the quick proof answered (else the walk did)
    orig = GraphFile._plain_upper
    monkeypatch.setattr(GraphFile, "_plain_upper",
                        lambda self, *a: plain.append(orig(self, *a) is not None) or orig(self, *a))
    g = GraphFile(path, DIM)
    assert plain == [True]
    body_end, block = 96 + g.count * 4 * g._w.shape[1], 4 * g._list_words
    assert g._upper == naive_upper(raw, g.count, body_end, block, g.maxlevel)
    assert len(g._upper) > 100
    rng = np.random.default_rng(3)
    sizes = np.frombuffer(raw, "<u4", offset=body_end)
    words = [int(w) for w in rng.choice(len(sizes), 300, replace=False)]
    words += [g._upper[e] - 1 for e in list(g._upper)[:50]]  # size words themselves
    outcomes = set()
    for i, w in enumerate(words):
        value = [0, block, 2 * block, block + 4, (g.maxlevel + 1) * block, int(rng.integers(1, 3000)),
                 int(sizes[w]) + block][i % 7]
        bad = bytearray(raw)
        bad[body_end + 4 * w: body_end + 4 * w + 4] = value.to_bytes(4, "little")
        p = tmp_path / "damaged.bin"
        p.write_bytes(bytes(bad))
        want = naive_upper(bytes(bad), g.count, body_end, block, g.maxlevel)
        try:
            got = GraphFile(p, DIM)._upper
        except GraphFileError as e:
            got = str(e)
        if isinstance(want, str):
            assert isinstance(got, str) and want in got, (w, value)
        else:
            assert got == want, (w, value)
        outcomes.add(want if isinstance(want, str) else "read")
    assert True in plain[1:] and False in plain[1:]  # both ways were taken
    # files still read and files refused both met ("trailing garbage": the test above)
    assert outcomes == {"read", "garbled or truncated link lists", "truncated in the link lists"}
