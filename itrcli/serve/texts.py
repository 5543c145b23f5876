"""The int8 text tower of a server's searches, run on threads of its own beside the
library's thread, so that the texts of some searches are embedded while others walk the
graph.

A text search hands its text to :class:`TextEmbedder` before it queues for the library's
thread, waits for the vector, then searches with it (the library keeps it as the vector
of that text: :meth:`itrcli.library.Library.keep_text_vector`).  The int8 tower embeds
one text at a time (its vector would depend on a batch: :mod:`itrcli.embed.textquant`),
so two single-threaded workers embed two texts at once.  (The float32 tower stays on the
library's thread, where the texts that wait are embedded in batches: beside it, its two
threads lost more to the graph walks than they gained.)

Only the exported ONNX tower is used here (an onnxruntime session runs from any thread);
until the library's thread has handed one over (:meth:`TextEmbedder.use`), or where a
library has none, searches embed their texts themselves.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

#: Texts embedded at once (each on one thread: two CPUs kept busy between them and the
#: library's thread).
WORKERS = 2


class TextEmbedder:
    """Embeds texts with the encoder the library's thread last handed over."""

    def __init__(self, workers: int = WORKERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="itr-text")
        self._encoder: Any = None

    def use(self, encoder: Any) -> None:
        """From the library's thread: the text encoder of its searches now (None: none to
        use here; those searches embed their texts themselves)."""
        self._encoder = encoder

    def submit(self, text: str) -> Future | None:
        """A future of ``(encoder, vector [dim])`` for ``text`` (``(None, None)`` when it
        could not be embedded here: the search embeds it, and reports any error), or None
        when no encoder has been handed over."""
        enc = self._encoder
        if enc is None:
            return None
        try:
            return self._pool.submit(_embed, enc, text)
        except RuntimeError:  # shut down
            return None

    def close(self) -> None:
        self._encoder = None
        self._pool.shutdown(wait=False, cancel_futures=True)


def _embed(enc, text: str) -> tuple[Any, Any]:
    try:
        return enc, enc.encode_texts([text])[0]  # [dim]
    except Exception:
        return None, None


__all__ = ["TextEmbedder"]
