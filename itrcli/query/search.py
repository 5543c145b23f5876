"""Search: turning queries into one vector, and ranking the library's images against it.

Queries are texts or image files, combined rclip-style (``--add`` / ``--subtract``): the
normalised embeddings are summed with signs and the sum normalised again.  Texts go through
the exported ONNX text tower when the library has one (no torch import), images already in
the library use their stored vectors (no model at all), anything else loads the model.

Ranking uses the HNSW graph (``ef`` from :data:`itrcli.store.vindex.EF_SEARCH`), or an exact
scan with ``exact=True`` or when filters leave few candidates.  Results are sorted by
descending cosine similarity, ties by path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Sequence

from ..errors import UsageError
from ..constants import MEDIA_EXTENSIONS
from .filters import MetaFilter

#: When filters leave at most this many candidates, score them exactly instead of
#: asking the graph (exact and cheaper at that size).
EXACT_BELOW = 20_000
#: Rows scored at a time by an exact scan (memory: this many vectors, not the library's).
EXACT_CHUNK = 50_000


@dataclass
class QueryPart:
    """One term of a query: a text or an image path, with a sign."""

    value: str
    kind: str  #: "text" | "image"
    sign: float = 1.0


@dataclass
class Hit:
    rank: int
    score: float
    path: str
    width: int | None
    height: int | None
    taken_at: str | None
    id: int
    mtime_ns: int | None = None
    #: words of the image's text that matched (searches that use text; see query/fusion.py)
    text: list[str] | None = None
    #: with ``--rerank``: the re-ranker's match probability (None past K, or unreadable)
    rerank_score: float | None = None
    reranked: bool = field(default=False, repr=False)  #: --rerank was asked for
    rerank_error: str | None = field(default=None, repr=False)  #: why it has no rerank_score
    time: float | None = None  #: a video frame's time in seconds (None: an image)
    #: the other files of the same photo (a RAW beside its JPEG, a Live Photo's clip:
    #: :mod:`itrcli.query.twins`); None when it has none
    alternates: list[str] | None = None

    @property
    def date(self) -> str | None:
        """Capture date (EXIF), else the file's modification date: YYYY-MM-DD."""
        if self.taken_at:
            return self.taken_at[:10]
        if self.mtime_ns is not None:
            return datetime.fromtimestamp(self.mtime_ns / 1e9).date().isoformat()
        return None

    def to_json(self) -> dict[str, Any]:
        d = {"rank": self.rank, "score": round(self.score, 4), "path": self.path,
             "width": self.width, "height": self.height, "taken_at": self.taken_at,
             "time": None if self.time is None else round(self.time, 3)}
        if self.text is not None:
            d["text"] = self.text
        if self.reranked:
            d["rerank_score"] = None if self.rerank_score is None else round(self.rerank_score, 4)
        if self.alternates:
            d["alternates"] = list(self.alternates)
        return d


@dataclass
class Filters:
    in_dirs: list[str] = field(default_factory=list)
    after: str | None = None  #: YYYY-MM-DD, inclusive
    before: str | None = None  #: YYYY-MM-DD, exclusive
    threshold: float | None = None
    meta: MetaFilter | None = None  #: camera, place, glob, size, kind (query/filters.py)
    auto_cut: float | None = None  #: --auto-cut's floor in std devs (query/autocut.py)

    @property
    def narrows(self) -> bool:
        return bool(self.in_dirs or self.after or self.before
                    or (self.meta is not None and self.meta.narrows))


def parse_date(value: str | None, option: str) -> str | None:
    if value is None:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").date().isoformat()
    except ValueError:
        raise UsageError(f"{option} {value!r}: expected a date as YYYY-MM-DD") from None


def classify(value: str, force: str | None = None) -> QueryPart:
    """A query term is an image when it names an existing image or video file (or ``force``)."""
    if force:
        return QueryPart(value, force)
    p = os.path.expanduser(value)
    # the extension sets are plain constants: no Pillow import on the search path
    if os.path.splitext(p)[1].lower() in MEDIA_EXTENSIONS and os.path.isfile(p):
        return QueryPart(os.path.abspath(p), "image")
    return QueryPart(value, "text")


def query_parts(query: str | None = None, *, image: str | None = None, text: str | None = None,
                add: Sequence[str] = (), subtract: Sequence[str] = ()) -> list[QueryPart]:
    """The terms of a search, classified, in a fixed order: ``image``, ``text``, ``query``,
    then ``add`` and ``subtract`` (negative) terms.  Texts are whitespace-normalised."""
    parts = []
    if image is not None:
        parts.append(classify(os.path.abspath(os.path.expanduser(image)), "image"))
    if text is not None:
        parts.append(classify(text, "text"))
    if query is not None:
        parts.append(classify(query))
    parts += [classify(a) for a in add]
    for s in subtract:
        p = classify(s)
        p.sign = -1.0
        parts.append(p)
    for p in parts:
        if p.kind == "text":
            p.value = clean_text(p.value)
    return parts


def build_query(
    parts: Sequence[QueryPart],
    *,
    stored_vector: Callable[[str], Any],
    encode_texts: Callable[[list[str]], Any],
    encode_image: Callable[[str], Any],
):
    """Sum the signed, normalised embeddings of ``parts`` and normalise: ``[dim]``."""
    import numpy as np

    texts = [p for p in parts if p.kind == "text"]
    total = None
    if texts:
        vecs = encode_texts([p.value for p in texts])  # [n, dim]
        for p, v in zip(texts, vecs):
            total = p.sign * v if total is None else total + p.sign * v
    for p in parts:
        if p.kind != "image":
            continue
        if not os.path.isfile(p.value):
            raise UsageError(f"image query {p.value}: no such file")
        v = stored_vector(p.value)
        if v is None:
            v = encode_image(p.value)
        v = v / max(float(np.linalg.norm(v)), 1e-12)
        total = p.sign * v if total is None else total + p.sign * v
    if total is None:
        raise UsageError("empty query")
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise UsageError("the query terms cancel out (the combined embedding is zero)")
    return (total / norm).astype(np.float32)


def allowed_ids(store, f: Filters) -> set[int] | None:
    """Ids passing --in/--after/--before and the metadata filters (None: no filter)."""
    if not f.narrows:
        return None
    ids = None
    if f.in_dirs or f.after or f.before:
        dirs = [os.path.abspath(os.path.expanduser(d)).rstrip(os.sep) for d in f.in_dirs]
        ids = store.ids_where(under=dirs, after=f.after, before=f.before)
    m = f.meta
    if m is not None and m.narrows:
        if m.needs_rows:  # distance and kind: decided in Python on the rows SQL leaves
            rows = store.metadata.filter_rows(camera=m.camera, globs=m.sql_globs(), min_size=m.min_size,
                               lat_range=m.near.lat_range() if m.near else None, ids=ids)
            ids = {r["id"] for r in rows if m.matches(r)}
        else:
            got = store.metadata.filter_ids(camera=m.camera, globs=m.sql_globs(), min_size=m.min_size)
            ids = got if ids is None else ids & got
    # labels: the images passing, and the frames of the videos passing
    return store.labels_of_files(ids)


def rank(
    query,
    *,
    store,
    get_vindex: Callable[[], Any],
    top: int,
    filters: Filters,
    exclude_paths: Sequence[str] = (),
    exact: bool = False,
    ef: int | None = None,
    hash_bits: int | None = None,
    frames: bool = False,
) -> list[Hit]:
    """The ``top`` best images for a query vector, filtered, existing files only.

    A video appears once, at its best frame, unless ``frames``: then every frame ranks
    on its own.
    """
    import numpy as np

    from ..store.db import fs_path_of

    if filters.auto_cut is not None:
        from dataclasses import replace

        from .autocut import WINDOW, gap_cut, library_floor

        floor = library_floor(store, query, filters.auto_cut)
        plain = replace(filters, auto_cut=None, threshold=floor if filters.threshold is None
                        else max(floor, filters.threshold))
        best = rank(query, store=store, get_vindex=get_vindex, top=WINDOW, filters=plain,
                    exclude_paths=exclude_paths, exact=exact, ef=ef, hash_bits=hash_bits,
                    frames=frames)
        cut = gap_cut([h.score for h in best], plain.threshold)
        return [h for h in best if h.score >= cut][:top]
    allowed = allowed_ids(store, filters)
    excluded: set[int] = set()
    for p in exclude_paths:
        row = store.row_by_path(p)
        if row:
            excluded.add(row["id"])
    if hash_bits is not None:
        from .binary import BIT_CHOICES

        if hash_bits not in BIT_CHOICES:
            raise UsageError(f"--hash-bits {hash_bits}: use one of {', '.join(map(str, BIT_CHOICES))}")
    use_exact = exact or (allowed is not None and len(allowed) <= EXACT_BELOW)
    if use_exact or hash_bits is not None:
        live = store.count()
    else:
        # an upper bound (deleted labels included); count(*) over the vectors table would
        # read every page of it, which costs more than the search
        live = get_vindex().count

    want = top + len(excluded)
    hits: list[Hit] = []
    while True:
        k = min(live, max(2 * want + 10, want))
        if use_exact:
            ids, scores = _exact(store, query, k, allowed)
        elif hash_bits is not None:
            ids, scores = _hashed(store, query, k, hash_bits, allowed)
        else:
            vi = get_vindex()
            filt = None if allowed is None else (lambda label: int(label) in allowed)
            try:
                ids, scores = vi.search(query, k, live, ef=ef, filter=filt)
            except RuntimeError:
                # the graph found fewer than k items passing the filter: score exactly
                ids, scores = _exact(store, query, k, allowed)
        labels = store.labels(int(i) for i in ids)  # label -> (file id, frame time)
        rows = store.rows({fid for fid, _ in labels.values()})
        cand = []
        for i, s in zip(ids, scores):
            fid, t = labels.get(int(i), (None, None))
            r = rows.get(fid)
            if r is None or fid in excluded:
                continue
            if filters.threshold is not None and s < filters.threshold:
                continue
            cand.append((float(s), r, t))
        cand.sort(key=lambda c: (-round(c[0], 6), c[1]["path"], c[2] or 0.0))
        hits = []
        seen: set[int] = set()
        for s, r, t in cand:
            if not frames and r["id"] in seen:
                continue  # a video once, at its best frame
            seen.add(r["id"])
            if not os.path.exists(fs_path_of(r["path"], r["fsname"])):
                continue  # deleted since it was indexed
            hits.append(Hit(len(hits) + 1, s, r["path"], r["width"], r["height"],
                            r["taken_at"], r["id"], r.get("mtime_ns"), time=t))
            if len(hits) == top:
                break
        exhausted = k >= live or (filters.threshold is not None and len(scores)
                                  and float(np.min(scores)) < filters.threshold)
        if len(hits) >= top or exhausted:
            return hits
        want *= 4  # vanished files or filters ate the candidates: ask for more


def _hashed(store, query, k: int, bits: int, allowed: set[int] | None):
    """Fast then slow: Hamming ranking of binary codes, the best re-ranked by cosine."""
    import numpy as np

    from .binary import code_search

    pairs = code_search(store, query, k, bits=bits)
    if allowed is not None:
        pairs = [(i, s) for i, s in pairs if i in allowed]
    ids = np.asarray([i for i, _ in pairs], dtype=np.int64)
    return ids, np.asarray([s for _, s in pairs], dtype=np.float32)


def _exact(store, query, k: int, allowed: set[int] | None):
    """The ``k`` best labels by cosine (those in ``allowed`` only, unless None), best first,
    ties by label.  The vectors are read :data:`EXACT_CHUNK` rows at a time and only the
    best ``k`` are kept between chunks: a million 512-d vectors are never all in memory
    (2 GB as float32); a small ``allowed`` set is read by its ids."""
    import numpy as np

    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    if allowed is not None and len(allowed) <= EXACT_CHUNK:
        ids, mat = store.vectors(allowed)  # [n], [n, dim]
        return _best(ids, mat @ query, k, ordered=True)
    keep = None if allowed is None else np.fromiter(allowed, dtype=np.int64, count=len(allowed))
    best_ids, best = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    for ids, mat in store.vector_chunks(EXACT_CHUNK):  # [c], [c, dim]
        scores = mat @ query  # [c]
        if keep is not None:
            mask = np.isin(ids, keep)
            ids, scores = ids[mask], scores[mask]
        best_ids, best = _best(np.concatenate([best_ids, ids]),
                               np.concatenate([best, scores]), k, ordered=False)
    return _best(best_ids, best, k, ordered=True)


def _best(ids, scores, k: int, *, ordered: bool):
    """The ``k`` highest ``scores`` and their ``ids``; ``ordered``: best first, ties by id."""
    import numpy as np

    if len(ids) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        ids, scores = ids[part], scores[part]
    if ordered:
        order = np.lexsort((ids, -scores))
        ids, scores = ids[order], scores[order]
    return ids, scores.astype(np.float32, copy=False)


_WS = re.compile(r"\s+")


def clean_text(q: str) -> str:
    return _WS.sub(" ", q).strip()
