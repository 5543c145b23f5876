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
from .errors import ExitCode, ItrError, LibraryError, UsageError
from .query.request import SearchRequest, SearchResult
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
        self._encoder_args: tuple[str, str, str, str | None] | None = None
        #: many searches will follow (``itr serve``): worth a slower start for faster queries
        self.long_lived = False
        #: the text tower of searches whose request names none: ``fp32``, or ``int8``
        #: (:mod:`itrcli.embed.textquant`; ``itr serve --text-precision``)
        self.text_precision = "fp32"
        self._interrupted = False  # :meth:`interrupt`
        self._reranker = None  # loaded by the first search with rerank=True
        self._reranker_args: tuple[str | None, str, str] | None = None

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
        """Release what the library holds: the database, the graph (loaded or mapped), the
        loaded encoder and re-ranker.  Closing twice is harmless."""
        self.close_graph()
        self._encoder = self._encoder_args = None
        self._reranker = self._reranker_args = None
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
        shown = self.store.shown_paths()
        return [shown[p] for p in sorted(fs_paths) if p in shown]

    def encoder(self, model: str | None = None, device: str = "auto", precision: str = "auto",
                towers: str = "both"):
        """The library's encoder, loaded once (imports torch and transformers).

        ``towers="image"`` (indexing) leaves the text tower's weights unread until a text is
        encoded (see :class:`itrcli.embed.encoder.Encoder`)."""
        name = model or self.model or models.resolve(None)
        return self._encoder_at(name, device, precision, self._revision_of(name), towers)

    def _encoder_at(self, name: str, device: str, precision: str, revision: str | None,
                    towers: str):
        """:meth:`encoder` of ``name`` at ``revision``: reads no database, so an index run
        may load it in a thread beside its first decodes."""
        from .embed.encoder import Encoder

        args = (name, device, precision, revision)
        if self._encoder is None or self._encoder_args != args:
            self._encoder = Encoder(name, device=device, precision=precision, towers=towers,
                                    revision=revision)
            self._encoder_args = args
        return self._encoder

    def _revision_of(self, model: str) -> str | None:
        """The hub revision the library's vectors were made with, when ``model`` is its
        model (a newer snapshot in the cache must not be mixed in); else None."""
        if model != self.model:
            return models.preset_revision(model) if not self.model else None
        return self.store.get_meta("model_revision") or models.preset_revision(model)

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
        ocr: bool | None = None,
        video: bool = True,
        video_budget: float | None = None,
        engine: str = "local",
        address: str | None = None,
        engine_logs: bool = False,
        list_indexed: bool = False,
    ) -> IndexSummary:
        """Add new and changed images under ``paths``, drop deleted ones (unless not ``prune``).

        ``video``: also index videos (when PyAV is installed), a few frames each with their
        times (:mod:`itrcli.ingest.video`); ``video_budget``: seconds one video may take.
        ``ocr``: True reads the text in images from now on (a library setting, kept by later
        runs), False stops and forgets it, None keeps the library's setting.
        ``engine="ray"`` reads, decodes and embeds on a Ray cluster (``address``, else a
        local Ray instance; needs ``itr-search[ray]``), committing here as a local run does;
        ``engine_logs`` lets Ray's own log lines through on stderr.  ``list_indexed``:
        give ``summary.indexed_files`` (what :meth:`indexed` would give for
        ``summary.found``) when the run changed no file row, without reading the rows again.

        Returns an :class:`~itrcli.jobs.indexer.IndexSummary`; ``summary.interrupted`` is set when
        Ctrl-C stopped the run (every batch committed before it is kept).
        Raises:
            LibraryError: bound to another model, or locked by another writer.
            ModelError: the model cannot be loaded.
        """
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

        opts = dict(device=device, precision=precision, batch_size=batch_size, workers=workers,
                    include_hidden=include_hidden, exclude=list(exclude),
                    follow_symlinks=follow_symlinks, prune=prune, draft=draft,
                    progress=progress, video=video, video_budget=video_budget, engine=engine,
                    address=address, engine_logs=engine_logs, list_indexed=list_indexed)
        try:
            with self.store.writing("itr index", wait):
                if reindex and self.model:
                    return self._reindex_beside(roots, model, ocr, opts)
                return self._index_locked(roots, model, reindex, ocr, **opts)
        except (sqlite3.Error, OSError) as e:
            # a full disk, a read-only or vanished library directory, a damaged database:
            # one actionable line (committed batches are kept; the next run goes on)
            raise library_error(e, self.directory) from e

    def _index_locked(self, roots: list[str], model: str | None, reindex: bool,
                      ocr: bool | None, *, device: str, precision: str, batch_size: int,
                      workers: int | None, include_hidden: bool, exclude: list[str],
                      follow_symlinks: bool, prune: bool, draft: bool, progress,
                      video: bool, video_budget: float | None, engine: str,
                      address: str | None, engine_logs: bool, list_indexed: bool) -> IndexSummary:
        """:meth:`index` with the write lock held (a library with no model bound yet, or
        an index run into the library a re-index builds beside the old one)."""
        from .ingest.images import Preprocess, supported_extensions
        from .jobs.indexer import IndexRun

        want = self._check_model(model, reindex)
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
            enc = self.encoder(want, drv_device, drv_precision, towers="image")
            if not self.store.get_meta("model"):
                self._bind(enc)
            return enc

        run_cls, extra = IndexRun, {}
        if engine == "ray":
            from .jobs.distributed import RayIndexRun as run_cls

            extra = dict(model=want, device=device, precision=precision, address=address,
                         logs=engine_logs, revision=self._revision_of(want))
        self._text_child_outcome = None
        if engine == "local":  # the towers' one-time exports, before encoding
            extra["before_encoder"] = lambda photos, count: self._export_towers_first(
                want, drv_device, drv_precision, photos, count)
            if prep is None:  # a new library: decoding starts while the encoder loads
                from functools import partial

                from .embed.encoder import guess_preprocess

                revision = self._revision_of(want)
                extra["guess_prep"] = partial(guess_preprocess, want, revision)
                extra["load_encoder"] = partial(self._encoder_at, want, drv_device,
                                                drv_precision, revision, "image")
        run = run_cls(
            self.store, self.directory, get_encoder, dim=dim, prep=prep,
            batch_size=batch_size, workers=n_workers,
            draft=draft, progress=progress, text=self._text_job(ocr, reindex),
            video_budget=video_budget, **extra,
        )
        from .constants import MEDIA_EXTENSIONS, VIDEO_EXTENSIONS
        from .ingest.video import available as video_available

        # both engines read videos (PyAV is a dependency; a broken install passes
        # them over, counted)
        videos = video and video_available()
        extensions = supported_extensions() | (VIDEO_EXTENSIONS if videos else frozenset())
        # videos left out by choice (--no-video) are not "passed over"
        unreadable = MEDIA_EXTENSIONS - extensions - (frozenset() if video else VIDEO_EXTENSIONS)
        summary = run.run(roots, extensions=extensions,
                          include_hidden=include_hidden, exclude=list(exclude),
                          follow_symlinks=follow_symlinks, prune=prune,
                          keep=frozenset() if videos else VIDEO_EXTENSIONS, list_indexed=list_indexed,
                          count=unreadable)
        known_roots = set(self.store.get_meta("roots", []))
        if engine == "local" and summary.embedded and self._encoder is not None:
            # which runtime encoded the library (itr info; see embed/imagetower.py)
            self.store.set_meta(image_runtime=getattr(self._encoder, "image_runtime", "torch"))
        if not summary.interrupted:
            self.store.set_meta(roots=sorted(known_roots | set(roots)))
            self._finish_text_tower()
        return summary

    def _reindex_beside(self, roots: list[str], model: str | None, ocr: bool | None,
                        opts: dict[str, Any]) -> IndexSummary:
        """``index(reindex=True)`` of a library bound to a model: a new library is built in
        ``<library>/.reindex`` (the model loaded and checked first, by its own run) and
        swapped in at the end.  Until the swap the old library answers searches as it was;
        a failed, interrupted or killed re-index leaves it untouched (the next re-index
        removes the half-built one).  The swap keeps a whole library at every step."""
        import shutil

        from .embed import textonnx
        from .store import vindex

        from .constants import REINDEX_DIR

        side_dir = self.directory / REINDEX_DIR
        shutil.rmtree(side_dir, ignore_errors=True)  # a killed re-index's half-built library
        side = Library.open(side_dir, create=True)
        try:
            if ocr is None and self.ocr:
                ocr = True  # the library's setting, kept
            with side.store.writing("itr index --reindex"):
                summary = side._index_locked(roots, model or self.model, False, ocr, **opts)
                if summary.interrupted:
                    return summary
                side.store.set_meta(roots=sorted(set(self.store.get_meta("roots", [])) | set(roots)))
            side.store.checkpoint()
            side.close()
            # the old graph and text tower go first (a kill after this leaves the old rows,
            # whose graph is rebuilt from them), then the database (the new rows and
            # vectors), then the new graph and tower join it
            vindex.remove_graphs(self.directory)
            textonnx.remove_export(self.directory)
            self.store.swap_in(side_dir)
            vindex.adopt_graphs(side_dir, self.directory)
            textonnx.adopt_export(side_dir, self.directory)
            self._forget_loaded()
            return summary
        finally:
            side.close()
            shutil.rmtree(side_dir, ignore_errors=True)

    def _forget_loaded(self) -> None:
        """Drop what was loaded for the library's previous contents (graph, encoder)."""
        self._vindex = self._mapped = None
        self._encoder = self._encoder_args = None

    @property
    def ocr(self) -> bool:
        """Whether ``itr index`` reads the text in this library's images (``--ocr``)."""
        return bool(self.store.get_meta("ocr", False))

    def _text_job(self, ocr: bool | None, reindex: bool):
        """The OCR side of an index run (None when the library reads no text); applies an
        ``--ocr`` / ``--no-ocr`` request to the library's setting first."""
        if ocr is False:
            if self.ocr or self.store.words.any_read():
                with self.store.transaction():
                    self.store.words.clear()
            self.store.set_meta(ocr=False)
            return None
        if not (ocr or self.ocr):
            return None
        from .ingest.ocr import available

        if not available():
            how = "" if ocr else " (this library reads text; 'itr index --no-ocr' turns that off)"
            raise LibraryError(f"reading text in images needs rapidocr: pip install 'itr-search[ocr]'{how}")
        if reindex:
            with self.store.transaction():
                self.store.words.clear()
        if ocr:
            self.store.set_meta(ocr=True)
        from .jobs.textread import TextJob

        return TextJob(self.store)

    def _bind(self, enc) -> None:
        info = enc.info
        self.store.set_meta(
            model=info.id, model_revision=info.revision, model_type=info.model_type,
            dim=info.dim, precision=enc.precision, preprocess=info.preprocess,
            text_max_length=info.text_max_length, text_padding=info.text_padding,
        )

    # -- the exported text tower (fast cold searches; see embed/textonnx.py) ------------------
    def _text_export_due(self, model: str | None) -> bool:
        """No exported tower for ``model`` yet, or one of an older export format (made
        again: it still answers meanwhile), and its export has not been given up."""
        from .embed.textonnx import export_current

        return bool(model) and not (self._text_export_ok() and export_current(self.directory)) and (
            self.store.get_meta("text_export_failed") != model)

    def _text_export_ok(self) -> bool:
        """The exported text tower is there and belongs to the library's model and dimension."""
        from .embed.textonnx import export_matches

        return export_matches(self.directory, self.model, self.store.get_meta("dim"))

    def _cache_revision(self, model: str) -> str | None:
        """The revision that keys ``model``'s exports in the machine's tower cache: the
        library's recorded one, else the one the hub cache holds now (None: a local
        directory, keyed by its files)."""
        return self._revision_of(model) or models.model_revision(model)

    def _finish_text_tower(self) -> None:
        """End of a run: take the text tower's export from the machine's tower cache, or
        make it (in a child process for a large tower, once the run has let go of its image
        tower: the two peaks of memory never add up), and record the outcome.  Never
        raises: without the tower searches use the torch text tower, same vectors, slower.
        A failure is retried by the next runs (EXPORT_TRIES in all), unless the model
        cannot be exported at all (e.g. a sentencepiece tokenizer that ``tokenizers`` cannot
        load)."""
        from .embed import onnxexport, textonnx

        model = self.model
        if (model and self._text_export_due(model)
                and textonnx.from_cache(self.directory, model, self._cache_revision(model))
                and not self._text_export_due(model)):
            return
        if not self._text_export_due(model):
            if not model:  # no image was found: a tower of no bound model is not kept
                textonnx.remove_export(self.directory)
            elif self._text_export_ok():
                textonnx.cache_export(self.directory, model, self._cache_revision(model))
            return
        if onnxexport.use_child(model):
            # made before the run's encoder was loaded (below), or now, once it is let go of
            code, why = self._text_child_outcome or self._text_export_child(model)
            unsupported = code == textonnx.UNSUPPORTED
        else:
            code, why, unsupported = 0, "", False
            try:
                textonnx.export(self._encoder or self._text_side(model), self.directory)
            except onnxexport.ExportUnsupported as e:
                code, why, unsupported = 1, str(e), True
            except Exception as e:
                code, why = 1, f"{type(e).__name__}: {str(e)[:200]}"
        if code == 0 and self._text_export_ok():
            self.store.set_meta(text_export_tries=None)
            textonnx.cache_export(self.directory, model, self._cache_revision(model))
            return
        import logging

        logging.getLogger("itr").debug("text tower export failed: %s", why)
        tries = self.store.get_meta("text_export_tries") or {}
        n = (tries.get("n", 0) if tries.get("model") == model else 0) + 1
        if unsupported or n >= EXPORT_TRIES:
            self.store.set_meta(text_export_failed=model, text_export_tries=None)
        else:
            self.store.set_meta(text_export_tries={"model": model, "n": n})

    def _text_export_child(self, model: str) -> tuple[int, str]:
        """Export the text tower in a child process, the run's image tower let go of first;
        (exit status, its last line of error output)."""
        from .embed import textonnx

        self._release_image_tower()
        return textonnx.start(model, self.directory, revision=self._revision_of(model)).wait()

    def _export_towers_first(self, model: str, device: str, precision: str,
                             photos: list[str], count: int) -> None:
        """Before a run first loads its encoder: the one-time exports it needs, while it holds
        no model, so that their peaks of memory never add to the encoder's (the first
        library of a model on a machine: the image tower's for onnxruntime, then the text
        tower's, each in a child process for a large tower).  The text tower's outcome is
        recorded by :meth:`_finish_text_tower` at the run's end, as for an export made there.
        ``count``: the files the run may encode; the image tower is exported for a run that
        gains more than the export costs (:func:`itrcli.embed.imagetower.worth_exporting`)."""
        from .embed import imagetower, onnxexport, textonnx

        if imagetower.worth_exporting(count):
            self._export_image_tower(model, device, precision, photos)
        if not onnxexport.use_child(model):
            return  # small towers are exported by the run itself, at its end
        if not self._text_export_due(model):
            return  # there already (a bound library), or given up for this model
        if textonnx.from_cache(self.directory, model, self._cache_revision(model)):
            return  # an earlier library of this model on this machine exported it
        self._preload_encoder(model, device, precision)
        self._text_child_outcome = self._text_export_child(model)

    def _preload_encoder(self, model: str, device: str, precision: str) -> None:
        """While this run waits on the text tower's export child, import what loading its
        encoder will (:func:`itrcli.embed.encoder.preload`) in a daemon thread: about 3 s of
        imports on the core the child leaves idle, instead of after it (the machine's first
        library of a model: 24 photos of 12 MP in 8.3 s instead of 10.8 s; the whole run's
        peak 1,066 MiB PSS instead of 873-984, within the 1.2 GB it is held to).  Not beside
        the image tower's export, whose child peaks higher.  A failure is left in the
        future, untaken: the encoder's own loading meets it again and reports it."""
        from .embed.encoder import preload
        from .pools import in_thread

        revision = self._revision_of(model)
        in_thread(lambda: preload(model, device, precision, revision), "itr-preload")

    def _export_image_tower(self, model: str, device: str, precision: str,
                            photos: list[str]) -> None:
        """Before a run first loads its encoder, where onnxruntime would run the image tower
        and this machine has no export of the model yet: export it now, checked on
        ``photos`` (:mod:`itrcli.embed.imageexport`; in a child process for a large tower,
        while this run holds no model), so that the whole run, the first library of a
        model on a machine included, encodes with it.  Never raises; a failure is one line
        under ``-v``, the run encodes with torch and the next runs try again (up to
        EXPORT_TRIES runs per model)."""
        import logging

        from .embed import imageexport, imagetower
        from .embed.encoder import resolve_device, resolve_precision

        if not photos:
            return
        try:
            device = resolve_device(device)
            precision = resolve_precision(precision, device)
        except Exception:
            return  # the encoder's own loading reports it
        revision = self._revision_of(model)
        tries = self.store.get_meta("image_export_tries") or {}
        n = tries.get("n", 0) if tries.get("model") == model else 0
        if n >= EXPORT_TRIES or not imagetower.export_due(model, revision, device, precision):
            return
        why = imageexport.export_for_run(model, revision, photos)
        if why is None:
            logging.getLogger("itr").debug("image tower exported for onnxruntime")
            self.store.set_meta(image_export_tries=None)
            return
        logging.getLogger("itr").info("image tower export failed (torch is used): %s", why)
        self.store.set_meta(image_export_tries={"model": model, "n": n + 1})

    def _release_image_tower(self) -> None:
        """Give the memory of an encoder loaded for indexing back before the export child
        peaks (a later use loads it again)."""
        enc = self._encoder
        if enc is None or getattr(enc, "model", None) is not None:
            return  # a two-tower encoder: a caller may use it for texts
        self._encoder = self._encoder_args = None
        del enc
        from .gcpause import give_back_memory

        give_back_memory()

    def _text_side(self, model: str):
        """The text tower alone, in float32 on the CPU (an export with no model loaded)."""
        from .embed.encoder import Encoder

        return Encoder(model, device="cpu", precision="fp32", towers="text",
                       revision=self._revision_of(model))

    # -- searching --------------------------------------------------------------------------
    def text_encoder(self, device: str = "auto", precision: str = "auto",
                     text_precision: str | None = None):
        """Something with ``encode_texts``: the exported ONNX tower if present, else torch.

        ``text_precision``: ``int8`` for the exported tower with int8 weights
        (:mod:`itrcli.embed.textquant`: made on first use); where there is no export, or
        the int8 copy cannot be made, the float32 tower answers, with one line under
        ``-v`` (on a GPU: the torch tower).  None: the library's :attr:`text_precision`."""
        import logging

        from .embed.textonnx import OnnxTextEncoder

        text_precision = text_precision or self.text_precision

        if device not in ("auto", "cpu"):
            return self.encoder(None, device, precision)
        from .embed.textonnx import export_identity

        # kept for the next search of a long-lived library (itr serve) while the export on
        # disk is the same files (a --reindex swaps in another, and the database with it)
        key = (export_identity(self.directory), text_precision)
        cached = getattr(self, "_text_onnx", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        if self._text_export_ok():
            try:
                if text_precision == "int8":
                    from .embed import textquant

                    # a server embeds int8 texts one at a time, two at once on threads of
                    # one thread each (itrcli/serve/texts.py)
                    enc = textquant.encoder(self.directory, warm=self.long_lived,
                                            threads=1 if self.long_lived else None)
                else:
                    enc = OnnxTextEncoder(self.directory, warm=self.long_lived)
            except Exception as e:
                if text_precision != "fp32":
                    logging.getLogger("itr").info("%s text tower not used (float32 is): %s",
                                                  text_precision, e)
                    enc = self.text_encoder(device, precision, "fp32")
                    if getattr(self, "_text_onnx", (None, None))[1] is enc:
                        # kept for this export: a server does not quantise again, for seconds,
                        # at each search
                        self._text_onnx = (key, enc)
                    return enc
                # damaged export: the torch path gives the same vectors
            else:
                self._text_onnx = (key, enc)
                return enc
        if text_precision != "fp32":
            logging.getLogger("itr").info("%s text tower: the library has no exported text "
                                          "tower yet (float32 is used)", text_precision)
        self._text_onnx = None  # no session of an export answers now
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

    def embed_query(self, parts, device: str = "auto", precision: str = "auto", adapter=None,
                    at: float | None = None, text_precision: str | None = None):
        """Combine query parts (:class:`itrcli.query.search.QueryPart`) into one vector ``[dim]``.

        ``adapter`` (an :class:`itrcli.query.adapt.Adapter`) maps the text parts towards
        image space first; image parts are image vectors already.  ``at``: the time in
        seconds of the frame to use for video terms; ``text_precision``: the text tower's
        (:meth:`text_encoder`)."""
        from .query.search import build_query

        def encode_texts(texts):
            enc = self.text_encoder(device, precision, text_precision)
            vecs = self._encode_texts(enc, texts)  # [n, dim]
            return vecs if adapter is None else adapter.apply(vecs)

        return build_query(
            parts,
            stored_vector=lambda p: self.stored_vector(p, at if _is_video(p) else None),
            encode_texts=encode_texts,
            encode_image=lambda p: self.embed_image(p, device, precision,
                                                    at if _is_video(p) else None),
        )

    def _encode_texts(self, enc, texts: list[str]):
        """``enc.encode_texts(texts)``, the last :data:`TEXT_CACHE` answers kept while the
        encoder is the same (a long-lived library: the next page of a search, the back
        button, a query asked again encode nothing).  Keyed by the whole list, so that a
        text gets the very vector it would get without the cache."""
        cache = self._text_cache_for(enc)
        key = tuple(texts)
        vecs = cache.get(key)
        if vecs is None:
            vecs = cache[key] = enc.encode_texts(list(texts))
            _keep_last(cache, TEXT_CACHE)
        else:
            cache.move_to_end(key)
        return vecs.copy()

    def _text_cache_for(self, enc):
        """The kept text vectors of encoder ``enc`` (emptied when the encoder changes)."""
        if getattr(self, "_text_cache_of", None) is not enc:
            from collections import OrderedDict

            self._text_cache_of, self._text_cache = enc, OrderedDict()
        return self._text_cache

    def prime_texts(self, texts: Sequence[str], device: str = "auto",
                    precision: str = "auto", *, least: int = 2,
                    text_precision: str | None = None) -> int:
        """Encode ``texts`` in one batch and keep each one's vector as the search of that
        text alone would use it (a server under load: the queries waiting for the library
        are embedded together, several times cheaper than one by one; a vector then differs
        from a lone encoding by float rounding only, ~1e-7; the int8 tower encodes each
        text alone, at the same cost as one by one).  Returns how many were
        encoded (those already kept are not; none when fewer than ``least`` are new: by
        default one text is left to its own search, which encodes it exactly as alone)."""
        enc = self.text_encoder(device, precision, text_precision)
        cache = self._text_cache_for(enc)
        todo = [t for t in dict.fromkeys(texts) if (t,) not in cache][:TEXT_CACHE]
        if len(todo) < max(1, least):
            return 0
        # texts of like length together: a batch is padded to its longest text
        todo.sort(key=len)
        for at in range(0, len(todo), PRIME_BATCH):
            part = todo[at:at + PRIME_BATCH]
            for t, v in zip(part, enc.encode_texts(part)):  # [n, dim]
                cache[(t,)] = v[None, :].copy()
        _keep_last(cache, TEXT_CACHE)
        return len(todo)

    def shared_text_encoder(self):
        """The text encoder of this library's searches when other threads may use it too
        (the exported ONNX tower: an onnxruntime session runs from any thread), else None."""
        from .embed.textonnx import OnnxTextEncoder

        try:
            enc = self.text_encoder()
        except ItrError:
            return None
        return enc if isinstance(enc, OnnxTextEncoder) else None

    def keep_text_vector(self, encoder, text: str, vector) -> bool:
        """Keep ``vector`` ``[dim]`` as the vector of a search for ``text`` alone, if
        ``encoder`` (which made it, on another thread: ``itr serve``) is the text encoder
        that this library's searches use, as :meth:`shared_text_encoder` last found it;
        False otherwise (they embed the text again)."""
        if encoder is None or getattr(self, "_text_onnx", (None, None))[1] is not encoder:
            return False
        cache = self._text_cache_for(encoder)
        cache[(text,)] = vector[None, :].copy()
        _keep_last(cache, TEXT_CACHE)
        return True

    def knows_text(self, text: str) -> bool:
        """Whether the vector of a search for ``text`` alone is kept (no encoding needed)."""
        return (getattr(self, "_text_cache_of", None) is not None
                and (text,) in self._text_cache)

    def search(self, request: SearchRequest | str | None = None, /, *, progress=None,
               **options: Any) -> SearchResult:
        """Rank the library's images and videos against one request.

        ``request`` is a :class:`~itrcli.query.request.SearchRequest`, or the query text (or
        image path) with the request's fields as keyword ``options``::

            lib.search("two children on a lawn", top=5, after="2024-01-01")
            lib.search(SearchRequest(query="a red bicycle", rerank=True))

        The text is mapped by the library's adapter (``itr adapt``) unless ``adapt=False``;
        on a library that reads text the words are matched too (``text_match``); a video
        ranks once, at its best frame (``hit.time``), unless ``frames``; an image query never
        returns the query file itself.  ``progress``: the re-ranker's progress (``rerank``).

        Returns a :class:`~itrcli.query.request.SearchResult` (iterable over its hits).
        Raises:
            UsageError: empty query, bad date or filter, unreadable query image.
            LibraryError: the library is empty.
        """
        import time

        from .query.autocut import FLOOR_SIGMAS
        from .query.filters import meta_filter, parse_sort, sort_hits
        from .query.search import Filters, parse_date, query_parts, rank

        t0 = time.perf_counter()
        if isinstance(request, SearchRequest):
            req = request.replace(**options) if options else request.checked()
        else:
            req = SearchRequest.build(request, **options)
        parts = query_parts(req.query, image=req.image, text=req.text, add=req.add,
                            subtract=req.subtract)
        if any(p.kind == "text" and not p.value for p in parts):
            raise UsageError("empty query")
        if not parts:
            raise UsageError("empty query: give QUERY, --image or --text")
        rerank_k = req.rerank_k
        if req.rerank:
            from .embed.rerank import DEFAULT_RERANK_K

            rerank_k = DEFAULT_RERANK_K if rerank_k is None else rerank_k
            if len(parts) != 1 or parts[0].kind != "text":
                raise UsageError("--rerank scores one text against images: it takes a text "
                                 "query without --add/--subtract, not an image query")
        if not self.model or not self.store.has_files():
            raise LibraryError(f"library {self.directory} is empty (run 'itr index PATH' first)")
        meta = meta_filter(camera=req.camera, near=req.near, globs=req.globs,
                           min_size=req.min_size, kind=req.kind)
        order = parse_sort(req.sort)
        sigmas = (None if req.auto_cut is False or req.auto_cut is None
                  else FLOOR_SIGMAS if req.auto_cut is True else float(req.auto_cut))
        filters = Filters(list(req.in_dirs), parse_date(req.after, "--after"),
                          parse_date(req.before, "--before"), req.threshold, meta, sigmas)
        if req.at is not None and not any(p.kind == "image" and _is_video(p.value) for p in parts):
            raise UsageError("--at goes with a video query (QUERY or --image naming a video file)")
        exclude = [p.value for p in parts if p.kind == "image"]
        page = req.offset + req.top
        want = page + 1  # one more: whether another page follows
        if req.rerank:
            want = max(want, rerank_k)  # type: ignore[type-var]
        out = SearchResult(req, model=self.model)
        tq = self._word_query(parts, req.text_match)
        timings = out.timings
        if tq is not None and req.text_match == "only":
            from .query.fusion import fused_rank

            t1 = time.perf_counter()

            def ranked(n: int):
                return fused_rank(None, tq, store=self.store, get_vindex=self._search_graph,
                                  top=n, filters=filters, exclude_paths=exclude,
                                  text_only=True, frames=req.frames)
        else:
            adapter = (self.adapter() if req.adapt and any(p.kind == "text" for p in parts)
                       else None)
            out.adapter = adapter.method if adapter is not None else None
            q = self.embed_query(parts, req.device, req.precision, adapter, at=req.at,
                                 text_precision=req.text_precision)
            t1 = time.perf_counter()
            timings["embed"] = t1 - t0
            ef = req.ef or self.store.get_meta("search_ef")  # measured by `itr index`

            def ranked(n: int):
                if tq is not None:
                    from .query.fusion import fused_rank

                    return fused_rank(q, tq, store=self.store, get_vindex=self._search_graph,
                                      top=n, filters=filters, exclude_paths=exclude,
                                      exact=req.exact, ef=ef, hash_bits=req.hash_bits,
                                      frames=req.frames)
                return rank(q, store=self.store, get_vindex=self._search_graph, top=n,
                            filters=filters, exclude_paths=exclude, exact=req.exact, ef=ef,
                            hash_bits=req.hash_bits, frames=req.frames)
        hits = self._photos(ranked, want, filters, exclude, req.all_files)
        t2 = time.perf_counter()
        timings["rank"] = t2 - t1
        if req.rerank:
            hits, cache = self._rerank(hits, parts[0].value, k=rerank_k,  # type: ignore[arg-type]
                                       model=req.rerank_model, device=req.device,
                                       precision=req.precision, progress=progress,
                                       cache=req.rerank_cache)
            out.rerank_cache = cache
            timings["rerank"] = time.perf_counter() - t2
        out.more = len(hits) > page
        out.hits = sort_hits(hits[:page], order)[req.offset:]  # each hit keeps its rank
        timings["total"] = time.perf_counter() - t0
        return out

    def _photos(self, ranked, want: int, filters, exclude: list[str], all_files: bool):
        """``ranked(n)``'s hits as one hit per photo (:func:`itrcli.query.twins.collapse`):
        asked for more while the twins folded leave fewer than ``want``."""
        from .query.search import allowed_ids
        from .query.twins import collapse
        from .store.db import db_path_of

        cache: list = []

        def allowed(row) -> bool:  # a primary not among the hits passes the filters too
            if not cache:
                cache.append(allowed_ids(self.store, filters))
            return cache[0] is None or row["id"] in cache[0]

        ask = want
        while True:
            hits = ranked(ask)
            got = len(hits)
            hits = collapse(self.store, hits, all_files=all_files, allowed=allowed,
                            excluded=[db_path_of(p)[0] for p in exclude])
            if len(hits) >= want or got < ask:
                return hits[:want]
            ask = ask * 2 + (want - len(hits))

    # -- binary codes ---------------------------------------------------------------------
    def binary_codes(self, files: Sequence[tuple[str, int]] = (), texts: Sequence[str] = (), *,
                   bits: int = 64, method: str = "itq", device: str = "auto",
                   precision: str = "auto") -> list[dict[str, str]]:
        """Hex codes of indexed files (``(path as shown, id)`` from :meth:`indexed`) and of
        texts, in that order: ``[{"path"|"text": ..., "code": hex}]``.  A video's code is
        that of the normalised mean of its frames' vectors; files without a vector (see
        :meth:`check`) are left out.  The hasher is fitted on the library (see
        :mod:`itrcli.query.binary`) and saved when writable."""
        from .query.binary import file_codes, library_codes, to_hex

        if not files and not texts:
            return []
        lc = library_codes(self.store, bits, method)
        out: list[dict[str, str]] = []
        if files:
            codes = file_codes(self.store, lc, [i for _, i in files])
            out += [{"path": p, "code": to_hex(codes[i], bits)} for p, i in files if i in codes]
        if texts:
            vecs = self.text_encoder(device, precision).encode_texts(list(texts))  # [t, dim]
            out += [{"text": t, "code": to_hex(c, bits)} for t, c in zip(texts, lc.hasher.codes(vecs))]
        return out

    def near_duplicates(self, files: Sequence[tuple[str, int]], *, bits: int = 64,
                        method: str = "itq", threshold: float | None = None) -> list[list[str]]:
        """Groups of near-duplicate files among ``files`` (``(path as shown, id)``): paths
        sorted within each group, groups sorted.  ``threshold``: the cosine that confirms a
        pair (default :data:`itrcli.query.binary.DUPES_THRESHOLD`)."""
        from .query.dupes import find_dupes
        from .query.binary import DUPES_THRESHOLD

        if not files:
            return []
        cut = DUPES_THRESHOLD if threshold is None else threshold
        from .query.twins import fold_groups

        groups = find_dupes(self.store, [i for _, i in files], bits, method, cut)
        shown = {i: p for p, i in files}
        # a RAW and its JPEG, a Live Photo and its clip: one photo, not duplicates
        return sorted(sorted(g) for g in fold_groups(self.store, [sorted(shown[i] for i in g)
                                                                  for g in groups]))

    # -- adapting ---------------------------------------------------------------------------
    def stored_adapter(self):
        """The stored :class:`itrcli.store.adapters.StoredAdapter`, or None."""
        return self.store.adapters.load()

    def adapter(self):
        """The query map fitted by :meth:`adapt` for this library's model, or None."""
        from .query.adapt import Adapter

        a = self.stored_adapter()
        if a is None or a.model != self.model or a.dim != self.store.get_meta("dim"):
            return None  # fitted for a model the library no longer holds
        return Adapter(a.method, a.params, a.matrix, a.mean)

    def adapt(
        self,
        pairs,
        *,
        methods: Sequence[str] | None = None,
        folds: int = 5,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 32,
        workers: int | None = None,
        cache: bool = True,
        progress: Progress | None = None,
        wait: float = 0.0,
    ) -> dict[str, Any]:
        """Fit a query map on captioned ``pairs`` and store it (see :mod:`itrcli.query.adapt`).

        Args:
            pairs: a :class:`itrcli.evaluation.datasets.Dataset` (``datasets.load``).
            methods: the methods to choose from (default: all of
                :data:`itrcli.query.adapt.METHODS`); cross-validation picks one, or none.
            folds: cross-validation folds (grouped by image).
            cache: use the evaluation embedding cache.
            wait: seconds to wait for the write lock when the map is stored (the fit itself
                runs without it: an index run goes on meanwhile).
        Returns:
            ``{"stored": bool, "method", "params", "pairs_hash", "cv": {...}, "skipped": [...],
            "notes": [...], "encoded": {...}}``; nothing is stored when no map beats the
            model as it is on held-out pairs.
        Raises:
            LibraryError: empty library, read-only.
            UsageError: too few readable pairs, bad ``folds`` / ``methods``.
        """
        import numpy as np

        from .evaluation.evaluate import embed_dataset, pairs_of
        from .store.embedding_cache import EmbeddingCache, default_cache_path
        from .query import adapt as fit
        from .store.adapters import StoredAdapter
        from .store.db import now_iso

        if self.store.readonly:
            raise LibraryError("library opened read-only")
        if not self.model:
            raise LibraryError(f"library {self.directory} is empty (run 'itr index PATH' first: "
                               "the map is fitted on its model's vectors)")
        methods = list(methods or fit.METHODS)
        for m in methods:
            if m not in fit.METHODS:
                raise UsageError(f"--method {m}: expected one of {', '.join(fit.METHODS)}")
        if folds < 2:
            raise UsageError("--folds must be at least 2")
        store_cache = EmbeddingCache(default_cache_path()) if cache else None
        try:
            e = embed_dataset(pairs, self.model, device=device, precision=precision,
                              batch_size=batch_size, workers=workers, cache=store_cache,
                              library_vector=self.store.vector_for_hash, progress=progress)
        finally:
            if store_cache is not None:
                store_cache.close()
        p = pairs_of(pairs, e)
        n_images = len(np.unique(p.image_hash))
        need = fit.min_images(folds)
        if n_images < need:
            raise UsageError(
                f"{pairs.source}: {n_images} readable captioned image(s); adapting needs at "
                f"least {need} ({folds}-fold cross-validation, {fit.MIN_IMAGES_PER_FOLD} images "
                "a fold at least)")
        notes = []
        dim = p.texts.shape[1]
        if len(p) < dim:
            notes.append(f"{len(p)} pairs, fewer than the dimension ({dim}): every map is "
                         "regularised (ridge towards the model as it is, shrunk CCA with at most "
                         "as many components as pairs); cross-validation picks the strength")
        adapter, sel = fit.select_and_fit(p.texts, p.images, p.image_hash, methods=methods,
                                          folds=folds)
        phash = fit.pairs_hash(zip(p.image_hash.tolist(), p.captions))
        cv = sel.to_json()
        stored = sel.best.method != "none"
        if stored:
            fitted_on = self.model
            with self.store.writing("itr adapt", wait):
                if self.model != fitted_on or self.store.get_meta("dim") != dim:
                    raise LibraryError(f"library {self.directory} was re-indexed with another "
                                       "model while the map was fitted; run itr adapt again")
                with self.store.transaction():
                    self.store.adapters.save(StoredAdapter(
                        fitted_on, phash, os.path.abspath(pairs.source), len(p), n_images,
                        adapter.method, adapter.params, dim, adapter.matrix, adapter.mean, cv,
                        now_iso()))
        return {"stored": stored, "method": sel.best.method, "params": sel.best.params,
                "pairs_hash": phash, "model": self.model, "cv": cv, "skipped": e.skipped,
                "notes": notes, "encoded": e.stats}

    def remove_adapter(self, *, wait: float = 0.0) -> bool:
        """Drop the stored query map; True if there was one.
        Raises:
            LibraryError: opened read-only, or locked (``wait`` seconds).
        """
        with self.store.writing("itr adapt --remove", wait), self.store.transaction():
            return self.store.adapters.delete()

    def _word_query(self, parts, mode: str):
        """The words to match in the images' text, or None for a cosine-only search."""
        from .store.words import word_query

        if mode not in ("auto", "only", "none"):
            raise UsageError(f"text_match {mode!r}: expected auto, only or none")
        if mode == "none" or (mode == "auto" and not self.ocr):
            return None  # a library without text: nothing more imported or read
        words = " ".join(p.value for p in parts if p.kind == "text" and p.sign > 0)
        has_text = self.ocr and self.store.words.has_tables()
        if mode == "only":
            if not has_text:
                raise LibraryError(f"library {self.directory} has no text read from its images "
                                   "(run 'itr index PATH --ocr' first)")
            if not words:
                raise UsageError("--text-only needs a text query")
            if parts and any(p.kind == "image" or p.sign < 0 for p in parts):
                raise UsageError("--text-only ranks by words: no image query, --add or --subtract")
        if not has_text or not words:
            return None
        tq = word_query(words)
        if tq.empty and mode == "only":
            raise UsageError(f"--text-only: no word to match in {words!r}")
        return None if tq.empty else tq

    def rerank(self, hits: list, text: str, *, k: int, model: str | None = None,
               device: str = "auto", precision: str = "auto", progress=None,
               cache: bool = True) -> list:
        """Re-score the first ``k`` hits against ``text`` with an image-text matching model
        (:class:`itrcli.embed.rerank.Reranker`; ``model`` None: ``$ITR_RERANK_MODEL`` or
        the default preset) and put them in the order of its match probability; hits past
        ``k`` follow in their first order.  Each hit keeps its cosine ``score`` and gets
        ``rerank_score`` (None past ``k``, or when its file cannot be read now: those follow
        the re-scored ones, with ``rerank_error``).  A video hit is scored at its frame
        (``hit.time``), decoded again at full size.  Returns the hits renumbered.

        ``cache``: keep the re-ranker's vision features of each image and frame in the
        feature cache (``$XDG_CACHE_HOME/itr/rerank``, bounded by
        ``$ITR_RERANK_CACHE_BYTES``; see :mod:`itrcli.store.feature_cache`), so that
        another query over the same images skips the vision tower; the scores are the
        same either way.
        Raises:
            ModelError: the re-ranker cannot be loaded.
            UsageError: ``$ITR_RERANK_CACHE_BYTES`` is not a number of bytes.
        """
        return self._rerank(hits, text, k=k, model=model, device=device, precision=precision,
                            progress=progress, cache=cache)[0]

    def _rerank(self, hits: list, text: str, *, k: int, model: str | None, device: str,
                precision: str, progress, cache: bool) -> tuple[list, dict[str, Any] | None]:
        """:meth:`rerank`, and how its feature cache served (hits, misses, writes, error)."""
        from .embed.rerank import Reranker, reorder
        from .store.db import fs_path_of
        from .store.feature_cache import FeatureCache

        head, tail = hits[:k], hits[k:]
        used = None
        if head:
            rows = self.store.rows(h.id for h in head)
            paths = [fs_path_of(rows[h.id]["path"], rows[h.id]["fsname"]) if h.id in rows
                     else h.path for h in head]
            # a video hit is scored at its frame; the video's hash keys the frame's cached
            # features while the file is unchanged since indexing (size and mtime)
            times = [h.time for h in head]
            video_hashes = [_unchanged_hash(rows.get(h.id), p) if h.time is not None else None
                            for h, p in zip(head, paths)]
            features = FeatureCache.from_env() if cache else None  # a bad bound fails first
            args = (model, device, precision)
            if self._reranker is None or self._reranker_args != args:
                self._reranker = Reranker(model, device=device, precision=precision)
                self._reranker_args = args
            scores, errors = self._reranker.score_files(text, paths, progress=progress,
                                                        cache=features, times=times,
                                                        video_hashes=video_hashes)
            if features is not None:
                used = {"hits": features.hits, "misses": features.misses,
                        "writes": features.writes, "error": features.error}
            for h, p, s in zip(head, paths, scores):
                h.rerank_score, h.rerank_error = s, errors.get(p) if s is None else None
            head = [head[i] for i in reorder(scores)]
        out = head + tail
        for n, h in enumerate(out, 1):
            h.rank, h.reranked = n, True
        return out, used

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
        from .store.vindex import LOADED_GRAPH_MAX, VectorIndex, vindex_size

        seq = self.store.last_seq()
        for vi in (getattr(self, "_vindex", None), getattr(self, "_mapped", None)):
            if vi is not None and vi.seq == seq:
                return vi
        # a library kept open (itr serve) follows the log in place while no newer graph is
        # saved, instead of loading the graph again after each commit of an index run
        for vi in (getattr(self, "_vindex", None), getattr(self, "_mapped", None)):
            if vi is not None and vi.follow(self.store, seq):
                return vi
        self.close_graph()  # a graph of an older state: its memory back
        if self.long_lived and vindex_size(self.directory) <= LOADED_GRAPH_MAX:
            # many searches will follow: a graph within the budget is loaded whole, which
            # hnswlib searches several times faster than the mapped file is searched
            # (100,000 images: 0.9-1.4 ms against 6.6 ms), for a quarter of a second's load
            self._vindex = VectorIndex(self.directory, self._dim()).open(self.store)
            return self._vindex
        # many searches over a graph too large to load: its compact copy (a third of the
        # file, built on a thread while the mapped file answers; see store/compactgraph.py)
        # instead of the file's pages, which thousands of searches would all touch
        self._mapped = VectorIndex(self.directory, self._dim()).open_mapped(
            self.store, compact=self.long_lived)
        return self._mapped

    def settle_graph(self) -> None:
        """Open the graph for searching and wait until it is in the form a long-lived
        library searches: a graph too large to load, its compact copy built (a few seconds
        at a million images; before any search has touched the mapped file's pages)."""
        self._search_graph()
        vi = getattr(self, "_mapped", None)
        if vi is not None:
            if self._interrupted:  # told while the graph was being opened
                vi.interrupt()
            vi.settle(wait=True)

    def interrupt(self) -> None:
        """Stop the graph's background work for good: a compact copy being built (from
        any thread: a server told to stop while it starts; :meth:`settle_graph` then
        returns within a tenth of a second and the mapped file answers)."""
        self._interrupted = True
        vi = getattr(self, "_mapped", None)
        if vi is not None:
            vi.interrupt()

    def close_graph(self) -> None:
        """Let go of the graph, loaded or mapped (the next search opens the newest)."""
        for name in ("_vindex", "_mapped"):
            vi = getattr(self, name, None)
            if vi is not None:
                vi.close()
            setattr(self, name, None)

    def _dim(self) -> int:
        return int(self.store.get_meta("dim"))

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

    def compact(self, *, progress=None, wait: float = 0.0):
        """Convert a library made before 0.2.0 to the dense layout (float16 vectors in 16 KiB
        pages; resumable, see :mod:`itrcli.jobs.compact`).  Returns a
        :class:`~itrcli.jobs.compact.Compaction`.
        Raises:
            LibraryError: opened read-only, or locked (``wait`` seconds).
        """
        from .jobs.compact import compact

        return compact(self.store, progress=progress, wait=wait)

    # -- information ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Path, model, dimension, counts, roots and on-disk sizes (the ``itr info`` object)."""
        meta = self.store.meta()
        sizes = disk_usage(self.directory)
        total = sum(sizes.values())

        from .constants import THUMBS_DIR
        from .embed.textquant import current as int8_current
        from .store.db import PAGE_SIZE

        vectors = self.store.count()  # from the files and frames indexes, not the vectors
        layout = self.store.layout()
        kept = sum(v for k, v in sizes.items() if k != THUMBS_DIR)  # thumbnails are a cache
        return {
            "library": str(self.directory),
            "model": meta.get("model"),
            "model_revision": meta.get("model_revision"),
            "model_type": meta.get("model_type"),
            # what a new library is bound to (this one keeps its own)
            "default_model": models.DEFAULT_PRESET,
            "dim": meta.get("dim"),
            "precision": meta.get("precision"),
            "image_runtime": meta.get("image_runtime"),
            # this machine's timing of the two fp32 CPU runtimes for the model (its export's)
            "image_runtime_timing": self._image_runtime_timing(meta.get("model")),
            "schema_version": meta.get("schema_version"),
            "files": self.store.file_count(),
            "vectors": vectors,
            "metadata": self.store.metadata.coverage(),  # files with gps, camera, taken_at
            **dict(zip(("videos", "frames"), self.store.video_counts())),
            "roots": meta.get("roots", []),
            "fast_text_search": self._text_export_ok(),
            # the int8 copy of that tower (--text-precision int8) is on disk, and current
            "text_int8": self._text_export_ok() and int8_current(self.directory),
            "search_ef": meta.get("search_ef"),
            "search_recall": meta.get("search_recall"),
            "adapter": self._adapter_info(),
            "ocr": self._text_info(bool(meta.get("ocr"))),
            "sizes": {**sizes, "total": total},
            # database, graph and text tower per image or video frame (thumbnails excluded)
            "storage": {**layout, "bytes_per_image": round(kept / vectors) if vectors else None,
                        "compact": layout["vector_dtype"] == "float16"
                        and layout["page_size"] == PAGE_SIZE},
        }

    def _image_runtime_timing(self, model: str | None) -> dict[str, Any] | None:
        from .embed.imagetower import machine_timing

        return machine_timing(model, self._revision_of(model)) if model else None

    def _adapter_info(self) -> dict[str, Any] | None:
        a = self.stored_adapter()
        if a is None:
            return None
        return {**a.to_json(), "active": a.model == self.model}

    def _text_info(self, on: bool) -> dict[str, Any]:
        return {"enabled": on, **self.store.words.status_counts()}


#: Runs that try to export a model's text tower before it is given up (see
#: :meth:`Library._finish_text_tower`); ``itr index --reindex`` starts again.
EXPORT_TRIES = 3

def read_text(paths: Sequence[str | os.PathLike], *, library: Library | None = None,
              include_hidden: bool = False) -> list[dict[str, Any]]:
    """The text in image files (``itr text``): what ``library`` read when it holds the same
    content (``itr index --ocr``), else read now (needs ``itr-search[ocr]``).  Directories are
    walked for images.  Returns, per file in path order within each directory,
    ``{"path", "source": "library" | "read", "lines": [{"text", "box", "confidence"}]}``
    or ``{"path", "error"}``.
    Raises:
        UsageError: a file not in the library, and no OCR engine installed.
    """
    from .ingest.images import supported_extensions
    from .ingest.ocr import OcrUnavailable, TextReader
    from .ingest.walk import walk
    from .jobs.textread import text_for
    from .show.output import one_line

    files: list[str] = []
    for p in map(str, paths):
        if os.path.isdir(p):
            found = walk([p], extensions=supported_extensions(), include_hidden=include_hidden,
                         exclude=[], follow_symlinks=False)
            files += sorted(found.files)
        else:
            files.append(os.path.abspath(p))
    reader = TextReader()
    out = []
    for f in files:
        try:
            out.append(text_for(f, library.store if library else None, reader))
        except OcrUnavailable as e:
            raise UsageError(f"{one_line(f)} is not in the library; {e}") from None
    return out


def evaluate(dataset, models: Sequence[str | None] = (None,), *, library: Library | None = None,
             **options: Any):
    """Recall@K of each model on a captioned ``dataset`` (``itr eval``; see
    :func:`itrcli.evaluation.evaluate.evaluate` for the options).  ``library``: reuse its
    stored vectors where its model is the one evaluated (None: that library's model)."""
    from .evaluation.evaluate import evaluate as run

    return run(dataset, list(models) or [None],
               db=library.directory if library is not None else None, **options)


#: Text queries whose vectors a library keeps (:meth:`Library._encode_texts`).
TEXT_CACHE = 256
#: Texts encoded together by :meth:`Library.prime_texts` (sorted by length first): past
#: ~8, a bigger batch is no cheaper per text, only more padded.
PRIME_BATCH = 16

#: ``search --at``: a stored frame within this many seconds of the time asked for is used
#: as it is (no model load); otherwise the frame there is decoded and embedded.
AT_TOLERANCE = 0.5


def _unchanged_hash(row: dict[str, Any] | None, fs_path: str) -> str | None:
    """The row's content hash while the file's size and mtime still match it, else None."""
    if row is None:
        return None
    try:
        st = os.stat(fs_path)
    except OSError:
        return None
    return row["hash"] if (st.st_size, st.st_mtime_ns) == (row["size"], row["mtime_ns"]) else None


def _keep_last(cache, n: int) -> None:
    """Drop the least recently used entries of an ordered ``cache`` beyond ``n``."""
    while len(cache) > n:
        cache.popitem(last=False)


def _is_video(path: str) -> bool:
    from .ingest.video import is_video  # no PyAV import

    return is_video(path)


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


__all__ = ["Library", "ExitCode", "SearchRequest", "SearchResult", "evaluate", "read_text"]
