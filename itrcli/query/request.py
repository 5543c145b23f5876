"""A search as one request in and one result out: the objects that the command line, the
Python API (:meth:`itrcli.library.Library.search`) and the server share.

A :class:`SearchRequest` holds every option of ``itr search`` under the command line's
names (``--in`` is ``in_dirs``, ``--glob`` is ``globs``); a :class:`SearchResult` holds the
hits with what the search used to find them (the adapter, the re-ranker's feature cache)
and how long each step took.  Both are plain data: no model, no database.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..constants import TEXT_PRECISIONS
from ..errors import UsageError

#: ``text_match`` values: fuse cosine and the words read in images, words only, cosine only
TEXT_MATCH_MODES = ("auto", "only", "none")

_SEQUENCES = ("add", "subtract", "in_dirs", "globs")


@dataclass(frozen=True)
class SearchRequest:
    """What to search for, how, and which results to return (see ``itr search --help``).

    ``query`` is a text, or an image when it names an existing image or video file;
    ``image`` / ``text`` force the kind.  ``top`` results are returned from ``offset`` on
    (paging: the next page has ``offset + top``).  ``hash_bits``: rank binary codes first.
    ``auto_cut``: True, or the floor in standard deviations.  ``text_match``: on a library
    that reads text, ``auto`` fuses cosine with the words' match, ``only`` ranks by the
    words, ``none`` by cosine.  ``frames``: every matching video frame, not each video once;
    ``at``: the frame of a video query.  ``rerank``: re-score the first ``rerank_k``.
    ``all_files``: every file its own hit, not one hit per photo (a RAW and its JPEG, a
    Live Photo and its clip are one photo: :mod:`itrcli.query.twins`).  ``text_precision``:
    ``int8`` embeds the text with the int8 text tower (:mod:`itrcli.embed.textquant`),
    ``fp32`` with the float32 one, None as the library does (``Library.text_precision``).
    """

    query: str | None = None
    image: str | None = None
    text: str | None = None
    add: tuple[str, ...] = ()
    subtract: tuple[str, ...] = ()
    top: int = 10
    offset: int = 0
    in_dirs: tuple[str, ...] = ()
    threshold: float | None = None
    after: str | None = None
    before: str | None = None
    camera: str | None = None
    near: str | None = None
    globs: tuple[str, ...] = ()
    min_size: str | None = None
    kind: str | None = None
    sort: str = "score"
    auto_cut: bool | float = False
    exact: bool = False
    ef: int | None = None
    hash_bits: int | None = None
    adapt: bool = True
    text_match: str = "auto"
    frames: bool = False
    all_files: bool = False
    at: float | None = None
    rerank: bool = False
    rerank_k: int | None = None
    rerank_model: str | None = None
    rerank_cache: bool = True
    device: str = "auto"
    precision: str = "auto"
    text_precision: str | None = None

    def __post_init__(self) -> None:
        for name in _SEQUENCES:  # lists welcome; kept as tuples (the request is immutable)
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(str(v) for v in value or ()))

    @classmethod
    def build(cls, query: str | None = None, **options: Any) -> "SearchRequest":
        """A request from keyword options, checked (:meth:`checked`).
        Raises:
            UsageError: an option of no such name, or a value out of range.
        """
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UsageError(f"unknown search option(s): {', '.join(unknown)}")
        return cls(query=query, **options).checked()

    def replace(self, **changes: Any) -> "SearchRequest":
        """A copy with ``changes`` (e.g. the next page: ``offset=r.offset + r.top``)."""
        return SearchRequest.build(**{**self.to_dict(), **changes})

    def checked(self) -> "SearchRequest":
        """Itself, once the values that need no library are in range.
        Raises:
            UsageError: the first value that is not.
        """
        if self.top < 1:
            raise UsageError("--top must be at least 1")
        if self.offset < 0:
            raise UsageError("offset must be at least 0")
        if self.text_match not in TEXT_MATCH_MODES:
            raise UsageError(f"text_match {self.text_match!r}: expected auto, only or none")
        if self.rerank_k is not None and self.rerank_k < 1:
            raise UsageError("--rerank-k must be at least 1")
        if self.at is not None and self.at < 0:
            raise UsageError("--at must be at least 0")
        if self.hash_bits is not None and self.hash_bits < 1:
            raise UsageError("--hash-bits must be positive")
        if self.ef is not None and self.ef < 1:
            raise UsageError("ef must be at least 1")
        if self.text_precision is not None and self.text_precision not in TEXT_PRECISIONS:
            raise UsageError(f"--text-precision {self.text_precision!r}: expected "
                             f"{' or '.join(TEXT_PRECISIONS)}")
        return self

    @property
    def label(self) -> str | None:
        """The query as results name it (``"query"`` in JSON)."""
        return self.query if self.query is not None else (self.image or self.text)

    def to_dict(self) -> dict[str, Any]:
        """Every field, sequences as lists (JSON-ready)."""
        d = dataclasses.asdict(self)
        for name in _SEQUENCES:
            d[name] = list(d[name])
        return d


@dataclass
class SearchResult:
    """The hits of one :class:`SearchRequest` and how they were found.

    Iterating, indexing and ``len()`` go over the hits, so a result reads as the list of
    :class:`itrcli.query.search.Hit` s that ``Library.search`` returned before 0.3.0.
    """

    request: SearchRequest
    hits: list = field(default_factory=list)
    model: str | None = None
    #: the method of the library's adapter that mapped the text (``itr adapt``), or None
    adapter: str | None = None
    #: the re-ranker's feature cache as this search used it: hits, misses, writes and the
    #: error that kept it from being written; None without ``rerank`` or without the cache
    rerank_cache: dict[str, Any] | None = None
    #: seconds spent: ``embed`` (the query vector), ``rank``, ``rerank`` and ``total``
    timings: dict[str, float] = field(default_factory=dict)
    #: whether results go on past this page (for ``offset + top``)
    more: bool = False

    def __iter__(self) -> Iterator:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, i):
        return self.hits[i]

    def __bool__(self) -> bool:
        return bool(self.hits)

    def to_json(self) -> dict[str, Any]:
        """The object of ``itr search --json``: query, model, adapter, results."""
        return {"query": self.request.label, "model": self.model, "adapter": self.adapter,
                "results": [h.to_json() for h in self.hits]}
