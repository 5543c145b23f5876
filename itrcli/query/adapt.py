"""Adapting queries to a collection: a linear map learned from captioned pairs.

A collection with its own captions (a catalogue's titles, a lab's annotations) often uses
words the model ranks poorly.  On the frozen vectors of the library's model, a small map
from text space towards image space, fitted on the collection's own (image, caption)
pairs, fixes much of that without touching the model or the image vectors.

Every method here gives one ``[dim, dim]`` matrix ``W`` (and a mean ``m``, zero but for
CCA) applied to the *query side only*: a text vector ``t`` becomes
``normalise((t - m) @ W)`` and is compared with the stored image vectors by cosine, so the
HNSW graph and the stored vectors stay as they are.

Methods (``T``: caption vectors ``[n, dim]``, ``I``: their images' vectors ``[n, dim]``):

- ``ridge``: ``W = argmin |T W - I|^2 + lam * s * |W - Id|^2`` with ``s = trace(T'T) / dim``:
  least squares from text to image vectors, shrunk towards the identity (the model as
  it is), so it stays well-posed with fewer pairs than dimensions.
- ``procrustes``: the orthogonal ``W`` closest to mapping ``T`` onto ``I``
  (``W = U V'`` from the SVD ``T'I = U S V'``): a rotation, no parameter.
- ``cca``: regularised canonical correlation analysis (covariances shrunk by
  ``reg * s``): projections ``A`` (text) and ``B`` (image) whose ``k`` components
  correlate most; the score ``(t - m_t) A diag(rho) B' (x - m_x)'`` ranks images like
  ``(t - m_t) W x'`` with ``W = A diag(rho) B'`` (the ``m_x`` term is the same for
  every image of one query), so CCA folds into the query side too: a dot product in
  the canonical space, not a cosine there.

Which method and parameters: the one with the best held-out text->image recall in
k-fold cross-validation, folds grouped by image (no image has captions on both sides of
a fold).  "none" (the model as it is) is always a candidate.

Pure numpy; no model, no database.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

METHODS = ("ridge", "procrustes", "cca")
#: Ridge strengths tried (times trace(T'T)/dim).
RIDGE_LAMBDAS = (0.01, 0.1, 1.0, 10.0)
#: CCA covariance shrinkage tried (times the mean variance).
CCA_REGS = (0.1, 1.0)
#: CCA components kept, as fractions of the dimension.
CCA_FRACTIONS = (0.25, 0.5, 1.0)
#: K of the recall that picks the method (their mean).
SELECT_KS = (1, 5, 10)
DEFAULT_FOLDS = 5
#: Held-out captions scored at once (a [chunk, fold images] matrix).
RANK_CHUNK = 2048
#: Fewest captioned images to fit on: each of the folds needs test images and training
#: images on the other side.
MIN_IMAGES_PER_FOLD = 2


@dataclass
class Candidate:
    """A method and its parameters (``method="none"``: no map)."""

    method: str
    params: dict[str, float] = field(default_factory=dict)

    def label(self) -> str:
        """``ridge lam=0.1``, ``cca reg=1 k=32``, ``procrustes``, ``none``."""
        return " ".join([self.method] + [f"{k}={v:g}" for k, v in self.params.items()])


@dataclass
class Adapter:
    """A fitted map: ``apply(t) = normalise((t - mean) @ matrix)``."""

    method: str
    params: dict[str, float]
    matrix: np.ndarray  #: [dim, dim] float32
    mean: np.ndarray  #: [dim] float32 (zero but for cca)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[0])

    def apply(self, texts: np.ndarray) -> np.ndarray:
        """Map text vectors ``[n, dim]`` (or ``[dim]``) into the image side, L2-normalised."""
        t = np.asarray(texts, dtype=np.float32)
        out = (t - self.mean) @ self.matrix  # [n, dim]
        norm = np.linalg.norm(out, axis=-1, keepdims=True)
        return (out / np.maximum(norm, 1e-12)).astype(np.float32)

    def label(self) -> str:
        return Candidate(self.method, self.params).label()


# -- fitting ----------------------------------------------------------------------------


def ridge_stats(t: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(t't, t'x)`` ``[dim, dim]`` each: all :func:`fit_ridge` needs of the pairs."""
    t, x = np.asarray(t, np.float64), np.asarray(x, np.float64)
    return t.T @ t, t.T @ x


def fit_ridge(t: np.ndarray, x: np.ndarray, lam: float,
              stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``argmin_W |t W - x|^2 + lam s |W - Id|^2`` (``s = trace(t't)/dim``): ``[dim, dim]``.
    ``stats``: :func:`ridge_stats` of the same pairs, to try several ``lam`` at the cost of one."""
    tt, tx = stats if stats is not None else ridge_stats(t, x)
    d = tt.shape[0]
    r = lam * max(float(np.trace(tt)) / d, 1e-12)
    return np.linalg.solve(tt + r * np.eye(d), tx + r * np.eye(d))


def fit_procrustes(t: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The orthogonal ``W`` minimising ``|t W - x|``: ``U V'`` of ``svd(t'x)``."""
    u, _s, vt = np.linalg.svd(np.asarray(t, np.float64).T @ np.asarray(x, np.float64))
    return u @ vt


@dataclass
class CCA:
    """Canonical directions, best first: ``t_proj = (t - mean_t) @ a``, ``x_proj = (x - mean_x) @ b``."""

    a: np.ndarray  #: [dim, dim] text directions (columns)
    b: np.ndarray  #: [dim, dim] image directions
    corr: np.ndarray  #: [dim] canonical correlations, descending
    mean_t: np.ndarray  #: [dim]
    mean_x: np.ndarray  #: [dim]

    def matrix(self, k: int) -> np.ndarray:
        """``A_k diag(rho_k) B_k'``: the query-side map keeping ``k`` components."""
        return (self.a[:, :k] * self.corr[:k]) @ self.b[:, :k].T


def _inv_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    return (v / np.sqrt(np.maximum(w, 1e-12))) @ v.T


def fit_cca(t: np.ndarray, x: np.ndarray, reg: float) -> CCA:
    """Regularised CCA: covariances ``C + reg * s * Id`` (``s``: mean variance), whitened,
    and the SVD of the whitened cross-covariance."""
    t, x = np.asarray(t, np.float64), np.asarray(x, np.float64)
    n, d = t.shape
    mt, mx = t.mean(0), x.mean(0)
    tc, xc = t - mt, x - mx
    ctt = tc.T @ tc / n
    cxx = xc.T @ xc / n
    ctx = tc.T @ xc / n
    ctt += reg * max(float(np.trace(ctt)) / d, 1e-12) * np.eye(d)
    cxx += reg * max(float(np.trace(cxx)) / d, 1e-12) * np.eye(d)
    kt, kx = _inv_sqrt(ctt), _inv_sqrt(cxx)
    u, s, vt = np.linalg.svd(kt @ ctx @ kx)
    return CCA(kt @ u, kx @ vt.T, s, mt, mx)


def cca_ks(dim: int, n: int) -> list[int]:
    """Component counts tried: fractions of ``dim``, at most ``n`` (rank of the data)."""
    return sorted({max(1, min(n, round(f * dim))) for f in CCA_FRACTIONS})


def candidates(dim: int, n: int, methods: Sequence[str] = METHODS) -> list[Candidate]:
    """Every (method, parameters) tried, "none" first."""
    out = [Candidate("none")]
    for m in methods:
        if m == "procrustes":
            out.append(Candidate("procrustes"))
        elif m == "ridge":
            out += [Candidate("ridge", {"lam": lam}) for lam in RIDGE_LAMBDAS]
        elif m == "cca":
            out += [Candidate("cca", {"reg": r, "k": k}) for r in CCA_REGS for k in cca_ks(dim, n)]
        else:
            raise ValueError(f"unknown method {m!r} (expected one of {', '.join(METHODS)})")
    return out


def fit(t: np.ndarray, x: np.ndarray, cand: Candidate, *, _shared: dict | None = None) -> Adapter:
    """Fit one candidate on pairs ``t[i] <-> x[i]`` (``[n, dim]`` each).

    ``_shared``: a dict kept across candidates on the same pairs, so that ridge strengths
    share one ``t't`` and CCA component counts one decomposition."""
    d = t.shape[1]
    mean = np.zeros(d)
    shared = {} if _shared is None else _shared
    if cand.method == "none":
        w = np.eye(d)
    elif cand.method == "ridge":
        if "ridge" not in shared:
            shared["ridge"] = ridge_stats(t, x)
        w = fit_ridge(t, x, cand.params["lam"], shared["ridge"])
    elif cand.method == "procrustes":
        w = fit_procrustes(t, x)
    elif cand.method == "cca":
        key = ("cca", cand.params["reg"])
        if key not in shared:
            shared[key] = fit_cca(t, x, cand.params["reg"])
        c = shared[key]
        w, mean = c.matrix(int(cand.params["k"])), c.mean_t
    else:
        raise ValueError(f"unknown method {cand.method!r}")
    return Adapter(cand.method, dict(cand.params), w.astype(np.float32), mean.astype(np.float32))


# -- cross-validation -------------------------------------------------------------------


def image_folds(n_images: int, folds: int, seed: int = 0) -> np.ndarray:
    """The fold of each image ``[n_images]``: a seeded shuffle dealt round-robin."""
    order = np.random.default_rng(seed).permutation(n_images)
    fold = np.empty(n_images, dtype=np.int64)
    fold[order] = np.arange(n_images) % folds
    return fold


def t2i_ranks(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """0-based rank of each query's relevant item: ``scores`` ``[q, n]``, ``truth`` ``[q]``.

    Ties as in :mod:`itrcli.evaluation.metrics`: an item outranks the relevant one when its
    score is higher, or equal with a lower index."""
    rel = scores[np.arange(len(truth)), truth][:, None]  # [q, 1]
    idx = np.arange(scores.shape[1])[None, :]
    return ((scores > rel) | ((scores == rel) & (idx < truth[:, None]))).sum(1)


def recall(ranks: np.ndarray, ks: Sequence[int] = SELECT_KS) -> dict[str, float]:
    """``{"R@K": percent}`` for each K."""
    return {f"R@{k}": float(100.0 * np.mean(ranks < k)) if len(ranks) else 0.0 for k in ks}


def min_images(folds: int) -> int:
    """Fewest captioned images cross-validation with ``folds`` folds needs."""
    return max(folds * MIN_IMAGES_PER_FOLD, 10)


@dataclass
class Selection:
    """What cross-validation found: every candidate's mean held-out recall, and the pick."""

    folds: int
    pairs: int
    images: int
    scores: list[tuple[Candidate, dict[str, float]]]  #: candidate, mean {"R@1", "R@5", "R@10"}
    best: Candidate

    def recall_of(self, cand: Candidate) -> dict[str, float]:
        return next(r for c, r in self.scores if c == cand)

    @property
    def baseline(self) -> dict[str, float]:
        return self.recall_of(Candidate("none"))

    def best_per_method(self) -> list[tuple[Candidate, dict[str, float]]]:
        """The best parameters of each method, in the order tried."""
        out: dict[str, tuple[Candidate, dict[str, float]]] = {}
        for c, r in self.scores:
            if c.method not in out or _merit(r) > _merit(out[c.method][1]):
                out[c.method] = (c, r)
        return list(out.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "folds": self.folds, "pairs": self.pairs, "images": self.images,
            "picked": {"method": self.best.method, "params": self.best.params},
            "baseline": _round(self.baseline), "adapted": _round(self.recall_of(self.best)),
            "methods": [{"method": c.method, "params": c.params, **_round(r)}
                        for c, r in self.best_per_method()],
        }


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in d.items()}


def _merit(r: dict[str, float]) -> float:
    return sum(r.values()) / len(r)


def cross_validate(
    t: np.ndarray,
    x: np.ndarray,
    image_of: np.ndarray,
    cands: Sequence[Candidate],
    *,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
) -> Selection:
    """Mean held-out text->image recall of each candidate over ``folds`` image folds.

    Args:
        t: caption vectors ``[n, dim]``; x: their images' vectors ``[n, dim]``.
        image_of: which image each pair shows ``[n]`` (any ids): folds never split an image.
        cands: from :func:`candidates`.
    Returns:
        A :class:`Selection`; ``best`` has the highest mean of R@1, R@5, R@10 (ties: the
        earlier candidate, so "none" wins unless a map does better).
    Raises:
        ValueError: fewer images than :func:`min_images` needs.
    """
    images, first, inv = np.unique(np.asarray(image_of), return_index=True, return_inverse=True)
    if len(images) < min_images(folds):
        raise ValueError(f"{len(images)} captioned images: {folds}-fold cross-validation needs "
                         f"at least {min_images(folds)}")
    fold_of_image = image_folds(len(images), folds, seed)
    totals: list[list[np.ndarray]] = [[] for _ in cands]
    for f in range(folds):
        test_img = np.flatnonzero(fold_of_image == f)  # [m_f]
        local = np.full(len(images), -1)
        local[test_img] = np.arange(len(test_img))
        held = local[inv] >= 0  # [n] pairs whose image is in this fold
        tr_t, tr_x = t[~held], x[~held]
        gallery = x[first[test_img]]  # [m_f, dim]: each held-out image once
        queries, truth = t[held], local[inv[held]]
        shared: dict = {}
        for j, c in enumerate(cands):
            ad = fit(tr_t, tr_x, c, _shared=shared)
            q = ad.apply(queries)  # [m, dim]
            for s in range(0, len(q), RANK_CHUNK):  # bounded memory on large sets
                totals[j].append(t2i_ranks(q[s : s + RANK_CHUNK] @ gallery.T,
                                           truth[s : s + RANK_CHUNK]))
    scores = [(c, recall(np.concatenate(r))) for c, r in zip(cands, totals)]
    best = max(scores, key=lambda cr: _merit(cr[1]))[0]  # max keeps the first of equals
    return Selection(folds, len(t), len(images), scores, best)


def select_and_fit(
    t: np.ndarray,
    x: np.ndarray,
    image_of: np.ndarray,
    *,
    methods: Sequence[str] = METHODS,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
) -> tuple[Adapter, Selection]:
    """Pick a candidate by :func:`cross_validate`, then fit it on every pair."""
    cands = candidates(t.shape[1], int(len(t) * (folds - 1) / folds), methods)
    sel = cross_validate(t, x, image_of, cands, folds=folds, seed=seed)
    return fit(t, x, sel.best), sel


# -- identity of the pairs --------------------------------------------------------------


def pairs_hash(pairs: Iterable[tuple[str, str]]) -> str:
    """A content hash of (image content hash, caption) pairs, order-free: the same
    captioned photos under other file names, or listed in another order, hash alike."""
    h = hashlib.blake2b(digest_size=16)
    for image_hash, caption in sorted(set(pairs)):
        h.update(f"{image_hash}\t{caption}\n".encode())
    return h.hexdigest()
