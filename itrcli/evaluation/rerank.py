"""``itr eval --rerank``: the "exact+rerank" rows.

Text->image: each caption's top K images by exact cosine are put in the order of the
re-ranker's match probability; image->text: each image's top K captions.  Ranks past K are
those of the exact ranking (re-ranking only permutes the first K), so the figures show
what ``itr search --rerank --rerank-k K`` gains over ``exact``, as BLIP's paper measures
ITM re-ranking of its own contrastive top k.

The (image, caption) pairs that any fold, direction or model needs are scored once,
grouped by image: each image is decoded at full size, runs through the vision tower once
(or its features come from the feature cache that ``itr search --rerank`` shares), and
meets all of its candidate captions in batches.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from ..embed.rerank import reorder

Pairs = dict[int, set[int]]  # image index -> caption indices


def top_k(scores: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """``[q, n]`` scores -> ``[q, min(k, n)]`` indices by descending score, ties by the
    lower index (the order of :func:`itrcli.evaluation.metrics.t2i_ranks`)."""
    k = min(k, scores.shape[1])
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    for s in range(0, scores.shape[0], chunk):
        out[s : s + chunk] = np.argsort(-scores[s : s + chunk], axis=1, kind="stable")[:, :k]
    return out


class FoldCandidates:
    """One fold's candidate lists in both directions, in global indices."""

    def __init__(self, img: np.ndarray, txt: np.ndarray, imgs: np.ndarray, caps: np.ndarray,
                 k: int) -> None:
        self.imgs, self.caps = imgs, caps  # [n_f] global image / [m_f] global caption indices
        self.t2i = imgs[top_k(txt @ img.T, k)]  # [m_f, k] global image indices
        self.i2t = caps[top_k(img @ txt.T, k)]  # [n_f, k] global caption indices

    def pairs(self, into: Pairs) -> None:
        for q, cand in zip(self.caps, self.t2i):
            for i in cand:
                into.setdefault(int(i), set()).add(int(q))
        for i, cand in zip(self.imgs, self.i2t):
            into.setdefault(int(i), set()).update(int(c) for c in cand)

    def ranks(self, probs: dict[tuple[int, int], float | None], caption_image: np.ndarray,
              base: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(text->image ``[m_f]``, image->text ``[n_f]``) ranks after re-ranking the
        candidates; ``base``: the fold's exact ranks, kept where the answer is past K."""
        t2i, i2t = base[0].copy(), base[1].copy()
        for row, (q, cand) in enumerate(zip(self.caps, self.t2i)):
            order = cand[reorder([probs[(int(i), int(q))] for i in cand])]
            hit = np.flatnonzero(order == caption_image[q])
            if len(hit):
                t2i[row] = int(hit[0])
        for row, (i, cand) in enumerate(zip(self.imgs, self.i2t)):
            order = cand[reorder([probs[(int(i), int(c))] for c in cand])]
            hit = np.flatnonzero(caption_image[order] == i)
            if len(hit):
                i2t[row] = int(hit[0])
        return t2i, i2t


def score_pairs(reranker, image_paths: Sequence[str], texts: Sequence[str], pairs: Pairs,
                probs: dict[tuple[int, int], float | None], *, workers: int = 2,
                progress: Any = None, cache: Any = None) -> dict[str, Any]:
    """Fill ``probs[(image, caption)]`` for every pair not in it yet (None: the image
    cannot be read now).  ``cache``: a :class:`itrcli.store.feature_cache.FeatureCache`
    for the vision features, or None.  Returns counts and seconds."""
    todo = {i: sorted(c for c in caps if (i, c) not in probs) for i, caps in pairs.items()}
    todo = {i: caps for i, caps in todo.items() if caps}
    order = sorted(todo)
    t0 = time.perf_counter()
    n_pairs = sum(len(c) for c in todo.values())
    written = 0
    if progress is not None and order:
        progress.start(len(order))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        ahead = 4  # decoded images waiting: each is [3, 384, 384] float32 for BLIP base
        pending: dict[int, Future] = {}
        for n, i in enumerate(order):
            for j in order[n : n + ahead]:
                if j not in pending:
                    pending[j] = pool.submit(reranker.load_file, image_paths[j], cache)
            key, pixels, feats, error = pending.pop(i).result()
            caps = todo[i]
            if error is not None:
                scores = [None] * len(caps)
            else:
                emb = reranker.features(key, pixels, feats, cache)  # [1, L, width]
                written += feats is None
                scores = [float(p) for p in reranker.score_texts(
                    None, [texts[c] for c in caps], embeds=emb)]
            for c, p in zip(caps, scores):
                probs[(i, c)] = p
            if progress is not None:
                progress.advance(1, 1)
    if progress is not None and order:
        progress.close()
    if cache is not None and written:
        cache.trim()
    return {"images": len(order), "pairs": n_pairs, "seconds": time.perf_counter() - t0}
