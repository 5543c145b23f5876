"""Binary codes (itrcli.query.binary): packing, Hamming ranking, ITQ, storage, search, dupes."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from itrcli.query import binary
from itrcli.query.dupes import find_dupes
from itrcli.query.binary import (
    Hasher, dupe_groups, fit, from_hex, hamming, hamming_topk, code_search,
    itq_rotation, library_codes, pack, pca, quantization_error, to_hex, unpack,
)
from itrcli.store.db import Store

from conftest import MICRO_CLIP, python_cmd


# --- helpers ----------------------------------------------------------------------------


def clustered(n: int, dim: int, clusters: int = 20, spread: float = 0.35,
              seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres, with a common offset like CLIP's: ``[n, dim]``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim))
    x += 2.0 * rng.standard_normal(dim)  # all vectors share a direction (the mean)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_hamming(a: np.ndarray, b: np.ndarray, bits: int) -> int:
    """Reference: compare bit by bit, as Python ints."""
    n = 0
    for i in range(bits):
        word, shift = divmod(i, 64)
        n += ((int(a[word]) >> (63 - shift)) & 1) != ((int(b[word]) >> (63 - shift)) & 1)
    return n


def fake_library(directory: Path, vectors: np.ndarray, first: int = 0) -> Store:
    """A library holding ``vectors`` as files ``f{i}.jpg`` (no model needed)."""
    store = Store(directory, create=True)
    if not store.get_meta("model"):
        store.set_meta(model="fake-model", dim=int(vectors.shape[1]))
    add_vectors(store, vectors, first)
    return store


def add_vectors(store: Store, vectors: np.ndarray, first: int = 0) -> None:
    with store.transaction() as c:
        for i, v in enumerate(vectors, start=first):
            info = {"size": 1, "mtime_ns": 1, "hash": f"h{i}"}
            store.insert_file(c, str(store.directory / f"f{i}.jpg"), info, v)


# --- packing and hex ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [16, 32, 64, 128, 256, 7, 20, 100])
def test_pack_and_hex_round_trip(bits):
    rng = np.random.default_rng(bits)
    signs = rng.random((6, bits)) < 0.5
    codes = pack(signs)
    assert codes.dtype == np.uint64 and codes.shape == (6, binary.n_words(bits))
    assert np.array_equal(unpack(codes, bits), signs)
    for row, s in zip(codes, signs):
        h = to_hex(row, bits)
        assert len(h) == (bits + 3) // 4 and h == h.lower()
        assert np.array_equal(from_hex(h, bits), row)
        # the hex reads like the bit string, first bit first
        assert int(h, 16) >> (4 * len(h) - bits) == int("".join("1" if b else "0" for b in s), 2)


def test_hex_of_a_known_code():
    assert to_hex(pack(np.array([[True] + [False] * 62 + [True]]))[0], 64) == "8000000000000001"
    assert to_hex(pack(np.array([[True, True, False, True] * 4]))[0], 16) == "dddd"


@pytest.mark.parametrize("s", ["abc", "zzzz", "ddddd"])
def test_from_hex_rejects_bad_codes(s):
    with pytest.raises(ValueError):
        from_hex(s, 16)


# --- Hamming distance and top-k -----------------------------------------------------------


@pytest.mark.parametrize("bits", [16, 64, 100, 256])
def test_hamming_ranking_equals_brute_force(bits):
    rng = np.random.default_rng(bits)
    # few distinct bit patterns: many equal distances, so tie order is exercised
    signs = rng.random((300, bits)) < np.where(rng.random(bits) < 0.8, 0.02, 0.5)
    codes = pack(signs)
    q = codes[7]
    ref = np.array([brute_hamming(q, c, bits) for c in codes])
    assert np.array_equal(hamming(q, codes), ref)
    assert np.array_equal(binary._distances(q, codes, use_lut=True), ref)  # numpy < 2 path
    for k in (1, 10, 299, 300, 1000):
        idx, d = hamming_topk(q, codes, k)
        want = sorted(range(len(codes)), key=lambda i: (ref[i], i))[:k]
        assert idx.tolist() == want
        assert d.tolist() == [ref[i] for i in want]
        assert idx.dtype == np.int64


@pytest.mark.parametrize("bits", [64, 128])
def test_pair_scan_equals_brute_force_with_and_without_bitwise_count(bits, monkeypatch):
    rng = np.random.default_rng(bits)
    codes = pack(rng.random((150, bits)) < np.where(rng.random(bits) < 0.85, 0.03, 0.5))
    want = [(i, j) for i in range(150) for j in range(i + 1, 150)
            if brute_hamming(codes[i], codes[j], bits) <= 5]
    assert want and binary.candidate_pairs(codes, 5).tolist() == [list(p) for p in want]
    monkeypatch.setattr(binary, "_HAS_BITWISE_COUNT", False)  # numpy < 2
    assert binary.candidate_pairs(codes, 5).tolist() == [list(p) for p in want]
    assert np.array_equal(hamming(codes[0], codes),
                          [brute_hamming(codes[0], c, bits) for c in codes])


def test_hamming_topk_of_nothing():
    idx, d = hamming_topk(np.zeros(1, np.uint64), np.zeros((0, 1), np.uint64), 5)
    assert idx.shape == d.shape == (0,)


# --- fitting --------------------------------------------------------------------------------


def test_itq_has_lower_quantisation_error_than_pca_sign():
    x = clustered(2000, 32, seed=1)
    xc = x - x.mean(axis=0)
    v = xc @ pca(xc, 16)  # [n, 16]
    pca_err = quantization_error(v)
    itq_err = quantization_error(v @ itq_rotation(v, 50, 0))
    assert itq_err < 0.98 * pca_err  # 13.09 vs 13.52 here; 22.5 vs 26.8 on the micro model
    # and the fitted hasher's projections are the rotated ones
    h = fit(x, 16)
    assert h.learned == 16
    assert quantization_error(h.project(x)) == pytest.approx(itq_err, rel=1e-3)


def test_fit_is_deterministic_and_serialisable():
    x = clustered(300, 48, seed=2)
    a, b = fit(x, 64), fit(x, 64)
    assert np.array_equal(a.projection, b.projection) and np.array_equal(a.mean, b.mean)
    assert np.array_equal(a.codes(x), b.codes(x))
    c = Hasher.from_dict(json.loads(json.dumps(a.to_dict())))
    assert np.array_equal(c.codes(x), a.codes(x))
    assert not np.array_equal(fit(x, 64, seed=1).codes(x), a.codes(x))


@pytest.mark.parametrize("n, dim, bits", [(5, 8, 64), (1, 8, 16), (40, 16, 256), (100, 32, 16)])
def test_bits_beyond_dim_or_rank_are_filled_with_random_hyperplanes(n, dim, bits):
    x = clustered(n, dim, clusters=3, seed=n)
    h = fit(x, bits)
    assert h.learned <= min(bits, dim, n - 1)
    assert h.projection.shape == (dim, bits)
    codes = h.codes(x)
    assert codes.shape == (n, binary.n_words(bits))
    assert np.array_equal(codes, fit(x, bits).codes(x))


def test_lsh_and_bad_arguments():
    x = clustered(200, 32)
    h = fit(x, 64, "lsh", seed=3)
    assert h.method == "lsh" and h.learned == 0
    assert np.array_equal(h.codes(x), fit(x, 64, "lsh", seed=3).codes(x))
    with pytest.raises(ValueError):
        fit(x, 64, "pq")
    with pytest.raises(ValueError):
        fit(x[:0], 64)
    with pytest.raises(ValueError):
        h.codes(np.zeros((2, 31), np.float32))


def test_texts_and_images_share_the_projection():
    x = clustered(300, 32)
    h = fit(x, 64)
    one = h.codes(x[5])  # a single vector is one row
    assert np.array_equal(one, h.codes(x)[5:6])


# --- near-duplicates (pure) -------------------------------------------------------------------


def test_dupe_groups_are_connected_components_of_confirmed_pairs():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((60, 32)).astype(np.float32)  # 60 unrelated directions
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    near = x[[3, 10, 10]] + 0.02 * rng.standard_normal((3, 32)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    v = np.concatenate([x, near])  # rows 60 ~ 3; 61, 62 ~ 10
    h = fit(v, 64)
    groups = dupe_groups(v, h.codes(v), 64)
    assert groups == [[3, 60], [10, 61, 62]]
    assert dupe_groups(v, h.codes(v), 64, threshold=1.01) == []


# --- a library's codes ------------------------------------------------------------------------


def test_library_codes_are_saved_and_deterministic(tmp_path):
    x = clustered(400, 32)
    s1 = fake_library(tmp_path / "a", x)
    s2 = fake_library(tmp_path / "b", x)
    a, b = library_codes(s1, 64), library_codes(s2, 64)
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.ids, b.ids)
    xs = s1.as_stored(x)  # what the library holds (float16 copies)
    assert np.array_equal(a.codes, fit(xs, 64).codes(xs))
    again = library_codes(s1, 64)  # from the tables, not refitted
    assert np.array_equal(again.codes, a.codes)
    assert s1.conn.execute("SELECT count(*) FROM hash_codes").fetchone()[0] == 400
    s1.close()
    ro = Store(tmp_path / "a", readonly=True)
    assert np.array_equal(library_codes(ro, 64).codes, a.codes)
    ro.close()
    s2.close()


def test_refit_rule_and_incremental_codes(tmp_path):
    x = clustered(1000, 32, seed=5)
    store = fake_library(tmp_path / "lib", x[:500])
    xs = store.as_stored(x)  # what the library holds of each (float16 copies)
    first = library_codes(store, 64)
    assert first.hasher.n_fit == 500
    add_vectors(store, x[500:550], first=500)  # +10%: same fit, new vectors coded
    second = library_codes(store, 64)
    assert second.hasher.n_fit == 500 and len(second.ids) == 550
    assert np.array_equal(second.codes[:500], first.codes)
    assert np.array_equal(second.codes[500:], first.hasher.codes(xs[500:550]))
    # a changed file (new content, new vector) is coded again; a removed one is dropped
    with store.transaction() as c:
        store.update_file(c, int(second.ids[0]), {"hash": "changed"}, x[999])
        store.delete_files(c, [int(second.ids[1])])
    third = library_codes(store, 64)
    assert len(third.ids) == 549 and int(second.ids[1]) not in third.ids.tolist()
    assert np.array_equal(third.codes[0], first.hasher.codes(xs[999])[0])
    # more than 20% changed since the fit: refitted on everything
    add_vectors(store, x[550:700], first=550)
    fourth = library_codes(store, 64)
    assert fourth.hasher.n_fit == 699
    _ids, mat = store.vectors()
    assert np.array_equal(fourth.codes, fit(mat, 64).codes(mat))
    # another width or method is another hasher
    assert library_codes(store, 16, "lsh").codes.shape == (699, 1)
    store.close()


def test_a_fit_holds_no_write_lock_and_codes_what_was_written_meanwhile(tmp_path, monkeypatch):
    """While the ITQ fit runs, an index run can write (it used to wait for the whole fit
    and fail after its 30 s busy timeout); what it added, changed and removed meanwhile is
    coded, or dropped, before the codes are returned and saved."""
    x = clustered(620, 32, seed=9)
    store = fake_library(tmp_path / "lib", x[:500])
    writer = Store(tmp_path / "lib")  # an index run's connection
    writer.conn.execute("PRAGMA busy_timeout = 0")  # fail at once instead of waiting
    real, during = binary.fit_rows, []

    def fit_rows(*args, **kwargs):
        add_vectors(writer, x[500:520], first=500)  # BEGIN IMMEDIATE while fitting
        with writer.transaction() as c:
            writer.update_file(c, 1, {"hash": "changed"}, x[619])
            writer.delete_files(c, [2])
        during.append(writer.last_seq())
        return real(*args, **kwargs)

    monkeypatch.setattr(binary, "fit_rows", fit_rows)
    lc = library_codes(store, 64)
    assert during and lc.hasher.n_fit == 500  # fitted on the snapshot it read
    ids, mat = store.vectors()
    assert len(ids) == 519 and np.array_equal(lc.ids, ids)
    assert np.array_equal(lc.codes, lc.hasher.codes(mat))  # the changed vector coded anew

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted again")

    monkeypatch.setattr(binary, "fit_rows", no_fit)
    again = library_codes(store, 64)  # saved, and current: no fit, no coding
    assert np.array_equal(again.ids, lc.ids) and np.array_equal(again.codes, lc.codes)
    writer.close()
    store.close()


def test_library_codes_errors(tmp_path):
    from itrcli.errors import LibraryError, UsageError

    store = Store(tmp_path / "empty", create=True)
    with pytest.raises(LibraryError, match="empty"):
        library_codes(store, 64)
    with pytest.raises(UsageError):
        library_codes(store, 12)
    with pytest.raises(UsageError):
        library_codes(store, 64, "pq")
    store.close()


def test_hash_search_re_ranks_by_exact_cosine(tmp_path):
    x = clustered(3000, 64, clusters=40, seed=6)
    store = fake_library(tmp_path / "lib", x)
    ids, mat = store.vectors()
    overlap = []
    for qi in range(0, 3000, 150):
        q = mat[qi]
        hits = code_search(store, q, 10)
        exact = ids[np.lexsort((ids, -(mat @ q)))[:10]]
        assert len(hits) == 10 and hits[0][0] == ids[qi]
        scores = [s for _, s in hits]
        assert scores == sorted(scores, reverse=True)
        assert scores[3] == pytest.approx(float(mat[ids.tolist().index(hits[3][0])] @ q))
        overlap.append(len(set(h for h, _ in hits) & set(exact.tolist())) / 10)
    assert np.mean(overlap) >= 0.9
    store.close()
    ro = Store(tmp_path / "lib", readonly=True)  # `itr search` opens the library read-only
    assert code_search(ro, mat[0], 10) == code_search(ro, mat[0], 10)
    assert code_search(ro, mat[0], 10)[0][0] == ids[0]
    ro.close()


# --- with a model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The micro-trained CLIP when present (real similarities), else a random tiny CLIP."""
    if (MICRO_CLIP / "model.safetensors").exists():
        return MICRO_CLIP
    from support import synth

    return synth.make_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


def jpeg(img, quality: int):
    from PIL import Image

    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def write_dupes_set(directory: Path) -> tuple[list[Path], Path, Path]:
    """30 images of different content, plus a resized, recompressed copy of one of them."""
    from PIL import Image

    from support import synth

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (color, shape, pos) in enumerate(synth.combinations()[::5]):
        p = directory / f"{color}-{shape}-{pos}.png"
        synth.draw(color, shape, pos, seed=i).save(p)
        paths.append(p)
    original = paths[7]
    copy = directory / "copy-of-original.jpg"
    img = Image.open(original).convert("RGB")
    img.resize((48, 48), Image.Resampling.BICUBIC).save(copy, "JPEG", quality=60)
    return paths + [copy], original, copy


def test_resized_recompressed_copy_is_in_its_originals_dupes_group(tmp_path, model_dir):
    from itrcli.library import Library

    paths, original, copy = write_dupes_set(tmp_path / "photos")
    with Library.open(tmp_path / "db", create=True) as lib:
        lib.index([str(tmp_path / "photos")], model=str(model_dir), device="cpu")
        known = lib.store.known()
        ids = [known[str(p)].id for p in sorted(paths)]
        groups = find_dupes(lib.store, ids)
        by_id = {known[str(p)].id: p for p in paths}
        named = [sorted(by_id[i] for i in g) for g in groups]
    mine = [g for g in named if original in g]
    assert mine and copy in mine[0]
    if model_dir == MICRO_CLIP:  # a trained model tells different content apart
        assert named == [sorted([original, copy])]


def test_micro_recall_at_10_with_codes_is_close_to_exact(tmp_path):
    if not (MICRO_CLIP / "model.safetensors").exists():
        pytest.skip("tests/fixtures/micro-clip missing (run scripts/train_micro_clip.py): "
                    "a random-weight model has no recall to compare")
    from support import synth
    from itrcli.embed.encoder import Encoder

    enc = Encoder(str(MICRO_CLIP), device="cpu")
    combos = synth.combinations()
    seeds = 4  # 600 images, 4 per caption; re-ranking looks at 100 of them
    images = [synth.draw(*c, seed=2000 + s) for s in range(seeds) for c in combos]
    labels = np.tile(np.arange(len(combos)), seeds)
    pixels = np.stack([enc.prep(img) for img in images])
    x = enc.encode_pixels(pixels)  # [600, dim]
    t = enc.encode_texts(synth.all_captions())  # [150, dim]
    store = fake_library(tmp_path / "lib", x)
    ids, mat = store.vectors()

    def recall(rank) -> float:
        got = [np.isin(rank(q), np.flatnonzero(labels == qi)).sum() / seeds
               for qi, q in enumerate(t)]
        return float(np.mean(got))

    row = {int(i): r for r, i in enumerate(ids)}
    exact = recall(lambda q: np.argsort(-(mat @ q), kind="stable")[:10])
    hashed = recall(lambda q: np.array([row[i] for i, _ in code_search(store, q, 10)]))
    assert exact > 0.5  # the fixture is trained
    assert hashed >= exact - 0.03
    store.close()


# --- the command line -------------------------------------------------------------------------


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*python_cmd(), "hash", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli_codes_json_text_and_dupes(tmp_path, model_dir):
    paths, original, copy = write_dupes_set(tmp_path / "photos")
    db = tmp_path / "db"
    r = run_cli(tmp_path / "photos", "--db", db, "-m", model_dir, "--text", "a red circle")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(paths) + 1
    shown = [line.split("  ", 1) for line in lines]
    assert [p for _, p in shown[:-1]] == sorted(str(p) for p in paths)
    assert shown[-1][1] == "a red circle"
    assert all(len(code) == 16 and int(code, 16) >= 0 for code, _ in shown)
    # already indexed: nothing is embedded again, the stored fit gives the same codes
    r = run_cli(tmp_path / "photos", "--db", db, "--json")
    assert r.returncode == 0, r.stderr
    assert [[d["code"], d["path"]] for d in json.loads(r.stdout)] == shown[:-1]
    r = run_cli(tmp_path / "photos", "--db", db, "--json", "--bits", "128")
    assert all(len(d["code"]) == 32 for d in json.loads(r.stdout))
    r = run_cli("--dupes", tmp_path / "photos", "--db", db, "--json")
    assert r.returncode == 0, r.stderr
    groups = json.loads(r.stdout)
    assert any(str(original) in g and str(copy) in g for g in groups)
    assert all(g == sorted(g) for g in groups) and groups == sorted(groups)
    r = run_cli("--dupes", tmp_path / "photos", "--db", db)
    assert r.stdout == "\n".join("".join(p + "\n" for p in g) for g in groups)


def test_cli_rejects_bad_bits(tmp_path):
    r = run_cli("--text", "x", "--bits", "12", "--db", tmp_path / "db")
    assert r.returncode == 2 and "--bits" in r.stderr
