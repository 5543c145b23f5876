"""An ``itr index`` run: walk, plan, read and hash, decode in a prefetching pool, encode,
and commit rows + vectors in batches.

Only files that are new or whose size/mtime changed are read.  Every file read is hashed
first; content the library already knows (a moved, renamed or copied file) takes the known
vector without being decoded.  Decoding runs in a bounded thread pool ahead of the encoder
(Pillow and numpy release the GIL), so the two overlap without unbounded memory.

Reliability: no single file can stop a run (every failure becomes a skipped file with a
one-line reason; files that fail to decode are remembered until they change); each batch
is one transaction; the graph is told which log entry it reflects only once its vectors are
in it, so a run killed or interrupted at any point leaves a graph that the log completes.
"""

from __future__ import annotations

import os
import threading
import time
from array import array
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping

from ..gcpause import gc_paused
from ..pools import in_thread
from ..progress import NoProgress, Progress
from ..ingest.files import Unreadable, hash_stream
from ..ingest.images import DecodeError, Preprocess, decoder_for, read_image
from ..store.db import Store, db_path_of
from ..store.vindex import VectorIndex, graph_files, remove_temp_files
from ..ingest.walk import Plan, plan as make_plan, under, walk
from ..records import StoredFile
from ..ingest.video import is_video  # no PyAV import


def _decoder_for(path: str) -> str:
    """The decoder id a remembered failure of this file is recorded under."""
    return decoder_for(path)

#: Seconds between saves of the HNSW graph during a long run (the log covers the rest).
SAVE_EVERY = 300.0
#: Photos a run hands its ``before_encoder`` hook (what an image tower export is checked on).
EXPORT_SAMPLES = 8


@dataclass
class IndexSummary:
    """What a run did; ``to_json()`` gives the ``--json`` object with its fixed keys."""

    scanned: int = 0
    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    embedded: int = 0  #: images decoded and encoded (the images/s numerator)
    interrupted: bool = False
    #: the image files the walk found under the roots (not in ``to_json``)
    found: list[str] = field(default_factory=list, repr=False)
    #: with ``run(list_indexed=True)``, when the run changed no file row: the found files
    #: the library holds, in path order, and their ids (see ``indexed_files``)
    indexed_rows: tuple[list[str], "array[int]"] | None = field(default=None, repr=False)
    text: Any = None  #: :class:`itrcli.jobs.textread.TextStats` when text is read (--ocr)
    engine: str = "local"  #: "local", or "ray" (:mod:`itrcli.jobs.distributed`)
    #: media files of types this install cannot read (raw, HEIC without pillow-heif, videos
    #: without PyAV...), by extension: not read, not counted as skipped
    passed_over: dict[str, int] = field(default_factory=dict)

    @property
    def indexed_files(self) -> list[tuple[str, int]] | None:
        """(path as shown, id) of the found files the library holds, in path order, when
        the run was asked for them (``run(list_indexed=True)``) and changed no file row;
        else None
        (ask :meth:`itrcli.library.Library.indexed`).  Made anew on each access."""
        if self.indexed_rows is None:
            return None
        paths, ids = self.indexed_rows
        with gc_paused():  # a million pairs
            return [(p if p.isascii() else db_path_of(p)[0], i) for p, i in zip(paths, ids)]

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        d = self.__dict__
        return {
            "scanned": d["scanned"], "added": d["added"], "updated": d["updated"],
            "moved": d["moved"], "removed": d["removed"], "unchanged": d["unchanged"],
            "skipped": d["skipped"], "errors": d["errors"],
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "engine": self.engine,
            "passed_over": dict(sorted(self.passed_over.items())),
            # an extra key, only when the library reads text (--ocr; see docs/ocr.md)
            **({"ocr": self.text.to_json()} if self.text is not None else {}),
        }

    def skip(self, path: str, reason: str) -> None:
        self.skipped += 1
        self.errors.append({"path": _display(path), "error": reason})


def _display(path: str) -> str:
    return db_path_of(path)[0]


@dataclass
class _Read:
    path: str
    size: int = 0
    mtime_ns: int = 0
    content_hash: str = ""
    #: the picture resized and cropped, not yet normalised (:meth:`Preprocess.crop`):
    #: ``[H, W, 3]`` uint8, a video's frames ``[n, H, W, 3]``: a quarter of the memory of
    #: the model's float32 input while they wait for the encoder
    pixels: Any = None
    #: the recipe ``pixels`` were made with (the run's may be a guess: see IndexRun)
    prep: Any = None
    vector: Any = None  #: ``[dim]``, when the engine embedded it already (Ray workers)
    meta: dict[str, Any] | None = None
    error: str | None = None
    #: the error depends only on the file's bytes: remember it until the file changes
    remember: bool = False
    #: a video: the time of each frame in ``pixels``, else None
    times: list[float] | None = None
    note: str | None = None  #: a video read only in part: why

    @property
    def frames(self) -> int:
        """Pictures to encode: 1 for an image, the kept frames of a video."""
        return 1 if self.times is None else len(self.times)

    @property
    def decoded(self) -> bool:
        """False when the content was already known (its vector is reused, not computed)."""
        return self.pixels is not None or self.vector is not None


def read_for_vectors(path: str, prep: Preprocess | None, draft: bool,
                     known_hashes: frozenset[str]) -> _Read:
    """Worker: read, hash, and (unless the content is known) decode and preprocess
    (:func:`itrcli.ingest.images.read_image`).  Never raises for a bad file: the reason
    is in ``error``."""
    f = read_image(path, draft_for=prep if draft else None, skip=known_hashes.__contains__)
    r = _Read(path, content_hash=f.content_hash, error=f.error, remember=f.remember)
    if f.st is not None:
        # size/mtime as read, not as walked: a file rewritten meanwhile is seen again
        r.size, r.mtime_ns = f.st.st_size, f.st.st_mtime_ns
    if f.image is not None:
        try:
            if prep is not None:
                r.pixels, r.prep = prep.crop(f.image, (f.meta.width, f.meta.height)), prep
            r.meta = asdict(f.meta)
        except DecodeError as e:  # e.g. a strip too thin to preprocess: the bytes' fault
            r.error, r.remember = str(e), True
        except MemoryError:
            r.error = "not enough memory to decode"
        except Exception as e:
            r.error = f"cannot decode: {type(e).__name__}: {str(e)[:200]}"
    return r


def read_video(path: str, prep: Preprocess | None, known_hashes: frozenset[str],
               budget: float | None = None) -> _Read:
    """Worker for a video: hash it, and (unless the content is known) select its frames
    (:func:`itrcli.ingest.video.select_frames`) and preprocess them.  Never raises."""
    import numpy as np

    from ..ingest import video

    r = _Read(path)
    try:
        st, r.content_hash = hash_stream(path)
    except Unreadable as e:
        r.error = str(e)
        return r
    r.size, r.mtime_ns = st.st_size, st.st_mtime_ns
    if r.content_hash in known_hashes:
        return r
    if st.st_size == 0:
        r.error, r.remember = "empty file", True
        return r
    short = 256
    if prep is not None:
        short = max(prep.shortest_edge or 0, prep.height or 0, prep.width or 0, prep.crop_height) or 256
    try:
        v = video.select_frames(path, short_side=short,
                                **({"budget": budget} if budget is not None else {}))
        try:
            now = os.stat(path)
        except OSError:
            now = None
        if now is None or (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            r.error = "file changed while being read (it is read again next run)"
            return r
        if prep is not None:
            r.pixels = np.stack([prep.crop(f.image, (v.width or f.image.width, v.height or f.image.height))
                                 for f in v.frames])  # [n, H, W, 3] uint8
            r.prep = prep
        r.times = [round(f.time, 3) for f in v.frames]
        r.note = v.note
        r.meta = {"width": v.width, "height": v.height, "taken_at": v.taken_at,
                  "duration": v.duration if v.duration is not None else (r.times[-1] if r.times else 0.0)}
    except video.VideoError as e:
        r.error, r.remember = str(e), True
    except MemoryError:
        r.error = "not enough memory to decode"
    except Exception as e:  # whatever a hostile file provokes, it must not stop the run
        r.error = f"cannot decode video: {type(e).__name__}: {str(e)[:200]}"
    return r


def indexed_rows(p: Plan, known: Mapping[str, Any]) -> tuple[list[str], "array[int]"]:
    """The found paths that the library holds, in path order, and their ids, when the run
    planned as ``p`` (``known``: what it planned against) changed no row: the unchanged
    paths and the changed ones left unread (a bad file remembered).  The ids are copied
    into an array: a list would hold ``known``'s int objects, and with them the memory of
    every row read for change detection."""
    with gc_paused():
        paths = p.unchanged + p.changed
        ids = p.unchanged_ids + [known[path].id for path in p.changed]
        order = sorted(range(len(paths)), key=paths.__getitem__)  # faster than sorting pairs
        return [paths[i] for i in order], array("q", [ids[i] for i in order])


def empty_roots(roots: list[str], found, known, unlisted) -> list[tuple[str, int]]:
    """Directory roots under which the walk found no image although the library holds
    some: ``(root, how many it holds)``."""
    out = []
    for root in roots:
        if under(root, unlisted) or not os.path.isdir(root):
            continue
        if any(under(p, [root]) for p in found):
            continue
        n = sum(1 for p in known if under(p, [root]))
        if n:
            out.append((root, n))
    return out


class IndexRun:
    """One run over ``roots``; see :meth:`itrcli.library.Library.index`."""

    def __init__(
        self,
        store: Store,
        library_dir,
        get_encoder: Callable[[], Any],
        *,
        dim: int | None,
        prep: Preprocess | None,
        batch_size: int = 32,
        workers: int = 2,
        draft: bool = True,
        progress: Progress | None = None,
        text: Any = None,
        video_budget: float | None = None,
        before_encoder: Callable[[list[str], int], None] | None = None,
        guess_prep: Callable[[], Preprocess | None] | None = None,
        load_encoder: Callable[[], Any] | None = None,
    ) -> None:
        """``before_encoder(photos, count)``: called once, before the run first loads its
        encoder, with a few of the photos it is about to encode and how many files it may
        encode in all (the image tower's one-time export for this machine is made and
        checked on them first, when the run is large enough to gain from it).

        ``guess_prep`` and ``load_encoder`` (a new library, whose recipe ``prep`` is not
        known yet): the recipe read from the model's files, and the encoder's load, which
        touches no database.  Decoding then starts at once with the guess, and the encoder
        loads in a thread beside it (after ``before_encoder``) instead of before it: about
        3 s of imports and weights on one core while the other sat idle.  ``get_encoder``
        then takes the loaded encoder (and binds the library) in the run's thread; files
        decoded with a guess its recipe contradicts are decoded again."""
        self.store = store
        #: a :class:`itrcli.jobs.textread.TextJob` when the library reads text (--ocr)
        self.text = text
        self.video_budget = video_budget  #: seconds per video (None: the default)
        self.library_dir = library_dir
        self.get_encoder = get_encoder
        self.dim = dim
        self.prep = prep
        self.batch_size = max(1, batch_size)
        self.workers = max(1, workers)
        self.draft = draft
        self.progress = progress or NoProgress()
        self.summary = IndexSummary()
        self.failures: dict[str, Any] = {}
        self.vindex: VectorIndex | None = None
        self._last_save = time.monotonic()
        self.before_encoder = before_encoder
        self.guess_prep = guess_prep
        self.load_encoder = load_encoder
        self._loading: Future | None = None  # the encoder loading beside the first decodes
        self._loaded = threading.Event()  # cleared while it loads (see _decode_thread_start)
        self._loaded.set()
        self._decode_threads = 0
        self._threads_lock = threading.Lock()
        self._to_encode = 0  # files this run may decode and encode (set by _process)

    # -- the run -----------------------------------------------------------------------
    def run(self, roots: list[str], *, extensions: frozenset[str], include_hidden: bool = False,
            exclude: list[str] | None = None, follow_symlinks: bool = False,
            prune: bool = True, keep: frozenset[str] = frozenset(),
            list_indexed: bool = False, count: frozenset[str] = frozenset()) -> IndexSummary:
        """``keep``: extensions not walked this run (``--no-video``) whose indexed files are
        neither read nor pruned.  ``list_indexed``: fill ``summary.indexed_files`` when no file row changes
        (from the rows read for change detection: no second read of a million rows).
        ``count``: extensions of media this install cannot read, counted by the walk in
        ``summary.passed_over``."""
        t0 = time.monotonic()
        s = self.summary
        self._remove_temp_files()
        found = walk(roots, extensions=extensions, include_hidden=include_hidden,
                     exclude=exclude or [], follow_symlinks=follow_symlinks, count=count)
        s.passed_over = found.passed_over
        for path, reason in found.errors:
            s.skip(path, reason)
        s.scanned = len(found.files)
        s.found = list(found.files)
        known = self.store.known()
        if keep:
            known = {p: k for p, k in known.items() if os.path.splitext(p)[1].lower() not in keep}
        for root, n in empty_roots(roots, found.files, known, found.unlisted) if prune else []:
            # an unmounted disk looks like an empty mount point: never prune a whole root
            s.skip(root, f"no image found under it; its {n} indexed files are kept (a disk not "
                         "mounted?); 'itr check --repair --prune' forgets them")
            found.unlisted.append(root)
        p = make_plan(found.files, known, roots, found.unlisted)
        s.unchanged = len(p.unchanged)
        missing = {path: known[path] for path in p.missing} if prune else {}
        # files that failed to decode and have not changed since: reported, not read again
        self.failures = self.store.failures()
        todo = []
        for path in p.changed + p.new:
            f, e = self.failures.get(path), found.files[path]
            if f is not None and f.decoder == _decoder_for(path) and (f.size, f.mtime_ns) == (e.size, e.mtime_ns):
                s.skip(path, f.reason)
            else:
                todo.append(path)
        gone_failures = [
            path for path in self.failures
            if path not in found.files and under(path, roots) and not under(path, found.unlisted)
        ] if prune else []
        try:
            if self.text is not None:
                s.text = self.text.stats
                self.text.queue_missing()  # read beside the encoder from the start
            if todo or missing or gone_failures:
                self._process(todo, known, missing)
                self._remove(missing, gone_failures)
            elif list_indexed:
                s.indexed_rows = indexed_rows(p, known)
            if self.text is not None:
                self.text.finish(self.progress)
        except KeyboardInterrupt:
            s.interrupted = True
        except BaseException:
            # keep what the graph has (best effort: the log covers it anyway)
            try:
                self._save()
            except Exception:
                pass
            raise
        finally:
            if self.text is not None:
                self.text.close()
            s.seconds = time.monotonic() - t0
        if s.interrupted:
            self._save()  # no catching up: Ctrl-C should end the run promptly
        else:
            self._finish()
        s.seconds = time.monotonic() - t0
        return s

    def _open_vindex(self) -> VectorIndex:
        if self.vindex is None:
            dim = self.dim or int(self.store.get_meta("dim"))
            self.vindex = VectorIndex(self.library_dir, dim).open(self.store)
        return self.vindex

    def _encoder(self, paths: list[str]):
        """The run's encoder; ``before_encoder`` first, once, with up to
        :data:`EXPORT_SAMPLES` of the photos among ``paths`` (the files about to be encoded).
        One loading beside the decodes (:meth:`_load_beside`) is waited for, and its recipe
        becomes the run's."""
        if self._loading is not None:
            loading, self._loading = self._loading, None
            loading.result()  # the load's error (a ModelError...) is raised here, in the run
            enc = self.get_encoder()
            self.prep, self.dim = enc.prep, enc.dim
            return enc
        self._before_encoder(paths)
        return self.get_encoder()

    def _before_encoder(self, paths: list[str]) -> None:
        if self.before_encoder is not None:
            hook, self.before_encoder = self.before_encoder, None
            hook([p for p in paths if not is_video(p)][:EXPORT_SAMPLES],
                 max(self._to_encode, len(paths)))

    def _guess(self) -> bool:
        """A new library: the recipe guessed from the model's files, to decode with while
        the encoder loads (:meth:`_load_beside`); False where there is none."""
        if self.prep is not None or self.guess_prep is None or self.load_encoder is None:
            return False
        self.prep = self.guess_prep()
        return self.prep is not None

    def _load_beside(self, todo: list[str]) -> None:
        """``before_encoder``, then the encoder's load in a thread, while the decode pool
        works; :meth:`_encoder` waits for it."""
        self._before_encoder(todo)
        self._loading = in_thread(self.load_encoder, "itr-load-encoder")
        self._loading.add_done_callback(lambda _: self._loaded.set())

    def _decode_thread_start(self) -> None:
        """A decode thread, as it starts: while the encoder loads beside the pool, all but
        one of them (of two or more) wait for it, leaving the load (single-threaded imports
        and weights) a core of its own: with both decoding beside it, it took 3.9 s instead
        of 3.0 on two cores, and the encoding gained nothing."""
        with self._threads_lock:
            self._decode_threads += 1
            n = self._decode_threads
        if n > max(1, self.workers - 1):
            self._loaded.wait()

    def _in_recipe(self, batch: list[tuple[str, _Read]]) -> list[tuple[str, _Read]]:
        """``batch``, its files decoded with a guessed recipe that the encoder's contradicts
        decoded again (one that fails now is left out, counted as skipped)."""
        out = []
        for path, r in batch:
            if r.pixels is not None and r.prep != self.prep:
                r = self._read_again(path)
                if r is None:
                    continue
            out.append((path, r))
        return out

    def _read_again(self, path: str) -> _Read | None:
        """``path`` read and decoded once more with the run's recipe (its content known or
        not); None, counted as skipped, if it fails now."""
        r = (read_video(path, self.prep, frozenset(), self.video_budget) if is_video(path)
             else read_for_vectors(path, self.prep, self.draft, frozenset()))
        if r.error is not None:
            self.summary.skip(path, r.error)
            self.progress.advance(1, 0)
            return None
        return r

    def _process(self, todo: list[str], known: dict[str, StoredFile], missing: dict[str, StoredFile]) -> None:
        s = self.summary
        if not todo:
            return
        hashes = self.store.hashes()  # content hash -> an id having it
        missing_by_hash: dict[str, list[str]] = {}
        for path, k in missing.items():
            missing_by_hash.setdefault(k.content_hash, []).append(path)
        known_hashes = frozenset(hashes)
        # The model is needed only if something must be decoded; it is loaded on first need.
        # A library bound to it knows its recipe: the pool decodes meanwhile.  A new one
        # guesses the recipe from the model's files and loads the encoder beside the pool;
        # without a guess, the encoder is loaded first.
        self._to_encode = len(todo)
        guessed = self._guess()
        if self.prep is None:
            enc = self._encoder(todo)
            self.prep, self.dim = enc.prep, enc.dim
        if guessed:
            self._loaded.clear()  # until the encoder is loaded beside the pool
        self.progress.start(len(todo))
        batch: list[tuple[str, _Read]] = []  # decoded, waiting to be encoded
        ops: list[tuple[str, str, Any]] = []  # (kind, path, payload) without encoding
        reads = self._reads(todo, known_hashes)  # the pool is at work from here
        try:
            if guessed:
                self._load_beside(todo)
            for r in reads:
                k = known.get(r.path)
                if r.error is not None:
                    s.skip(r.path, r.error)
                    if r.remember:
                        ops.append(("fail", r.path, (None, r)))
                    self.progress.advance(1, 0)
                    continue
                if r.note:  # a video read in part
                    s.errors.append({"path": _display(r.path), "error": r.note})
                if k is not None and r.content_hash == k.content_hash:
                    # touched, same bytes: remember the new mtime so it is not read again
                    ops.append(("touch", r.path, (k, r)))
                elif k is None and missing_by_hash.get(r.content_hash):
                    old = missing_by_hash[r.content_hash].pop()
                    del missing[old]
                    ops.append(("move", r.path, (known[old], r)))
                elif r.content_hash in hashes and not r.decoded:
                    ops.append(("copy", r.path, (k, r)))
                else:
                    batch.append((r.path, r))
                if sum(r.frames for _, r in batch) >= self.batch_size or len(ops) >= 512:
                    batch, ops = self._flush(batch, ops, known), []
                    if time.monotonic() - self._last_save > SAVE_EVERY:
                        self._save()
            while batch or ops:
                batch, ops = self._flush(batch, ops, known), []
        finally:
            reads.close()
            self.progress.close()

    def _reads(self, todo: list[str], known_hashes: frozenset[str]) -> Iterator[_Read]:
        """Each file of ``todo`` read, hashed and, unless its content is known, decoded
        (:func:`read_for_vectors`), in a bounded thread pool ahead of the consumer.  The Ray engine
        (:mod:`itrcli.jobs.distributed`) replaces this with a cluster that also embeds."""
        reads = self._read_ahead(todo, known_hashes)
        next(reads)  # starts the pool: files are read from now on, before the first is asked for
        return reads

    def _read_ahead(self, todo: list[str], known_hashes: frozenset[str]) -> Iterator[_Read | None]:
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="itr-decode",
                                  initializer=self._decode_thread_start)
        pending: deque[tuple[str, Future]] = deque()
        it = iter(todo)
        # uint8 pictures (150 KB at 224 px): 8 batches ahead take the memory 2 batches of
        # float32 did, and keep the cores busy while a new library's encoder loads
        depth = max(8 * self.batch_size, 4 * self.workers)
        try:
            def fill() -> None:
                while len(pending) < depth:
                    # a video's frames take the memory of many photos: at most one per
                    # worker waits decoded
                    if sum(1 for p, _ in pending if is_video(p)) >= self.workers:
                        return
                    path = next(it, None)
                    if path is None:
                        return
                    if is_video(path):
                        fut = pool.submit(read_video, path, self.prep, known_hashes, self.video_budget)
                    else:
                        fut = pool.submit(read_for_vectors, path, self.prep, self.draft, known_hashes)
                    pending.append((path, fut))

            fill()
            yield None
            while pending:
                path, fut = pending.popleft()
                try:
                    r = fut.result()
                except Exception as e:  # read_for_vectors does not raise; if it ever does, skip the file
                    r = _Read(path, error=f"cannot read: {type(e).__name__}: {e}")
                fill()
                yield r
        finally:
            for _, f in pending:
                f.cancel()
            self._loaded.set()  # no decode thread waits on a load any longer
            pool.shutdown(wait=True, cancel_futures=True)

    def _flush(self, batch: list[tuple[str, _Read]], ops: list[tuple[str, str, Any]],
               known: dict[str, StoredFile]) -> list[tuple[str, _Read]]:
        """Encode ``batch`` and commit it with ``ops`` in one transaction.

        Returns files to put in the next batch: copies whose source content left the
        library meanwhile (they were not decoded, so they are now).
        """
        import numpy as np

        if not batch and not ops:
            return []
        s = self.summary
        vecs = None
        if batch:
            if any(r.vector is None for _, r in batch):  # not embedded by the engine
                enc = self._encoder([path for path, _ in batch])
                batch = self._in_recipe(batch)
            need = [r for _, r in batch if r.vector is None]
            if need:
                pixels = [r.pixels[None] if r.times is None else r.pixels for r in need]
                pixels = np.concatenate(pixels) if len(pixels) > 1 else pixels[0]  # [frames, H, W, 3]
                flat = np.concatenate([enc.encode_pixels(enc.prep.normalise(pixels[i : i + self.batch_size]))
                                       for i in range(0, len(pixels), self.batch_size)])  # [frames, dim]
                ends = np.cumsum([r.frames for r in need])
                # an image's vector [dim], a video's frames [n, dim]
                for r, e in zip(need, ends):
                    r.vector = flat[e - 1] if r.times is None else flat[e - r.frames : e]
            # as the database will hold them (float16 values): the graph gets the same, so a
            # graph rebuilt from the database is this one
            vecs = [self.store.as_stored(r.vector) for _, r in batch]
        gone: list[int] = []  # labels deleted (a changed video's old frames)
        put_ids, put_vecs, counts = [], [], {"added": 0, "updated": 0, "moved": 0, "unchanged": 0}
        redo: list[str] = []
        ok: list[str] = []  # paths now in the library as they are on disk
        seq = None
        with self.store.transaction() as c:
            for kind, path, (k, r) in ops:
                info = {"size": r.size, "mtime_ns": r.mtime_ns, "hash": r.content_hash}
                if kind == "fail":
                    self.store.record_failure(c, path, r.size, r.mtime_ns, r.error, _decoder_for(path))
                    continue
                if (k is None or kind == "move") and self._name_taken(c, path):
                    continue
                ok.append(path)
                if kind == "touch":
                    self.store.update_file(c, k.id, info)
                    counts["unchanged"] += 1
                elif kind == "move":
                    self.store.update_file(c, k.id, {**info, "path": path})
                    counts["moved"] += 1
                else:  # copy: known content at a new path, or a changed file now equal to another
                    src_id = self.store.id_for_hash(c, r.content_hash)
                    if src_id is None:  # its only holder changed in this run: decode it after all
                        redo.append(path)
                        ok.pop()
                        continue
                    row = self.store.rows([src_id])[src_id]
                    if (row.get("duration") is not None) != is_video(path):
                        redo.append(path)  # the same bytes as a video and as an image: decode
                        ok.pop()
                        continue
                    meta = {m: row.get(m) for m in ("width", "height", "taken_at", "camera", "lat",
                                                    "lon", "duration")}
                    if row.get("duration") is not None:  # a copy of a video: copy its frames
                        labels, times = self.store.frames(src_id)
                        lids, lvecs = self.store.vectors(labels)
                        by_label = dict(zip(lids.tolist(), lvecs))
                        fvecs = np.stack([by_label[i] for i in labels])  # [n, dim], time order
                        if k is None:
                            id_ = self.store.insert_file(c, path, {**info, **meta}, None)
                            counts["added"] += 1
                        else:
                            id_ = k.id
                            self.store.update_file(c, id_, {**info, **meta})
                            counts["updated"] += 1
                        old, new = self.store.put_frames(c, id_, times, fvecs)
                        gone += old
                        put_ids += new
                        put_vecs += list(fvecs)
                        continue
                    vec = self.store.vector_for_hash(r.content_hash)
                    if k is None:
                        id_ = self.store.insert_file(c, path, {**info, **meta}, vec)
                        counts["added"] += 1
                    else:
                        id_ = k.id
                        self.store.update_file(c, id_, {**info, **meta}, vec)
                        counts["updated"] += 1
                    put_ids.append(id_)
                    put_vecs.append(vec)
            for (path, r), vec in zip(batch, vecs if vecs is not None else []):
                info = {"size": r.size, "mtime_ns": r.mtime_ns, "hash": r.content_hash, **(r.meta or {})}
                k = known.get(path)
                video = r.times is not None
                if k is None:
                    if self._name_taken(c, path):
                        continue
                    id_ = self.store.insert_file(c, path, info, None if video else vec)
                    counts["added"] += 1
                else:
                    self.store.update_file(c, k.id, info, None if video else vec)
                    id_ = k.id
                    counts["updated"] += 1
                ok.append(path)
                if video:
                    old, new = self.store.put_frames(c, id_, r.times, vec)
                    gone += old
                    put_ids += new
                    put_vecs += list(vec)
                    continue
                put_ids.append(id_)
                put_vecs.append(vec)
            self.store.forget_failures(c, [p for p in ok if p in self.failures])
            if self.text is not None:
                self.text.store_done(c)
            if put_ids or gone:
                seq = self.store.last_seq()  # the log entry the graph reflects once it has these
        # committed: only now count it, and mirror it into the graph
        for key, n in counts.items():
            setattr(s, key, getattr(s, key) + n)
        s.embedded += sum(r.frames for _, r in batch)
        if self.text is not None:
            self.text.committed()
            for path, r in batch:
                if r.times is None:  # the text of images only (video frames are not read)
                    self.text.queue(r.content_hash, path)
        if put_ids or gone:
            vi = self._open_vindex()
            vi.remove(gone)
            if put_ids:
                vi.add(np.asarray(put_ids, dtype=np.int64), np.stack(put_vecs))
            vi.seq = max(vi.seq, seq)
        # failed reads were counted when they were met (in _process), not again here
        done = len(batch) + sum(kind != "fail" for kind, _, _ in ops) - len(redo)
        self.progress.advance(done, len(batch))
        return [(path, r) for path in redo if (r := self._read_again(path)) is not None]

    def _name_taken(self, c, path: str) -> bool:
        """A new file whose shown name is already another file's (two names that differ
        only in bytes that are not UTF-8 and their escapes): skipped, not a crash."""
        if not self.store.path_taken(c, path):
            return False
        self.summary.skip(path, "its name, with non-UTF-8 bytes escaped, is another indexed file's")
        return True

    def _remove(self, missing: dict[str, StoredFile], gone_failures: list[str] = ()) -> None:
        if not missing and not gone_failures:
            return
        ids = [k.id for k in missing.values()]
        with self.store.transaction() as c:
            labels = self.store.delete_files(c, ids)  # a video's frames too
            self.store.forget_failures(c, gone_failures)
            seq = self.store.last_seq()
        self.summary.removed += len(ids)
        if ids:
            vi = self._open_vindex()
            vi.remove(labels)
            vi.seq = max(vi.seq, seq)

    def _save(self) -> None:
        """Save the graph as of the last log entry it fully reflects, then drop the log
        up to there.  (Not ``store.last_seq()``: an interrupt between a commit and the graph
        update must leave those entries in the log, to be replayed.)"""
        vi = self.vindex
        if vi is not None and vi.dirty:
            seq = vi.seq
            try:
                vi.save(seq)
            except BaseException:
                self._remove_temp_files()
                raise
            vi.verify_saved(seq)
            self.store.truncate_log(seq)
        self._last_save = time.monotonic()

    def _remove_temp_files(self) -> None:
        """Temporary graph files of a run that was killed while saving (we hold the lock)."""
        remove_temp_files(self.library_dir)

    def _finish(self) -> None:
        self._catch_up()
        self._save()
        self._calibrate()

    def _calibrate(self) -> None:
        """Measure the search ``ef`` on this library's own vectors when it has no
        measurement or has changed size by more than 20% since (:func:`vindex.calibrate`)."""
        from ..store.vindex import measure_search_ef, needs_calibration

        if not (self.dim or self.store.get_meta("dim")):
            return
        count = self.store.count()
        if not needs_calibration(self.store.get_meta("search_ef_count"), count):
            return
        if self.vindex is None:
            self._open_vindex()  # a library indexed by an older itr: measured once
        measure_search_ef(self.vindex, self.store, count)

    def _catch_up(self) -> None:
        """A run with nothing to embed still saves a graph that a killed or failed run left
        missing or behind the log, so that readers need not replay or rebuild it."""
        if self.vindex is not None or not (self.dim or self.store.get_meta("dim")):
            return
        saved = graph_files(self.library_dir)[0]
        if (saved and saved[-1][0] == self.store.last_seq()) or (not saved and not self.store.has_vectors()):
            return
        self._open_vindex()  # replays the log, or rebuilds: then dirty, and saved
