"""A search result for people and for pipes: the terminal table (with inline previews),
the piped ``score<TAB>path`` lines, and the contact sheet with its thumbnails.

Reads the store (the images behind the hits), never writes it.  Imports Pillow only when a
thumbnail or preview is drawn.
"""

from __future__ import annotations

from typing import Iterator, TextIO

from .output import err, format_time, one_line


def piped_lines(result) -> str:
    """``score<TAB>path`` lines (``<TAB>seconds`` after a video frame's path); with
    ``rerank``: ``match<TAB>score<TAB>path``, match ``-`` past the re-scored ones."""
    def tail(h) -> str:
        return "" if h.time is None else f"\t{h.time:.2f}"

    if result.request.rerank:
        return "".join(("-" if h.rerank_score is None else f"{h.rerank_score:.4f}")
                       + f"\t{h.score:.4f}\t{h.path}{tail(h)}\n" for h in result.hits)
    return "".join(f"{h.score:.4f}\t{h.path}{tail(h)}\n" for h in result.hits)


def words_cell(words: list[str] | None, limit: int = 30) -> str:
    """The matched words of a hit, for the terminal table ("-" when none matched; control
    characters escaped)."""
    text = " ".join(one_line(w) for w in words or []) or "-"
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def write_table(out: TextIO, result, previews: Iterator | None = None) -> None:
    """The terminal table: rank, (match,) score, date, (time,) (words,) path; under each row
    its preview when ``previews`` yields them (an exception: that image's failure).  A
    terminal gets no control character from a file name or a word (escaped as ``ls -b``)."""
    hits = result.hits
    width = max([len(str(max((h.rank for h in hits), default=0)))] + [1])
    words = {h.id: words_cell(h.text) for h in hits if h.text is not None}
    text_w = max([len(w) for w in words.values()] + [0])
    times = [format_time(h.time) if h.time is not None else "" for h in hits]
    tw = max(map(len, times), default=0)  # a time column only when a video ranks
    rerank = result.request.rerank
    for h, t in zip(hits, times):
        date = h.date or "-"
        match = "" if not rerank else (
            f"{h.rerank_score:.4f}  " if h.rerank_score is not None else "     -  ")
        cell = f"{words.get(h.id, ''):<{text_w}}  " if words else ""
        when = f"{t:>{tw}}  " if tw else ""
        out.write(f"{h.rank:>{width}}  {match}{h.score:.4f}  {date:<10}  {when}{cell}"
                  f"{one_line(h.path)}\n")
        if previews is not None:
            seq = next(previews)
            if isinstance(seq, Exception):
                err(f"itr: no preview of {one_line(h.path)}: "
                    f"{getattr(seq, 'strerror', None) or seq}")
            else:
                out.write(seq + "\n")
            out.flush()  # each image as soon as it is ready


class Pictures:
    """The images behind a result's hits, for previews and the contact sheet, with the
    library's thumbnail cache (trimmed to its cap by :meth:`close`)."""

    def __init__(self, store, directory, result) -> None:
        from .thumbs import ThumbnailCache, source_for

        self.store, self.result = store, result
        self.cache = ThumbnailCache.for_library(directory)
        self.sources = [source_for(store, h.path, h.time) for h in result.hits]

    def previews(self, out: TextIO, *, protocol: str, rows: int) -> Iterator | None:
        """Inline images for ``out`` (a terminal), or None with the reason on stderr."""
        from .preview import for_terminal

        previewer, found = for_terminal(out, force=protocol, rows=rows, cache=self.cache)
        if previewer is None:
            err(f"itr: no image previews: {found.reason}")
            return None
        return previewer.sequences(self.sources)

    def write_sheet(self, target: str) -> None:
        """The contact sheet of the result into ``target`` (a file, or ``-`` for stdout),
        the query's images shown beside its words.
        Raises:
            OSError: ``target`` cannot be written.
        """
        from ..ingest.video import is_video
        from .contact_sheet import query_terms, write_search_html
        from .thumbs import source_for

        req = self.result.request
        terms = query_terms(req.query, image=req.image, text=req.text, add=list(req.add),
                            subtract=list(req.subtract))

        def frame(v):  # a video term shows its --at frame (else its first)
            return (req.at or 0.0) if is_video(v) else None

        term_sources = [source_for(self.store, v, frame(v)) if k == "image" else None
                        for k, v, _ in terms]
        write_search_html(target, self.result.hits, self.sources, terms=terms,
                          term_sources=term_sources, cache=self.cache, model=self.result.model)

    def close(self) -> None:
        self.cache.trim()  # evict least recently used thumbnails beyond the cap
