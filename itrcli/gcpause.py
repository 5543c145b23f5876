"""The cyclic garbage collector paused while a block builds long-lived objects, and memory
given back to the system once large objects are gone (:func:`give_back_memory`).

A block that makes a million objects (a walk's entries, the library's file rows, the
imports of torch and transformers) sets off a full collection again and again on the way,
each one walking every object made so far: 30% of a million-file walk here, 1 s of
importing torch and transformers.  None of those objects is garbage, and whatever the
block does leave as garbage is collected after it.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def gc_paused() -> Iterator[None]:
    """Collector off for the block, then back as it was (nesting is fine)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def give_back_memory() -> None:
    """Collect now, and have glibc return its freed heap pages to the system (it keeps
    them otherwise: a process that dropped a model's weights would still hold their pages
    while the next step loads other copies).  Harmless where there is no glibc."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
