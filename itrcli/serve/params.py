"""An HTTP query string as a :class:`~itrcli.query.request.SearchRequest`, under the command
line's option names (``/api/search?q=beach&n=20&after=2024-01-01&glob=*.jpg``), and the
``next`` tokens of paging.

Pure: no web framework, no library.  Every malformed value is a
:class:`~itrcli.errors.UsageError` with a one-line message (the server answers 400).
Nothing a client sends here reaches the file system: the query is always a text (an
``itr search QUERY`` naming an existing image file would make it an image query), and
``add``/``subtract`` terms naming pictures are refused; an image query is ``like=ID`` (a
file the library holds) or an upload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from typing import Any, Iterable

from ..constants import MEDIA_EXTENSIONS
from ..errors import UsageError
from ..query.request import SearchRequest

#: At most this many results a page, and pages up to this offset: a client cannot make
#: one request rank the whole library.
MAX_TOP = 1000
MAX_OFFSET = 100_000
#: At most this many values of a repeatable option, and characters in one value.
MAX_REPEAT = 32
MAX_VALUE = 1000

_TRUE = {"", "1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_PICTURES = MEDIA_EXTENSIONS  # photos of every kind (HEIC, AVIF, RAW) and videos


def _bool(name: str, v: str) -> bool:
    s = v.strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise UsageError(f"{name}={v!r}: expected true or false")


def _int(name: str, v: str, lo: int, hi: int | None = None) -> int:
    try:
        n = int(v.strip())
    except ValueError:
        raise UsageError(f"{name}={v!r}: expected a whole number") from None
    if n < lo or (hi is not None and n > hi):
        raise UsageError(f"{name}={n}: expected {lo} to {hi}" if hi is not None
                         else f"{name}={n}: expected at least {lo}")
    return n


def _float(name: str, v: str) -> float:
    try:
        x = float(v.strip())
    except ValueError:
        raise UsageError(f"{name}={v!r}: expected a number") from None
    if not math.isfinite(x):
        raise UsageError(f"{name}={v!r}: expected a finite number")
    return x


def _text(name: str, v: str) -> str:
    if "\x00" in v:
        raise UsageError(f"{name}: NUL character")
    return v


def _term(name: str, v: str) -> str:
    """An ``add``/``subtract`` term: a text only (an image term would open a path)."""
    v = _text(name, v)
    if os.path.splitext(v.strip())[1].lower() in _PICTURES:
        raise UsageError(f"{name}={v!r}: names a picture file; over HTTP a term is a text "
                         "(search by a picture with like=ID or by uploading it)")
    return v


#: HTTP name -> (request field, parser); repeatable options collect lists.
_SCALARS = {
    "q": "query", "n": "top", "top": "top", "offset": "offset", "after": "after",
    "before": "before", "camera": "camera", "near": "near", "min_size": "min_size",
    "kind": "kind", "sort": "sort", "threshold": "threshold", "auto_cut": "auto_cut",
    "exact": "exact", "ef": "ef", "frames": "frames", "all_files": "all_files", "at": "at",
    "hash": None,
    "hash_bits": None, "no_adapt": "adapt", "text_only": None, "no_text": None,
    "rerank": "rerank", "rerank_k": "rerank_k", "no_rerank_cache": "rerank_cache",
}
_REPEATED = {"in": "in_dirs", "glob": "globs", "add": "add", "subtract": "subtract"}
#: Names the page or the server read themselves (not search options).
_OTHER = {"next", "like"}
NAMES = frozenset(_SCALARS) | frozenset(_REPEATED) | _OTHER


def search_request(pairs: Iterable[tuple[str, str]], *, need_query: bool = True
                   ) -> tuple[SearchRequest, dict[str, Any]]:
    """The request of an ``/api/search`` query string, and the values the server resolves
    itself: ``{"like": file id or None, "next": token or None}``.

    ``need_query``: a text ``q`` (or ``like``) is required (False: an upload is the query).
    Raises:
        UsageError: an unknown name, a repeated single option, a malformed value.
    """
    single: dict[str, str] = {}
    lists: dict[str, list[str]] = {}
    for raw, value in pairs:
        name = raw.replace("-", "_")
        if name not in NAMES:
            raise UsageError(f"unknown parameter {raw!r}")
        if len(value) > MAX_VALUE:
            raise UsageError(f"{raw}: value longer than {MAX_VALUE} characters")
        if name in _REPEATED:
            lists.setdefault(name, []).append(value)
            if len(lists[name]) > MAX_REPEAT:
                raise UsageError(f"{raw}: more than {MAX_REPEAT} values")
        elif name in single:
            raise UsageError(f"{raw} given twice")
        else:
            single[name] = value
    opts: dict[str, Any] = {}
    g = single.get
    if "q" in single:
        q = _text("q", single["q"])
        if not q.strip():
            raise UsageError("empty query: q=")
        opts["text"] = q  # always a text: a client's string never names a file here
    extra = {"like": None, "next": g("next")}
    if "like" in single:
        extra["like"] = _int("like", single["like"], 0)
        if "q" in single:
            raise UsageError("q and like exclude each other (add a text with add=)")
    elif "q" not in single and need_query:
        raise UsageError("give q=TEXT (or like=ID)")
    if "n" in single and "top" in single:
        raise UsageError("n and top are the same option")
    if (v := g("n", g("top"))) is not None:
        opts["top"] = _int("n", v, 1, MAX_TOP)
    if (v := g("offset")) is not None:
        opts["offset"] = _int("offset", v, 0, MAX_OFFSET)
    for name in ("after", "before", "camera", "near", "min_size", "kind"):
        if (v := g(name)) is not None and v.strip():
            opts[name] = _text(name, v.strip())
    if (v := g("sort")) is not None:
        opts["sort"] = v.strip() or "score"
    if (v := g("threshold")) is not None and v.strip():
        opts["threshold"] = _float("threshold", v)
    if (v := g("auto_cut")) is not None:
        # true/false as on the command line, or the floor in standard deviations
        try:
            opts["auto_cut"] = _bool("auto_cut", v)
        except UsageError:
            opts["auto_cut"] = _float("auto_cut", v)
    for name in ("exact", "frames", "all_files", "rerank"):
        if (v := g(name)) is not None:
            opts[name] = _bool(name, v)
    if (v := g("no_adapt")) is not None:
        opts["adapt"] = not _bool("no_adapt", v)
    if (v := g("no_rerank_cache")) is not None:
        opts["rerank_cache"] = not _bool("no_rerank_cache", v)
    if (v := g("ef")) is not None:
        opts["ef"] = _int("ef", v, 1, 100_000)
    if (v := g("rerank_k")) is not None:
        opts["rerank_k"] = _int("rerank_k", v, 1, MAX_TOP)
    if (v := g("at")) is not None:
        if extra["like"] is None:
            raise UsageError("at goes with like=ID of a video")
        opts["at"] = _float("at", v)
    hashed = g("hash")
    if hashed is not None and _bool("hash", hashed):
        opts["hash_bits"] = _int("hash_bits", g("hash_bits", "64"), 1, 4096)
    elif g("hash_bits") is not None:
        raise UsageError("hash_bits goes with hash=true")
    text_only = _bool("text_only", g("text_only", "false"))
    no_text = _bool("no_text", g("no_text", "false"))
    if text_only and no_text:
        raise UsageError("text_only and no_text exclude each other")
    if text_only and ("threshold" in opts or "hash_bits" in opts):
        raise UsageError("threshold and hash rank by cosine: not with text_only")
    opts["text_match"] = "only" if text_only else "none" if no_text else "auto"
    opts["in_dirs"] = [_text("in", v) for v in lists.get("in", []) if v.strip()]
    opts["globs"] = [_text("glob", v) for v in lists.get("glob", []) if v.strip()]
    opts["add"] = [_term("add", v) for v in lists.get("add", []) if v.strip()]
    opts["subtract"] = [_term("subtract", v) for v in lists.get("subtract", []) if v.strip()]
    req = SearchRequest.build(None, **opts)
    return req, extra


# -- paging ---------------------------------------------------------------------------------

def _digest(req: SearchRequest) -> str:
    """What identifies a query across its pages: every field but the offset."""
    d = req.to_dict()
    d.pop("offset")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def next_token(req: SearchRequest) -> str:
    """The token of the page after ``req`` (opaque to clients)."""
    raw = f"{req.offset + req.top}.{_digest(req)}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def offset_of(token: str, req: SearchRequest) -> int:
    """The offset a ``next`` token stands for, for the same query as ``req``.
    Raises:
        UsageError: a malformed token, or one of another query.
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        offset, digest = raw.split(".", 1)
        n = int(offset)
    except (ValueError, UnicodeDecodeError):
        raise UsageError("next: not a token of this server") from None
    if digest != _digest(req):
        raise UsageError("next: the token belongs to another query")
    if not 0 <= n <= MAX_OFFSET:
        raise UsageError(f"next: past the last page a client may ask for ({MAX_OFFSET:,})")
    return n


__all__ = ["MAX_OFFSET", "MAX_TOP", "NAMES", "next_token", "offset_of", "search_request"]
