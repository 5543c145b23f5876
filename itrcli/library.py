"""The :class:`Library`: the Python API that the CLI itself uses.

A library is a directory holding ``itr.db`` (SQLite: files, vectors, log, meta), the HNSW
graph under ``hnsw/``, the exported text tower under ``text/`` and the write ``lock``.
It is bound to one model: the first ``index`` records it, later runs must use the same one.

Example::

    from itrcli import Library
    lib = Library.open("~/.local/share/itr", create=True)
    summary = lib.index(["~/photos"], model="laion-b32")
    for hit in lib.search("two children on a lawn", top=5):
        print(hit.score, hit.path)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .embed import models
from .errors import ExitCode, LibraryError, UsageError
from .store.lock import WriteLock
from .paths import default_library_dir
from .store.db import Store

if TYPE_CHECKING:  # the index machinery (Pillow, thread pools) is imported when indexing
    from .jobs.indexer import IndexSummary, Progress


class Library:
    """An itr library on disk.  Use :meth:`open`."""

    def __init__(self, directory: Path, store: Store) -> None:
        self.directory = directory
        self.store = store
        self._encoder = None
        self._encoder_args: tuple[str, str, str] | None = None

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | os.PathLike | None = None, *, create: bool = False,
             readonly: bool = False) -> "Library":
        """Open the library at ``directory`` (default: ``$ITR_DB`` or ``~/.local/share/itr``).

        Args:
            create: create an empty library if there is none.
            readonly: open without taking or needing write access (search, info).
        Raises:
            LibraryError: no library there (and not ``create``), or it cannot be opened.
        """
        d = Path(directory).expanduser() if directory else default_library_dir()
        if d.exists() and not d.is_dir():
            raise LibraryError(f"--db {d}: exists and is not a directory")
        return cls(d.absolute(), Store(d, create=create, readonly=readonly))

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- model binding ------------------------------------------------------------------
    @property
    def model(self) -> str | None:
        """The model this library is bound to (hub id or local directory), or None if empty."""
        return self.store.get_meta("model")

    def _check_model(self, requested: str | None, reindex: bool) -> str:
        bound = self.model
        if requested is None:
            return bound or models.resolve(None)
        want = models.resolve(requested)
        if bound and want != bound and not reindex:
            raise LibraryError(
                f"library {self.directory} holds embeddings of '{bound}', not '{want}'; "
                "use another --db for the new model, or --reindex to re-embed everything"
            )
        return want

    def encoder(self, model: str | None = None, device: str = "auto", precision: str = "auto"):
        """The library's encoder, loaded once (imports torch and transformers)."""
        from .embed.encoder import Encoder

        name = model or self.model or models.resolve(None)
        args = (name, device, precision)
        if self._encoder is None or self._encoder_args != args:
            self._encoder = Encoder(name, device=device, precision=precision)
            self._encoder_args = args
        return self._encoder

    # -- indexing -------------------------------------------------------------------------
    def index(
        self,
        paths: Iterable[str],
        *,
        model: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 32,
        workers: int | None = None,
        include_hidden: bool = False,
        exclude: Iterable[str] = (),
        follow_symlinks: bool = False,
        prune: bool = True,
        reindex: bool = False,
        draft: bool = True,
        wait: float = 0.0,
        progress: Progress | None = None,
        video: bool = True,
        video_budget: float | None = None,
    ) -> IndexSummary:
        """Add new and changed images under ``paths``, drop deleted ones (unless not ``prune``).

        ``video``: also index videos (when PyAV is installed), a few frames each with their
        times (:mod:`itrcli.ingest.video`); ``video_budget``: seconds one video may take.

        Returns an :class:`~itrcli.jobs.indexer.IndexSummary`; ``summary.interrupted`` is set when
        Ctrl-C stopped the run (every batch committed before it is kept).
        Raises:
            LibraryError: bound to another model, or locked by another writer.
            ModelError: the model cannot be loaded.
        """
        from .ingest.images import Preprocess, supported_extensions
        from .jobs.indexer import IndexRun

        roots = [os.path.abspath(os.path.expanduser(p)) for p in paths]
        if not roots:
            raise UsageError("no PATH given to index")
        if self.store.readonly:
            raise LibraryError("library opened read-only")
        import sqlite3

        from .store.db import library_error

        lock = WriteLock(self.directory, "itr index").acquire(wait)
        try:
            want = self._check_model(model, reindex)
            if reindex and self.model:
                # the graph first: killed in between, the graph is rebuilt from the rows
                import shutil

                shutil.rmtree(self.directory / "hnsw", ignore_errors=True)
                self._clear()
            if reindex:
                with self.store.transaction() as c:
                    c.execute("DELETE FROM failures")  # retry every bad file too
            meta = self.store.meta()
            prep = Preprocess.from_config(meta["preprocess"]) if meta.get("preprocess") else None
            dim = meta.get("dim")

            n_workers = workers or default_workers()

            def get_encoder():
                enc = self.encoder(want, device, precision)
                if not self.store.get_meta("model"):
                    self._bind(enc)
                return enc

            run = IndexRun(
                self.store, self.directory, get_encoder, dim=dim, prep=prep,
                batch_size=batch_size, workers=n_workers,
                draft=draft, progress=progress, video_budget=video_budget,
            )
            from .constants import VIDEO_EXTENSIONS
            from .ingest.video import available as video_available

            videos = video and video_available()
            summary = run.run(roots, extensions=supported_extensions() | (VIDEO_EXTENSIONS if videos else frozenset()),
                              include_hidden=include_hidden, exclude=list(exclude),
                              follow_symlinks=follow_symlinks, prune=prune,
                              keep=frozenset() if videos else VIDEO_EXTENSIONS)
            known_roots = set(self.store.get_meta("roots", []))
            if not summary.interrupted:
                self.store.set_meta(roots=sorted(known_roots | set(roots)))
                self._catch_up_text_tower(want, device, precision)
                self._export_text_tower()
            return summary
        except (sqlite3.Error, OSError) as e:
            # a full disk, a read-only or vanished library directory, a damaged database:
            # one actionable line (committed batches are kept; the next run goes on)
            raise library_error(e, self.directory) from e
        finally:
            lock.release()

    def _bind(self, enc) -> None:
        info = enc.info
        self.store.set_meta(
            model=info.id, model_revision=info.revision, model_type=info.model_type,
            dim=info.dim, precision=enc.precision, preprocess=info.preprocess,
            text_max_length=info.text_max_length, text_padding=info.text_padding,
        )

    def _export_text_tower(self) -> None:
        """Export the text tower for fast cold searches, once, if the model is loaded anyway."""
        from .embed.textonnx import OnnxTextEncoder, export

        if self._encoder is None or OnnxTextEncoder.available(self.directory):
            return
        try:
            export(self._encoder, self.directory)
        except Exception as e:
            # No fast path then (e.g. a sentencepiece tokenizer that `tokenizers` cannot
            # load): searches use the torch text tower, with the same results, only slower.
            import logging

            logging.getLogger("itr").debug("text tower export failed: %s", str(e)[:200])
            self.store.set_meta(text_export_failed=self.model)

    # -- searching --------------------------------------------------------------------------
    def text_encoder(self, device: str = "auto", precision: str = "auto"):
        """Something with ``encode_texts``: the exported ONNX tower if present, else torch."""
        from .embed.textonnx import OnnxTextEncoder

        if device in ("auto", "cpu") and OnnxTextEncoder.available(self.directory):
            try:
                return OnnxTextEncoder(self.directory)
            except Exception:
                pass  # damaged export: the torch path gives the same vectors
        return self.encoder(None, device, precision)

    def stored_vector(self, path: str, at: float | None = None):
        """The stored vector of an indexed, unchanged file, else None (no model needed).

        A video's: the frame kept at ``at`` seconds (within :data:`AT_TOLERANCE`), or with
        ``at`` None the normalised mean of its frames.
        """
        import numpy as np

        row = self.store.row_by_path(os.path.abspath(path))
        if row is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        if st.st_size != row["size"] or st.st_mtime_ns != row["mtime_ns"]:
            return None
        if row.get("duration") is None:
            ids, vecs = self.store.vectors([row["id"]])
            return vecs[0] if len(ids) else None
        labels, times = self.store.frames(row["id"])
        if not labels:
            return None
        if at is None:
            _, vecs = self.store.vectors(labels)
            m = vecs.mean(axis=0)
            return m / max(float(np.linalg.norm(m)), 1e-12)
        j = int(np.argmin(np.abs(np.asarray(times) - at)))
        if abs(times[j] - at) > AT_TOLERANCE:
            return None  # no frame kept there: that frame is decoded and embedded
        ids, vecs = self.store.vectors([labels[j]])
        return vecs[0] if len(ids) else None

    def embed_image(self, path: str, device: str = "auto", precision: str = "auto",
                    at: float | None = None):
        """Embed one image file, or a video's frame at ``at`` seconds (default: the normalised
        mean of the frames ``itr index`` would keep), with the library's model: ``[dim]``."""
        import numpy as np

        from .ingest.images import DecodeError, decode_file

        enc = self.encoder(None, device, precision)
        if _is_video(path):
            from .ingest import video

            try:
                if at is not None:
                    imgs = [video.frame_at(path, at)]
                else:
                    imgs = [f.image for f in video.select_frames(path).frames]
            except (OSError, video.VideoError) as e:
                raise UsageError(f"video query {path}: {e}") from None
            vecs = enc.encode_pixels(np.stack([enc.prep(i) for i in imgs]))  # [n, dim]
            m = vecs.mean(axis=0)
            return m / max(float(np.linalg.norm(m)), 1e-12)
        try:
            pixels, _meta, _data = decode_file(path, enc.prep, draft=False)
        except (OSError, DecodeError) as e:
            raise UsageError(f"image query {path}: {e}") from None
        return enc.encode_pixels(pixels[None])[0]

    def embed_query(self, parts, device: str = "auto", precision: str = "auto",
                    at: float | None = None):
        """Combine query parts (:class:`itrcli.query.search.QueryPart`) into one vector ``[dim]``.
        ``at``: the time in seconds of the frame to use for video terms."""
        from .query.search import build_query

        return build_query(
            parts,
            stored_vector=lambda p: self.stored_vector(p, at if _is_video(p) else None),
            encode_texts=lambda texts: self.text_encoder(device, precision).encode_texts(texts),
            encode_image=lambda p: self.embed_image(p, device, precision,
                                                    at if _is_video(p) else None),
        )

    def search(
        self,
        query: str | None = None,
        *,
        image: str | None = None,
        text: str | None = None,
        add: Sequence[str] = (),
        subtract: Sequence[str] = (),
        top: int = 10,
        in_dirs: Sequence[str] = (),
        threshold: float | None = None,
        after: str | None = None,
        before: str | None = None,
        exact: bool = False,
        ef: int | None = None,
        device: str = "auto",
        precision: str = "auto",
        hash_bits: int | None = None,
        frames: bool = False,
        at: float | None = None,
    ) -> list:
        """Rank the library's images against a query; returns :class:`itrcli.query.search.Hit` s.

        A video ranks once, at its best frame (``hit.time``), unless ``frames``.  A video
        file as query: ``at`` picks its frame at that many seconds.

        ``query`` is a text, or an image when it names an existing image file; ``image`` /
        ``text`` force the kind.  ``add`` / ``subtract`` terms are classified the same way.
        ``hash_bits``: rank binary codes of that length by Hamming distance first, then
        re-rank the best candidates by cosine (see :mod:`itrcli.query.hashing`).
        An image query never returns the query file itself.
        Raises:
            UsageError: empty query, bad date, unreadable query image.
            LibraryError: the library is empty.
        """
        from .query.search import Filters, parse_date, query_parts, rank

        parts = query_parts(query, image=image, text=text, add=add, subtract=subtract)
        if any(p.kind == "text" and not p.value for p in parts):
            raise UsageError("empty query")
        if not parts:
            raise UsageError("empty query: give QUERY, --image or --text")
        if top < 1:
            raise UsageError("--top must be at least 1")
        if not self.model or self.store.conn.execute("SELECT 1 FROM files LIMIT 1").fetchone() is None:
            raise LibraryError(f"library {self.directory} is empty (run 'itr index PATH' first)")
        filters = Filters(list(in_dirs), parse_date(after, "--after"),
                          parse_date(before, "--before"), threshold)
        if at is not None and not any(p.kind == "image" and _is_video(p.value) for p in parts):
            raise UsageError("--at goes with a video query (QUERY or --image naming a video file)")
        if at is not None and at < 0:
            raise UsageError("--at must be at least 0")
        q = self.embed_query(parts, device, precision, at=at)
        ef = ef or self.store.get_meta("search_ef")  # measured on this library by `itr index`
        exclude = [p.value for p in parts if p.kind == "image"]
        return rank(q, store=self.store, get_vindex=self._search_graph, top=top, filters=filters,
                    exclude_paths=exclude, exact=exact, ef=ef, hash_bits=hash_bits, frames=frames)

    def vector_index(self):
        """The HNSW graph, up to date with the store (replayed in memory if behind)."""
        from .store.vindex import VectorIndex

        vi = getattr(self, "_vindex", None)
        if vi is None or vi.seq != self.store.last_seq():  # first use, or indexed since
            vi = self._vindex = VectorIndex(self.directory, self._dim()).open(self.store)
        return vi

    def _search_graph(self):
        """The graph for searching: the saved file memory-mapped when it is up to date
        (no full load; see :mod:`itrcli.store.graphfile`), else as :meth:`vector_index`."""
        from .store.vindex import VectorIndex

        seq = self.store.last_seq()
        for vi in (getattr(self, "_vindex", None), getattr(self, "_mapped", None)):
            if vi is not None and vi.seq == seq:
                return vi
        self._mapped = VectorIndex(self.directory, self._dim()).open_mapped(self.store)
        return self._mapped

    def _dim(self) -> int:
        return int(self.store.get_meta("dim"))

    def _clear(self) -> None:
        """--reindex: forget every vector and the model binding (rows are re-created)."""
        with self.store.transaction() as c:
            ids = [r[0] for r in c.execute("SELECT id FROM files")]
            self.store.delete_files(c, ids)
            c.execute("DELETE FROM meta WHERE key IN ('model', 'model_revision', 'model_type',"
                      " 'dim', 'precision', 'preprocess', 'text_max_length', 'text_padding',"
                      " 'search_ef', 'search_recall', 'search_ef_count')")
        import shutil

        shutil.rmtree(self.directory / "hnsw", ignore_errors=True)
        shutil.rmtree(self.directory / "text", ignore_errors=True)

    def _catch_up_text_tower(self, model: str, device: str, precision: str) -> None:
        """A run killed before exporting the text tower leaves none; the next run exports
        it even with nothing to embed (once: a failed export is not retried every run)."""
        from .embed.textonnx import OnnxTextEncoder

        if (self._encoder is not None or not self.model or OnnxTextEncoder.available(self.directory)
                or self.store.get_meta("text_export_failed") == self.model):
            return
        try:
            self.encoder(model, device, precision)
        except Exception:  # the model is gone: searches fall back to it anyway
            return
        self._export_text_tower()
        if not OnnxTextEncoder.available(self.directory):
            self.store.set_meta(text_export_failed=self.model)

    # -- verifying and repairing ---------------------------------------------------------------
    def check(self, *, files: bool = True):
        """Verify the library without changing it; returns an :class:`itrcli.jobs.check.Report`
        (``report.ok``, ``report.to_json()``).  ``files``: also look for vanished files."""
        from .jobs.check import check

        return check(self, files=files)

    def repair(self, *, prune: bool = False, wait: float = 0.0):
        """Fix what :meth:`check` finds (rebuild the graph, drop orphan or damaged vectors,
        remove leftovers of killed runs); ``prune`` also forgets files that vanished.
        Returns the check report after repair, with ``repaired`` listing what was done.
        Raises:
            LibraryError: opened read-only, locked (``wait`` seconds), or beyond repair.
        """
        from .jobs.check import repair

        return repair(self, prune=prune, wait=wait)

    # -- information ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Path, model, dimension, counts, roots and on-disk sizes (the ``itr info`` object)."""
        meta = self.store.meta()
        sizes: dict[str, int] = {}
        total = 0
        for p in sorted(self.directory.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.directory).parts[0]
                n = p.stat().st_size
                sizes[rel] = sizes.get(rel, 0) + n
                total += n
        db = self.store.db  # sqlite-utils view: table counts without hand-written SQL
        return {
            "library": str(self.directory),
            "model": meta.get("model"),
            "model_revision": meta.get("model_revision"),
            "model_type": meta.get("model_type"),
            "dim": meta.get("dim"),
            "precision": meta.get("precision"),
            "schema_version": meta.get("schema_version"),
            "files": db["files"].count,
            "vectors": db["vectors"].count,
            **dict(zip(("videos", "frames"), self.store.video_counts())),
            "roots": meta.get("roots", []),
            "fast_text_search": (self.directory / "text" / "text.onnx").exists(),
            "search_ef": meta.get("search_ef"),
            "search_recall": meta.get("search_recall"),
            "sizes": {**sizes, "total": total},
        }


#: ``search --at``: a stored frame within this many seconds of the time asked for is used
#: as it is (no model load); otherwise the frame there is decoded and embedded.
AT_TOLERANCE = 0.5


def _is_video(path: str) -> bool:
    from .ingest.video import is_video  # no PyAV import

    return is_video(path)


def default_workers() -> int:
    """Decode threads: enough to keep the encoder fed without starving torch's threads."""
    return max(1, min(4, (os.cpu_count() or 1)))


__all__ = ["Library", "ExitCode"]
