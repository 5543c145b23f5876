"""Image-caption evaluation datasets: detecting the format and loading images + captions.

Formats (``format=`` or detected from the path):

- ``karpathy``: Karpathy split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``):
  ``images[]`` with ``filename``, optional ``filepath``, ``split`` and
  ``sentences[].raw``.  Has splits; ``test`` by default (Flickr30k 1K, COCO 5K).
- ``coco``: COCO captions JSON (``captions_val2017.json``): ``images[].{id, file_name}``
  and ``annotations[].{image_id, caption}``.  The file is one split.
- ``csv``: a header row naming ``image`` and ``caption`` columns, one row per caption;
  rows of the same image need not be adjacent.  A caption containing commas may be
  quoted, or left unquoted when ``caption`` is the last column.
- ``folder``: a directory where each image has a same-stem ``.txt`` file holding one
  caption per line.

Image paths in the files are relative to ``images`` (default: the directory holding the
annotation file).  Images that are listed but not on disk are left out and reported in
:attr:`Dataset.missing`, never silently.  Malformed files raise
:class:`~itrcli.errors.UsageError` naming the file and the line or entry.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import UsageError
from ..ingest.images import supported_extensions

FORMATS = ("karpathy", "coco", "csv", "folder")


@dataclass
class Dataset:
    """Images and their captions, in dataset order.

    ``captions[i]`` are the captions of ``images[i]``; every image has at least one.
    """

    name: str  #: e.g. "flickr30k", "captions_val2017", the CSV's stem, the folder's name
    format: str  #: one of :data:`FORMATS`
    source: str  #: the annotation file or folder
    split: str | None  #: None for formats without splits
    images: list[str] = field(default_factory=list)  #: absolute paths
    captions: list[list[str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  #: listed, not on disk: left out
    uncaptioned: list[str] = field(default_factory=list)  #: on disk, no caption: left out

    @property
    def n_captions(self) -> int:
        return sum(len(c) for c in self.captions)

    def flat(self) -> tuple[list[str], list[int]]:
        """(every caption ``[n_captions]``, the index of its image ``[n_captions]``)."""
        texts, owner = [], []
        for i, caps in enumerate(self.captions):
            texts += caps
            owner += [i] * len(caps)
        return texts, owner

    def subset(self, keep: Iterable[int]) -> "Dataset":
        """The same dataset restricted to the images at indices ``keep`` (in that order)."""
        keep = list(keep)
        return Dataset(self.name, self.format, self.source, self.split,
                       [self.images[i] for i in keep], [self.captions[i] for i in keep],
                       list(self.missing), list(self.uncaptioned))

    def missing_report(self, limit: int = 5) -> str | None:
        """One line about left-out images, or None when nothing was left out."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} image(s) listed in {self.source} not found, "
                         f"left out: {_first(self.missing, limit)}")
        if self.uncaptioned:
            parts.append(f"{len(self.uncaptioned)} image(s) without captions left out: "
                         f"{_first(self.uncaptioned, limit)}")
        return "; ".join(parts) or None


def _first(paths: list[str], limit: int) -> str:
    return ", ".join(paths[:limit]) + (", ..." if len(paths) > limit else "")


def detect_format(path: str | os.PathLike) -> str:
    """``folder`` for a directory, ``csv`` for ``*.csv``; JSON files by their keys."""
    p = Path(path)
    if p.is_dir():
        return "folder"
    if not p.exists():
        raise UsageError(f"dataset {p}: no such file or directory")
    if p.suffix.lower() in (".csv", ".tsv"):
        return "csv"
    if p.suffix.lower() == ".json":
        data = _read_json(p)
        return _json_format(p, data)
    raise UsageError(f"dataset {p}: unknown format (expected a .json, .csv or a folder; "
                     "or set --format)")


def _json_format(p: Path, data) -> str:
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        if "annotations" in data:
            return "coco"
        first = data["images"][0] if data["images"] else {}
        if isinstance(first, dict) and "sentences" in first:
            return "karpathy"
    raise UsageError(
        f"dataset {p}: JSON is neither a Karpathy split file (images[].sentences) nor COCO "
        "captions (images[] + annotations[])"
    )


def load(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    images: str | os.PathLike | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> Dataset:
    """Load an evaluation dataset.

    Args:
        path: annotation file (JSON, CSV) or folder.
        format: one of :data:`FORMATS`; detected when None.
        images: directory the image paths are relative to (default: the file's directory,
            or the folder itself).
        split: Karpathy split to use (default ``test``); an error for other formats.
        limit: keep the first N images that exist (after the split).
    Returns:
        A :class:`Dataset` with at least one image.
    Raises:
        UsageError: unknown format, malformed file, empty caption, nothing left to evaluate.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"dataset {p}: no such file or directory")
    fmt = (format or detect_format(p)).lower()
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise UsageError("--limit must be at least 1")
    if split is not None and fmt != "karpathy":
        raise UsageError(f"--split: the {fmt} format has no splits")
    if fmt == "folder":
        if not p.is_dir():
            raise UsageError(f"dataset {p}: the folder format needs a directory")
        root = Path(images).expanduser() if images else p
        entries = _folder_entries(p)
        name, split_out = p.name, None
    else:
        if p.is_dir():
            raise UsageError(f"dataset {p}: the {fmt} format needs a file, not a directory")
        root = Path(images).expanduser() if images else p.parent
        if fmt == "csv":
            entries = _csv_entries(p)
            name, split_out = p.stem, None
        else:
            data = _read_json(p)
            if fmt == "coco":
                entries = _coco_entries(p, data)
                name, split_out = p.stem, None
            else:
                split_out = split or "test"
                entries = _karpathy_entries(p, data, split_out)
                name = str(data.get("dataset") or p.stem.removeprefix("dataset_"))
    if images and not root.is_dir():
        raise UsageError(f"--images {root}: not a directory")
    ds = Dataset(name=name, format=fmt, source=str(p), split=split_out)
    for rel, caps in entries:
        path_found = _find(root, rel)
        if path_found is None:
            ds.missing.append(str(root / rel[0]))
            continue
        if not caps:
            ds.uncaptioned.append(path_found)
            continue
        ds.images.append(path_found)
        ds.captions.append(caps)
        if limit is not None and len(ds.images) >= limit:
            break
    if not ds.images:
        why = f" ({ds.missing_report()})" if ds.missing_report() else ""
        hint = "; set --images to the directory holding them" if ds.missing and fmt != "folder" else ""
        raise UsageError(f"dataset {p}: no image with captions to evaluate{why}{hint}")
    return ds


# -- finding files ----------------------------------------------------------------------


def _find(root: Path, candidates: tuple[str, ...]) -> str | None:
    """The first candidate relative path that exists under ``root``, absolute."""
    for rel in candidates:
        q = root / rel
        if q.is_file():
            return str(q.absolute())
    return None


# -- the formats: each yields (candidate relative paths, captions) per image -------------

Entry = tuple[tuple[str, ...], list[str]]


def _read_json(p: Path):
    try:
        with open(p, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"dataset {p}: malformed JSON at line {e.lineno}, column {e.colno}: "
                         f"{e.msg}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"dataset {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"dataset {p}: {e.strerror or e}") from None


def _text(value, where: str) -> str:
    """A caption, stripped; empty or non-string captions are errors naming the entry."""
    if not isinstance(value, str):
        raise UsageError(f"{where}: caption is not a string")
    s = " ".join(value.split())
    if not s:
        raise UsageError(f"{where}: empty caption")
    return s


def _karpathy_entries(p: Path, data, split: str) -> list[Entry]:
    imgs = data.get("images") if isinstance(data, dict) else None
    if not isinstance(imgs, list):
        raise UsageError(f"dataset {p}: no images[] list (not a Karpathy split file)")
    out: list[Entry] = []
    splits: set[str] = set()
    for i, img in enumerate(imgs):
        where = f"{p}: images[{i}]"
        if not isinstance(img, dict) or not isinstance(img.get("filename"), str) or not img["filename"]:
            raise UsageError(f"{where}: no filename")
        s = str(img.get("split", ""))
        splits.add(s)
        if s != split:
            continue
        sentences = img.get("sentences")
        if not isinstance(sentences, list):
            raise UsageError(f"{where} ({img['filename']}): no sentences[] list")
        caps = []
        for j, sent in enumerate(sentences):
            raw = sent.get("raw") if isinstance(sent, dict) else None
            caps.append(_text(raw, f"{where}.sentences[{j}].raw ({img['filename']})"))
        fp = img.get("filepath")
        # COCO's filepath (val2014/) is optional on disk: many keep all images in one folder
        rel = (f"{fp}/{img['filename']}", img["filename"]) if fp else (img["filename"],)
        out.append((rel, caps))
    if not out:
        raise UsageError(
            f"dataset {p}: no images in split '{split}' (splits: {', '.join(sorted(splits)) or 'none'})"
        )
    return out


def _coco_entries(p: Path, data) -> list[Entry]:
    imgs, anns = data.get("images"), data.get("annotations")
    if not isinstance(imgs, list) or not isinstance(anns, list):
        raise UsageError(f"dataset {p}: COCO captions need images[] and annotations[] lists")
    by_id: dict = {}
    order = []
    for i, img in enumerate(imgs):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise UsageError(f"{p}: images[{i}]: needs id and file_name")
        if img["id"] in by_id:
            raise UsageError(f"{p}: images[{i}]: duplicate id {img['id']}")
        by_id[img["id"]] = []
        order.append(img)
    for j, ann in enumerate(anns):
        where = f"{p}: annotations[{j}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise UsageError(f"{where}: needs image_id and caption")
        if ann["image_id"] not in by_id:
            raise UsageError(f"{where}: image_id {ann['image_id']} is not in images[]")
        by_id[ann["image_id"]].append(_text(ann.get("caption"), f"{where} (image_id {ann['image_id']})"))
    return [((img["file_name"],), by_id[img["id"]]) for img in order]


def _csv_entries(p: Path) -> list[Entry]:
    try:
        f = open(p, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise UsageError(f"dataset {p}: {e.strerror or e}") from None
    with f:
        try:
            delim = "\t" if p.suffix.lower() == ".tsv" else ","
            reader = csv.reader(f, delimiter=delim)
            header = next(reader, None)
            if header is None:
                raise UsageError(f"dataset {p}: empty file (expected a header image,caption)")
            cols = [h.strip().lower() for h in header]
            if "image" not in cols or "caption" not in cols:
                raise UsageError(
                    f"{p}:1: header must name 'image' and 'caption' columns, got {','.join(header)!r}"
                )
            ci, cc = cols.index("image"), cols.index("caption")
            caption_last = cc == len(cols) - 1
            by_image: dict[str, list[str]] = {}
            for row in reader:
                line = reader.line_num
                if not row or all(not x.strip() for x in row):
                    continue
                if len(row) > len(cols) and caption_last:
                    # an unquoted caption with commas: the extra fields are part of it
                    row = row[: len(cols) - 1] + [delim.join(row[len(cols) - 1 :])]
                if len(row) != len(cols):
                    raise UsageError(f"{p}:{line}: expected {len(cols)} fields, got {len(row)}")
                image = row[ci].strip()
                if not image:
                    raise UsageError(f"{p}:{line}: empty image path")
                by_image.setdefault(image, []).append(_text(row[cc], f"{p}:{line} ({image})"))
        except csv.Error as e:
            raise UsageError(f"{p}:{reader.line_num}: malformed CSV: {e}") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"dataset {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [((image,), caps) for image, caps in by_image.items()]


def _folder_entries(root: Path) -> list[Entry]:
    exts = supported_extensions()
    out: list[Entry] = []
    for rel in _walk_sorted(root):
        if os.path.splitext(rel)[1].lower() not in exts:
            continue
        txt = root / (os.path.splitext(rel)[0] + ".txt")
        caps: list[str] = []
        if txt.is_file():
            try:
                lines = txt.read_text(encoding="utf-8-sig").splitlines()
            except UnicodeDecodeError as e:
                raise UsageError(f"{txt}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except OSError as e:
                raise UsageError(f"{txt}: {e.strerror or e}") from None
            caps = [" ".join(line.split()) for line in lines if line.strip()]
            if not caps:
                raise UsageError(f"{txt}: no caption (expected one caption per line)")
        out.append(((rel,), caps))
    return out


def _walk_sorted(root: Path) -> Iterator[str]:
    """Relative paths of the files under ``root``, sorted, hidden ones skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            if not name.startswith("."):
                yield name if rel_dir == "." else os.path.join(rel_dir, name)
