"""The compact copy of a graph file (int8 codes, exact scores) finds what the mapped file
finds, in a third of the memory."""

from __future__ import annotations

import os
import sys

import hnswlib
import numpy as np
import pytest

from itrcli.store.compactgraph import CompactGraph, available_memory, copy_size, fits
from itrcli.store.graphfile import GraphFile, GraphFileError

DIM = 24


def clustered(rng, n: int, dim: int = DIM) -> np.ndarray:
    centres = rng.standard_normal((40, dim)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def save_graph(path, x, labels, deleted=()):
    idx = hnswlib.Index(space="cosine", dim=x.shape[1])
    idx.init_index(max_elements=len(x) + 100, ef_construction=100, M=8, random_seed=100)
    idx.add_items(x, labels, num_threads=1)
    for lab in deleted:
        idx.mark_deleted(int(lab))
    idx.save_index(str(path))
    return path


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """3,000 vectors under labels that need both u32 words, 150 marked deleted."""
    rng = np.random.default_rng(11)
    x = clustered(rng, 3000)
    labels = (1 << 33) + 7 * np.arange(3000)
    deleted = labels[rng.choice(3000, 150, replace=False)]
    path = save_graph(tmp_path_factory.mktemp("graph") / "3000.bin", x, labels, deleted)
    queries = clustered(rng, 80) + 0.3 * rng.standard_normal((80, DIM)).astype(np.float32)
    return path, labels, set(deleted.tolist()), x, queries


def exact_top(x, labels, live, q, k):
    s = x @ (q / np.linalg.norm(q))
    s[~live] = -np.inf
    order = np.argsort(-s, kind="stable")[:k]
    return labels[order].tolist(), 1 - s[order]


def test_an_exhaustive_beam_gives_the_exact_answer_and_the_files_own_scores(graph):
    """With the beam as wide as the graph every element is scored, so what comes back is
    the exact top k: the codes only chose what to read again, the scores are the file's."""
    path, labels, deleted, x, queries = graph
    live = ~np.isin(labels, list(deleted))
    c = CompactGraph(path, DIM)
    g = GraphFile(path, DIM)
    for q in queries[:20]:
        want, want_d = exact_top(x, labels, live, q, 10)
        got, dist = c.search(q, 10, 3000)
        assert got.tolist() == want
        np.testing.assert_allclose(dist, want_d, atol=1e-6)
        assert got.tolist() == g.search(q, 10, 3000)[0].tolist()
    c.close()
    c.close()  # twice is harmless


@pytest.mark.parametrize("ef", [20, 60])
def test_a_narrow_beam_finds_what_the_mapped_file_finds(graph, ef):
    """The walk over codes takes hnswlib's path up to the codes' rounding: nearly always
    the same neighbours as the mapped file, as many of the true ones, exact scores."""
    path, labels, deleted, x, queries = graph
    live = ~np.isin(labels, list(deleted))
    c, g = CompactGraph(path, DIM), GraphFile(path, DIM)
    same = found_c = found_g = 0
    for q in queries:
        got, dist = c.search(q, 10, ef)
        ref, ref_d = g.search(q, 10, ef)
        truth = set(exact_top(x, labels, live, q, 10)[0])
        same += got.tolist() == ref.tolist()
        found_c += len(truth & set(got.tolist()))
        found_g += len(truth & set(ref.tolist()))
        # every score is the stored vector's exact cosine distance, nearest first
        rows = (got - (1 << 33)) // 7
        np.testing.assert_allclose(dist, 1 - x[rows] @ (q / np.linalg.norm(q)), atol=1e-6)
        assert (np.diff(dist) >= 0).all()
    assert same >= 0.9 * len(queries)
    assert found_c >= found_g - 0.01 * 10 * len(queries)


def test_deleted_marks_and_filters(graph):
    path, labels, deleted, _, queries = graph
    c = CompactGraph(path, DIM)
    keep = set(labels[::3].tolist())
    for q in queries[:30]:
        got, _ = c.search(q, 10, 40)
        assert len(got) == 10 and not deleted & set(got.tolist())
        got, _ = c.search(q, 10, 40, allowed=keep.__contains__)
        assert len(got) == 10 and set(got.tolist()) <= keep - deleted
    few = set(labels[:3].tolist()) - deleted
    got, _ = c.search(queries[0], 10, 40, allowed=few.__contains__)
    assert set(got.tolist()) == few  # fewer pass than asked for: what there is
    assert c.search(queries[0], 0, 40)[0].tolist() == []


def test_a_third_of_the_file_at_512_dimensions(tmp_path):
    rng = np.random.default_rng(3)
    x = clustered(rng, 1500, 512)
    path = save_graph(tmp_path / "g.bin", x, np.arange(1500))
    c = CompactGraph(path, 512)
    assert c.nbytes < 0.35 * path.stat().st_size
    q = x[7] + 0.01 * rng.standard_normal(512).astype(np.float32)
    assert c.search(q, 3, 64)[0][0] == 7


def test_the_copy_is_the_size_foretold_and_made_only_where_it_fits(graph, monkeypatch):
    from itrcli.store import compactgraph

    path = graph[0]
    g = GraphFile(path, DIM)
    assert copy_size(g) == CompactGraph(path, DIM).nbytes
    free = available_memory()
    assert free is None or free > 0
    monkeypatch.setattr(compactgraph, "available_memory", lambda: 2 * copy_size(g))
    assert fits(g)
    monkeypatch.setattr(compactgraph, "available_memory", lambda: 2 * copy_size(g) - 2)
    assert not fits(g)


def test_damaged_or_short_files(graph, tmp_path):
    path = graph[0]
    raw = path.read_bytes()
    short = tmp_path / "short"
    short.write_bytes(raw[:5000])
    with pytest.raises(GraphFileError, match="truncated"):
        CompactGraph(short, DIM)
    with pytest.raises(GraphFileError, match="cannot read"):
        CompactGraph(tmp_path / "missing.bin", DIM)
    with pytest.raises(GraphFileError, match="24-dimensional vectors, the library 32"):
        CompactGraph(path, 32)
    g = GraphFile(path, DIM)
    bad = bytearray(raw)
    rec = 4 * g._w.shape[1]
    for i in range(g.count):  # every element's first level-0 neighbour points past the end
        bad[96 + i * rec + 4: 96 + i * rec + 8] = (0x7FFFFFF0).to_bytes(4, "little")
    garbled = tmp_path / "garbled"
    garbled.write_bytes(bytes(bad))
    with pytest.raises((IndexError, KeyError)):
        CompactGraph(garbled, DIM).search(graph[4][0], 10, 40)


@pytest.mark.skipif(sys.platform == "win32", reason="an open file cannot be removed there")
def test_a_file_removed_after_the_copy_is_still_read_for_the_exact_scores(graph, tmp_path):
    """A writer that saves a newer graph removes the old file; a search on the copy that
    is still in use reads its scores from the file it holds open."""
    path, labels, deleted, x, queries = graph
    mine = tmp_path / "mine.bin"
    mine.write_bytes(path.read_bytes())
    c = CompactGraph(mine, DIM)
    before = c.search(queries[0], 10, 80)
    os.remove(mine)
    after = c.search(queries[0], 10, 80)
    assert before[0].tolist() == after[0].tolist()
    np.testing.assert_array_equal(before[1], after[1])



def test_a_build_told_to_stop_stops_at_its_next_chunk(graph, monkeypatch):
    """A reader that closes (a server told to stop) does not wait for a copy it will never
    search: the build looks at its ``cancel`` event before each chunk of the file."""
    import threading

    from itrcli.store import compactgraph
    from itrcli.store.compactgraph import BuildCancelled

    path = graph[0]
    told = threading.Event()
    told.set()
    with pytest.raises(BuildCancelled):
        CompactGraph(path, DIM, cancel=told)

    class SetAfterTwoChunks(threading.Event):
        looks = 0

        def is_set(self) -> bool:
            self.looks += 1
            return self.looks > 2

    monkeypatch.setattr(compactgraph, "CHUNK", 500)  # 6 chunks
    part_way = SetAfterTwoChunks()
    with pytest.raises(BuildCancelled):
        CompactGraph(path, DIM, cancel=part_way)
    assert part_way.looks == 3
    assert CompactGraph(path, DIM, cancel=threading.Event()).count == len(graph[1])
