"""Near-duplicate groups without comparing all pairs (itrcli.query.dupes): the same groups as
the exhaustive method (binary.dupe_groups), on random and adversarial inputs, through the
library and through `itr hash --dupes`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from itrcli.pools import in_order
from itrcli.query import binary, dupes
from itrcli.query.dupes import find_dupes
from itrcli.query.binary import BIT_CHOICES, dupe_groups, library_codes
from itrcli.store.db import Store


def photo_like(n: int, dim: int, seed: int, clusters: int = 30, copies: float = 0.05,
               latent: int = 12, noise: float = 0.02) -> np.ndarray:
    """Unit vectors in clusters of a low-dimensional subspace plus a little full-dimensional
    noise (like image embeddings), with a share of them replaced by noisy copies of others
    (planted near-duplicates, some copies of copies)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((latent, dim))
    centres = rng.standard_normal((clusters, latent))
    z = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, latent))
    x = z @ basis + 0.5 * rng.standard_normal((n, dim)) + 3.0 * rng.standard_normal(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    k = int(copies * n)
    src, dst = rng.choice(n, k), rng.choice(n, k, replace=False)
    x[dst] = x[src] + noise * rng.standard_normal((k, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def both(vectors: np.ndarray, codes: np.ndarray, bits: int, threshold: float, radius=None):
    """(exhaustive groups, pruned groups)."""
    ref = dupe_groups(vectors, codes, bits, threshold=threshold, radius=radius)
    got = dupes.groups(codes, vectors, bits, threshold=threshold, radius=radius)
    return ref, got


def pair_cosines(v: np.ndarray, n_pairs: int, seed: int) -> np.ndarray:
    """Cosines of random pairs, computed as the exact test computes them."""
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(v), n_pairs), rng.integers(0, len(v), n_pairs)
    keep = i != j
    return np.einsum("ij,ij->i", v[i[keep]], v[j[keep]])


# --- the same groups as the exhaustive method -----------------------------------------------


@pytest.mark.parametrize("bits", BIT_CHOICES)
@pytest.mark.parametrize("method", ["itq", "lsh"])
def test_same_groups_as_exhaustive_for_every_width(bits, method):
    v = photo_like(1500 if bits > 16 else 600, 96, seed=bits)
    codes = binary.fit(v, bits, method).codes(v)
    ref, got = both(v, codes, bits, binary.DUPES_THRESHOLD)
    assert ref, "the planted copies should make groups"
    assert got == ref


@pytest.mark.parametrize("seed", range(4))
def test_same_groups_at_thresholds_and_radii_drawn_at_random(seed):
    rng = np.random.default_rng(100 + seed)
    dim = int(rng.choice([24, 64, 160]))
    v = photo_like(int(rng.integers(300, 1200)), dim, seed=seed, noise=float(rng.choice([0.01, 0.05])))
    bits = int(rng.choice(BIT_CHOICES))
    codes = binary.fit(v, bits, str(rng.choice(binary.METHODS)), seed=seed).codes(v)
    cos = pair_cosines(v, 2000, seed)
    for threshold in (float(rng.uniform(0.5, 0.99)), float(np.quantile(cos, 0.99)),
                      float(cos.max())):
        for radius in (0, int(rng.integers(1, bits // 2 + 1)), bits // 2, None):
            ref, got = both(v, codes, bits, threshold, radius)
            assert got == ref, (threshold, radius)


def test_threshold_equal_to_a_pairs_cosine_keeps_that_pair():
    # pairs right at the threshold: the exact test is the same float32 product
    v = photo_like(800, 64, seed=7, copies=0.1)
    codes = binary.fit(v, 64).codes(v)
    ref = dupe_groups(v, codes, 64)
    a, b = ref[0][0], ref[0][1]
    t = float(np.einsum("ij,ij->i", v[[a]], v[[b]])[0])
    ref, got = both(v, codes, 64, t)
    assert any(a in g for g in ref)
    assert got == ref
    assert both(v, codes, 64, float(np.nextafter(np.float32(t), np.float32(2))))[1] == \
        dupe_groups(v, codes, 64, threshold=float(np.nextafter(np.float32(t), np.float32(2))))


def test_many_identical_codes_and_vectors():
    rng = np.random.default_rng(3)
    v = photo_like(400, 48, seed=3)
    v[100:300] = v[100]  # 200 identical vectors: one group of at least 200
    codes = binary.fit(v, 32).codes(v)
    ref, got = both(v, codes, 32, 0.95)
    assert max(map(len, ref)) >= 200 and got == ref
    same_code = np.zeros_like(codes)  # every code identical: only the cosine decides
    for t in (0.95, 0.5, -1.0):
        assert both(v, same_code, 32, t) == (dupe_groups(v, same_code, 32, threshold=t),) * 2
    assert dupes.groups(same_code[:150], v[:150], 32, threshold=-1.0) == [list(range(150))]
    shuffled = rng.permutation(len(v))
    assert both(v[shuffled], codes[shuffled], 32, 0.95)[1] == \
        dupe_groups(v[shuffled], codes[shuffled], 32, threshold=0.95)


def test_where_nothing_is_pruned_each_step_returns_few_pairs_at_a_time(monkeypatch):
    # threshold -1 and one code for all: every pair passes the bound and the radius, so
    # only the tasks stopping (and going on later) and, for rows compared with all, the
    # tiles bound the pairs held at once; the groups are still the exhaustive ones
    monkeypatch.setattr(dupes, "_COL_TILE", 128)  # tiles of 32 x 32 in the cluster blocks
    monkeypatch.setattr(dupes, "_ROW_TILE", 64)
    monkeypatch.setattr(dupes, "_TASK_PAIRS", 2_000)
    most = {"task": 0, "tile": 0, "resumed": 0}
    real_cluster, real_block = dupes._cluster_block, dupes._block

    def cluster_block(*a):
        i, _, more = out = real_cluster(*a)
        most["task"] = max(most["task"], len(i))
        most["resumed"] += a[-1] > 0
        return out

    def block(*a):
        i, _ = out = real_block(*a)
        most["tile"] = max(most["tile"], len(i))
        return out

    monkeypatch.setattr(dupes, "_cluster_block", cluster_block)
    monkeypatch.setattr(dupes, "_block", block)
    v = photo_like(900, 32, seed=8)
    v[5] = 0  # compared with every row, tile by tile
    same = np.zeros((len(v), 1), dtype=np.uint64)
    ref, got = both(v, same, 64, -1.0)
    assert got == ref and len(ref) == 1
    assert most["resumed"] > 0
    assert 0 < most["task"] <= 2_000 + 32 * 32
    assert 0 < most["tile"] <= 64 * 128


def test_zero_vectors_vectors_off_the_basis_and_unnormalised_ones():
    # rows without a direction in the projection, or far off it, are compared with all
    rng = np.random.default_rng(5)
    v = photo_like(700, 64, seed=5)
    v[10] = 0
    v[11] = 0
    odd = rng.standard_normal(64).astype(np.float32)
    odd -= (v[:200].T @ np.linalg.lstsq(v[:200].T, odd, rcond=None)[0]).astype(np.float32)
    v[20] = v[21] = odd / np.linalg.norm(odd)  # a pair nearly orthogonal to the others
    v[30:60] *= 1.7  # longer than unit: the product, not the cosine, is compared
    codes = binary.fit(v, 64).codes(v)
    for t in (0.95, 0.0, -0.5):
        ref, got = both(v, codes, 64, t)
        assert got == ref, t
    assert any(20 in g and 21 in g for g in dupe_groups(v, codes, 64))


def test_tiny_inputs():
    v = photo_like(50, 16, seed=1)
    codes = binary.fit(v, 16).codes(v)
    for n in (0, 1, 2, 3, 33):
        for t in (0.99, -1.0):
            ref, got = both(v[:n], codes[:n], 16, t)
            assert got == ref
    with pytest.raises(ValueError):
        dupes.groups(codes[:3], v[:4], 16)


def test_groups_do_not_depend_on_the_seed_or_the_chunking():
    v = photo_like(1000, 64, seed=9)
    codes = binary.fit(v, 64).codes(v)
    ref = dupe_groups(v, codes, 64)
    for seed in (1, 2):
        assert dupes.groups(codes, v, 64, seed=seed) == ref
    assert dupes.groups(codes, dupes.ArrayVectors(v, chunk=77), 64) == ref


@pytest.mark.parametrize("threads", [1, 3])
def test_groups_are_the_same_on_one_thread_or_several(threads, monkeypatch):
    # small tasks: many passes and cluster blocks run at once, finishing out of order
    monkeypatch.setattr(dupes, "default_workers", lambda: threads)
    monkeypatch.setattr(dupes, "_PASS_ROWS", 200)
    v = photo_like(1500, 64, seed=21, copies=0.1)
    codes = binary.fit(v, 64).codes(v)
    ref = dupe_groups(v, codes, 64)
    assert len(ref) > 20
    assert dupes.groups(codes, dupes.ArrayVectors(v, chunk=97), 64) == ref


def test_in_order_gives_results_in_order_with_a_bounded_number_in_flight():
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    pulled, running, most = [], [0], [0]
    lock = threading.Lock()

    def items():
        for i in range(40):
            pulled.append(i)
            yield i

    def work(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002 * (i % 3))  # later items often finish first
        with lock:
            running[0] -= 1
        return i * i

    got = []
    with ThreadPoolExecutor(4) as pool:
        for r in in_order(pool, work, items(), ahead=3):
            got.append(r)
            assert len(pulled) <= len(got) + 3  # never more than `ahead` beyond the results
    assert got == [i * i for i in range(40)]
    assert 1 < most[0] <= 3


def test_set_bits_equal_unpacking_every_bit():
    rng = np.random.default_rng(4)
    for n in (1, 7, 8, 9, 1000, 4099):
        for density in (0.0, 0.003, 0.3, 1.0):
            row = np.packbits(rng.random(n) < density)
            want = np.flatnonzero(np.unpackbits(row, count=n))
            got = dupes._set_bits(row)
            assert got.tolist() == want.tolist(), (n, density)


def test_hamming_pairs_equal_the_scan_with_and_without_bitwise_count(monkeypatch):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2**63, (50, 2), dtype=np.int64).astype(np.uint64) * 2 + 1
    i, j = rng.integers(0, 50, 200), rng.integers(0, 50, 200)
    want = [int(binary.hamming(codes[a], codes[[b]])[0]) for a, b in zip(i, j)]
    assert dupes.hamming_pairs(codes, i, j).tolist() == want
    monkeypatch.setattr(dupes, "_HAS_BITWISE_COUNT", False)
    assert dupes.hamming_pairs(codes, i, j).tolist() == want


# --- a library: the store's vectors, never all in memory --------------------------------------


def fake_library(directory: Path, vectors: np.ndarray) -> Store:
    """A library holding ``vectors`` as files ``f{i:05d}.jpg`` that exist (empty), with the
    size and mtime stored, so `itr hash PATH` finds nothing to index (no model needed)."""
    files = directory / "photos"
    files.mkdir(parents=True)
    store = Store(directory / "db", create=True)
    store.set_meta(model="fake-model", dim=int(vectors.shape[1]), text_export_failed="fake-model")
    with store.transaction() as c:
        for i, v in enumerate(vectors):
            p = files / f"f{i:05d}.jpg"
            p.touch()
            st = p.stat()
            store.insert_file(c, str(p), {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                          "hash": f"{i:032x}", "width": 1, "height": 1}, v)
    return store


def test_find_dupes_on_a_library_equals_exhaustive_and_streams(tmp_path, monkeypatch):
    v = photo_like(1200, 64, seed=11)
    store = fake_library(tmp_path, v)
    ids, mat = store.vectors()
    lc = library_codes(store, 64)
    want = [[int(ids[r]) for r in g] for g in dupe_groups(mat, lc.codes, 64)]
    assert want
    # the whole matrix is never asked for: only chunks and id lists
    real = Store.vectors

    def no_full_read(self, ids=None):
        assert ids is not None, "read every vector at once"
        return real(self, ids)

    monkeypatch.setattr(Store, "vectors", no_full_read)
    assert find_dupes(store, ids.tolist()) == want
    # the scan in many chunks, decoded in threads while the next are read
    monkeypatch.setattr(dupes, "_SCAN_CHUNK", 101)
    monkeypatch.setattr(dupes, "default_workers", lambda: 2)
    assert find_dupes(store, ids.tolist()) == want
    # a subset (looked up by id, not scanned) in another order: groups follow that order
    sub = ids[::-1][:400].tolist()
    rows = {int(i): r for r, i in enumerate(ids)}
    sub_rows = [rows[i] for i in sub]
    ref = dupe_groups(mat[sub_rows], lc.codes[sub_rows], 64)
    assert find_dupes(store, sub) == [[sub[r] for r in g] for g in ref]
    # a refit reads a sample and codes chunk by chunk: the same codes as fitting in memory
    h = binary.fit(mat, 32, "itq")
    assert np.array_equal(library_codes(store, 32).codes, h.codes(mat))
    store.close()


def test_cli_dupes_prints_the_exhaustive_groups(tmp_path, itr):
    v = photo_like(900, 48, seed=13, copies=0.08)
    store = fake_library(tmp_path, v)
    ids, mat = store.vectors()
    paths = {int(i): p for i, p in store.conn.execute("SELECT id, path FROM files")}
    store.close()
    db, photos = tmp_path / "db", tmp_path / "photos"
    r = itr("hash", "--dupes", str(photos), "--db", str(db), "--json", "--threshold", "0.97")
    assert r.code == 0, r.err
    s = Store(db, readonly=True)
    codes = library_codes(s, 64).codes
    s.close()
    want = sorted(sorted(paths[int(ids[i])] for i in g)
                  for g in dupe_groups(mat, codes, 64, threshold=0.97))
    assert want and json.loads(r.out) == want
    assert "groups of near-duplicates" in r.err
    r = itr("hash", "--dupes", str(photos), "--db", str(db), "--bits", "16", "--method", "lsh")
    assert r.code == 0, r.err
    s = Store(db, readonly=True)
    codes = library_codes(s, 16, "lsh").codes
    s.close()
    want = sorted(sorted(paths[int(ids[i])] for i in g) for g in dupe_groups(mat, codes, 16))
    assert r.out == "\n".join("".join(p + "\n" for p in g) for g in want)
