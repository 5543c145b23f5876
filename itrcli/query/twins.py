"""Twins: the files of one photo, as cameras and phones write them side by side.

A camera set to RAW+JPEG writes ``IMG_0001.CR2`` and ``IMG_0001.JPG``; an iPhone's Live
Photo is ``IMG_0001.HEIC`` and ``IMG_0001.MOV`` (a clip of about 3 s).  Files of the same
folder and the same stem (the name without its extension, case kept) are **one photo**
when one of them is plainly the photo to show:

- the kinds rank: an ordinary image (JPEG, PNG, WebP...) first, then HEIC/HEIF and AVIF,
  then camera RAW, then a short video (the Live Photo's clip: at most
  :data:`LIVE_CLIP_MAX_S` seconds; a longer video of the same name is a video of its own);
- the **primary** is the one file of the best kind present; when two files share the best
  kind (``a.jpg`` and ``a.png``) they are distinct pictures and no file of the stem is
  merged; a stem of videos alone is no photo.

Nothing is stored: the twins of a file are its stem's rows, found by one range of the
path index (:meth:`itrcli.store.db.Store.rows_by_prefixes`) when a search or
``itr hash --dupes`` needs them, so they follow every add, move and removal for free.
Search gives one hit per photo, the primary's path, the others in ``alternates``
(``--all-files``: every file its own hit); ``--dupes`` does not report twins as copies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..constants import AVIF_EXTENSIONS, HEIF_EXTENSIONS, RAW_EXTENSIONS, VIDEO_EXTENSIONS

#: A video of a photo's stem is its Live Photo clip when at most this long (Apple's are
#: about 3 s; a camera's own clip of the same number is longer, and stays a video).
LIVE_CLIP_MAX_S = 6.0


def stem_prefix(path: str) -> str | None:
    """``<folder>/<stem>.``: the start every twin's path shares, or None for a name with
    no extension."""
    head, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    if not stem or not ext:
        return None
    return os.path.join(head, stem) + "."


def kind_rank(path: str, duration: float | None = None) -> int | None:
    """0 an ordinary image, 1 HEIF/AVIF, 2 camera RAW, 3 a short video; None: no twin."""
    ext = os.path.splitext(path)[1].lower()
    if ext in VIDEO_EXTENSIONS:
        return 3 if duration is not None and duration <= LIVE_CLIP_MAX_S else None
    if ext in RAW_EXTENSIONS:
        return 2
    if ext in HEIF_EXTENSIONS or ext in AVIF_EXTENSIONS:
        return 1
    return 0


def _stem(path: str) -> tuple[str, str]:
    head, name = os.path.split(path)
    return head, os.path.splitext(name)[0]


def primaries(items: Iterable[tuple[str, float | None]]) -> dict[str, str]:
    """Each twin's path -> its photo's primary path (the primary maps to itself), from
    ``(path as shown, duration)`` of the files of some stems; files that are no twin are
    absent."""
    by_stem: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for path, duration in items:
        k = kind_rank(path, duration)
        if k is not None and os.path.splitext(path)[1]:
            by_stem.setdefault(_stem(path), []).append((k, path))
    out: dict[str, str] = {}
    for members in by_stem.values():
        if len(members) < 2:
            continue
        members.sort()
        best = members[0][0]
        if best == 3 or (len(members) > 1 and members[1][0] == best):
            continue  # videos alone, or two pictures of the same kind: not one photo
        primary = members[0][1]
        for _k, p in members:
            out[p] = primary
    return out


@dataclass
class Photo:
    """The files of one photo: the primary's row, and every member's row by path."""

    primary: dict[str, Any]
    members: dict[str, dict[str, Any]] = field(default_factory=dict)

    def alternates(self, shown: str) -> list[str]:
        """The paths of the other files of the photo than ``shown``, sorted."""
        return sorted(p for p in self.members if p != shown)


def photos_of(store, paths: Sequence[str]) -> dict[str, Photo]:
    """The photo each of ``paths`` (as shown) belongs to, for those that are twins: one
    range of the path index per stem."""
    prefixes = [p for p in (stem_prefix(x) for x in paths) if p is not None]
    if not prefixes:
        return {}
    rows = {r["path"]: r for r in store.rows_by_prefixes(prefixes)}
    prim = primaries((p, r.get("duration")) for p, r in rows.items())
    photos: dict[str, Photo] = {}
    out: dict[str, Photo] = {}
    for p, pp in prim.items():
        ph = photos.get(pp)
        if ph is None:
            ph = photos[pp] = Photo(rows[pp])
        ph.members[p] = rows[p]
    for p in paths:
        if p in prim:
            out[p] = photos[prim[p]]
    return out


def collapse(store, hits: list, *, all_files: bool = False, allowed=None,
             excluded: Iterable[str] = ()) -> list:
    """One hit per photo (see the module docstring), in the order of ``hits``: the first
    (best) hit of a photo stands for it, under its primary's path when the primary may be
    shown (``allowed(row)``: it passes the search's filters; its file exists), with the
    other files in ``alternates``.  ``all_files``: every hit kept, each naming the others
    of its photo.  A photo one of whose files is ``excluded`` (the query image) is left out.
    Hits are renumbered."""
    from ..store.db import fs_path_of

    photos = photos_of(store, [h.path for h in hits])
    if not photos:
        return hits
    excluded = set(excluded)
    out = []
    seen: set[int] = set()
    for h in hits:
        ph = photos.get(h.path)
        if ph is None:
            out.append(h)
            continue
        if excluded & set(ph.members):
            continue  # the same photo as the query
        if not all_files:
            pid = ph.primary["id"]
            if pid in seen:
                continue
            seen.add(pid)
            row = ph.primary
            if row["path"] != h.path and (allowed is None or allowed(row)) and os.path.exists(
                    fs_path_of(row["path"], row["fsname"])):
                h.path, h.id, h.width, h.height = row["path"], row["id"], row["width"], row["height"]
                h.taken_at, h.mtime_ns, h.time = row["taken_at"], row.get("mtime_ns"), None
        h.alternates = ph.alternates(h.path)
        out.append(h)
    for n, h in enumerate(out):
        h.rank = n + 1
    return out


def fold_groups(store, groups: list[list[str]]) -> list[list[str]]:
    """Near-duplicate groups of paths (as shown) with the twins of a photo folded into its
    first member: a RAW and its JPEG are one photo, not two copies.  Groups left with
    one member are dropped."""
    photos = photos_of(store, [p for g in groups for p in g])
    out = []
    for g in groups:
        seen: set[int] = set()
        kept = []
        for p in g:
            ph = photos.get(p)
            if ph is not None:
                if ph.primary["id"] in seen:
                    continue
                seen.add(ph.primary["id"])
                # the photo under its primary's path when the group holds it
                p = ph.primary["path"] if ph.primary["path"] in g else p
            kept.append(p)
        if len(kept) > 1:
            out.append(kept)
    return out
