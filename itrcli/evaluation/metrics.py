"""Retrieval metrics for image-caption datasets: recall at K in both directions, median
rank, rsum and the COCO 1K fold protocol.  Pure numpy, no model.

Conventions (the ones papers use, e.g. VSE++, CLIP, OpenCLIP):

- A dataset is ``n_images`` images and ``n_captions`` captions; ``caption_image[c]`` is
  the index of caption ``c``'s image.  Every image has at least one caption.
- text->image: each caption is a query; its image is the one relevant item.  Averaged
  over captions.
- image->text: each image is a query; any of its captions is a hit.  Averaged over images.
- A *rank* is 0-based: the number of candidates ranked above the first relevant one.
- Ties: a candidate outranks the relevant item only if its score is strictly higher, or
  equal with a lower index.  Ranking by ``(-score, index)`` is thus a total order, and a
  model that gives every candidate the same score gets the rank of the relevant index,
  not a lucky 0.
- ``R@K``: percentage of queries whose rank is below K.  ``medr``: VSE++'s
  ``floor(median(rank)) + 1`` (1-based).  ``rsum``: R@1 + R@5 + R@10 of both directions.
- Approximate methods (HNSW) return only their top ``L`` candidates; a relevant item
  not among them has rank :data:`NOT_RETRIEVED`.  It counts as a miss for every ``R@K``
  and makes ``medr`` unknown (``None``) when the median falls beyond the list.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: Rank of a relevant item that an approximate search did not return at all.
NOT_RETRIEVED = np.iinfo(np.int64).max
#: The K values of rsum, fixed so that rsum is comparable with published figures.
RSUM_KS = (1, 5, 10)


def _check_caption_image(caption_image: np.ndarray, n_images: int) -> np.ndarray:
    caption_image = np.asarray(caption_image, dtype=np.int64)  # [n_captions]
    if caption_image.ndim != 1:
        raise ValueError("caption_image must be 1-d")
    if len(caption_image) and (caption_image.min() < 0 or caption_image.max() >= n_images):
        raise ValueError("caption_image holds an index outside [0, n_images)")
    return caption_image


def t2i_ranks(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """Rank of each caption's image among all images.

    Args:
        scores: ``[n_captions, n_images]`` similarities (higher is better).
        caption_image: ``[n_captions]`` index of each caption's image.
    Returns:
        ``[n_captions]`` int64 0-based ranks, ties broken by the lower index.
    """
    scores = np.asarray(scores)  # [n_captions, n_images]
    caption_image = _check_caption_image(caption_image, scores.shape[1])
    true = scores[np.arange(len(caption_image)), caption_image][:, None]  # [n_captions, 1]
    col = np.arange(scores.shape[1])[None, :]  # [1, n_images]
    above = (scores > true) | ((scores == true) & (col < caption_image[:, None]))
    return above.sum(axis=1).astype(np.int64)


def i2t_ranks(
    scores: np.ndarray, caption_image: np.ndarray, images: np.ndarray | None = None
) -> np.ndarray:
    """Rank of each image's best-placed caption among all captions.

    Args:
        scores: ``[n_queries, n_captions]`` similarities (higher is better).
        caption_image: ``[n_captions]`` index of each caption's image.
        images: ``[n_queries]`` the image index of each score row (default ``0..n-1``),
            so that a large set can be scored in chunks of rows.
    Returns:
        ``[n_queries]`` int64 0-based ranks, ties broken by the lower index.
    Raises:
        ValueError: an image has no caption.
    """
    scores = np.asarray(scores)  # [n_queries, n_captions]
    images = np.arange(scores.shape[0]) if images is None else np.asarray(images, dtype=np.int64)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    own = caption_image[None, :] == images[:, None]  # [n_queries, n_captions]
    if not own.any(axis=1).all():
        raise ValueError("an image query has no caption")
    # The best-placed relevant caption: highest score, lowest index among equal scores
    # (argmax returns the first maximum).  Everything ranked above it is irrelevant.
    masked = np.where(own, scores, -np.inf)
    best = masked.argmax(axis=1)  # [n_queries]
    best_score = scores[np.arange(len(images)), best][:, None]  # [n_queries, 1]
    col = np.arange(scores.shape[1])[None, :]
    above = (scores > best_score) | ((scores == best_score) & (col < best[:, None]))
    return above.sum(axis=1).astype(np.int64)


def exact_ranks(
    image_vecs: np.ndarray, text_vecs: np.ndarray, caption_image: np.ndarray, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine ranking in both directions, scored in chunks to bound memory.

    Args:
        image_vecs: ``[n_images, dim]`` L2-normalised.
        text_vecs: ``[n_captions, dim]`` L2-normalised.
        caption_image: ``[n_captions]``.
        chunk: query rows scored at once (COCO 5K: a full ``[25000, 5000]`` matrix would
            be 500 MB).
    Returns:
        (text->image ranks ``[n_captions]``, image->text ranks ``[n_images]``).
    """
    image_vecs = np.asarray(image_vecs, dtype=np.float32)
    text_vecs = np.asarray(text_vecs, dtype=np.float32)
    caption_image = _check_caption_image(caption_image, len(image_vecs))
    t2i = np.empty(len(text_vecs), dtype=np.int64)
    for s in range(0, len(text_vecs), chunk):
        scores = text_vecs[s : s + chunk] @ image_vecs.T  # [chunk, n_images]
        t2i[s : s + chunk] = t2i_ranks(scores, caption_image[s : s + chunk])
    i2t = np.empty(len(image_vecs), dtype=np.int64)
    for s in range(0, len(image_vecs), chunk):
        scores = image_vecs[s : s + chunk] @ text_vecs.T  # [chunk, n_captions]
        rows = np.arange(s, min(s + chunk, len(image_vecs)))
        i2t[s : s + chunk] = i2t_ranks(scores, caption_image, rows)
    return t2i, i2t


def t2i_ranks_from_lists(retrieved: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """Ranks from ranked result lists of a text->image search.

    Args:
        retrieved: ``[n_captions, L]`` image indices, best first (row ``c`` answers caption ``c``).
        caption_image: ``[n_captions]``.
    Returns:
        ``[n_captions]`` int64: position of the caption's image, or :data:`NOT_RETRIEVED`.
    """
    retrieved = np.asarray(retrieved, dtype=np.int64)  # [n_captions, L]
    hit = retrieved == np.asarray(caption_image, dtype=np.int64)[:, None]  # [n_captions, L]
    return _first_hit(hit)


def i2t_ranks_from_lists(
    retrieved: np.ndarray, caption_image: np.ndarray, images: np.ndarray | None = None
) -> np.ndarray:
    """Ranks from ranked result lists of an image->text search.

    Args:
        retrieved: ``[n_queries, L]`` caption indices, best first.
        caption_image: ``[n_captions]``.
        images: ``[n_queries]`` the image of each row (default ``0..n-1``).
    Returns:
        ``[n_queries]`` int64: position of the first of the image's captions, or
        :data:`NOT_RETRIEVED`.
    """
    retrieved = np.asarray(retrieved, dtype=np.int64)  # [n_queries, L]
    images = np.arange(retrieved.shape[0]) if images is None else np.asarray(images, dtype=np.int64)
    hit = np.asarray(caption_image, dtype=np.int64)[retrieved] == images[:, None]  # [n_queries, L]
    return _first_hit(hit)


def _first_hit(hit: np.ndarray) -> np.ndarray:
    """``[n, L]`` bool -> ``[n]`` index of the first True, or NOT_RETRIEVED."""
    if hit.shape[1] == 0:
        return np.full(hit.shape[0], NOT_RETRIEVED, dtype=np.int64)
    first = hit.argmax(axis=1).astype(np.int64)
    return np.where(hit.any(axis=1), first, NOT_RETRIEVED)


def recall_at(ranks: np.ndarray, k: int) -> float:
    """Percentage of queries whose 0-based rank is below ``k``."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        return 0.0
    return float(100.0 * np.mean(ranks < k))


def median_rank(ranks: np.ndarray) -> float | None:
    """``floor(median(rank)) + 1`` (1-based, as VSE++ reports it), or None when the median
    lies beyond what an approximate search returned."""
    r = np.sort(np.asarray(ranks, dtype=np.int64))
    n = len(r)
    if n == 0:
        return None
    middle = r[(n - 1) // 2 : n // 2 + 1]  # one value (odd n) or two (even n)
    if (middle == NOT_RETRIEVED).any():
        return None
    return float(np.floor(middle.astype(np.float64).mean()) + 1)


def direction_metrics(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float | None]:
    """``{"R@1": ..., ..., "medr": ...}`` for one direction; recalls in percent."""
    out: dict[str, float | None] = {f"R@{k}": recall_at(ranks, k) for k in ks}
    out["medr"] = median_rank(ranks)
    return out


def rsum(t2i: np.ndarray, i2t: np.ndarray) -> float:
    """R@1 + R@5 + R@10 of both directions (the sum papers call rsum, at most 600)."""
    return float(sum(recall_at(t2i, k) + recall_at(i2t, k) for k in RSUM_KS))


def summarise(t2i: np.ndarray, i2t: np.ndarray, ks: Sequence[int]) -> dict:
    """The metrics of one ranking: ``{"t2i": {...}, "i2t": {...}, "rsum": ...}``."""
    return {"t2i": direction_metrics(t2i, ks), "i2t": direction_metrics(i2t, ks), "rsum": rsum(t2i, i2t)}


def fold_indices(
    caption_image: np.ndarray, n_images: int, folds: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split a dataset into ``folds`` contiguous image folds (COCO 1K: 5 x 1,000 images).

    Folds are consecutive runs of images in dataset order, as large as possible and
    differing by at most one image (``np.array_split``); captions follow their images.
    Returns:
        A list of (image indices ``[n_f]``, caption indices ``[m_f]``) per fold.
    Raises:
        ValueError: fewer images than folds.
    """
    if folds < 1:
        raise ValueError("folds must be at least 1")
    if n_images < folds:
        raise ValueError(f"{n_images} images cannot make {folds} folds")
    caption_image = np.asarray(caption_image, dtype=np.int64)
    out = []
    for imgs in np.array_split(np.arange(n_images), folds):
        caps = np.flatnonzero((caption_image >= imgs[0]) & (caption_image <= imgs[-1]))
        out.append((imgs, caps))
    return out


def mean_of(summaries: Sequence[dict]) -> dict:
    """Average per-fold summaries (every recall, medr and rsum); medr is None if any fold's is."""
    if len(summaries) == 1:
        return summaries[0]
    out: dict = {}
    for direction in ("t2i", "i2t"):
        keys = summaries[0][direction].keys()
        out[direction] = {}
        for key in keys:
            vals = [s[direction][key] for s in summaries]
            out[direction][key] = None if any(v is None for v in vals) else float(np.mean(vals))
    out["rsum"] = float(np.mean([s["rsum"] for s in summaries]))
    return out
