"""Contact sheets: one self-contained HTML page of thumbnails (``--html FILE``).

The page needs nothing but itself: thumbnails are embedded as ``data:`` URIs, the style is
inline, there is no script, and a Content-Security-Policy forbids loading anything else.
Each thumbnail links to its original with a percent-encoded ``file://`` URL.  Every piece
of text (queries, paths) is HTML-escaped.

Two layouts: a search (the query, its images shown, then a responsive grid of results with
rank, score and path) and duplicate groups (``itr hash --dupes --html``: one row per group).
"""

from __future__ import annotations

import base64
import html
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Sequence, TextIO
from urllib.parse import quote_from_bytes

from .thumbs import Source, ThumbnailCache

#: Thumbnails on the page fit this box (pixels); shown at up to 220 CSS pixels.
THUMB_BOX = (320, 320)

_CSS = """
:root { color-scheme: light dark; --bg: #fafafa; --fg: #222; --card: #fff; --muted: #666;
        --line: #ddd; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #151515; --fg: #e6e6e6; --card: #222; --muted: #9a9a9a; --line: #333; } }
* { box-sizing: border-box; }
body { margin: 0; padding: 16px 20px 40px; background: var(--bg); color: var(--fg);
       font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; }
header { margin-bottom: 16px; }
h1 { font-size: 20px; margin: 0 0 6px; font-weight: 600; }
h2 { font-size: 15px; margin: 24px 0 8px; font-weight: 600; }
.meta { color: var(--muted); margin: 0; }
.terms { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin: 8px 0; }
.term { display: flex; align-items: center; gap: 8px; background: var(--card);
        border: 1px solid var(--line); border-radius: 8px; padding: 6px 10px; }
.term img { height: 120px; width: auto; max-width: 240px; border-radius: 4px; }
.sign { font-weight: 700; color: var(--muted); }
.grid { display: grid; gap: 12px; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); }
.row { display: flex; gap: 12px; overflow-x: auto; padding-bottom: 4px; }
.row figure { flex: 0 0 220px; }
figure { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 8px;
         overflow: hidden; display: flex; flex-direction: column; }
figure > a.thumb { display: flex; align-items: center; justify-content: center; height: 220px;
                   background: var(--line); }
figure img { max-width: 100%; max-height: 220px; display: block; }
.missing { color: var(--muted); font-style: italic; }
figcaption { padding: 6px 8px 8px; }
.label { font-variant-numeric: tabular-nums; color: var(--muted); }
.words { font-weight: 600; overflow-wrap: anywhere; }
.path { display: block; word-break: break-all; color: inherit; text-decoration: none;
        font-size: 12px; }
.path:hover { text-decoration: underline; }
"""

# No network, no script, no frames: only inline style and data: images.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class Card:
    """One picture on the page."""

    path: str  #: shown (already printable text)
    url: str  #: where the picture links to (``file://...``)
    thumb: bytes | None  #: JPEG, or None when it could not be made
    label: str = ""  #: e.g. ``#1 · 0.3124``
    error: str | None = None  #: why there is no thumbnail
    text: str = ""  #: words read in the picture that the query matched


def file_url(path: str | os.PathLike) -> str:
    """A ``file://`` URL for a local path, every byte outside ``A-Za-z0-9_.-~/``
    percent-encoded (so spaces, ``#``, ``?``, ``%`` and non-UTF-8 names survive)."""
    p = os.path.abspath(os.fspath(path))
    if os.name == "nt":
        from pathlib import Path

        return Path(p).as_uri()
    return "file://" + quote_from_bytes(os.fsencode(p), safe="/")


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _esc(s: object) -> str:
    # file names that are not UTF-8 arrive surrogate-escaped: show their bytes as \xNN, as
    # the library's stored paths do
    text = str(s)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return html.escape(text, quote=True)


def _card_html(c: Card) -> str:
    href = _esc(c.url)
    if c.thumb:
        pic = f'<img src="{data_uri(c.thumb)}" alt="{_esc(os.path.basename(c.path))}">'
    else:
        pic = f'<span class="missing">{_esc(c.error or "no preview")}</span>'
    label = f'<span class="label">{_esc(c.label)}</span>' if c.label else ""
    words = f'<span class="words">{_esc(c.text)}</span>' if c.text else ""
    return (f'<figure><a class="thumb" href="{href}">{pic}</a><figcaption>{label}{words}'
            f'<a class="path" href="{href}">{_esc(c.path)}</a></figcaption></figure>')


def _page(title: str, header: str, body: str) -> str:
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="itr"><title>{_esc(title)}</title>'
        f"<style>{_CSS}</style></head>\n<body>\n<header>{header}</header>\n{body}\n</body></html>\n"
    )


def _generated() -> str:
    return datetime.now().astimezone().replace(microsecond=0).isoformat(sep=" ")


def _cards(cache: ThumbnailCache, sources: Sequence[Source], labels: Sequence[str],
           shown: Sequence[str]) -> list[Card]:
    out = []
    for src, label, text, thumb in zip(sources, labels, shown, cache.get_many(sources, THUMB_BOX)):
        if isinstance(thumb, Exception):
            reason = getattr(thumb, "strerror", None) or str(thumb) or type(thumb).__name__
            out.append(Card(text, file_url(src.path), None, label, f"no preview: {reason}"))
        else:
            out.append(Card(text, file_url(src.path), thumb, label))
    return out


def search_page(terms: Sequence[tuple[str, str, float]], cards: Sequence[Card],
                query_cards: Sequence[Card | None] = (), model: str | None = None) -> str:
    """The page of a search.

    Args:
        terms: the query as (kind ``"text"`` / ``"image"``, value, sign) terms, in order.
        cards: the results, best first.
        query_cards: for each term, the card of its image (None for texts).
        model: shown under the query.
    """
    qcards = list(query_cards) + [None] * (len(terms) - len(query_cards))
    items, title_bits = [], []
    for i, ((kind, value, sign), qc) in enumerate(zip(terms, qcards)):
        sign_s = "" if i == 0 and sign > 0 else ("+ " if sign > 0 else "\u2212 ")
        sign_html = f'<span class="sign">{_esc(sign_s)}</span>' if sign_s else ""
        if kind == "image":
            name = os.path.basename(value)
            title_bits.append(sign_s + name)
            pic = (f'<img src="{data_uri(qc.thumb)}" alt="{_esc(name)}">' if qc and qc.thumb
                   else "")
            link = _esc(file_url(value))
            items.append(f'<span class="term">{sign_html}<a href="{link}">{pic}</a>'
                         f'<a class="path" href="{link}">{_esc(value)}</a></span>')
        else:
            title_bits.append(sign_s + f"\u201c{value}\u201d")
            items.append(f'<span class="term">{sign_html}<q>{_esc(value)}</q></span>')
    n = len(cards)
    meta = f"{n} result{'s' if n != 1 else ''}" + (f" \u00b7 {model}" if model else "")
    header = (f"<h1>itr search</h1><div class=\"terms\">{''.join(items)}</div>"
              f'<p class="meta">{_esc(meta)} \u00b7 {_esc(_generated())}</p>')
    body = '<main class="grid">\n' + "\n".join(_card_html(c) for c in cards) + "\n</main>"
    return _page("itr: " + " ".join(title_bits), header, body)


def dupes_page(groups: Sequence[Sequence[Card]]) -> str:
    """The page of duplicate groups: one row per group."""
    n_files = sum(len(g) for g in groups)
    header = ("<h1>itr: duplicates</h1>"
              f'<p class="meta">{len(groups)} group{"s" if len(groups) != 1 else ""}, '
              f"{n_files} files \u00b7 {_esc(_generated())}</p>")
    sections = []
    for i, g in enumerate(groups, 1):
        sections.append(f'<section class="group"><h2>Group {i} \u00b7 {len(g)} files</h2>'
                        f'<div class="row">{"".join(_card_html(c) for c in g)}</div></section>')
    return _page("itr: duplicates", header, "<main>\n" + "\n".join(sections) + "\n</main>")


def write_text(out: str | os.PathLike | TextIO, text: str) -> None:
    """Write a page to a file name (``-``: stdout) or an open text stream."""
    if hasattr(out, "write"):
        out.write(text)  # type: ignore[union-attr]
        return
    if os.fspath(out) == "-":  # type: ignore[arg-type]
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with open(out, "w", encoding="utf-8") as f:  # type: ignore[arg-type]
        f.write(text)


def write_search_html(out: str | os.PathLike | TextIO, hits: Sequence, sources: Sequence[Source],
                      *, terms: Sequence[tuple[str, str, float]],
                      term_sources: Sequence[Source | None] = (),
                      cache: ThumbnailCache | None = None, model: str | None = None) -> None:
    """Write the contact sheet of a search.

    Args:
        out: a file name, ``-`` for stdout, or a text stream.
        hits: :class:`itrcli.query.search.Hit` s, best first.
        sources: the image of each hit (:func:`itrcli.show.thumbs.source_for`).
        terms: the query, as in :func:`search_page`.
        term_sources: for each term, the image to show (None for texts).
        cache: the thumbnail cache (default: none).
    """
    cache = cache or ThumbnailCache(None)
    cards = _cards(cache, sources, [f"#{h.rank} \u00b7 {h.score:.4f}" for h in hits],
                   [h.path for h in hits])
    for c, h in zip(cards, hits):
        c.text = " ".join(getattr(h, "text", None) or [])
    wanted = [(i, s) for i, s in enumerate(term_sources) if s is not None]
    made = _cards(cache, [s for _, s in wanted], [""] * len(wanted), [s.path for _, s in wanted])
    qcards: list[Card | None] = [None] * len(terms)
    for (i, _), c in zip(wanted, made):
        if i < len(qcards):
            qcards[i] = c
    write_text(out, search_page(terms, cards, qcards, model))


def write_dupes_html(groups: Sequence[Sequence[str]], out: str | os.PathLike | TextIO, *,
                     store=None, cache: ThumbnailCache | None = None) -> None:
    """Write the contact sheet of duplicate groups (``itr hash --dupes --html FILE``).

    Args:
        groups: paths (as the library shows them), one list per group.
        out: a file name, ``-`` for stdout, or a text stream.
        store: the open library's :class:`~itrcli.store.db.Store`, so that thumbnails are
            cached by content hash (and non-UTF-8 names opened); None: paths as given.
        cache: the thumbnail cache, e.g. ``ThumbnailCache.for_library(lib.directory)``.
    """
    from .output import human_bytes
    from .thumbs import source_for

    cache = cache or ThumbnailCache(None)
    flat = [p for g in groups for p in g]
    sources = [source_for(store, p) if store is not None else Source(p) for p in flat]
    labels = []
    for s in sources:
        try:
            labels.append(human_bytes(os.stat(s.path).st_size))
        except OSError:
            labels.append("missing")
    cards = iter(_cards(cache, sources, labels, flat))
    rows = [[next(cards) for _ in g] for g in groups]
    write_text(out, dupes_page(rows))


def query_terms(query: str | None = None, *, image: str | None = None, text: str | None = None,
                add: Iterable[str] = (),
                subtract: Iterable[str] = ()) -> list[tuple[str, str, float]]:
    """The query's terms (kind, value, sign), classified and ordered as
    :meth:`itrcli.library.Library.search` does."""
    from ..query.search import query_parts

    parts = query_parts(query, image=image, text=text, add=add, subtract=subtract)
    return [(p.kind, p.value, p.sign) for p in parts]


__all__ = ["Card", "dupes_page", "file_url", "query_terms", "search_page", "write_dupes_html",
           "write_search_html"]
