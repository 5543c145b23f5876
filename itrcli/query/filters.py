"""Metadata filters and result order for search: camera, place, path glob, size, kind.

Each option is parsed by a small pure function (option text -> value, or a one-line
:class:`~itrcli.errors.UsageError`).  The store evaluates what SQL does well, in C, over
the ``files`` table (camera, glob, size, and the latitude band of ``--near``; see
:mod:`itrcli.store.metadata`); :meth:`MetaFilter.matches` then decides on the rows that
remain with what needs more than SQL: the great-circle distance, and :func:`row_kind`.

- ``--camera TEXT``: the camera recorded at index time (EXIF make and model, e.g.
  ``Apple iPhone 12``) contains TEXT, case-insensitive for ASCII letters (SQL ``LIKE``).
  Files without a camera never match.
- ``--near LAT,LON[,KM]``: great-circle distance from the point at most KM kilometres
  (default :data:`DEFAULT_NEAR_KM`); files without GPS never match.
- ``--glob PATTERN`` (repeatable, any may match): shell wildcards ``*``, ``?``, ``[...]``
  (``[!...]`` negated), case-sensitive, ``*`` also crossing ``/``.  An absolute pattern
  is matched against the whole path, any other against the end of the path after a
  ``/`` (``*.png``: files ending in .png; ``2023/*.jpg``: under a folder named 2023).
- ``--min-size WxH``: at least W pixels wide and H high (after EXIF rotation).
- ``--kind image|video``: what :func:`row_kind` says the row is.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Sequence

from ..errors import UsageError

#: ``--near`` radius when none is given, in kilometres: a town and its surroundings.
DEFAULT_NEAR_KM = 10.0
#: Mean Earth radius (IUGG), kilometres.
EARTH_RADIUS_KM = 6371.0088
KINDS = ("image", "video")
SORTS = ("score", "date", "path")


@dataclass(frozen=True)
class Near:
    lat: float
    lon: float
    km: float = DEFAULT_NEAR_KM

    def lat_range(self) -> tuple[float, float]:
        """Latitudes a match can have: along a meridian a degree is the shortest, so no
        point outside this band is within ``km`` (a superset, safe for SQL narrowing)."""
        d = math.degrees(self.km / EARTH_RADIUS_KM)
        return self.lat - d, self.lat + d


@dataclass
class MetaFilter:
    """The metadata options of one search; empty means no filter."""

    camera: str | None = None
    near: Near | None = None
    globs: list[str] = field(default_factory=list)
    min_size: tuple[int, int] | None = None
    kind: str | None = None

    @property
    def narrows(self) -> bool:
        return bool(self.camera or self.near or self.globs or self.min_size or self.kind)

    @property
    def needs_rows(self) -> bool:
        """Whether :meth:`matches` has anything to decide after the SQL narrowing."""
        return self.near is not None or self.kind is not None

    def matches(self, row: Mapping[str, Any]) -> bool:
        """What SQL leaves to Python, on one ``files`` row (``lat``, ``lon``, and ``kind``
        where the schema has it): the distance to ``near`` and the kind."""
        if self.kind is not None and row_kind(row) != self.kind:
            return False
        if self.near is not None:
            lat, lon = row.get("lat"), row.get("lon")
            if lat is None or lon is None:
                return False
            if distance_km(self.near.lat, self.near.lon, lat, lon) > self.near.km:
                return False
        return True

    def sql_globs(self) -> list[str]:
        """The ``--glob`` patterns as SQLite ``GLOB`` patterns over the whole path."""
        return [glob_sql(g) for g in self.globs]


def row_kind(row: Mapping[str, Any]) -> str:
    """``"image"`` or ``"video"`` for a ``files`` row.  The one place that decides: a video's
    row has a ``duration`` (see ``m005_video_frames``); every other row is an image."""
    return "video" if row.get("duration") is not None else "image"


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle (haversine) distance in kilometres between two points in degrees."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def glob_sql(pattern: str, *, pathmod=os.path) -> str:
    """A ``--glob`` pattern as an SQLite ``GLOB`` pattern over the whole path: relative
    patterns get ``*/`` in front (the end of the path after a ``/``), and the shell's
    ``[!...]`` becomes SQLite's ``[^...]``.  With ``ntpath`` (Windows, whose stored paths
    use ``\\``): ``/`` in the pattern stands for ``\\``, and ``C:\\...`` or
    ``\\\\server\\...`` is absolute."""
    pattern = re.sub(r"\[!", "[^", pattern)
    sep = pathmod.sep
    if sep != "/":
        pattern = pattern.replace("/", sep)
    return pattern if pathmod.isabs(pattern) else "*" + sep + pattern


# --- parsing option values ------------------------------------------------------------

_NUM = r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*"


def parse_near(value: str | None) -> Near | None:
    """``"LAT,LON"`` or ``"LAT,LON,KM"`` (decimal degrees, kilometres) -> :class:`Near`."""
    if value is None:
        return None
    m = re.fullmatch(_NUM + "," + _NUM + "(?:," + _NUM + ")?", value)
    if not m:
        raise UsageError(f"--near {value!r}: expected LAT,LON or LAT,LON,KM in decimal "
                         "degrees and kilometres, e.g. 48.8584,2.2945,5")
    lat, lon = float(m[1]), float(m[2])
    km = float(m[3]) if m[3] is not None else DEFAULT_NEAR_KM
    if not -90 <= lat <= 90 or not -180 <= lon <= 180:
        raise UsageError(f"--near {value!r}: latitude must be within -90..90 and longitude "
                         "within -180..180")
    if km <= 0:
        raise UsageError(f"--near {value!r}: the radius must be more than 0 km")
    return Near(lat, lon, km)


def parse_min_size(value: str | None) -> tuple[int, int] | None:
    """``"WxH"`` -> (W, H) in pixels."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*", value)
    if not m:
        raise UsageError(f"--min-size {value!r}: expected WIDTHxHEIGHT in pixels, e.g. 1920x1080")
    return int(m[1]), int(m[2])


def parse_globs(values: Sequence[str]) -> list[str]:
    out = []
    for g in values:
        if not g.strip():
            raise UsageError("--glob: empty pattern")
        out.append(os.path.expanduser(g))
    return out


def parse_camera(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.strip():
        raise UsageError("--camera: empty text")
    return value.strip()


def parse_kind(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v not in KINDS:
        raise UsageError(f"--kind {value!r}: expected {' or '.join(KINDS)}")
    return v


def parse_sort(value: str | None) -> str:
    v = (value or "score").strip().lower()
    if v not in SORTS:
        raise UsageError(f"--sort {value!r}: expected {', '.join(SORTS)}")
    return v


def meta_filter(*, camera: str | None = None, near: str | None = None,
                globs: Sequence[str] = (), min_size: str | None = None,
                kind: str | None = None) -> MetaFilter:
    """A :class:`MetaFilter` from option texts (raises :class:`UsageError` on bad input)."""
    return MetaFilter(parse_camera(camera), parse_near(near), parse_globs(globs),
                      parse_min_size(min_size), parse_kind(kind))


# --- result order ----------------------------------------------------------------------

def when(taken_at: str | None, mtime_ns: int | None) -> str:
    """Capture time (EXIF), else the file's modification time, as local ISO 8601 text
    (comparable as strings); empty when neither is known."""
    if taken_at:
        return taken_at
    if mtime_ns is not None:
        return datetime.fromtimestamp(mtime_ns / 1e9).isoformat(timespec="seconds")
    return ""


def sort_hits(hits: list, by: str) -> list:
    """Reorder hits (already the best by score): ``score`` as ranked, ``date`` newest
    first (undated last), ``path`` ascending; ties by path.  Each hit keeps its rank
    (its place by score)."""
    if by == "date":
        return sorted(sorted(hits, key=lambda h: h.path),
                      key=lambda h: when(h.taken_at, h.mtime_ns), reverse=True)
    if by == "path":
        return sorted(hits, key=lambda h: h.path)
    return list(hits)
