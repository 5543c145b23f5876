"""Verifying a library (``itr check``) and repairing what drifted (``itr check --repair``).

SQLite is the source of truth; everything else is checked against it, from one read
snapshot, without the write lock (so ``itr check`` runs beside ``itr index``):

- the database itself (``PRAGMA integrity_check``) and its metadata (model, dimension);
- rows vs vectors: every file row has one vector of the library's dimension, finite and of
  unit length, and no vector lacks its row;
- the HNSW graph file vs the rows.  The file is parsed here, independently of hnswlib
  (a short or garbled file would crash hnswlib's searches, not just fail them): header,
  every neighbour id, labels, delete marks and vectors.  It must be of the library's
  dimension, not ahead of ``vector_log``, with the log after it complete; every label live
  in it must have a row with the same vector, and every row the log has not touched since
  must be live in it;
- leftovers of killed runs (temporary graph files), and indexed files that vanished.

:func:`repair` fixes what can be fixed without re-encoding: it drops orphan vectors and the
rows of damaged vectors (the next ``itr index`` re-embeds those files), removes leftovers,
rebuilds and saves the graph, and with ``prune=True`` forgets files that vanished.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LibraryError
from ..store.db import Store, decode_vectors, fs_path_of, library_error
from ..store.graphfile import GraphFile, GraphFileError
from ..store.lock import holder
from ..constants import REINDEX_DIR
from ..store.vindex import VectorIndex, graph_files, remove_temp_files

ERROR, WARNING, NOTE = "error", "warning", "note"
#: Paths listed per finding (all of them are counted).
EXAMPLES = 5
#: How far a stored vector's norm may be from 1, and a graph vector from the stored one.
NORM_TOLERANCE = 1e-3
VECTOR_TOLERANCE = 1e-4
#: float16's relative rounding (half a unit in the last of its 11 significant bits)
F16_ROUNDING = 2.0 ** -11
_CHUNK = 10_000


@dataclass
class Finding:
    """One kind of problem or observation, with how many things it concerns."""

    kind: str  #: stable identifier, e.g. ``orphan-vectors`` (see ``docs/library-format.md``)
    severity: str  #: ``error`` (drift or damage), ``warning`` (look at it), ``note``
    count: int
    message: str
    examples: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list, repr=False)  #: rows/labels concerned

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "severity": self.severity, "count": self.count,
                "message": self.message, "examples": self.examples}


@dataclass
class Report:
    """What :func:`check` found (and what :func:`repair` did)."""

    library: str
    files: int = 0
    vectors: int = 0
    graph_file: str | None = None
    graph_seq: int | None = None
    graph_labels: int | None = None  #: live labels in the saved graph file
    log_entries: int = 0  #: log entries newer than the saved graph (replayed on open)
    findings: list[Finding] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No errors (warnings and notes allowed)."""
        return not any(f.severity == ERROR for f in self.findings)

    def get(self, kind: str) -> Finding | None:
        return next((f for f in self.findings if f.kind == kind), None)

    def add(self, kind: str, severity: str, message: str, items: list | None = None,
            ids: list[int] | None = None, count: int | None = None) -> Finding:
        items = list(items or [])
        f = Finding(kind, severity, count if count is not None else (len(items) or len(ids or []) or 1),
                    message, [str(x) for x in items[:EXAMPLES]], list(ids or []))
        self.findings.append(f)
        return f

    def to_json(self) -> dict[str, Any]:
        """The ``itr check --json`` object."""
        return {
            "library": self.library,
            "ok": self.ok,
            "files": self.files,
            "vectors": self.vectors,
            "graph": {"file": self.graph_file, "seq": self.graph_seq, "labels": self.graph_labels,
                      "log_entries": self.log_entries},
            "problems": [f.to_json() for f in self.findings],
            "repaired": self.repaired,
        }


# --- the graph file, parsed without hnswlib -------------------------------------------------

def read_graph_file(path: Path, dim: int | None = None) -> GraphFile:
    """Parse and fully validate an hnswlib index file (see :mod:`itrcli.store.graphfile`):
    sizes, every link and label.  Raises :class:`GraphFileError`."""
    return GraphFile(path, dim).validate()


# --- check ------------------------------------------------------------------------------------

def check(store: Store, *, files: bool = True, _locked: bool = False) -> Report:
    """Verify the library whose database ``store`` is; see the module docstring.
    ``files``: also ``stat`` every indexed file (vanished, changed).  Never writes anything."""
    directory = store.directory
    rep = Report(library=str(directory))
    writer = None if _locked else holder(directory)  # _locked: we hold it (repair)
    if writer:
        rep.add("writer", NOTE, f"{writer} is writing to the library; this check sees its last commit")
    try:
        store.begin_snapshot()  # one read snapshot for every query below
    except sqlite3.Error as e:
        rep.add("integrity", ERROR, f"the database cannot be read: {e}")
        return rep
    try:
        if not _check_database(rep, store):
            return rep
        meta = store.meta()
        dim = meta.get("dim")
        rep.files = store.count()
        rep.vectors = store.vector_count()
        if (rep.files or rep.vectors) and not (meta.get("model") and dim):
            rep.add("meta", ERROR, "the library has rows but no recorded model or dimension; "
                    "re-index with 'itr index PATH --reindex -m MODEL'")
            return rep
        good = _check_vectors(rep, store, dim) if dim else {}
        if dim:
            _check_graph(rep, store, int(dim), good, writer)
        if files:
            _check_files(rep, store)
        n = store.failure_count()
        if n:
            rep.add("remembered-failures", NOTE, f"{n} file(s) that could not be decoded are "
                    "remembered: reported as skipped, not read again until they change", count=n)
        _check_words(rep, store, bool(meta.get("ocr")))
    except sqlite3.DatabaseError as e:
        rep.add("integrity", ERROR, f"the database cannot be read: {e}")
    finally:
        store.end_snapshot()
    return rep


def _check_database(rep: Report, store: Store) -> bool:
    try:
        msgs = store.integrity_messages(20)
    except sqlite3.DatabaseError as e:
        rep.add("integrity", ERROR, f"the database is damaged: {e}")
        return False
    if msgs != ["ok"]:
        rep.add("integrity", ERROR, f"the database is damaged: {msgs[0]}", items=msgs)
        return False
    return True


def _check_vectors(rep: Report, store: Store, dim: int) -> dict[int, None]:
    """Rows vs vectors; returns the ids of good vectors (in id order)."""
    import numpy as np

    # a label (vector id) is an image's file id, or a video frame's id (see m005_video_frames)
    orphans = store.orphan_vector_ids()
    if orphans:
        rep.add("orphan-vectors", ERROR, f"{len(orphans)} vector(s) belong to no image or "
                "video frame", items=orphans, ids=orphans)
    rows = store.rows_without_vectors()
    if rows:
        rep.add("rows-without-vectors", ERROR, f"{len(rows)} image or frame row(s) have no vector",
                items=[p for _, p in rows], ids=[i for i, _ in rows])
    _check_frames(rep, store)
    bad: list[tuple[int, str]] = []
    good: dict[int, None] = {}
    last = -1
    while True:
        chunk = store.vector_blobs_after(last, _CHUNK)
        if not chunk:
            break
        last = chunk[-1][0]
        # float16 (since 0.2.0, or compacted) or float32 (0.1.0): 2 or 4 bytes a value
        ok_rows = [(i, b) for i, b, _ in chunk if len(b) in (2 * dim, 4 * dim)]
        bad += [(i, p) for i, b, p in chunk if len(b) not in (2 * dim, 4 * dim)]
        if ok_rows:
            mat = decode_vectors([b for _, b in ok_rows], dim)
            with np.errstate(all="ignore"):
                fine = np.isfinite(mat).all(axis=1) & (np.abs(np.linalg.norm(mat, axis=1) - 1) < NORM_TOLERANCE)
            paths = {i: p for i, _, p in chunk}
            for (i, _), f in zip(ok_rows, fine):
                if f:
                    good[i] = None
                else:
                    bad.append((i, paths[i]))
    if bad:
        rep.add("bad-vectors", ERROR, f"{len(bad)} vector(s) have the wrong size, non-finite "
                "values or not unit length", items=[p for _, p in bad], ids=[i for i, _ in bad])
    return good


def _check_frames(rep: Report, store: Store) -> None:
    """Videos vs their frames: every video has frames, every frame its video."""
    empty = store.videos_without_frames()
    if empty:
        rep.add("videos-without-frames", ERROR, f"{len(empty)} video(s) have no frame: searches "
                "cannot find them", items=[p for _, p in empty], ids=[i for i, _ in empty])
    lost = store.orphan_frame_ids()
    if lost:
        rep.add("orphan-frames", ERROR, f"{len(lost)} frame(s) belong to no video row",
                items=lost, ids=lost)


def _label_paths(store, ids) -> dict[int, str]:
    """label -> the path shown for it (``path @seconds`` for a video frame)."""
    owners = store.labels(int(i) for i in ids)
    rows = store.rows({fid for fid, _ in owners.values()})
    return {i: rows[fid]["path"] + ("" if t is None else f" @{t:g}")
            for i, (fid, t) in owners.items() if fid in rows}


def _check_graph(rep: Report, store: Store, dim: int, good: dict[int, None],
                 writer: str | None) -> None:
    import numpy as np

    saved, temps = graph_files(store.directory)
    if temps and not writer:
        rep.add("temp-files", WARNING, f"{len(temps)} temporary graph file(s) left by a run "
                "killed while saving", items=[p.name for p in temps])
    if (store.directory / REINDEX_DIR).exists() and not writer:
        rep.add("reindex-leftover", WARNING, f"{REINDEX_DIR}/ holds the half-built library of "
                "an itr index --reindex that was killed (the library is as before it): --repair "
                "removes it, the next --reindex starts again", items=[REINDEX_DIR])
    if len(saved) > 1 and not writer:
        rep.add("old-graphs", NOTE, f"{len(saved) - 1} older graph file(s) not yet removed",
                items=[p.name for _, p in saved[:-1]])
    last = store.last_seq()
    if not saved:
        rep.log_entries = len(store.log_after(0))
        if good:
            rep.add("no-graph", NOTE, "no saved graph: built from the database when a search "
                    "opens the library; the next 'itr index' or --repair saves one")
        return
    seq, path = saved[-1]
    rep.graph_file = str(path.relative_to(store.directory))
    rep.graph_seq = seq
    if seq > last and writer:
        rep.add("graph-ahead", NOTE, f"graph file {path.name} was saved after this check's "
                "snapshot (a run is saving); check again when it is done")
        return
    def replaced() -> bool:
        """The file is gone because the running writer saved a newer one meanwhile."""
        if writer and not path.exists():
            rep.add("graph-unreadable", NOTE, f"graph file {path.name} was replaced during the "
                    "check (a run is saving); check again when it is done")
            return True
        return False

    try:
        g = read_graph_file(path, dim)
    except GraphFileError as e:
        if not replaced():
            rep.add("graph-unreadable", ERROR, f"graph file {path.name}: {e} (searches rebuild "
                    "the graph in memory every time)", items=[path.name])
        return
    try:
        import hnswlib

        idx = hnswlib.Index(space="cosine", dim=dim)
        idx.load_index(str(path))  # by its path: the writer may have replaced it since
        del idx
    except Exception as e:  # noqa: BLE001  (hnswlib raises RuntimeError and friends)
        if not replaced():
            rep.add("graph-unreadable", ERROR, f"graph file {path.name}: hnswlib cannot load it: "
                    f"{e}", items=[path.name])
        return
    live = ~g.deleted
    rep.graph_labels = int(live.sum())
    if seq > last:
        rep.add("graph-ahead", ERROR, f"graph file {path.name} reflects log entry {seq} but the "
                f"database ends at {last} (commits lost to a power cut?); searches rebuild it")
        return
    log = store.log_after(seq)
    rep.log_entries = len(log)
    if len(log) != last - seq:
        rep.add("log-gap", ERROR, f"the log after graph {path.name} is incomplete "
                f"({len(log)} of {last - seq} entries); searches rebuild the graph every time")
        return
    if log:
        rep.add("graph-behind", NOTE, f"the saved graph is {len(log)} log entries behind (a run "
                "was killed or interrupted before saving): replayed on open, saved by the next "
                "'itr index' or --repair", count=len(log))
    touched = {i for _, i, _ in log}
    store_ids = np.fromiter(good, dtype=np.int64, count=len(good))
    labels = g.labels[live]
    untouched = ~np.isin(labels, np.fromiter(touched, dtype=np.int64, count=len(touched)))
    extra = labels[untouched & ~np.isin(labels, store_ids)]
    bad_ids = {i for f in rep.findings if f.kind in ("bad-vectors", "orphan-vectors", "rows-without-vectors")
               for i in f.ids}
    extra = [int(i) for i in extra if int(i) not in bad_ids]
    if extra:
        rep.add("graph-extra-labels", ERROR, f"{len(extra)} label(s) in the graph have no row "
                "(stale entries)", items=extra, ids=extra)
    want = store_ids[~np.isin(store_ids, np.fromiter(touched, dtype=np.int64, count=len(touched)))]
    in_graph = np.isin(want, labels)
    missing = want[~in_graph]
    if len(missing):
        paths = _label_paths(store, missing[:EXAMPLES])
        rep.add("graph-missing-labels", ERROR, f"{len(missing)} vector(s) are not in the graph: "
                "searches without --exact cannot find them",
                items=[paths[int(i)] for i in missing[:EXAMPLES] if int(i) in paths],
                ids=[int(i) for i in missing], count=len(missing))
    # the vectors: label -> position in the file, compared chunk by chunk with the rows
    order = np.argsort(g.labels)
    sorted_labels = g.labels[order]
    both = want[in_graph]
    wrong: list[int] = []
    for i in range(0, len(both), _CHUNK):
        ids = both[i : i + _CHUNK]
        _, vecs = store.vectors(ids.tolist())
        pos = order[np.searchsorted(sorted_labels, ids)]
        gv = np.asarray(g.vectors[pos], dtype=np.float32)
        gv = gv / np.maximum(np.linalg.norm(gv, axis=1, keepdims=True), 1e-12)  # cosine: unit vectors
        # a float16 row (compacted) against its graph's float32 original: float16 rounding
        off = (np.abs(gv - vecs) > VECTOR_TOLERANCE + np.abs(vecs) * F16_ROUNDING).any(axis=1)
        wrong += [int(x) for x in ids[off]]
    if wrong:
        paths = _label_paths(store, wrong[:EXAMPLES])
        rep.add("graph-wrong-vectors", ERROR, f"{len(wrong)} graph label(s) carry another vector "
                "than their file's row", items=[paths[i] for i in wrong[:EXAMPLES] if i in paths],
                ids=wrong)


def _check_files(rep: Report, store: Store) -> None:
    import stat as stat_

    vanished, unreadable, changed = [], [], []
    for id_, path, fsname, size, mtime in store.file_stats():
        try:
            st = os.stat(fs_path_of(path, fsname))
        except (FileNotFoundError, NotADirectoryError):
            vanished.append((id_, path))
            continue
        except OSError:
            unreadable.append((id_, path))
            continue
        if not stat_.S_ISREG(st.st_mode):
            vanished.append((id_, path))
        elif st.st_size != size or st.st_mtime_ns != mtime:
            changed.append((id_, path))
    if vanished:
        rep.add("vanished", WARNING, f"{len(vanished)} indexed file(s) no longer exist (deleted, "
                "or on a disk that is not mounted): 'itr index' forgets deleted files under its "
                "roots; 'itr check --repair --prune' forgets them now",
                items=[p for _, p in vanished], ids=[i for i, _ in vanished])
    if unreadable:
        rep.add("unreadable", WARNING, f"{len(unreadable)} indexed file(s) cannot be looked at "
                "(permission denied or I/O error)", items=[p for _, p in unreadable],
                ids=[i for i, _ in unreadable])
    if changed:
        rep.add("changed", NOTE, f"{len(changed)} file(s) changed since they were indexed: the "
                "next 'itr index' re-embeds them", items=[p for _, p in changed],
                ids=[i for i, _ in changed])


def _check_words(rep: Report, store: Store, ocr: bool) -> None:
    """The words read in images (``itr index --ocr``): rows vs lines vs the FTS index, and
    coverage of the library's content."""
    if not store.words.has_tables():
        return
    gone = store.words.orphans()
    if gone:
        rep.add("text-orphans", NOTE, f"text of {len(gone)} image content(s) no longer in the "
                "library: dropped by the next 'itr index' or --repair", count=len(gone))
    wrong = store.words.miscounted()
    loose = store.words.loose_line_hashes()
    if wrong or loose:
        rep.add("text-lines", ERROR, f"{len(wrong) + loose} image(s) have stored text lines that "
                "disagree with their read record; --repair forgets them (read again next run)",
                items=wrong, count=len(wrong) + loose)
    want, have = store.words.fts_ids()
    if want != have:
        rep.add("text-index", ERROR, f"the full-text index disagrees with the stored text "
                f"({len(want - have)} missing, {len(have - want)} extra): --repair rebuilds it",
                count=len(want ^ have))
    if ocr:
        n = store.words.unread_count()
        if n:
            rep.add("text-unread", NOTE, f"the text of {n} image(s) is not read yet: the next "
                    "'itr index' reads it", count=n)
    failed = store.words.status_counts()["failed"]
    if failed:
        rep.add("text-failures", NOTE, f"the text of {failed} image(s) could not be read: "
                "remembered, not tried again (their vectors are fine)", count=failed)


def _repair_text(store, before: Report) -> list[str]:
    done = []
    if not store.words.has_tables():
        return done
    if before.get("text-orphans") or before.get("text-lines"):
        with store.transaction():
            gone = store.words.orphans()
            bad = store.words.miscounted()
            store.words.delete(gone + bad)
            store.words.delete_loose_lines()
        if gone:
            done.append(f"dropped the text of {len(gone)} image content(s) no longer in the library")
        if bad or before.get("text-lines"):
            done.append(f"forgot the inconsistent text of {len(bad)} image(s) (read again next run)")
    if before.get("text-index") or before.get("text-lines"):
        with store.transaction():
            n = store.words.rebuild_fts()
        done.append(f"rebuilt the full-text index ({n} images with text)")
    return done


# --- repair -----------------------------------------------------------------------------------

_GRAPH_PROBLEMS = ("graph-unreadable", "graph-ahead", "log-gap", "graph-extra-labels",
                   "graph-missing-labels", "graph-wrong-vectors")


def repair(store: Store, *, prune: bool = False, wait: float = 0.0) -> Report:
    """Fix what :func:`check` finds, under the write lock; returns a fresh check with
    ``repaired`` listing what was done.

    Never re-encodes: rows whose vector is missing or damaged are dropped, and the next
    ``itr index`` embeds those files again.  ``prune``: also forget files that vanished
    (not done otherwise: a disk that is not mounted looks the same).
    Raises:
        LibraryError: read-only, locked, or a database too damaged to repair here.
    """
    if store.readonly:
        raise LibraryError("library opened read-only; cannot repair")
    try:
        with store.writing("itr check --repair", wait):
            return _repair(store, prune)
    except (sqlite3.Error, OSError) as e:
        raise library_error(e, store.directory) from e


def _repair(store: Store, prune: bool) -> Report:
    done: list[str] = []
    before = check(store, _locked=True)
    if before.get("integrity"):
        try:
            kept = store.rebuild_file()
        except sqlite3.DatabaseError as e:
            raise LibraryError(
                f"library database {store.path} is damaged beyond what --repair fixes "
                f"({before.get('integrity').message}; copying it failed: {e}); restore a backup, "
                f"or salvage its rows: sqlite3 {store.path} .recover | sqlite3 recovered.db"
            ) from None
        done.append(f"rebuilt the database file from its tables (the damaged one is kept as {kept.name})")
        before = check(store, _locked=True)
    if before.get("meta"):
        raise LibraryError(before.get("meta").message)

    def ids(kind: str) -> list[int]:
        f = before.get(kind)
        return f.ids if f else []

    orphans = ids("orphan-vectors")
    lost_frames = ids("orphan-frames")
    # labels -> their files: a video with a damaged or missing frame vector is dropped whole
    # (the next 'itr index' reads it again)
    owners = store.labels(set(ids("rows-without-vectors")) | set(ids("bad-vectors")))
    drop = sorted({fid for fid, _ in owners.values()} | set(ids("videos-without-frames")))
    vanished = ids("vanished") if prune else []
    if orphans or drop or vanished or lost_frames:
        with store.transaction() as c:
            store.delete_orphan_vectors(c, orphans + lost_frames)
            gone = [r["path"] for r in store.rows(vanished).values()]
            store.delete_files(c, drop + vanished)
            store.forget_failures_shown(c, gone)
        if orphans:
            done.append(f"dropped {len(orphans)} orphan vector(s)")
        if lost_frames:
            done.append(f"dropped {len(lost_frames)} frame(s) of no video")
        if drop:
            done.append(f"dropped {len(drop)} row(s) without a usable vector (the next 'itr index' "
                        "re-embeds them)")
        if vanished:
            done.append(f"forgot {len(vanished)} vanished file(s)")
    if prune:
        with store.transaction() as c:
            gone = [p for p in store.failures() if not os.path.lexists(p)]
            store.forget_failures(c, gone)
        if gone:
            done.append(f"forgot {len(gone)} vanished bad file(s)")
    done += _repair_text(store, before)
    saved = graph_files(store.directory)[0]
    n_temps = remove_temp_files(store.directory)
    if n_temps:
        done.append(f"removed {n_temps} temporary graph file(s)")
    if before.get("reindex-leftover"):
        import shutil

        shutil.rmtree(store.directory / REINDEX_DIR, ignore_errors=True)
        done.append(f"removed the half-built library of a killed re-index ({REINDEX_DIR}/)")
    dim = store.get_meta("dim")
    if dim:
        vi = VectorIndex(store.directory, int(dim))
        rebuild = (any(before.get(k) for k in _GRAPH_PROBLEMS) or orphans or drop or vanished
                   or lost_frames)
        if rebuild:
            vi.rebuild(store)
        else:
            vi.open(store)  # replays the log when behind
        if vi.dirty or not saved:
            seq = store.last_seq()
            vi.save(seq)
            vi.verify_saved(seq)
            store.truncate_log(seq)
            n = store.vector_count()
            done.append(f"{'rebuilt' if rebuild else 'saved'} the search graph ({n} vectors)")
        for _, p in graph_files(store.directory)[0][:-1]:
            _unlink(p)
    after = check(store, _locked=True)
    after.repaired = done
    return after


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass
