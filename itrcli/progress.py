"""The progress interface that long runs report to (indexing, evaluation), and the
default number of decode threads.  Light: the terminal and log implementations live in
:mod:`itrcli.show.output`, and a run never imports them."""

from __future__ import annotations

import os
from typing import Protocol


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, files: int, embedded: int) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, files: int, embedded: int) -> None:
        pass

    def close(self) -> None:
        pass


def default_workers() -> int:
    """Decode threads: enough to keep the encoder fed without starving torch's threads
    (and the near-duplicate search's threads, :mod:`itrcli.query.dupes`)."""
    return max(1, min(4, (os.cpu_count() or 1)))
