"""``--auto-cut``: keep the results that stand out, for this query, from the library.

A fixed cosine threshold means different things for different queries and models (a good
match for one text scores like noise for another).  The cut-off is found per query in
two steps:

1. The query is scored against a fixed random sample of the library
   (:data:`SAMPLE_SIZE` vectors, images and video frames alike, the same ones for every
   query while the library is unchanged; all of them in a smaller library).  Most of a
   library is unrelated to any one query, so the sample says what "unrelated" scores
   like for this query and this model.  A result must reach the sample mean plus
   :data:`FLOOR_SIGMAS` standard deviations (the floor).
2. Among the best :data:`WINDOW` results above the floor, the largest drop between two
   consecutive scores ends the kept set (a group of matches is followed by a drop to the
   near-misses).

So at most :data:`WINDOW` results are kept, none when nothing clears the floor.  The
numbers were measured on the evaluation sets with ``bench/autocut.py`` (figures in
docs/filters.md); ``--threshold`` stays for a fixed cut-off.
"""

from __future__ import annotations

from typing import Sequence

#: Images scored to describe the library's score distribution for a query.
SAMPLE_SIZE = 1000
#: Standard deviations above the sample mean that a kept result reaches at least.
FLOOR_SIGMAS = 1.5
#: The largest score drop is looked for among this many best results above the floor.
WINDOW = 50


def floor_from_scores(scores, sigmas: float = FLOOR_SIGMAS) -> float:
    """The score a kept result reaches at least, from the query's scores over the library
    sample ``[n]``: mean + ``sigmas`` standard deviations."""
    import numpy as np

    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        return float("-inf")
    return float(s.mean() + sigmas * s.std())


def gap_cut(best: Sequence[float], floor: float, window: int = WINDOW) -> float:
    """The score the last kept result has: ``best`` are the best scores, highest first;
    among the first ``window`` of them at or above ``floor``, the kept set ends before
    the largest drop (ties: the first).  Returns ``floor`` when at most one clears it."""
    above = [float(s) for s in best[:window] if s >= floor]
    if len(above) < 2:
        return floor
    drops = [a - b for a, b in zip(above, above[1:])]
    return above[drops.index(max(drops))]


def library_floor(store, query, sigmas: float = FLOOR_SIGMAS) -> float:
    """:func:`floor_from_scores` over the library's fixed sample, for a query ``[dim]``."""
    _, mat = store.vectors(store.metadata.sample_ids(SAMPLE_SIZE))  # [n, dim]
    return floor_from_scores(mat @ query, sigmas)
