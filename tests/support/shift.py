"""A domain-shift set for the micro CLIP: its drawings captioned in words it never saw.

The micro CLIP (``tests/fixtures/micro-clip``) learnt one token per caption word ("red",
"circle", "left", ...).  Here every colour, shape and position is said another way
("crimson", "orb", "on the port side"), spelt with byte pieces the model never trained
on, so its zero-shot recall on these captions is low, while a map fitted on some of them
can learn the new words (see ``itr adapt``).
"""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path

from . import synth

#: Caption words and phrases of :func:`synth.caption`, and how the shifted captions say them.
SYNONYMS: dict[str, str] = {
    "red": "crimson", "green": "emerald", "blue": "azure", "yellow": "lemon",
    "purple": "violet", "orange": "tangerine",
    "circle": "orb", "square": "box", "triangle": "wedge", "star": "asterisk", "cross": "plus",
    "on the left": "on the port side", "on the right": "on the starboard side",
    "at the top": "up high", "at the bottom": "down low", "in the center": "in the middle",
}

_PATTERN = re.compile(r"\b(" + "|".join(sorted(map(re.escape, SYNONYMS), key=len, reverse=True))
                      + r")\b")


def shifted_caption(color: str, shape: str, position: str) -> str:
    """``"a crimson orb on the port side"`` for ``("red", "circle", "left")``."""
    return _PATTERN.sub(lambda m: SYNONYMS[m.group(1)], synth.caption(color, shape, position))


def write_shift_set(directory: Path, *, seed: int = 0, first_seed: int = 3_000_000,
                    copies: int = 1) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Draw ``copies`` images of every (colour, shape, position) under ``directory/a`` and
    ``directory/b`` (a seeded half of the combinations each) and write ``a.csv``, ``b.csv``
    and ``all.csv`` (``image,caption``, shifted captions, paths relative to ``directory``).

    Drawing seeds from 3,000,000 on: unseen by the micro CLIP's training (0-95) and its
    held-out report (1,000,000+).  Returns the (relative path, caption) rows of a and b.
    """
    combos = synth.combinations()
    random.Random(seed).shuffle(combos)
    half = len(combos) // 2
    rows: dict[str, list[tuple[str, str]]] = {"a": [], "b": []}
    for i, (color, shape, pos) in enumerate(combos):
        part = "a" if i < half else "b"
        (directory / part).mkdir(parents=True, exist_ok=True)
        for c in range(copies):
            rel = f"{part}/{color}-{shape}-{pos}-{c}.png"
            synth.draw(color, shape, pos, seed=first_seed + i * copies + c).save(directory / rel)
            rows[part].append((rel, shifted_caption(color, shape, pos)))
    for name, rs in (("a", rows["a"]), ("b", rows["b"]), ("all", rows["a"] + rows["b"])):
        with open(directory / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            w.writerows(rs)
    return rows["a"], rows["b"]
