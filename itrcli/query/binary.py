"""Cross-modal hashing: short binary codes for Hamming-distance retrieval and near-duplicates.

A :class:`Hasher` maps an embedding (image or text, the same projection for both) to
``bits`` sign bits: ``code = (vector - mean) @ projection >= 0``.  It is learned on the
library's own image vectors:

* ``itq`` (default): PCA to ``bits`` dimensions, then the orthogonal rotation that
  minimises the quantisation error ``||sign(V R) - V R||`` (Gong & Lazebnik, *Iterative
  Quantization*, 2011), found by :data:`ITQ_ITERATIONS` seeded alternating steps.
* ``lsh``: random Gaussian hyperplanes (seeded) through the library's mean.

When ``bits`` exceeds what PCA can give (``bits > dim``, or a library with fewer than
``bits + 1`` distinct vectors), the learned bits are followed by seeded random hyperplanes
(LSH-style fill), so every width works on every library.

Codes are packed big-endian into ``uint64`` words: bit ``i`` is bit ``63 - i % 64`` of word
``i // 64``, so :func:`to_hex` reads like the bit string (``sha256sum``-style lowercase hex)
and unused trailing bits are zero.  Hamming distances are ``XOR`` + popcount over the words
(``np.bitwise_count`` on numpy >= 2, a 16-bit lookup table otherwise).

In a library the fitted hasher and the codes of every vector live in two tables of
``itr.db`` (``hashers``, ``hash_codes``) created on first use.  A hasher is refitted when
the vectors changed since its fit (added, replaced or removed, counted by the store's
vector-log sequence) exceed :data:`REFIT_CHANGE` (20%) of the vectors it was fitted on, or
when the library's model or dimension changed.  Codes are deterministic for a library: the
fit is seeded and reads the vectors in id order.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import sqlite3
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import LibraryError, UsageError

#: Code widths offered by ``itr hash --bits``.  :func:`fit` itself takes any width >= 1.
BIT_CHOICES: tuple[int, ...] = (16, 32, 64, 128, 256)
DEFAULT_BITS = 64
METHODS: tuple[str, ...] = ("itq", "lsh")
DEFAULT_METHOD = "itq"
#: Alternating minimisation steps of ITQ (the paper's choice).
ITQ_ITERATIONS = 50
#: At most this many vectors (a seeded sample, in id order) are used to fit: plenty for a
#: 512-d covariance, and it bounds the fit of a large library (0.4 s at 64 bits, 3 s at
#: 256, 512-d vectors, one core of this project's CPU).
FIT_SAMPLE = 10_000
#: ... of which at most this many learn the ITQ rotation (50 steps of two [m, bits] x
#: [bits, bits] products and a [bits, bits] SVD each): ~20x the 256 unknowns per column.
ITQ_SAMPLE = 5_000
#: Refit when more vectors than this fraction of the fitted count were added, replaced or
#: removed since the fit.  Growth is geometric, so a library is refitted O(log n) times.
REFIT_CHANGE = 0.20
#: ``code_search``: Hamming candidates kept for exact re-ranking: RERANK_FACTOR x top, at
#: least RERANK_MIN.
RERANK_FACTOR = 10
RERANK_MIN = 100
#: ``--dupes``: a candidate pair is confirmed when its cosine similarity is at least this.
#: Resized and recompressed copies of a photo typically score above 0.95 with real CLIP
#: models (the usual cut-off for near-duplicates); on the micro test model they score
#: >= 0.98 (5% crops >= 0.98) and images of different content <= 0.89 (see docs/hash.md).
DUPES_THRESHOLD = 0.95

_CHUNK = 65_536  # rows projected at a time: bounds the float temporaries to ~30 MB


# --- packing, hex and Hamming distance ----------------------------------------------------


def n_words(bits: int) -> int:
    """``uint64`` words per code of ``bits`` bits."""
    return (int(bits) + 63) // 64


def pack(signs: np.ndarray) -> np.ndarray:
    """Pack a boolean matrix ``[n, bits]`` into codes ``[n, words]`` uint64 (bit 0 = MSB)."""
    signs = np.asarray(signs, dtype=bool)
    n, bits = signs.shape
    words = n_words(bits)
    padded = np.zeros((n, words * 64), dtype=bool)
    padded[:, :bits] = signs
    as_bytes = np.packbits(padded, axis=1)  # [n, words * 8] uint8, big-endian bit order
    return as_bytes.view(">u8").astype(np.uint64)  # [n, words], native order


def unpack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`: codes ``[n, words]`` -> booleans ``[n, bits]``."""
    codes = np.atleast_2d(np.asarray(codes, dtype=np.uint64))
    as_bytes = np.ascontiguousarray(codes.astype(">u8")).view(np.uint8)  # [n, words * 8]
    return np.unpackbits(as_bytes, axis=1)[:, :bits].astype(bool)


def to_hex(code_row: np.ndarray, bits: int) -> str:
    """One code ``[words]`` uint64 as lowercase hex, ``ceil(bits / 4)`` digits."""
    row = np.asarray(code_row, dtype=np.uint64).reshape(-1)
    if row.shape[0] != n_words(bits):
        raise ValueError(f"a {bits}-bit code has {n_words(bits)} words, not {row.shape[0]}")
    return row.astype(">u8").tobytes().hex()[: (bits + 3) // 4]


def from_hex(s: str, bits: int) -> np.ndarray:
    """Parse :func:`to_hex` output back into ``[words]`` uint64.

    Raises:
        ValueError: wrong length, not hex, or bits set beyond ``bits``.
    """
    digits = (bits + 3) // 4
    s = s.strip().lower()
    if len(s) != digits:
        raise ValueError(f"a {bits}-bit code is {digits} hex digits, not {len(s)}")
    try:
        raw = bytes.fromhex(s + "0" * (n_words(bits) * 16 - digits))
    except ValueError:
        raise ValueError(f"not a hex code: {s!r}") from None
    row = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
    if bits % 4 and int(s[-1], 16) & ((1 << (4 - bits % 4)) - 1):
        raise ValueError(f"hex code {s!r} has bits set beyond bit {bits}")
    return row


_POPCOUNT16 = np.unpackbits(np.arange(1 << 16, dtype=">u2").view(np.uint8)).reshape(-1, 16).sum(
    axis=1, dtype=np.uint8)  # [65536]: set bits of every 16-bit value (64 KB)
_HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")  # numpy >= 2
_SCAN_ROWS = 65_536  # rows per step of a scan: the temporaries stay in cache


def _popcount_into(x: np.ndarray, out: np.ndarray, add: bool, use_lut: bool) -> None:
    """``out (+)= popcount(x)`` for 1-D uint64 ``x``."""
    if _HAS_BITWISE_COUNT and not use_lut:
        c = np.bitwise_count(x)  # [m] uint8
        if add:
            out += c
        else:
            out[...] = c
        return
    # numpy < 2: a 16-bit lookup table, four lookups per word (each word's 16-bit pieces)
    pieces = x.view(np.uint16).reshape(-1, 4)  # [m, 4]
    for j in range(4):
        if add or j:
            out += _POPCOUNT16[pieces[:, j]]
        else:
            out[...] = _POPCOUNT16[pieces[:, j]]


def _distances(query_code: np.ndarray, codes: np.ndarray, use_lut: bool = False,
               histogram: bool = False):
    """Hamming distances ``[n]``: uint8 up to 255 bits, else uint16.

    With ``histogram``: ``(distances, counts [bits + 1])`` where ``counts[d]`` is how many
    codes lie at distance ``d`` (counted block by block, while the block is in cache).
    """
    q = np.asarray(query_code, dtype=np.uint64).reshape(-1)  # [words]
    codes = np.asarray(codes, dtype=np.uint64)
    if codes.ndim != 2 or codes.shape[1] != q.shape[0]:
        raise ValueError(f"codes {codes.shape} do not match a query of {q.shape[0]} words")
    n, words = codes.shape
    out = np.empty(n, dtype=np.uint8 if words * 64 <= 255 else np.uint16)
    counts = np.zeros(words * 64 + 1, dtype=np.int64)
    # Word by word, in row blocks: XOR of a [n, words] array with a broadcast [words] row
    # is several times slower than 1-D XORs with a scalar, and whole-array temporaries
    # would cost page faults on every query.
    buf = np.empty(min(n, _SCAN_ROWS), dtype=np.uint64)
    for i in range(0, n, _SCAN_ROWS):
        m = min(_SCAN_ROWS, n - i)
        block = out[i : i + m]
        for w in range(words):
            x = np.bitwise_xor(codes[i : i + m, w], q[w], out=buf[:m])
            _popcount_into(x, block, w > 0, use_lut)
        if histogram:
            counts += np.bincount(block, minlength=counts.shape[0])
    return (out, counts) if histogram else out


def hamming(query_code: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hamming distance from one code ``[words]`` to each of ``codes [n, words]``: ``[n]`` int64."""
    return _distances(query_code, codes).astype(np.int64)


def hamming_topk(query_code: np.ndarray, codes: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` codes nearest to ``query_code`` in Hamming distance.

    Returns:
        ``(indices [k] int64, distances [k] int64)`` sorted by (distance, index); fewer than
        ``k`` when there are fewer codes.
    """
    d, counts = _distances(query_code, codes, histogram=True)  # [n], [bits + 1]
    return _topk_small_ints(d, k, counts)


def _topk_small_ints(d: np.ndarray, k: int, counts: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    # Distances are small integers (0..bits), so the k-th smallest comes from a histogram
    # (~1 ms on 10^6 codes, where np.argpartition takes ~10-20 ms: it is slow on keys with
    # so many ties).  Then: every index below the k-th distance, the lowest indices at it,
    # and a stable sort of those k, which gives exactly the order (distance, index).
    n = d.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if k < n:
        if counts is None:
            counts = np.bincount(d)
        kth = int(np.searchsorted(np.cumsum(counts), k))  # the k-th smallest distance
        below = np.flatnonzero(d < kth)
        at = np.flatnonzero(d == kth)[: k - below.shape[0]]
        sel = np.concatenate([below, at])  # [k], in index order
    else:
        sel = np.arange(n)
    order = sel[np.argsort(d[sel], kind="stable")]  # stable: equal distances by index
    return order.astype(np.int64), d[order].astype(np.int64)


# --- fitting ------------------------------------------------------------------------------


@dataclass(eq=False)
class Hasher:
    """A fitted hash: ``codes(v) = pack((v - mean) @ projection >= 0)``.

    Attributes:
        method: ``"itq"`` or ``"lsh"``.
        bits: code length.
        dim: input dimension.
        seed: the seed of the fit (sample, rotation start, random hyperplanes).
        n_fit: vectors it was fitted on (before sampling).
        learned: leading bits learned by PCA+ITQ; the remaining ``bits - learned`` are
            random hyperplanes (all of them for ``lsh``).
        mean: ``[dim]`` float32.
        projection: ``[dim, bits]`` float32.
    """

    method: str
    bits: int
    dim: int
    seed: int
    n_fit: int
    learned: int
    mean: np.ndarray
    projection: np.ndarray

    @property
    def words(self) -> int:
        return n_words(self.bits)

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """Real-valued projections ``[n, bits]`` float32 (their signs are the codes)."""
        x = self._check(vectors)
        return (x - self.mean) @ self.projection

    def codes(self, vectors: np.ndarray) -> np.ndarray:
        """Codes of ``vectors [n, dim]`` (or one ``[dim]`` vector): ``[n, words]`` uint64."""
        x = self._check(vectors)
        out = np.empty((x.shape[0], self.words), dtype=np.uint64)
        for i in range(0, x.shape[0], _CHUNK):
            z = (x[i : i + _CHUNK] - self.mean) @ self.projection  # [chunk, bits]
            out[i : i + _CHUNK] = pack(z >= 0)
        return out

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors of shape {x.shape} for a hasher of dimension {self.dim}")
        return x

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; arrays as base64 float32 little-endian (``projection`` row-major)."""
        return {
            "version": 1,
            "method": self.method,
            "bits": self.bits,
            "dim": self.dim,
            "seed": self.seed,
            "n_fit": self.n_fit,
            "learned": self.learned,
            "mean": _b64(self.mean),
            "projection": _b64(self.projection),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Hasher":
        """Inverse of :meth:`to_dict`."""
        if d.get("version") != 1:
            raise ValueError(f"unknown hasher version {d.get('version')!r}")
        bits, dim = int(d["bits"]), int(d["dim"])
        return cls(
            method=str(d["method"]), bits=bits, dim=dim, seed=int(d["seed"]),
            n_fit=int(d["n_fit"]), learned=int(d["learned"]),
            mean=_unb64(d["mean"], (dim,)), projection=_unb64(d["projection"], (dim, bits)),
        )


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def _unb64(s: str, shape: tuple[int, ...]) -> np.ndarray:
    a = np.frombuffer(base64.b64decode(s), dtype="<f4")
    if a.size != math.prod(shape):
        raise ValueError(f"stored array has {a.size} values, expected {shape}")
    return a.reshape(shape).astype(np.float32)


def fit(vectors: np.ndarray, bits: int, method: str = "itq", seed: int = 0) -> Hasher:
    """Learn a hash of ``bits`` bits on ``vectors [n, dim]`` float32.

    At most :data:`FIT_SAMPLE` rows are used (a seeded sample, kept in row order), and at
    most :data:`ITQ_SAMPLE` of them for the rotation.  ``itq`` learns ``min(bits, rank)``
    bits by PCA + ITQ rotation, where ``rank`` counts the principal components with
    non-negligible variance (at most ``dim`` and ``n - 1``); any remaining bits, and every
    bit of ``lsh``, are seeded random hyperplanes through the mean.  Runs BLAS on one thread.

    Raises:
        ValueError: no vectors, ``bits < 1`` or an unknown method.
    """
    x = np.asarray(vectors, dtype=np.float32)
    _check_fit(bits, method)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need vectors [n, dim] with n >= 1, got shape {x.shape}")
    return fit_rows(x.shape[0], lambda pos: x if len(pos) == len(x) else x[pos], bits, method, seed)


def fit_rows(n: int, read, bits: int, method: str = "itq", seed: int = 0) -> Hasher:
    """:func:`fit` on ``n`` vectors that are read only as far as the fit needs them:
    ``read(positions)`` (sorted row positions) returns their vectors ``[len, dim]``.  The
    same hasher as ``fit(all_vectors, ...)``, without holding all the vectors.

    Raises:
        ValueError: ``n < 1``, ``bits < 1`` or an unknown method.
    """
    _check_fit(bits, method)
    if n < 1:
        raise ValueError("need at least one vector to fit")
    with _one_blas_thread():
        rng = np.random.default_rng(seed)
        pos = np.sort(rng.choice(n, FIT_SAMPLE, replace=False)) if n > FIT_SAMPLE else np.arange(n)
        x = np.asarray(read(pos), dtype=np.float32)
        if x.ndim != 2 or x.shape[0] != len(pos):
            raise ValueError(f"read {len(pos)} rows, got shape {x.shape}")
        return _fit(x, n, int(bits), method, seed, rng)


def _check_fit(bits: int, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown hash method {method!r} (use {', '.join(METHODS)})")
    if int(bits) < 1:
        raise ValueError("bits must be at least 1")


def _fit(x: np.ndarray, n: int, bits: int, method: str, seed: int,
         rng: np.random.Generator) -> Hasher:
    # x: the sample (at most FIT_SAMPLE of the n rows), rng: after drawing it
    dim = x.shape[1]
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)  # [dim]
    xc = x - mean  # [m, dim]; float32 products: 2-3x faster than float64, ample precision
    parts = []
    learned = 0
    if method == "itq":
        pcs = pca(xc, bits).astype(np.float32)  # [dim, c], c <= bits
        learned = pcs.shape[1]
        if learned:
            sub = xc
            if len(xc) > ITQ_SAMPLE:
                sub = xc[np.sort(rng.choice(len(xc), ITQ_SAMPLE, replace=False))]
            v = sub @ pcs  # [min(m, ITQ_SAMPLE), c]
            parts.append(pcs @ itq_rotation(v, ITQ_ITERATIONS, rng).astype(np.float32))
    if bits > learned:
        parts.append(rng.standard_normal((dim, bits - learned)))
    projection = np.concatenate(parts, axis=1)  # [dim, bits]
    return Hasher(method, bits, dim, int(seed), n, learned, mean, projection.astype(np.float32))


@contextmanager
def _one_blas_thread():
    # A fit is mostly small products and SVDs (50 of [bits, bits]), where OpenBLAS threads
    # only add synchronisation, and on a busy CPU (or right after torch, whose threads
    # spin) every synchronisation can cost a time slice: a 48x48 SVD measured 15-70 ms
    # with 2 threads against 0.2-1.7 ms with one.  This is what threadpoolctl does; it is
    # a no-op where numpy does not use OpenBLAS.
    fns = _openblas_threads()
    if fns is None:
        yield
        return
    get, set_ = fns
    before = int(get())
    set_(1)
    try:
        yield
    finally:
        set_(before)


@functools.lru_cache(maxsize=1)
def _openblas_threads():
    import ctypes

    try:
        with open("/proc/self/maps") as f:  # the OpenBLAS that numpy loaded (Linux)
            paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    return get, set_
    return None


def pca(centred: np.ndarray, k: int, rel_tol: float = 1e-5) -> np.ndarray:
    """Top principal directions of centred rows ``[n, dim]``: ``[dim, c]`` float64.

    ``c = min(k, n - 1, components with variance > rel_tol x the largest)``: directions
    without variance would give bits that are rounding noise.  Each direction's sign
    is fixed (largest-magnitude entry positive) so that fits are reproducible.
    """
    xc = np.asarray(centred)
    cov = (xc.T @ xc).astype(np.float64) / max(1, xc.shape[0])  # [dim, dim]
    evals, evecs = np.linalg.eigh(cov)  # ascending
    evals, evecs = evals[::-1], evecs[:, ::-1]
    top = evals[0] if evals.size else 0.0
    c = int(min(k, xc.shape[0] - 1, np.count_nonzero(evals > rel_tol * top))) if top > 0 else 0
    w = evecs[:, :c].copy()
    flip = w[np.abs(w).argmax(axis=0), np.arange(c)] < 0
    w[:, flip] *= -1
    return w


def itq_rotation(v: np.ndarray, iterations: int = ITQ_ITERATIONS,
                 rng: np.random.Generator | int = 0) -> np.ndarray:
    """ITQ: the orthogonal ``R [c, c]`` minimising ``||B - v R||`` over ``B in {-1, 1}``.

    Starts from a random rotation (seeded) and alternates ``B = sign(v R)`` with the
    orthogonal Procrustes solution for ``R`` given ``B``.
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    v = np.asarray(v)
    if v.dtype not in (np.float32, np.float64):
        v = v.astype(np.float64)
    c = v.shape[1]
    r = np.linalg.qr(rng.standard_normal((c, c)))[0].astype(v.dtype)  # [c, c] random orthogonal
    one = v.dtype.type(1)
    for _ in range(iterations):
        b = np.where(v @ r >= 0, one, -one)  # [n, c]
        u, _s, vt = np.linalg.svd((b.T @ v).astype(np.float64))  # B^T V = U S V^T
        r = (vt.T @ u.T).astype(v.dtype)  # argmax_R tr(B^T V R) over orthogonal R
    return r.astype(np.float64)


def quantization_error(projected: np.ndarray) -> float:
    """Mean over rows of ``||sign(z) - z||^2``: what ITQ minimises (lower is better)."""
    z = np.asarray(projected, dtype=np.float64)
    return float(np.mean(np.sum((np.where(z >= 0, 1.0, -1.0) - z) ** 2, axis=1)))


# --- a library's hasher and codes (stored by :mod:`itrcli.store.codes`) ------------------------


@dataclass
class LibraryCodes:
    """A library's hasher and the code of every vector, in id order."""

    hasher: Hasher
    ids: np.ndarray  #: ``[n]`` int64
    codes: np.ndarray  #: ``[n, words]`` uint64

    def lookup(self, ids: Iterable[int]) -> np.ndarray:
        """Row positions of ``ids`` (all must be present)."""
        ids = np.asarray(list(ids), dtype=np.int64)
        pos = np.searchsorted(self.ids, ids)
        pos = np.minimum(pos, max(0, len(self.ids) - 1))
        if len(ids) and (len(self.ids) == 0 or np.any(self.ids[pos] != ids)):
            raise KeyError("ids without a vector in the library")
        return pos


def video_vectors(store, file_ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """The videos among ``file_ids`` and the vector that stands for each as a whole: the
    normalised mean of its frames' vectors (as for a video used as a query).

    Returns:
        (file ids ``[m]`` int64 in the given order, vectors ``[m, dim]`` float32); images,
        and videos without a stored frame vector, are left out.
    """
    ids = list(dict.fromkeys(int(i) for i in file_ids))
    labels = store.frame_labels(ids)
    dim = int(store.get_meta("dim", 0))
    out_ids: list[int] = []
    out: list[np.ndarray] = []
    todo = [(i, labels[i]) for i in ids if i in labels]
    start = 0
    while start < len(todo):  # a chunk of videos with at most _CHUNK frames in all (or one)
        end, n = start, 0
        while end < len(todo) and (end == start or n + len(todo[end][1]) <= _CHUNK):
            n += len(todo[end][1])
            end += 1
        got, vecs = store.vectors([lab for _, labs in todo[start:end] for lab in labs])
        row = {int(lab): r for r, lab in enumerate(got)}
        for fid, labs in todo[start:end]:
            rows = [row[lab] for lab in labs if lab in row]
            if rows:
                m = vecs[rows].mean(axis=0)  # [dim]
                out_ids.append(fid)
                out.append(m / max(float(np.linalg.norm(m)), 1e-12))
        start = end
    mat = np.stack(out).astype(np.float32) if out else np.zeros((0, dim), np.float32)
    return np.asarray(out_ids, dtype=np.int64), mat


def file_codes(store, lc: LibraryCodes, file_ids: Sequence[int]) -> dict[int, np.ndarray]:
    """file id -> code ``[words]``: an image's stored code, a video's the code of
    :func:`video_vectors`; files without a vector (see ``itr check``) are absent."""
    want = np.asarray(list(dict.fromkeys(int(i) for i in file_ids)), dtype=np.int64)
    pos = np.minimum(np.searchsorted(lc.ids, want), max(0, len(lc.ids) - 1))
    have = lc.ids[pos] == want if len(lc.ids) else np.zeros(len(want), bool)
    out = dict(zip(want[have].tolist(), lc.codes[pos[have]]))
    vids, vecs = video_vectors(store, want[~have].tolist())
    out.update(zip(vids.tolist(), lc.hasher.codes(vecs)))
    return out


def check_options(bits: int, method: str) -> None:
    """Raise :class:`UsageError` unless ``bits`` is in :data:`BIT_CHOICES` and ``method`` known."""
    if bits not in BIT_CHOICES:
        raise UsageError(f"--bits {bits}: use one of {', '.join(map(str, BIT_CHOICES))}")
    if method not in METHODS:
        raise UsageError(f"--method {method}: use one of {', '.join(METHODS)}")


def refit_due(n_fit: int, changed: int) -> bool:
    """The refit rule: more than :data:`REFIT_CHANGE` of the fitted count changed since."""
    return changed > REFIT_CHANGE * n_fit


def library_codes(store, bits: int = DEFAULT_BITS, method: str = DEFAULT_METHOD,
                  seed: int = 0) -> LibraryCodes:
    """The library's hasher and codes, fitted or refitted and brought up to date as needed.

    A writable store saves the fit and the codes (only vectors added or changed since the
    last call are coded); a read-only one computes what is missing in memory each time.
    A (re)fit reads the vectors and fits outside any write transaction, so that an index
    run goes on meanwhile; only saving the result, and coding what that run changed since,
    take the write lock.

    Raises:
        LibraryError: the library has no vectors.
        UsageError: bad ``bits`` or ``method``.
    """
    check_options(bits, method)
    model, dim = store.get_meta("model"), store.get_meta("dim")
    if not model or not dim or not store.has_vectors():
        raise LibraryError(
            f"library {store.directory} is empty (run 'itr index PATH' first; the hash is "
            "learned from the library's images)"
        )
    name = f"{method}-{bits}"
    if store.readonly:
        return _sync(store, name, model, int(dim), bits, method, seed, save=False)
    fitted = None
    try:
        fitted = _fit_outside(store, name, model, int(dim), bits, method, seed)
        with ExitStack() as held:
            try:
                held.enter_context(store.writing("itr hash"))
            except LibraryError:
                # another writer holds the lock (an index run), or the library cannot be
                # written here: the codes are a cache, computed in memory and not saved
                return _sync(store, name, model, int(dim), bits, method, seed, save=False,
                             fitted=fitted)
            with store.transaction():  # short: what is left is saving and small updates
                return _sync(store, name, model, int(dim), bits, method, seed, save=True,
                             fitted=fitted)
    except sqlite3.OperationalError as e:
        msg = str(e).replace(" ", "").lower()
        if "locked" in msg:
            raise LibraryError(f"library {store.directory} is busy (another itr is writing); "
                               "try again") from None
        if "readonly" not in msg:
            raise
        # a library on read-only media: code in memory, save nothing
        return _sync(store, name, model, int(dim), bits, method, seed, save=False,
                     fitted=fitted)


@dataclass
class _Fitted:
    """A fit made outside the write transaction, and the codes of every vector, as of one
    read snapshot."""

    hasher: Hasher
    seq: int  #: the vector-log sequence of that snapshot
    ids: np.ndarray  #: ``[n]`` int64
    codes: np.ndarray  #: ``[n, words]`` uint64
    hashes: dict[int, str]  #: each file's content hash then (what the codes are keyed by)


def _saved_hasher(store, name: str, model: str, dim: int, bits: int, method: str, seed: int,
                  seq: int, save: bool):
    """(the saved record or None, its hasher or None when a (re)fit is due)."""
    rec = store.codes.read_hasher(name)
    if rec is None:
        return None, None
    try:
        hasher = Hasher.from_dict(json.loads(rec.params))
    except (ValueError, KeyError, TypeError):
        return rec, None  # damaged or from a future version: fit again
    if (rec.model != model or hasher.dim != dim or hasher.seed != seed
            or hasher.bits != bits or hasher.method != method):
        return rec, None
    # a read-only store keeps using a stale fit: refitting in memory on every search
    # would read every vector each time, and the result could not be saved anyway
    if save and refit_due(hasher.n_fit, seq - rec.seq_fit):
        return rec, None
    return rec, hasher


def _fit_all(store, bits: int, method: str, seed: int):
    """A new hasher fitted on the library's vectors, and the code of every vector:
    (hasher, ids ``[n]``, codes ``[n, words]``).  Streamed: the fit reads its sample, the
    codes are made chunk by chunk, so a million vectors are never all in memory (2 GB as
    float32)."""
    all_ids = store.codes.vector_ids()
    hasher = fit_rows(len(all_ids), lambda pos: store.vectors(all_ids[pos].tolist())[1],
                      bits, method, seed)
    parts = [(cid, hasher.codes(vec)) for cid, vec in store.vector_chunks(_CHUNK)]
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    codes = (np.concatenate([p[1] for p in parts]) if parts
             else np.zeros((0, hasher.words), np.uint64))
    return hasher, ids, codes


def _fit_outside(store, name: str, model: str, dim: int, bits: int, method: str,
                 seed: int) -> _Fitted | None:
    """The (re)fit, when one is due, in one read snapshot and no write transaction (a
    writer goes on meanwhile: WAL); None when the saved fit stands."""
    store.begin_snapshot()
    try:
        seq = store.last_seq()
        if _saved_hasher(store, name, model, dim, bits, method, seed, seq, save=True)[1] is not None:
            return None  # the saved fit stands: what changed is coded in the transaction
        hasher, ids, codes = _fit_all(store, bits, method, seed)
        return _Fitted(hasher, seq, ids, codes, store.codes.content_hashes())
    finally:
        store.end_snapshot()


def _sync(store, name: str, model: str, dim: int, bits: int, method: str, seed: int,
          save: bool, fitted: _Fitted | None = None) -> LibraryCodes:
    """Bring the codes up to date (inside the write transaction when ``save``); ``fitted``:
    a fit made outside it, used when the saved one is still not current."""
    seq = store.last_seq()
    rec, hasher = _saved_hasher(store, name, model, dim, bits, method, seed, seq, save)

    if hasher is None and fitted is not None and (save or fitted.seq == seq):
        hasher = fitted.hasher
        if save:
            store.codes.replace_all(name, model, fitted.seq, json.dumps(hasher.to_dict()),
                                    fitted.ids, fitted.codes, fitted.hashes)
            rec = store.codes.read_hasher(name)
        if fitted.seq == seq:
            return LibraryCodes(hasher, fitted.ids, fitted.codes)
        # vectors were added, changed or removed while fitting: updated below, as the
        # codes are after any index run

    elif hasher is None:  # (re)fit on every vector and code them all
        hasher, ids, codes = _fit_all(store, bits, method, seed)
        if save:
            store.codes.replace_all(name, model, seq, json.dumps(hasher.to_dict()), ids, codes)
        return LibraryCodes(hasher, ids, codes)

    snap = rec.snapshot(hasher.words) if rec.seq_codes == seq else None
    if snap is not None:  # nothing changed since the last sync
        return LibraryCodes(hasher, *snap)

    if save:
        store.codes.drop_stale(name)
    todo = store.codes.uncoded_ids(name)
    parts = [store.vectors(todo[i : i + _CHUNK]) for i in range(0, len(todo), _CHUNK)]
    new_ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    new_codes = (np.concatenate([hasher.codes(p[1]) for p in parts]) if parts
                 else np.zeros((0, hasher.words), np.uint64))
    del parts
    if save:
        store.codes.add_codes(name, new_ids, new_codes)
    ids, codes = store.codes.load_codes(name, hasher.words, valid_only=not save)
    if not save:  # nothing was written: add the missing codes in memory
        ids, codes = _merge(ids, codes, new_ids, new_codes)
    else:
        store.codes.save_snapshot(name, ids, codes, seq)
    return LibraryCodes(hasher, ids, codes)


def _merge(ids, codes, more_ids, more_codes):
    all_ids = np.concatenate([ids, more_ids])
    all_codes = np.concatenate([codes, more_codes])
    order = np.argsort(all_ids, kind="stable")
    return all_ids[order], all_codes[order]


# --- search and near-duplicates -------------------------------------------------------------


def code_search(store, query_vec: np.ndarray, top: int, bits: int = DEFAULT_BITS,
                method: str = DEFAULT_METHOD) -> list[tuple[int, float]]:
    """Fast-then-slow search: Hamming scan over the codes, then exact cosine on the best.

    Keeps the ``max(RERANK_FACTOR * top, RERANK_MIN)`` nearest codes and re-ranks them by
    ``vector @ query_vec``.

    Args:
        store: an open :class:`itrcli.store.db.Store` (writable: codes are saved for next time).
        query_vec: ``[dim]`` float32, L2-normalised (a text or an image embedding).
        top: results wanted.
        bits: code length.
    Returns:
        ``[(id, cosine)]``, best first, ties by id; at most ``top``.
    """
    lc = library_codes(store, bits, method)
    q = np.asarray(query_vec, dtype=np.float32).reshape(-1)  # [dim]
    k = max(RERANK_FACTOR * int(top), RERANK_MIN)
    idx, _d = hamming_topk(lc.hasher.codes(q[None])[0], lc.codes, k)
    ids, mat = store.vectors(lc.ids[idx].tolist())  # [k], [k, dim]
    scores = mat @ q  # [k]
    order = np.lexsort((ids, -scores))[: int(top)]
    return [(int(ids[i]), float(scores[i])) for i in order]


def dupes_radius(bits: int) -> int:
    """Hamming radius for ``--dupes`` candidates: ``bits // 4 + 2`` (6, 10, 18, 34, 66).

    In a simulation with CLIP-like vectors (512-d, power-law spectrum, mean cosine 0.5
    between unrelated images), 99% of pairs at cosine 0.95 lie within this radius under
    ITQ and LSH codes of every width; resized or recompressed copies of the micro test
    model's images (cosine > 0.98) lie within 4 of 64.
    """
    return int(bits) // 4 + 2


def candidate_pairs(codes: np.ndarray, radius: int) -> np.ndarray:
    """Pairs ``(i, j)``, ``i < j``, of codes ``[n, words]`` within ``radius``: ``[p, 2]`` int64."""
    return np.concatenate(list(_pair_blocks(codes, radius)) or [np.zeros((0, 2), np.int64)])


def _pair_blocks(codes: np.ndarray, radius: int):
    # Every pair is compared (blocks of rows against the rows after them, vectorised): about
    # n^2 / 2 XOR + popcounts, ~1 s per 2 x 10^8 pairs of 64-bit codes on 2 cores.
    codes = np.asarray(codes, dtype=np.uint64)
    n, words = codes.shape
    cols = [np.ascontiguousarray(codes[:, w]) for w in range(words)]  # [n] each
    block = max(1, min(4096, (1 << 22) // max(1, n)))  # ~32 MB of XOR per block
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        d = None  # [b, n - i0]: rows i0..i1 against rows i0.. (each pair once)
        for col in cols:
            c = np.bitwise_count(np.bitwise_xor.outer(col[i0:i1], col[i0:])) if _HAS_BITWISE_COUNT \
                else _POPCOUNT16[np.bitwise_xor.outer(col[i0:i1], col[i0:]).view(np.uint16)] \
                .reshape(i1 - i0, n - i0, 4).sum(axis=2, dtype=np.uint8)
            d = c.astype(np.uint16) if d is None else d + c
        ii, jj = np.nonzero(d <= radius)
        keep = jj > ii  # the strict upper triangle: j > i
        yield np.stack([ii[keep] + i0, jj[keep] + i0], axis=1).astype(np.int64)


def dupe_groups(vectors: np.ndarray, codes: np.ndarray, bits: int,
                threshold: float = DUPES_THRESHOLD, radius: int | None = None) -> list[list[int]]:
    """Groups of near-duplicates among rows: connected components of confirmed pairs.

    The exhaustive method, kept as the reference: it compares every pair of codes
    (``n^2 / 2``; over 300 s at 10^6 rows) and holds every vector.
    :func:`itrcli.query.dupes.groups` returns the same groups without either
    (:func:`itrcli.query.dupes.find_dupes` for a library).

    Candidates are pairs within ``radius`` (default :func:`dupes_radius`) in Hamming
    distance, confirmed when ``vectors[i] @ vectors[j] >= threshold``.

    Returns:
        Lists of row indices (each sorted, at least two), sorted by their first index.
    """
    radius = dupes_radius(bits) if radius is None else int(radius)
    v = np.asarray(vectors, dtype=np.float32)
    parent = list(range(v.shape[0]))  # union-find forest over rows

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for pairs in _pair_blocks(codes, radius):
        if not len(pairs):
            continue
        cos = np.einsum("ij,ij->i", v[pairs[:, 0]], v[pairs[:, 1]])  # [p]
        for i, j in pairs[cos >= threshold].tolist():
            ri, rj = root(i), root(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(v.shape[0]):
        groups.setdefault(root(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


__all__ = [
    "BIT_CHOICES", "DEFAULT_BITS", "DEFAULT_METHOD", "DUPES_THRESHOLD", "dupes_radius",
    "Hasher", "LibraryCodes", "METHODS", "candidate_pairs", "dupe_groups",
    "fit", "fit_rows", "from_hex", "hamming", "hamming_topk", "code_search", "itq_rotation",
    "library_codes", "n_words", "pack", "pca", "quantization_error", "refit_due",
    "to_hex", "unpack",
]
