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
    from .jobs.indexer import IndexSummary
    from .progress import Progress


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

    def require_model(self, model: str | None) -> None:
        """Raise :class:`UsageError` when ``model`` is given and is not the library's
        (for commands that read vectors without indexing)."""
        if model and self.model and models.resolve(model) != self.model:
            raise UsageError(f"--model {model}: the library holds embeddings of '{self.model}'")

    def indexed(self, fs_paths: Iterable[str]) -> list[tuple[str, int]]:
        """(path as shown, file id) of those paths the library holds, in path order."""
        from .store.db import db_path_of

        known = self.store.known()
        return [(db_path_of(p)[0], known[p].id) for p in sorted(fs_paths) if p in known]

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
        engine: str = "local",
        address: str | None = None,
        engine_logs: bool = False,
    ) -> IndexSummary:
        """Add new and changed images under ``paths``, drop deleted ones (unless not ``prune``).

        ``engine="ray"`` reads, decodes and embeds on a Ray cluster (``address``, else a
        local Ray instance; needs ``itr[ray]``), committing here as a local run does;
        ``engine_logs`` lets Ray's own log lines through on stderr.

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
        if engine not in ("local", "ray"):
            raise UsageError(f"--engine {engine}: expected local or ray")
        if address and engine != "ray":
            raise UsageError("--address goes with --engine ray")
        if engine == "ray":
            from .jobs.distributed import require_ray

            require_ray()  # before any work: one line naming the extra
        if self.store.readonly:
            raise LibraryError("library opened read-only")
        import sqlite3

        from .store.db import library_error

        lock = WriteLock(self.directory, "itr index").acquire(wait)
        try:
            want = self._check_model(model, reindex)
            if reindex and self.model:
                self._clear()
            if reindex:
                with self.store.transaction() as c:
                    self.store.forget_all_failures(c)  # retry every bad file too
            meta = self.store.meta()
            prep = Preprocess.from_config(meta["preprocess"]) if meta.get("preprocess") else None
            dim = meta.get("dim")

            from .progress import default_workers

            n_workers = workers or default_workers()

            # with Ray the workers embed; the driver may have no GPU (it loads the model only
            # to bind a new library, export the text tower, or re-embed a rare leftover)
            drv_device, drv_precision = (device, precision) if engine == "local" else (
                "cpu", "auto" if precision == "fp16" else precision)

            def get_encoder():
                enc = self.encoder(want, drv_device, drv_precision)
                if not self.store.get_meta("model"):
                    self._bind(enc)
                return enc

            run_cls, extra = IndexRun, {}
            if engine == "ray":
                from .jobs.distributed import RayIndexRun as run_cls

                extra = dict(model=want, device=device, precision=precision, address=address,
                             logs=engine_logs)
            run = run_cls(
                self.store, self.directory, get_encoder, dim=dim, prep=prep,
                batch_size=batch_size, workers=n_workers,
                draft=draft, progress=progress, **extra,
            )
            summary = run.run(roots, extensions=supported_extensions(),
                              include_hidden=include_hidden, exclude=list(exclude),
                              follow_symlinks=follow_symlinks, prune=prune)
            known_roots = set(self.store.get_meta("roots", []))
            if not summary.interrupted:
                self.store.set_meta(roots=sorted(known_roots | set(roots)))
                self._catch_up_text_tower(want, drv_device, drv_precision)
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

    def stored_vector(self, path: str):
        """The stored vector of an indexed, unchanged file, else None (no model needed)."""
        row = self.store.row_by_path(os.path.abspath(path))
        if row is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        if st.st_size != row["size"] or st.st_mtime_ns != row["mtime_ns"]:
            return None
        ids, vecs = self.store.vectors([row["id"]])
        return vecs[0] if len(ids) else None

    def embed_image(self, path: str, device: str = "auto", precision: str = "auto"):
        """Embed one image file with the library's model: ``[dim]``."""
        from .ingest.images import DecodeError, decode_file

        enc = self.encoder(None, device, precision)
        try:
            pixels, _meta, _data = decode_file(path, enc.prep, draft=False)
        except (OSError, DecodeError) as e:
            raise UsageError(f"image query {path}: {e}") from None
        return enc.encode_pixels(pixels[None])[0]

    def embed_query(self, parts, device: str = "auto", precision: str = "auto"):
        """Combine query parts (:class:`itrcli.query.search.QueryPart`) into one vector ``[dim]``."""
        from .query.search import build_query

        return build_query(
            parts,
            stored_vector=self.stored_vector,
            encode_texts=lambda texts: self.text_encoder(device, precision).encode_texts(texts),
            encode_image=lambda p: self.embed_image(p, device, precision),
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
    ) -> list:
        """Rank the library's images against a query; returns :class:`itrcli.query.search.Hit` s.

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
        if not self.model or not self.store.has_files():
            raise LibraryError(f"library {self.directory} is empty (run 'itr index PATH' first)")
        filters = Filters(list(in_dirs), parse_date(after, "--after"),
                          parse_date(before, "--before"), threshold)
        q = self.embed_query(parts, device, precision)
        ef = ef or self.store.get_meta("search_ef")  # measured on this library by `itr index`
        exclude = [p.value for p in parts if p.kind == "image"]
        return rank(q, store=self.store, get_vindex=self._search_graph, top=top, filters=filters,
                    exclude_paths=exclude, exact=exact, ef=ef, hash_bits=hash_bits)

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
        """--reindex: forget every vector and the model binding (rows are re-created).
        The graph goes first: killed in between, it is rebuilt from the rows."""
        from .embed.textonnx import remove_export
        from .store.vindex import remove_graphs

        remove_graphs(self.directory)
        with self.store.transaction() as c:
            self.store.delete_files(c, self.store.vector_ids().tolist())
            self.store.forget_model(c)
        remove_export(self.directory)

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

        return check(self.store, files=files)

    def repair(self, *, prune: bool = False, wait: float = 0.0):
        """Fix what :meth:`check` finds (rebuild the graph, drop orphan or damaged vectors,
        remove leftovers of killed runs); ``prune`` also forgets files that vanished.
        Returns the check report after repair, with ``repaired`` listing what was done.
        Raises:
            LibraryError: opened read-only, locked (``wait`` seconds), or beyond repair.
        """
        from .jobs.check import repair

        return repair(self.store, prune=prune, wait=wait)

    # -- information ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Path, model, dimension, counts, roots and on-disk sizes (the ``itr info`` object)."""
        from .embed.textonnx import OnnxTextEncoder

        meta = self.store.meta()
        sizes = disk_usage(self.directory)
        total = sum(sizes.values())
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
            "roots": meta.get("roots", []),
            "fast_text_search": OnnxTextEncoder.available(self.directory),
            "search_ef": meta.get("search_ef"),
            "search_recall": meta.get("search_recall"),
            "sizes": {**sizes, "total": total},
        }



def disk_usage(directory: Path) -> dict[str, int]:
    """Bytes under each top-level entry of ``directory`` (files counted once, links not
    followed).  An entry that vanishes meanwhile (a graph file replaced or a thumbnail
    trimmed by a concurrent run) is simply not counted."""
    sizes: dict[str, int] = {}

    def walk(d: str) -> int:
        n = 0
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError:
            return 0
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    n += walk(e.path)
                elif e.is_file(follow_symlinks=False):
                    n += e.stat(follow_symlinks=False).st_size
            except OSError:  # gone since the listing
                continue
        return n

    try:
        with os.scandir(directory) as it:
            top = sorted(it, key=lambda e: e.name)
    except OSError:
        return sizes
    for e in top:
        try:
            if e.is_dir(follow_symlinks=False):
                size = walk(e.path)
                if not size:
                    continue  # as before: a folder shows once it holds something
            elif e.is_file(follow_symlinks=False):
                size = e.stat(follow_symlinks=False).st_size
            else:
                continue
        except OSError:
            continue
        sizes[e.name] = size
    return sizes


__all__ = ["Library", "ExitCode"]
