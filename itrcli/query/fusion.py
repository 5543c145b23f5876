"""Fusing two rankings of a library's images: by meaning (cosine) and by the words read in
them (full-text match), with reciprocal rank fusion.

Rule (:func:`rrf`): an image's fused score is the sum, over the rankings that hold it, of
``1 / (K + rank)`` with :data:`K` = 60 (Cormack et al., SIGIR 2009); ranks start at 1.
Ties go to the image with the better text rank, then the better cosine rank.  The cosine
ranking holds the best :data:`COSINE_CANDIDATES` images (or ``top``, if more); the text
ranking every image whose text matches all the query's words (as word beginnings) and
phrases, best bm25 first, at most :data:`TEXT_CANDIDATES`.  So a query whose words are
read in an image puts it near the top, and a descriptive query that matches no text ranks
exactly by meaning.

A hit's ``score`` stays its cosine similarity (so ``--threshold`` keeps its meaning);
with ``--text-only`` it is the text match (bm25, higher is better).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Hashable, Sequence, TypeVar

from ..store.words import WordQuery
from .search import Filters, Hit, allowed_ids, rank

#: The RRF constant: how fast a ranking's weight falls with rank.
K = 60
#: Cosine candidates fused (the graph's best); more when ``top`` is larger.
COSINE_CANDIDATES = 100
#: Text matches fused at most.
TEXT_CANDIDATES = 200

T = TypeVar("T", bound=Hashable)


def rrf(rankings: Sequence[Sequence[T]], k: int = K) -> list[tuple[T, float]]:
    """Reciprocal rank fusion: ``(item, score)`` best first; see the module docstring.
    Ties are broken by the item's rank in the earlier rankings first (pass the text
    ranking first), then by first appearance."""
    score: dict[T, float] = {}
    tie: dict[T, tuple[int, ...]] = {}
    far = 1 << 30
    for j, ranking in enumerate(rankings):
        for r, item in enumerate(ranking, 1):
            if item in score and tie[item][j] != far:
                continue  # an item listed twice in one ranking counts at its best rank
            score[item] = score.get(item, 0.0) + 1.0 / (k + r)
            t = list(tie.get(item, (far,) * len(rankings)))
            t[j] = r
            tie[item] = tuple(t)
    return sorted(score.items(), key=lambda kv: (-kv[1], tie[kv[0]]))


def text_hits(store, tq: WordQuery, filters: Filters,
              excluded: set[int]) -> list[tuple[int, float, dict[str, Any]]]:
    """Files whose text matches ``tq``: ``(id, text score, row)``, best first (copies of
    one content each, by path), filtered, existing files only."""
    from ..store.db import fs_path_of

    ranked = store.words.search(tq, TEXT_CANDIDATES)
    if not ranked:
        return []
    allowed = allowed_ids(store, filters)
    by_hash: dict[str, list[dict[str, Any]]] = {}
    for row in store.rows_by_hashes([h for h, _ in ranked]):
        by_hash.setdefault(row["hash"], []).append(row)
    out = []
    for h, s in ranked:
        for row in sorted(by_hash.get(h, []), key=lambda r: r["path"]):
            if row["id"] in excluded or (allowed is not None and row["id"] not in allowed):
                continue
            if not os.path.exists(fs_path_of(row["path"], row["fsname"])):
                continue
            out.append((row["id"], s, row))
    return out


def fused_rank(
    query,
    tq: WordQuery,
    *,
    store,
    get_vindex: Callable[[], Any],
    top: int,
    filters: Filters,
    exclude_paths: Sequence[str] = (),
    text_only: bool = False,
    **rank_args: Any,
) -> list[Hit]:
    """The ``top`` best images for a query vector and its words (see the module docstring);
    ``query`` may be None with ``text_only``.  Every hit carries ``text``: the words of its
    text that matched (an empty list when none did).  ``rank_args`` go to
    :func:`itrcli.query.search.rank` (``frames=True``: one hit per video frame)."""
    import numpy as np

    excluded = {r["id"] for r in (store.row_by_path(p) for p in exclude_paths) if r}
    texts = text_hits(store, tq, filters, excluded)
    if text_only:
        chosen = [(i, s, row) for i, s, row in texts[:top]]
        hits = [Hit(n + 1, s, row["path"], row["width"], row["height"], row["taken_at"], i,
                    row["mtime_ns"]) for n, (i, s, row) in enumerate(chosen)]
        return _with_words(store, tq, hits, {i: row["hash"] for i, _, row in chosen})
    cos_hits = rank(query, store=store, get_vindex=get_vindex, top=max(top, COSINE_CANDIDATES),
                    filters=filters, exclude_paths=exclude_paths, **rank_args)
    # items are (file id, frame time): with ``frames`` a video's frames rank on their own;
    # text is read in images only, so a text match is (id, None)
    fused = rrf([[(i, None) for i, _, _ in texts], [(h.id, h.time) for h in cos_hits]])
    by_key = {(h.id, h.time): h for h in cos_hits}
    rows = {i: row for i, _, row in texts}
    need = [i for (i, t), _ in fused if (i, t) not in by_key]
    if need:  # text matches beyond the cosine candidates: their cosine, for showing
        ids, vecs = store.vectors(need)
        cos = dict(zip(ids.tolist(), (vecs @ query).tolist())) if len(ids) else {}
    hits: list[Hit] = []
    for (i, t), _ in fused:
        if (i, t) in by_key:
            h = by_key[(i, t)]
        else:
            row, s = rows[i], cos.get(i)
            if s is None or (filters.threshold is not None and s < filters.threshold):
                continue
            h = Hit(0, float(np.float32(s)), row["path"], row["width"], row["height"],
                    row["taken_at"], i, row["mtime_ns"])
        h.rank = len(hits) + 1
        hits.append(h)
        if len(hits) == top:
            break
    hashes = {i: row["hash"] for i, row in rows.items()}
    return _with_words(store, tq, hits, hashes)


def _with_words(store, tq, hits: list[Hit], hashes: dict[int, str]) -> list[Hit]:
    for h in hits:
        hh = hashes.get(h.id)
        h.text = store.words.matched_words(hh, tq) if hh else []
    return hits
