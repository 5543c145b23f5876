"""Near-duplicate groups without comparing all pairs, with exactly the exhaustive result.

A pair of rows is *confirmed* when their codes are within the Hamming ``radius`` and
``vectors[i] @ vectors[j] >= threshold``; groups are the connected components of confirmed
pairs.  :func:`itrcli.query.binary.dupe_groups` finds them by comparing every pair of
codes (``n^2 / 2`` XOR + popcounts: over 300 s at a million images).  :func:`groups` finds
the same pairs, hence the same groups, by pruning with bounds that never drop a confirmed
pair:

1. **Why not the codes alone.**  The default radius (``bits // 4 + 2``, 18 of 64) is a
   large ball: about 1/600 of all 64-bit codes, so even *random* codes give ~1,700
   candidates per image at 10^6 images (~10^9 pairs).  Splitting the code into substrings
   (multi-index hashing) cannot shrink that set, only enumerate it; the cosine threshold
   is what is selective, so the pruning works on the vectors.
2. **A low-dimensional bound.**  With ``U`` the top ``PROJ_DIMS`` right singular vectors of
   a sample, each vector ``a = U p_a + r_a`` with ``r_a`` orthogonal to ``U``, so
   ``a . b = p_a . p_b + r_a . r_b <= p~_a . p~_b`` where ``p~ = [p, |r| + c |a|]``:
   one ``PROJ_DIMS + 1``-d product bounds the 512-d one (``c``, from :func:`_slack`,
   covers every float32 rounding, worst case, many times over).
3. **Clusters and the angular triangle inequality.**  Rows are assigned to up to
   ``MAX_CLUSTERS`` spherical k-means centres ``c`` of their ``p`` (seeded on a sample).  If
   ``a . b >= t`` then ``angle(p_a, p_b) <= theta = acos((t - s_A s) / (|p|_A |p|))``
   (``s``, ``|p|``: the largest residual and projection norms, of ``a``'s cluster ``A``
   and of all rows), so ``|angle(p_b, c_A) - angle(p_a, c_A)| <= theta``: a cluster's rows
   are compared only with rows within its widest angle + ``theta`` of its centre, and each
   of those only with the cluster rows whose angle is within ``theta`` of its own.
4. **Blocks.**  For each cluster, its rows against its possible partners: a matrix product
   of ``p~`` (BLAS), kept where the bound reaches the threshold, then the Hamming radius,
   then the exact cosine of the survivors (same vectors, same float32 ``einsum`` as the
   exhaustive method).

Rows without a direction (``p = 0``, e.g. zero vectors) or with a residual far above the
others (``LOOSE_RESIDUAL``) are compared with every row.  Every step is a bound or an exact test, so
the groups equal the exhaustive ones for any data; the pruning only decides the speed
(clustered data such as photo embeddings prune well; with ``threshold <= 0`` nothing is
pruned and every pair is compared, in the low-dimensional product).

Vectors come from a :class:`Vectors` source read twice in chunks (a sample, then every row
once), so a million 512-d vectors need ``n x (PROJ_DIMS + 1)`` float32 (260 MB), not 2 GB.

The work runs on the CPUs (:func:`itrcli.progress.default_workers` threads, at most 4, one
BLAS thread each; numpy and BLAS release the GIL): projecting each chunk and assigning its rows
to their clusters while the next is read, the pass of every row against the centres for
the partners, and the cluster blocks, in tasks of at most ``_TASK_PAIRS`` bounds a few
tasks ahead of the exact test of their pairs, which reads vectors in the calling thread.
The result does not depend on the number of threads.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Iterator, Protocol, Sequence

import numpy as np

from ..pools import in_order
from ..progress import default_workers
from .binary import (DEFAULT_BITS, DEFAULT_METHOD, DUPES_THRESHOLD, _HAS_BITWISE_COUNT,
                      _POPCOUNT16, _one_blas_thread, dupes_radius, library_codes,
                      video_vectors)

#: Dimensions of the projection that bounds the cosine (plus one column for the residual).
PROJ_DIMS = 63
#: Rows sampled (seeded) for the projection basis and the centres.
SAMPLE = 30_000
#: Clusters: ``K = min(MAX_CLUSTERS, n // ROWS_PER_CLUSTER)``, at least one.
MAX_CLUSTERS = 2048
ROWS_PER_CLUSTER = 32
KMEANS_ITERATIONS = 4
#: Angles (radians) are widened by this: a float32 cosine of unit 64-d vectors is off by
#: at most ~4e-6, which near 1 moves its angle by up to ``sqrt(2 x 4e-6) ~ 3e-3``; two
#: such angles enter each test.
ANGLE_SLACK = 1e-2
#: Rows whose residual bound exceeds this many times the median (plus 5% of the vector)
#: are compared with every row, so that a few odd vectors (orthogonal to the basis) do not
#: loosen every bound; rows a little off the basis (noisy copies) stay in clusters.
LOOSE_RESIDUAL = 4.0
#: Rows that fit the projection basis (a sample of the sample suffices).
BASIS_SAMPLE = 10_000

_ROW_TILE = 1024
_COL_TILE = 8192
_CHUNK = 65_536
_SCAN_CHUNK = 16_384  # rows per chunk of a scan decoded in threads (a few held at once)
_PASS_ROWS = 16_384  # rows per product with all centres, all threads together: [K, rows] float32 <= 128 MB
#: Candidate pairs verified at a time (their vectors are fetched: <= 2 x this many rows).
_VERIFY = 32_768
#: Pairs after which a task of the cluster blocks (at most ``_COL_TILE // 4`` rows of a
#: cluster against its partners) stops, to go on later: it returns at most this many plus
#: one tile's (16 bytes each), a few tasks in flight.
_TASK_PAIRS = 1 << 22


class Vectors(Protocol):
    """Where :func:`groups` reads the vectors of rows ``0..n-1``."""

    n: int
    dim: int

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows [m] int64, vectors [m, dim] float32)``, every row exactly once."""
        ...

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Vectors of ``rows`` (sorted, distinct) ``[len(rows), dim]`` float32, in that order."""
        ...


class ArrayVectors:
    """A :class:`Vectors` over an in-memory matrix ``[n, dim]``."""

    def __init__(self, vectors: np.ndarray, chunk: int = _CHUNK) -> None:
        self.v = np.asarray(vectors, dtype=np.float32)
        if self.v.ndim != 2:
            raise ValueError(f"vectors must be [n, dim], got shape {self.v.shape}")
        self.n, self.dim = self.v.shape
        self._chunk = max(1, int(chunk))

    def chunks(self):
        for i in range(0, self.n, self._chunk):
            j = min(self.n, i + self._chunk)
            yield np.arange(i, j, dtype=np.int64), self.v[i:j]

    def rows(self, rows: np.ndarray) -> np.ndarray:
        return self.v[np.asarray(rows, dtype=np.int64)]


class StoreVectors:
    """A :class:`Vectors` over library vectors ``ids`` (row ``r`` is ``ids[r]``), read through
    the store's own methods (never decoding its blobs here)."""

    def __init__(self, store, ids: np.ndarray, total: int | None = None, threads: int = 1) -> None:
        self.store = store
        self.threads = threads  # decoding the scan's chunks (Store.vector_chunks)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.n = len(self.ids)
        self.dim = int(store.get_meta("dim", 0))
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[self._order]
        # a scan of every stored vector is cheaper than id look-ups once the rows are a
        # good part of the library
        self._scan = total is not None and self.n * 4 >= total

    def chunks(self):
        if self._scan:
            for cid, vec in self.store.vector_chunks(_SCAN_CHUNK, self.threads):
                k = np.minimum(np.searchsorted(self._sorted, cid), max(0, self.n - 1))
                hit = self._sorted[k] == cid
                if hit.any():
                    yield self._order[k[hit]], vec[hit]
            return
        for i in range(0, self.n, _CHUNK):
            rows = self._order[i : i + _CHUNK]
            got_ids, vec = self.store.vectors(self.ids[rows].tolist())
            yield self._rows_of(got_ids), vec

    def rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for i in range(0, len(rows), _CHUNK):
            part = rows[i : i + _CHUNK]
            got_ids, vec = self.store.vectors(self.ids[part].tolist())  # in id order
            pos = np.searchsorted(got_ids, self.ids[part])
            if len(got_ids) != len(np.unique(self.ids[part])):
                raise KeyError("rows without a stored vector")
            out[i : i + len(part)] = vec[pos]
        return out

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        k = np.searchsorted(self._sorted, ids)
        return self._order[k]


class StackedVectors:
    """A :class:`Vectors` of two sources: rows ``0..a.n-1`` are ``a``'s, the next ``b``'s."""

    def __init__(self, a: "Vectors", b: "Vectors") -> None:
        self.a, self.b = a, b
        self.n, self.dim = a.n + b.n, max(a.dim, b.dim)

    def chunks(self):
        yield from self.a.chunks()
        for rows, vec in self.b.chunks():
            yield rows + self.a.n, vec

    def rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        k = int(np.searchsorted(rows, self.a.n))  # rows are sorted
        return np.concatenate([self.a.rows(rows[:k]), self.b.rows(rows[k:] - self.a.n)])


def confirmed(va: np.ndarray, vb: np.ndarray, threshold: float) -> np.ndarray:
    """The exact test of a candidate pair: ``va[k] @ vb[k] >= threshold`` in float32, as a
    mask ``[p]``.  The exhaustive method and :func:`groups` both use it, so the two agree
    to the last bit on pairs right at the threshold."""
    return np.einsum("ij,ij->i", va, vb) >= threshold


def hamming_pairs(codes: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Hamming distances of code pairs ``(codes[i[k]], codes[j[k]])``: ``[p]`` int64."""
    d = np.zeros(len(i), dtype=np.int64)
    for w in range(codes.shape[1]):
        x = np.bitwise_xor(codes[i, w], codes[j, w])
        if _HAS_BITWISE_COUNT:
            d += np.bitwise_count(x)
        else:
            d += _POPCOUNT16[x.view(np.uint16).reshape(-1, 4)].sum(axis=1, dtype=np.int64)
    return d


def groups(codes: np.ndarray, vectors: "Vectors | np.ndarray", bits: int,
           threshold: float = DUPES_THRESHOLD, radius: int | None = None,
           seed: int = 0) -> list[list[int]]:
    """Near-duplicate groups among rows, exactly those of the exhaustive method
    (:func:`itrcli.query.binary.dupe_groups`), found by pruning (see the module docstring).

    Args:
        codes: ``[n, words]`` uint64, the rows' codes.
        vectors: a :class:`Vectors` source, or an array ``[n, dim]``.
        bits: code length (for the default radius).
        threshold: a pair is confirmed when ``vectors[i] @ vectors[j] >= threshold``.
        radius: Hamming radius of candidates (default :func:`dupes_radius`).
        seed: seed of the sample and the centres (the groups do not depend on it).
    Returns:
        Lists of row indices (each sorted, at least two), sorted by their first index.
    """
    src = ArrayVectors(vectors) if isinstance(vectors, np.ndarray) else vectors
    codes = np.ascontiguousarray(codes, dtype=np.uint64)
    n = src.n
    if codes.ndim != 2 or codes.shape[0] != n:
        raise ValueError(f"codes {codes.shape} do not match {n} vectors")
    radius = dupes_radius(bits) if radius is None else int(radius)
    t = float(threshold)
    if n < 2:
        return []
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, min(n, SAMPLE), replace=False))
    xs = src.rows(sample)  # [m, dim]
    k = min(PROJ_DIMS, src.dim)
    slack = _slack(src.dim, k)
    k_clusters = max(1, min(MAX_CLUSTERS, n // ROWS_PER_CLUSTER))
    threads = default_workers()
    # one BLAS thread per thread of ours: the basis, the centres and the blocks are small
    # products and an eigensolver, where BLAS threads only add synchronisation (on a busy
    # CPU each can cost a time slice; see hashing._one_blas_thread)
    with _one_blas_thread(), ThreadPoolExecutor(threads, thread_name_prefix="itr-dupes") as pool:
        basis = _basis(xs[:: max(1, len(xs) // BASIS_SAMPLE)], k)  # [dim, k]
        ps = _project(xs, basis, slack)
        centres = _spherical_kmeans(ps[:, :-1], k_clusters, rng, pool, threads)  # [K, k]
        del xs, ps
        return _groups(codes, src, basis, slack, centres, t, radius, pool, threads)


def _groups(codes: np.ndarray, src: "Vectors", basis: np.ndarray, slack: float,
            centres: np.ndarray, t: float, radius: int, pool: Executor, threads: int) -> list[list[int]]:
    """:func:`groups` once the basis and the centres are drawn; ``pool`` runs the passes
    over every row and the cluster blocks."""
    n, k = src.n, basis.shape[1]
    pt = np.empty((n, k + 1), dtype=np.float32)  # every row's bound vector p~
    xnorm = np.empty(n, dtype=np.float32)
    # each row's cluster (nearest centre) and its angle to the centre
    label = np.empty(n, dtype=np.int64)
    angle = np.empty(n, dtype=np.float32)
    step = _pass_rows(threads)

    def project(chunk: tuple[np.ndarray, np.ndarray]) -> int:
        rows, x = chunk
        norms = np.empty(len(rows), dtype=np.float32)
        q = _project(x, basis, slack, norms)
        pt[rows] = q
        xnorm[rows] = norms
        for i in range(0, len(rows), step):
            label[rows[i : i + step]], angle[rows[i : i + step]] = _assign(q[i : i + step, :-1], centres)
        return len(rows)

    seen = sum(in_order(pool, project, src.chunks(), threads))  # reading beside projecting
    if seen != n:
        raise ValueError(f"the vector source gave {seen} rows, not {n}")
    pnorm = np.linalg.norm(pt[:, :-1], axis=1)
    res = pt[:, -1]
    # rows with no direction, or a residual far above the rest (that would loosen every
    # cluster's bound), are compared with every row instead
    loose = ~(pnorm > 0) | ~(res <= LOOSE_RESIDUAL * float(np.median(res)) + 0.05 * xnorm)
    tight = ~loose
    s_all = float(res[tight].max()) if tight.any() else 0.0
    p_all = float(pnorm[tight].max()) if tight.any() else 0.0

    label[loose] = -1
    k_clusters = len(centres)
    order = np.argsort(label, kind="stable")
    bounds = np.searchsorted(label[order], np.arange(-1, k_clusters + 1))
    loose_rows = order[bounds[0] : bounds[1]]
    members = [order[bounds[c + 1] : bounds[c + 2]] for c in range(k_clusters)]
    # cluster c's partners: rows within (its widest angle + theta_c) of its centre
    thetas = np.full(k_clusters, math.pi)
    kappa = np.full(k_clusters, np.inf, dtype=np.float32)
    for c, m in enumerate(members):
        if len(m):
            thetas[c] = _theta(t, float(res[m].max()), s_all, float(pnorm[m].max()), p_all)
            kappa[c] = _kappa(float(angle[m].max()) + thetas[c])
    partners = _partner_bits(pt[:, :-1], tight, centres, kappa, pool, threads)  # [K, ceil(n / 8)]

    def tasks() -> Iterator[tuple[int, np.ndarray, int]]:
        """A cluster's rows (at most ``_COL_TILE // 4``, by their angle to the centre: most
        clusters are one task) against its partners, from the first partner on."""
        for c, m in enumerate(members):
            if len(m):
                m = m[np.argsort(angle[m], kind="stable")]
                for r in range(0, len(m), _COL_TILE // 4):
                    yield c, m[r : r + _COL_TILE // 4], 0

    def cluster_pairs(task: tuple[int, np.ndarray, int]):
        c, rows, start = task
        return (task, *_cluster_block(pt, pnorm, centres[c], rows, angle[rows], _set_bits(partners[c]),
                                      thetas[c], t, codes, radius, start))

    uf = _UnionFind(n)
    pending = _Pending(src, t, uf)  # the exact test reads vectors: in this thread only
    for a in range(0, len(loose_rows), _ROW_TILE):  # tile by tile, as few pairs at a time
        for b in range(0, n, _COL_TILE):
            pending.add(*_block(pt, loose_rows[a : a + _ROW_TILE], np.arange(b, min(n, b + _COL_TILE)),
                                t, codes, radius))
    # thousands of small products, a few tasks ahead of the exact test of their pairs
    for (c, rows, _), i, j, more in in_order(pool, cluster_pairs, tasks(), 2 * threads):
        pending.add(i, j)
        while more is not None:  # a task stopped at _TASK_PAIRS pairs: the rest, here
            _, i, j, more = cluster_pairs((c, rows, more))
            pending.add(i, j)
    pending.flush()
    return uf.groups()


def _cluster_block(pt: np.ndarray, pnorm: np.ndarray, centre: np.ndarray, rows: np.ndarray,
                   row_angle: np.ndarray, cols: np.ndarray, theta: float, t: float,
                   codes: np.ndarray, radius: int,
                   start: int = 0) -> tuple[np.ndarray, np.ndarray, int | None]:
    """A cluster's rows against its partners, each partner only against the rows whose
    angle to the centre is within ``theta`` of its own (the triangle inequality): the
    pairs ``(rows, cols)`` whose bound reaches ``t`` and whose codes are within
    ``radius`` (:func:`_block`), from the ``start``-th partner by angle on.  Stops once
    ``_TASK_PAIRS`` pairs are found (only where the bound prunes little), and says from
    which partner to go on (None: done)."""
    ra = np.argsort(row_angle)
    rows, row_angle = rows[ra], row_angle[ra]
    col_angle = np.arccos(np.clip((pt[cols, :-1] @ centre) / pnorm[cols], -1.0, 1.0))
    ca = np.argsort(col_angle)
    cols, col_angle = cols[ca], col_angle[ca]
    reach = theta + ANGLE_SLACK
    parts, found, step = [], 0, _COL_TILE // 4
    for j in range(start, len(cols), step):
        c = cols[j : j + step]
        lo = np.searchsorted(row_angle, np.float32(col_angle[j] - reach), side="left")
        hi = np.searchsorted(row_angle, np.float32(col_angle[j + len(c) - 1] + reach), side="right")
        if hi > lo:
            parts.append(_block(pt, rows[lo:hi], c, t, codes, radius))
            found += len(parts[-1][0])
            if found >= _TASK_PAIRS and j + step < len(cols):
                return (*_concat(parts), j + step)
    return (*_concat(parts), None)


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs from several ``(i, j)`` parts as one ``(i, j)``."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate([i for i, _ in parts]), np.concatenate([j for _, j in parts])


def _slack(dim: int, k: int) -> float:
    """``c`` such that ``p~_a . p~_b >= a . b`` as computed, whatever the float32 rounding.

    With ``e = sqrt(k) gamma_dim`` bounding the error of a computed projection relative to
    ``|a|`` (``gamma_n = n u / (1 - n u)``, ``u = 2^-24``), the cross terms between the
    projection and the residual are at most ``2 e |a| |b|``; the product of ``p~`` and the
    exhaustive method's own float32 product err by at most ``4 (k + 1) u`` and ``gamma_dim``
    (relative).  ``c^2`` exceeds their sum (0.023 for 512-d vectors and 63 dimensions).
    """
    u = 2.0 ** -24
    gamma = dim * u / (1 - dim * u)
    e = math.sqrt(k) * gamma
    return math.sqrt(2 * e + gamma + 4 * (k + 1) * u + 1e-5)


def _theta(t: float, s_a: float, s_b: float, p_a: float, p_b: float) -> float:
    """Widest angle between ``p_a``, ``p_b`` of a pair with ``a . b >= t``, given bounds on
    their residuals ``s`` and projection norms ``p`` (pi: no bound)."""
    num, den = t - s_a * s_b, p_a * p_b
    if num <= 0 or den <= 0:
        return math.pi
    return math.acos(min(1.0, num / den))


def _kappa(reach: float) -> float:
    """The cosine to a centre that a row within ``reach`` radians of it has at least."""
    reach += ANGLE_SLACK
    return -math.inf if reach >= math.pi else math.cos(reach) - 1e-5


def _basis(xs: np.ndarray, k: int) -> np.ndarray:
    """Top ``k`` right singular vectors of the rows ``xs``: ``[dim, k]`` float32.  Any
    orthonormal basis keeps the bound exact; a good one only makes it tight."""
    x = np.asarray(xs, dtype=np.float32)
    m = (x.T @ x).astype(np.float64)  # [dim, dim]
    _evals, evecs = np.linalg.eigh((m + m.T) / 2)
    return np.ascontiguousarray(evecs[:, ::-1][:, :k], dtype=np.float32)


def _project(x: np.ndarray, basis: np.ndarray, slack: float,
             norms: np.ndarray | None = None) -> np.ndarray:
    """``p~ [m, k + 1]``: coordinates in the basis, then a bound on the residual's norm
    (allowing for the rounding of the coordinates) plus ``slack x |x|``.  ``norms``: an
    ``[m]`` array to receive ``|x|``."""
    x = np.asarray(x, dtype=np.float32)
    k, dim = basis.shape[1], basis.shape[0]
    p = x @ basis  # [m, k]
    xx = np.square(x).sum(axis=1, dtype=np.float64)  # [m]
    xn = np.sqrt(xx)
    if norms is not None:
        norms[...] = xn
    e = math.sqrt(k) * dim * 2.0 ** -24 / (1 - dim * 2.0 ** -24) * xn  # |p - exact p| <= e
    pn = np.linalg.norm(p.astype(np.float64), axis=1)
    res = np.sqrt(np.maximum(0.0, xx - np.maximum(0.0, pn - e) ** 2) + 1e-6 * xx) + 1.01 * e
    out = np.empty((x.shape[0], k + 1), dtype=np.float32)
    out[:, :-1] = p
    # rounded up to float32, so the stored bound is never below the true one
    out[:, -1] = np.nextafter((res + slack * xn).astype(np.float32), np.float32(np.inf))
    return out


def _unit(p: np.ndarray) -> np.ndarray:
    nrm = np.linalg.norm(p, axis=1, keepdims=True)
    return p / np.where(nrm > 0, nrm, 1)


def _spherical_kmeans(p: np.ndarray, k: int, rng: np.random.Generator, pool: Executor,
                      threads: int) -> np.ndarray:
    """``k`` unit centres ``[k, dim]`` float32 of the directions of ``p`` (seeded; the
    iterations' products with the centres run in ``pool``)."""
    u = _unit(p)
    u = u[np.linalg.norm(p, axis=1) > 0]
    if not len(u):
        c = np.zeros((1, p.shape[1]), dtype=np.float32)
        c[0, 0] = 1
        return c
    k = min(k, len(u))
    # k-means++ seeding (each next centre drawn in proportion to 1 - cos to the nearest),
    # in rounds of up to 64 draws: a few seeds in every natural cluster.  Too few centres
    # make wide clusters that prune nothing; too many only cost the products with them.
    c = np.empty((k, u.shape[1]), dtype=np.float32)
    c[0] = u[rng.integers(len(u))]
    best = u @ c[0]  # [m] cos to the nearest centre so far
    have = 1
    while have < k:
        w = np.maximum(1.0 - best, 0.0).astype(np.float64)
        tot = w.sum()
        take = min(64, k - have)
        if tot > 0 and np.count_nonzero(w) >= take:
            j = rng.choice(len(u), take, replace=False, p=w / tot)
        else:
            j = rng.choice(len(u), take, replace=False)
        c[have : have + take] = u[j]
        np.maximum(best, (u @ c[have : have + take].T).max(axis=1), out=best)
        have += take
    step = _pass_rows(threads)

    def nearest(i: int) -> np.ndarray:
        return np.argmax(u[i : i + step] @ c.T, axis=1)

    for _ in range(KMEANS_ITERATIONS):
        lab = np.concatenate(list(pool.map(nearest, range(0, len(u), step))))
        order = np.argsort(lab, kind="stable")
        used, starts = np.unique(lab[order], return_index=True)
        sums = np.add.reduceat(u[order], starts, axis=0)  # [len(used), dim]
        nrm = np.linalg.norm(sums, axis=1)
        ok = nrm > 0
        c[used[ok]] = sums[ok] / nrm[ok, None]  # an empty cluster keeps its centre
    return np.ascontiguousarray(c, dtype=np.float32)


def _assign(p: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre of each row's direction and the angle to it (radians)."""
    cos = _unit(p) @ centres.T  # [m, K]
    lab = np.argmax(cos, axis=1)
    best = cos[np.arange(len(lab)), lab]
    return lab, np.arccos(np.clip(best, -1.0, 1.0)).astype(np.float32)


def _pass_rows(threads: int) -> int:
    """Rows per task of a pass over every row with all centres: ``_PASS_ROWS`` shared by
    the threads (their ``[K, rows]`` products together stay at one task's size), a
    multiple of 8 (tasks pack into whole bytes)."""
    return max(8, _PASS_ROWS // threads // 8 * 8)


def _partner_bits(p: np.ndarray, tight: np.ndarray, centres: np.ndarray, kappa: np.ndarray,
                  pool: Executor, threads: int) -> np.ndarray:
    """Bits ``[c, b]`` (packed, ``[K, ceil(n / 8)]``) set where row ``b`` is tight and
    ``cos(p_b, centre c) >= kappa[c]``."""
    n = p.shape[0]
    out = np.zeros((len(centres), (n + 7) // 8), dtype=np.uint8)
    kap = kappa[:, None]
    step = _pass_rows(threads)
    all_tight = bool(tight.all())  # the usual case: no pass over the masks for it

    def one(i: int) -> None:  # i: a multiple of 8, so tasks write whole, distinct bytes
        j = min(n, i + step)
        mask = (centres @ _unit(p[i:j]).T) >= kap  # [K, m]: rows contiguous for the packing
        if not all_tight:
            mask &= tight[None, i:j]
        out[:, i // 8 : (j + 7) // 8] = np.packbits(mask, axis=1)

    for _ in pool.map(one, range(0, n, step)):
        pass
    return out


_BIT_OFFSETS = np.arange(8, dtype=np.int64)


def _set_bits(packed: np.ndarray) -> np.ndarray:
    """Positions of the set bits of ``packed`` (``np.packbits`` order), ascending: the
    non-zero bytes first, then their bits (4x faster than unpacking every bit of a
    sparse row)."""
    nz = np.flatnonzero(packed)
    bits = np.unpackbits(packed[nz][:, None], axis=1).astype(bool)  # [len(nz), 8]
    return (nz[:, None] * 8 + _BIT_OFFSETS)[bits]


def _block(pt: np.ndarray, rows: np.ndarray, cols: np.ndarray, t: float, codes: np.ndarray,
           radius: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs ``(rows[a], cols[b])`` whose bound reaches ``t`` and whose codes are within
    ``radius``, as (lower row, higher row) (:func:`_within`, tile by tile)."""
    parts = []
    for i in range(0, len(rows), _ROW_TILE):
        r = rows[i : i + _ROW_TILE]
        a = pt[r]  # [tr, k + 1]
        for j in range(0, len(cols), _COL_TILE):
            c = cols[j : j + _COL_TILE]
            g = a @ pt[c].T  # [tr, tc] bounds
            _same, ri, cj = np.intersect1d(r, c, assume_unique=True, return_indices=True)
            g[ri, cj] = -np.inf  # a row with itself is no pair
            if g.max() < t:  # the usual case: skip the mask and its scan
                continue
            ii, jj = np.nonzero(g >= t)
            parts.append(_within(codes, radius, r[ii], c[jj]))
    return _concat(parts)


def _within(codes: np.ndarray, radius: int, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs ``(i, j)`` of two rows whose codes are within ``radius``, as (lower row,
    higher row)."""
    keep = i != j
    i, j = i[keep], j[keep]
    keep = hamming_pairs(codes, i, j) <= radius
    i, j = i[keep], j[keep]
    return np.minimum(i, j), np.maximum(i, j)


class _Pending:
    """Candidate pairs within the Hamming radius (:func:`_within`), gathered for the exact
    cosine."""

    def __init__(self, src, t: float, uf: "_UnionFind") -> None:
        self.src, self.t, self.uf = src, t, uf
        self.parts: list[np.ndarray] = []
        self.size = 0

    def add(self, lo: np.ndarray, hi: np.ndarray) -> None:
        if not len(lo):
            return
        self.parts.append(lo * self.src.n + hi)  # one key per unordered pair
        self.size += len(lo)
        if self.size >= 4 * _VERIFY:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        keys = np.unique(np.concatenate(self.parts))
        self.parts, self.size = [], 0
        for s in range(0, len(keys), _VERIFY):
            k = keys[s : s + _VERIFY]
            i, j = k // self.src.n, k % self.src.n
            uniq = np.unique(np.concatenate([i, j]))
            v = self.src.rows(uniq)  # [u, dim]
            ok = confirmed(v[np.searchsorted(uniq, i)], v[np.searchsorted(uniq, j)], self.t)
            for a, b in zip(i[ok].tolist(), j[ok].tolist()):
                self.uf.union(a, b)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)
        self.touched: set[int] = set()

    def root(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.root(i), self.root(j)
        self.touched.update((i, j))
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for i in sorted(self.touched):
            out.setdefault(self.root(i), []).append(i)
        return sorted((g for g in out.values() if len(g) > 1), key=lambda g: g[0])


def find_dupes(store, ids: Sequence[int], bits: int = DEFAULT_BITS,
               method: str = DEFAULT_METHOD, threshold: float = DUPES_THRESHOLD,
               radius: int | None = None) -> list[list[int]]:
    """Near-duplicate groups among the library files ``ids`` (see :func:`itrcli.query.binary.dupe_groups`),
    found by :func:`groups`: the same groups as the exhaustive method,
    without comparing all pairs or holding all the vectors.  A video takes part as one
    row: the normalised mean of its frames' vectors, and that vector's code
    (:func:`itrcli.query.binary.video_vectors`).

    Returns:
        Groups of file ids (each of at least two), in the order of the given ``ids``; ids
        without a vector are left out.
    """
    lc = library_codes(store, bits, method)
    want = np.asarray(list(dict.fromkeys(int(i) for i in ids)), dtype=np.int64)  # given order
    pos = np.minimum(np.searchsorted(lc.ids, want), max(0, len(lc.ids) - 1))
    have = lc.ids[pos] == want if len(lc.ids) else np.zeros(len(want), bool)
    row_ids = want[have]  # every vector has a code: these are the ids with a vector
    codes = lc.codes[pos[have]]
    src: Vectors = StoreVectors(store, row_ids, total=len(lc.ids), threads=default_workers())
    vids, vvecs = video_vectors(store, want[~have].tolist())
    if len(vids):  # the videos follow the images, as rows held in memory
        src = StackedVectors(src, ArrayVectors(vvecs))
        codes = np.concatenate([codes, lc.hasher.codes(vvecs)])
        row_ids = np.concatenate([row_ids, vids])
    found = groups(codes, src, bits, threshold, radius)
    order = {int(i): n for n, i in enumerate(want)}
    out = [sorted((int(row_ids[r]) for r in g), key=order.__getitem__) for g in found]
    return sorted(out, key=lambda g: order[g[0]])


__all__ = ["ArrayVectors", "StackedVectors", "StoreVectors", "Vectors", "confirmed", "find_dupes",
           "groups", "hamming_pairs"]
