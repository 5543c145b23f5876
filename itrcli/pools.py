"""Work handed to other threads: a pool's results taken in order, a bounded number ahead
(the store's decoding beside its reads, the near-duplicate search's tasks), and one call
on a daemon thread of its own (the encoder's load beside the decoding, a graph's compact
copy).  Light (the standard library only), so the lowest layers may use it."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Executor, Future
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


def in_thread(fn: Callable[[], _R], name: str) -> "Future[_R]":
    """``fn()`` on a daemon thread of its own (dropped at exit, where a pool's workers are
    joined); its result or exception in the returned future."""
    done: Future = Future()

    def run() -> None:
        try:
            done.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to whoever takes the result
            done.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return done
