"""Exported towers kept once per machine: ``$XDG_CACHE_HOME/itr/towers/<key>/<kind>/``.

An export (the text tower to ONNX, an image tower to a faster runtime) depends only on the
model, its revision and the exporter, not on the library; so the first library of a model
on a machine pays for it and every later one reuses it.  ``<key>`` names the model and its
revision (a local directory: its path, and the size and time of its weights, so a
retrained checkpoint in the same folder is a new key); ``<kind>`` the export (``text``,
``image-onnx``, ...), with the exporter's format version inside it.

Entries are written whole or not at all: a writer builds ``.<kind>.tmp-PID`` beside the
entry, then renames it into place; a reader sees an entry only once its ``done`` marker
exists.  Two processes exporting the same tower at once both succeed; the second rename
replaces nothing (the entry is there) and its copy is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..paths import cache_dir

#: The marker file of a whole entry (written last, inside the temporary folder).
DONE = "done.json"


def root() -> Path:
    """The folder of every cached tower (``ITR_TOWER_CACHE`` overrides it)."""
    env = os.environ.get("ITR_TOWER_CACHE")
    return Path(env).expanduser() if env else cache_dir() / "towers"


def model_key(model: str, revision: str | None) -> str:
    """A file-name-safe key for a model at a revision.  A local directory keys by its path
    and the size and modification time of its files (weights rewritten: a new key)."""
    if os.path.isdir(model):
        parts = [os.path.abspath(model)]
        for name in sorted(os.listdir(model)):
            try:
                st = os.stat(os.path.join(model, name))
            except OSError:
                continue
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        ident = "\n".join(parts)
        label = os.path.basename(os.path.abspath(model).rstrip(os.sep)) or "model"
    else:
        ident = f"{model}@{revision or 'main'}"
        label = model.replace("/", "--")
    digest = hashlib.blake2b(ident.encode(), digest_size=8).hexdigest()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:60]
    return f"{safe}-{digest}"


def entry(model: str, revision: str | None, kind: str) -> Path:
    """Where the ``kind`` export of ``model`` at ``revision`` lives (whether or not it is
    there yet)."""
    return root() / model_key(model, revision) / kind


def lookup(model: str, revision: str | None, kind: str) -> Path | None:
    """The whole entry, or None."""
    d = entry(model, revision, kind)
    return d if (d / DONE).is_file() else None


def publish(tmp: Path, model: str, revision: str | None, kind: str,
            info: dict | None = None) -> Path:
    """Make the folder ``tmp`` (written by the caller, on the same file system: see
    :func:`staging`) the entry for (model, revision, kind), marking it whole.  Returns the
    entry; if another process published one first, ``tmp`` is removed and theirs kept."""
    (tmp / DONE).write_text(json.dumps({"model": model, "revision": revision, "kind": kind,
                                        **(info or {})}))
    final = entry(model, revision, kind)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, final)  # fails if final is a non-empty folder: someone else's
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if lookup(model, revision, kind) is None:
            raise
    return final


def staging(model: str, revision: str | None, kind: str) -> Path:
    """A new empty temporary folder beside the entry, for :func:`publish`."""
    final = entry(model, revision, kind)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{kind}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def remove(model: str, revision: str | None, kind: str) -> None:
    """Drop an entry (a damaged one: the next use exports again)."""
    shutil.rmtree(entry(model, revision, kind), ignore_errors=True)
