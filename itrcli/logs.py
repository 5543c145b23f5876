"""Logging for a command's duration: a handler and a level on one logger, both taken back
after (the ``itr`` logger's lines on stderr under ``-v``; a library's advice kept quiet)."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator


@contextlib.contextmanager
def handled(logger: logging.Logger, handler: logging.Handler, level: int) -> Iterator[None]:
    """``logger`` with ``handler`` and at ``level`` inside the block; as it was after."""
    before = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)
