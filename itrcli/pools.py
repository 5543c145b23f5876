"""Work handed to a thread pool with its results taken in order, a bounded number ahead:
the store's decoding beside its reads, the near-duplicate search's tasks.  Light (the
standard library only), so the lowest layers may use it."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Executor
from typing import Callable, Iterable, Iterator, TypeVar

_T = TypeVar("_T")
_R = TypeVar("_R")


def in_order(pool: Executor, fn: Callable[[_T], _R], items: Iterable[_T], ahead: int) -> Iterator[_R]:
    """``fn`` of each item, run in ``pool`` with at most ``ahead`` items in flight (and so at
    most that many results held); the results come in the items' order.  ``items`` is read
    in the calling thread (a SQLite cursor may be)."""
    waiting: deque = deque()
    for item in items:
        waiting.append(pool.submit(fn, item))
        if len(waiting) >= ahead:
            yield waiting.popleft().result()
    while waiting:
        yield waiting.popleft().result()
