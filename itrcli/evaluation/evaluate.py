"""``itr eval``: encode an image-caption dataset and measure retrieval quality.

Data flow: :class:`~itrcli.evaluation.datasets.Dataset` -> vectors per model (from the embedding
cache, a library, or the encoder) -> rankings per method (exact cosine, HNSW, binary
codes) -> :mod:`itrcli.evaluation.metrics` -> :class:`EvalResult`.

Images are decoded at full size (no JPEG draft mode) and preprocessed by the encoder's
:class:`~itrcli.ingest.images.Preprocess`, which matches the model's own processor, so the
figures are comparable with published ones.

The embedding cache (``$XDG_CACHE_HOME/itr/embeddings.db``, SQLite) keys image vectors by
(model key, blake2b-128 of the file bytes) and text vectors by (model key, text); the model
key is the model id, its revision (hub commit, or a fingerprint of a local directory's
config and weights) and the precision.  A second run, or the same images under another
name, encodes nothing.

Example::

    from itrcli.evaluation import datasets, evaluate
    ds = datasets.load("dataset_flickr30k.json", images="flickr30k-images")
    result = evaluate.evaluate(ds, ["laion-b32"], ann=True, hash_bits=[64])
    print(evaluate.format_table(result))
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import metrics
from ..embed import models
from .datasets import Dataset
from ..errors import ItrError, UsageError
from ..store.db import Store
from ..store.embedding_cache import EmbeddingCache, default_cache_path
from ..ingest.files import content_hash
from ..progress import NoProgress, Progress, default_workers

DEFAULT_KS = (1, 5, 10)
METHODS = ("exact", "hnsw", "hash", "hash+rerank", "exact+rerank")
#: hash+rerank: candidates taken by Hamming distance before the exact cosine re-rank:
#: ``max(RERANK_FACTOR * K_max, RERANK_MIN)``.
RERANK_FACTOR = 10
RERANK_MIN = 100
#: --folds when --adapt's pairs share images with the dataset and no --folds is given.
ADAPT_FOLDS = 5
#: Captions per text-encoder batch, as a multiple of the image batch size (texts are cheap).
TEXT_BATCH_FACTOR = 4


# -- results ----------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One row of the table: a model and a retrieval method."""

    model: str  #: hub id or absolute local directory
    method: str  #: "exact" | "hnsw" | "hash-64" | "hash-64+rerank"
    t2i: dict[str, float | None]  #: {"R@1": %, ..., "medr": rank}
    i2t: dict[str, float | None]
    rsum: float
    seconds: float  #: building the method's structures and answering every query

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "t2i": _rounded(self.t2i),
            "i2t": _rounded(self.i2t),
            "rsum": round(self.rsum, 2),
            "seconds": round(self.seconds, 3),
        }


@dataclass
class EvalResult:
    """What ``itr eval`` measured; ``to_json()`` is the ``--json`` object."""

    dataset: str
    split: str | None
    format: str
    images: int  #: images evaluated (after left-out ones)
    captions: int
    ks: tuple[int, ...]
    folds: int = 1
    results: list[MethodResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  #: listed but not on disk
    skipped: list[dict[str, str]] = field(default_factory=list)  #: {"path", "error"}: unreadable
    encoded: dict[str, dict[str, Any]] = field(default_factory=dict)  #: per model: counts, seconds
    notes: list[str] = field(default_factory=list)  #: one-line remarks for stderr
    adapt: dict[str, Any] | None = None  #: with ``adapt=``: the pairs and each fold's pick
    #: the captions' text tower: None (the model's own), ``fp32`` or ``int8`` (exported)
    text_precision: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "format": self.format,
            "images": self.images,
            "captions": self.captions,
            "folds": self.folds,
            "missing": len(self.missing),
            "skipped": self.skipped,
            "results": [r.to_json() for r in self.results],
            "encoded": self.encoded,
            "adapt": self.adapt,
            "text_precision": self.text_precision,
        }


def _rounded(d: dict[str, float | None]) -> dict[str, float | None]:
    return {k: (None if v is None else round(v, 2)) for k, v in d.items()}


# -- argument helpers -------------------------------------------------------------------


def parse_int_list(
    value: str | Sequence[int] | None, option: str, default: Sequence[int] = ()
) -> tuple[int, ...]:
    """``"1,5,10"`` -> ``(1, 5, 10)``: positive, de-duplicated, ascending."""
    if value is None:
        return tuple(default)
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    out = set()
    for p in parts:
        if p == "":
            continue
        try:
            n = int(p)
        except (TypeError, ValueError):
            raise UsageError(f"{option} {value}: expected comma-separated whole numbers") from None
        if n < 1:
            raise UsageError(f"{option} {value}: numbers must be at least 1")
        out.add(n)
    if not out:
        raise UsageError(f"{option}: no value given")
    return tuple(sorted(out))


# -- model key and cache ----------------------------------------------------------------


def model_key(model_id: str, revision: str | None, precision: str) -> str:
    """The cache's model key: id, revision and precision."""
    return f"{model_id}@{revision or 'unknown'}/{precision}"


# -- encoding ---------------------------------------------------------------------------


@dataclass
class Embedded:
    """One model's vectors for a dataset."""

    model: str  #: resolved model id
    image_vecs: dict[int, np.ndarray]  #: image index -> ``[dim]`` (unreadable ones absent)
    text_vecs: np.ndarray  #: ``[n_captions, dim]`` in :meth:`Dataset.flat` order
    skipped: list[dict[str, str]]
    stats: dict[str, Any]
    hashes: dict[int, str] = field(default_factory=dict)  #: image index -> content hash


def _decode(path: str, prep) -> tuple[Any, str | None]:
    """Worker: file -> (pixels ``[3, H, W]``, None) or (None, reason)."""
    from ..ingest.images import DecodeError, decode_file

    try:
        pixels, _meta, _data = decode_file(path, prep, draft=False)  # full size: processor parity
        return pixels, None
    except DecodeError as e:
        return None, str(e)
    except OSError as e:
        return None, e.strerror or str(e)
    except MemoryError:
        return None, "not enough memory to decode"


def embed_dataset(
    ds: Dataset,
    model: str,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    cache: EmbeddingCache | None = None,
    library_vector: Callable[[str], np.ndarray | None] | None = None,
    progress: Progress | None = None,
    text_precision: str | None = None,
) -> Embedded:
    """Vectors of every image and caption of ``ds`` under one model.

    Cached vectors are used first, then ``library_vector(content_hash)`` (vectors an itr
    library already holds), and the encoder is loaded only for what is left.
    Images that cannot be read or decoded are reported in ``skipped``.
    ``text_precision``: embed the captions as ``itr search --text-precision`` embeds texts,
    with the model's exported text tower (``fp32``) or its int8 copy (``int8``):
    :func:`_exported_texts`; None: with the model's own text tower at ``precision``.
    """
    from ..embed.encoder import resolve_device, resolve_precision

    t0 = time.perf_counter()
    progress = progress or NoProgress()
    model_id = models.resolve(model)
    precision = resolve_precision(precision, resolve_device(device))
    revision = models.model_revision(model_id)
    encoder = None

    def get_encoder():
        nonlocal encoder, revision
        if encoder is None:
            from ..embed.encoder import Encoder

            # image-only at first (the text tower on first caption): the image tower runs
            # where an index run would (onnxruntime or torch: embed/imagetower.py)
            encoder = Encoder(model_id, device=device, precision=precision, towers="image")
            revision = revision or encoder.revision
        return encoder

    if revision is None:
        get_encoder()
    key = model_key(model_id, revision, precision)
    text_key = key
    if text_precision == "int8":
        from ..embed.textquant import weight_kind

        text_key = model_key(model_id, revision, f"text-int8-{weight_kind()}")
    elif text_precision is not None:
        text_key = model_key(model_id, revision, f"text-{text_precision}-onnx")

    # images: hash every file, take what is known, encode the rest
    skipped: list[dict[str, str]] = []
    hashes: dict[int, str] = {}
    for i, path in enumerate(ds.images):
        try:
            with open(path, "rb") as f:
                hashes[i] = content_hash(f.read())
        except OSError as e:
            skipped.append({"path": path, "error": e.strerror or str(e)})
    image_vecs: dict[int, np.ndarray] = {}
    known = cache.get("images", key, list(hashes.values())) if cache else {}
    from_cache = from_library = 0
    for i, h in hashes.items():
        if h in known:
            image_vecs[i] = known[h]
            from_cache += 1
        elif library_vector is not None:
            v = library_vector(h)
            if v is not None:
                image_vecs[i] = v
                from_library += 1
    todo = [i for i in hashes if i not in image_vecs]

    texts, _owner = ds.flat()
    unique = list(dict.fromkeys(texts))
    text_known = cache.get("texts", text_key, unique) if cache else {}
    text_todo = sorted((t for t in unique if t not in text_known), key=lambda t: (len(t), t))

    if todo or text_todo:
        progress.start(len(todo) + len(text_todo))
        try:
            if todo:
                _encode_images(get_encoder(), ds, todo, hashes, image_vecs, skipped, key, cache,
                               batch_size, workers, progress)
            with (_exported_texts(model_id, revision, text_precision)
                  if text_precision is not None and text_todo
                  else contextlib.nullcontext(get_encoder() if text_todo else None)) as enc:
                tb = min(256, batch_size * TEXT_BATCH_FACTOR)
                for s in range(0, len(text_todo), tb):
                    batch = text_todo[s : s + tb]
                    vecs = enc.encode_texts(batch)  # [b, dim]
                    new = dict(zip(batch, vecs))
                    text_known.update(new)
                    if cache:
                        cache.put("texts", text_key, new)
                    progress.advance(len(batch), len(batch))
        finally:
            progress.close()
    text_vecs = np.stack([text_known[t] for t in texts]).astype(np.float32)  # [n_captions, dim]
    stats = {
        "images_encoded": len(todo) - sum(1 for i in todo if i not in image_vecs),
        "images_cached": from_cache,
        "images_from_library": from_library,
        "captions_encoded": len(text_todo),
        "captions_cached": len(unique) - len(text_todo),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    encoder = None  # free the model before the next one loads
    return Embedded(model_id, image_vecs, text_vecs, skipped, stats, hashes)


@contextlib.contextmanager
def _exported_texts(model_id: str, revision: str | None, precision: str):
    """An encoder of texts by ``model_id``'s exported text tower (``precision`` ``fp32``)
    or its int8 copy (``int8``: :mod:`itrcli.embed.textquant`), in a temporary folder for
    the duration: the machine's tower cache gives the float32 export when it holds one,
    else it is exported here.
    Raises:
        UsageError: the model's text tower cannot be exported.
    """
    import shutil
    import tempfile

    from ..embed import textonnx
    from ..embed.onnxexport import ExportUnsupported

    tmp = Path(tempfile.mkdtemp(prefix="itr-eval-text-"))
    try:
        if not textonnx.from_cache(tmp, model_id, revision):
            from ..embed.encoder import Encoder

            try:
                textonnx.export(Encoder(model_id, device="cpu", precision="fp32",
                                        towers="text", revision=revision), tmp, release=True)
            except ExportUnsupported as e:
                raise UsageError(f"--text-precision {precision}: the text tower of "
                                 f"'{model_id}' cannot be exported ({e})") from None
        if precision == "int8":
            from ..embed import textquant

            yield textquant.encoder(tmp)
        else:
            yield textonnx.OnnxTextEncoder(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Pairs:
    """(caption, image) pairs of a dataset as vectors, for fitting an adapter."""

    texts: np.ndarray  #: [n, dim]
    images: np.ndarray  #: [n, dim], the image of each caption (repeated per caption)
    image_hash: np.ndarray  #: [n] content hash of each pair's image (groups the folds)
    captions: list[str]  #: [n]

    def __len__(self) -> int:
        return len(self.captions)

    def select(self, keep: np.ndarray) -> "Pairs":
        """The pairs where ``keep`` (bool ``[n]``) holds."""
        return Pairs(self.texts[keep], self.images[keep], self.image_hash[keep],
                     [c for c, k in zip(self.captions, keep) if k])


def pairs_of(ds: Dataset, e: Embedded) -> Pairs:
    """Every caption of ``ds`` whose image could be read, with its image's vector."""
    texts, owner = ds.flat()
    rows = [c for c, i in enumerate(owner) if i in e.image_vecs]
    dim = e.text_vecs.shape[1]
    return Pairs(
        e.text_vecs[rows].astype(np.float32),
        np.stack([e.image_vecs[owner[c]] for c in rows]).astype(np.float32)
        if rows else np.zeros((0, dim), np.float32),
        np.asarray([e.hashes[owner[c]] for c in rows], dtype=str),
        [texts[c] for c in rows],
    )


def _encode_images(enc, ds, todo, hashes, image_vecs, skipped, key, cache, batch_size, workers,
                   progress) -> None:
    """Decode ``todo`` images in a thread pool one batch ahead of the encoder, and encode."""
    if not todo:
        return

    batches = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        def submit(b: list[int]) -> list[Future]:
            return [pool.submit(_decode, ds.images[i], enc.prep) for i in b]

        pending = submit(batches[0])
        for n, b in enumerate(batches):
            decoded = [f.result() for f in pending]
            if n + 1 < len(batches):
                pending = submit(batches[n + 1])  # decode the next batch while encoding this
            ok = []
            for i, (pixels, error) in zip(b, decoded):
                if error is not None:
                    skipped.append({"path": ds.images[i], "error": error})
                else:
                    ok.append((i, pixels))
            if ok:
                vecs = enc.encode_pixels(np.stack([p for _, p in ok]))  # [b, dim]
                new = {}
                for (i, _), v in zip(ok, vecs):
                    image_vecs[i] = v
                    new[hashes[i]] = v
                if cache:
                    cache.put("images", key, new)
            progress.advance(len(b), len(ok))


# -- methods ----------------------------------------------------------------------------

Ranks = tuple[np.ndarray, np.ndarray]  # (text->image [n_captions], image->text [n_images])


def exact_method(image_vecs: np.ndarray, text_vecs: np.ndarray, caption_image: np.ndarray) -> Ranks:
    """Exact cosine ranking (vectors are L2-normalised)."""
    return metrics.exact_ranks(image_vecs, text_vecs, caption_image)


def hnsw_depth(ks: Sequence[int]) -> tuple[int, int]:
    """(ef, k) for HNSW queries: ``ef`` as ``itr search`` sets it for the largest K, and
    ``k = ef`` results, which costs nothing more (hnswlib keeps ``max(ef, k)`` candidates)
    and lets the median rank be measured up to that depth."""
    from ..store.vindex import EF_SEARCH

    k_max = max(max(ks), max(metrics.RSUM_KS))
    ef = max(EF_SEARCH, 4 * k_max)
    return ef, ef


def _hnsw_lists(items: np.ndarray, queries: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Build an HNSW graph over ``items`` ``[n, dim]`` with :mod:`itrcli.store.vindex`'s
    parameters and answer ``queries`` ``[q, dim]``: ``[q, L]`` item indices, best first."""
    import hnswlib

    from ..store.vindex import EF_CONSTRUCTION, M

    n, dim = items.shape
    ef, k = hnsw_depth(ks)
    k = min(k, n)
    index = hnswlib.Index(space="cosine", dim=dim)
    index.init_index(max_elements=max(n, 1), ef_construction=EF_CONSTRUCTION, M=M, random_seed=100)
    # one thread: the graph, and so the figures, are the same on every run
    index.add_items(items, np.arange(n), num_threads=1)
    index.set_ef(ef)
    try:
        labels, _dist = index.knn_query(queries, k=k, num_threads=os.cpu_count() or 1)
    except RuntimeError as e:  # hnswlib could not fill k results (tiny or degenerate sets)
        raise ItrError(f"HNSW search failed on {n} vectors: {e}") from None
    return labels.astype(np.int64)  # [q, k]


def hnsw_method(image_vecs: np.ndarray, text_vecs: np.ndarray, caption_image: np.ndarray,
                ks: Sequence[int]) -> Ranks:
    """HNSW in both directions: a graph of images for caption queries, a graph of captions
    for image queries."""
    t2i = metrics.t2i_ranks_from_lists(_hnsw_lists(image_vecs, text_vecs, ks), caption_image)
    i2t = metrics.i2t_ranks_from_lists(_hnsw_lists(text_vecs, image_vecs, ks), caption_image)
    return t2i, i2t


def rerank_candidates(ks: Sequence[int]) -> int:
    """How many Hamming candidates hash+rerank re-scores exactly."""
    return max(RERANK_FACTOR * max(max(ks), max(metrics.RSUM_KS)), RERANK_MIN)


def hash_method(
    hamming_topk: Callable,
    item_codes: np.ndarray,
    query_codes: np.ndarray,
    item_vecs: np.ndarray,
    query_vecs: np.ndarray,
    relevant: Callable[[int, np.ndarray], np.ndarray],
    candidates: int,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Binary-code retrieval for one direction.

    Each query ranks every item by (Hamming distance, index) ("hash-B"); "hash-B+rerank"
    re-scores the first ``candidates`` of that list by exact cosine (ties by index) and
    keeps the Hamming order after them.

    Args:
        hamming_topk: :func:`itrcli.query.binary.hamming_topk`.
        item_codes: ``[n, words]`` uint64; query_codes: ``[q, words]``.
        item_vecs: ``[n, dim]``; query_vecs: ``[q, dim]`` (for the re-rank).
        relevant: (query index, item indices ``[L]``) -> bool ``[L]``.
        candidates: re-rank depth.
    Returns:
        (pure ranks ``[q]``, re-ranked ranks ``[q]``, seconds of the Hamming part,
        seconds of the re-rank part).
    """
    n = len(item_codes)
    pure = np.empty(len(query_codes), dtype=np.int64)
    reranked = np.empty(len(query_codes), dtype=np.int64)
    t_ham = t_rerank = 0.0
    c = min(candidates, n)
    for q in range(len(query_codes)):
        t0 = time.perf_counter()
        order, _dist = hamming_topk(query_codes[q], item_codes, n)  # [n], by (distance, index)
        t1 = time.perf_counter()
        order = np.asarray(order, dtype=np.int64)
        hit = relevant(q, order)  # [n]
        pure[q] = int(hit.argmax()) if hit.any() else metrics.NOT_RETRIEVED
        t2 = time.perf_counter()
        cand = order[:c]
        scores = item_vecs[cand] @ query_vecs[q]  # [c]
        resorted = cand[np.lexsort((cand, -scores))]  # by (-cosine, index)
        hit_c = relevant(q, resorted)
        reranked[q] = int(hit_c.argmax()) if hit_c.any() else pure[q]
        t3 = time.perf_counter()
        t_ham += t1 - t0
        t_rerank += t3 - t2
    return pure, reranked, t_ham, t_rerank


def _load_binary():
    try:
        from ..query import binary
    except ImportError as e:
        raise ItrError(f"--hash-bits needs itrcli.query.binary, which cannot be imported ({e})") from None
    return binary


# -- the evaluation ---------------------------------------------------------------------


def evaluate(
    ds: Dataset,
    model_names: Sequence[str | None] = (None,),
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ann: bool = False,
    hash_bits: Sequence[int] = (),
    hash_method_name: str = "itq",
    folds: int | None = 1,
    adapt: Dataset | None = None,
    adapt_methods: Sequence[str] | None = None,
    adapt_folds: int = 5,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    cache: bool | str | os.PathLike = True,
    db: str | os.PathLike | None = None,
    progress: Progress | None = None,
    rerank: bool = False,
    rerank_k: int | None = None,
    rerank_model: str | None = None,
    rerank_progress: Progress | None = None,
    text_precision: str | None = None,
) -> EvalResult:
    """Measure text->image and image->text retrieval of each model on ``ds``.

    Args:
        ds: from :func:`itrcli.evaluation.datasets.load`.
        model_names: preset names, hub ids or local directories; None means the library's
            model (with ``db``), else ``$ITR_MODEL`` or the default preset.
        ks: the K of R@K.
        ann: add an "hnsw" row per model (hnswlib, :mod:`itrcli.store.vindex` parameters).
        hash_bits: add "hash-B" and "hash-B+rerank" rows per model and B.
        hash_method_name: passed to :func:`itrcli.query.binary.fit`.
        folds: evaluate on this many contiguous image folds and average (COCO 1K: 5).
            None: 1, or :data:`ADAPT_FOLDS` when ``adapt`` shares images with ``ds``.
        adapt: captioned pairs to fit a query map on (:mod:`itrcli.query.adapt`): adds
            "exact+adapt" (and "hnsw+adapt") rows.  Each fold is ranked with a map fitted
            on the pairs whose images are not in that fold (compared by content), picked
            by ``adapt_folds``-fold cross-validation among ``adapt_methods``.
        cache: use the embedding cache (True: the default file; a path: that file).
        db: an itr library whose stored vectors may be reused (same model only; they come
            from draft-mode decoding, so may differ slightly from a fresh encode).
        progress: start/advance/close while encoding (e.g. :class:`itrcli.show.output.BarProgress`).
        rerank: add an "exact+rerank" row per model: the top ``rerank_k`` of exact re-scored
            by the image-text matching model ``rerank_model`` (see
            :mod:`itrcli.evaluation.rerank`); ``rerank_progress`` while it scores.  With
            ``cache``, the re-ranker's vision features are kept in the feature cache
            (:mod:`itrcli.store.feature_cache`) as ``itr search --rerank`` keeps them.
        text_precision: embed the captions as ``itr search --text-precision`` embeds
            texts: ``fp32``, the exported text tower; ``int8``, its int8 copy; None, the
            model's own text tower at ``precision``.
    Returns:
        An :class:`EvalResult`, rows in model order then exact, hnsw, hash-B, hash-B+rerank,
        exact+rerank.
    Raises:
        UsageError: bad ``ks`` / ``folds`` / ``hash_bits``.
        ModelError: a model cannot be loaded.
    """
    ks = parse_int_list(list(ks), "--recall", DEFAULT_KS)
    hash_bits = parse_int_list(list(hash_bits), "--hash-bits") if hash_bits else ()
    if folds is not None and folds < 1:
        raise UsageError("--folds must be at least 1")
    if folds is not None and folds > len(ds.images):
        raise UsageError(f"--folds {folds}: the dataset has only {len(ds.images)} image(s)")
    binary = _load_binary() if hash_bits else None
    result = EvalResult(dataset=ds.name, split=ds.split, format=ds.format, images=0, captions=0,
                        ks=tuple(ks), folds=folds or 1, missing=list(ds.missing),
                        text_precision=text_precision)
    for path in ds.uncaptioned:
        result.notes.append(f"no caption, left out: {path}")

    store_cache = None
    if cache:
        store_cache = EmbeddingCache(default_cache_path() if cache is True else cache)
    library = None
    try:
        if db is not None:
            library = Store(Path(db).expanduser(), readonly=True)
        names = []
        for name in list(model_names) or [None]:
            if name is None and library is not None:
                name = library.get_meta("model")
            if models.resolve(name) not in [models.resolve(n) for n in names]:
                names.append(name)  # a model given twice is one row, not two
        embedded: list[Embedded] = []
        adapt_embedded: list[Embedded] = []
        for name in names:
            library_vector = None
            if library is not None:
                want = models.resolve(name)
                if library.get_meta("model") == want:
                    library_vector = library.vector_for_hash
                else:
                    result.notes.append(f"library {library.directory} holds "
                                        f"'{library.get_meta('model')}', "
                                        f"not '{want}': its vectors are not reused")
            embedded.append(embed_dataset(
                ds, name, device=device, precision=precision, batch_size=batch_size,
                workers=workers, cache=store_cache, library_vector=library_vector,
                progress=progress, text_precision=text_precision))
            if adapt is not None:
                adapt_embedded.append(embed_dataset(
                    adapt, name, device=device, precision=precision, batch_size=batch_size,
                    workers=workers, cache=store_cache, library_vector=library_vector,
                    progress=progress, text_precision=text_precision))
    finally:
        if store_cache is not None:
            store_cache.close()
        if library is not None:
            library.close()

    # every model is evaluated on the same images: those that every model could read
    bad: dict[str, str] = {}
    for e in embedded:
        for s in e.skipped:
            bad.setdefault(s["path"], s["error"])
    keep = [i for i in range(len(ds.images)) if all(i in e.image_vecs for e in embedded)]
    result.skipped = [{"path": p, "error": err} for p, err in bad.items()]
    if not keep:
        raise ItrError("no image of the dataset could be read (see the skipped list)")
    pairs = [pairs_of(adapt, a) for a in adapt_embedded]
    if folds is None:
        shared = len(set(pairs[0].image_hash.tolist()) & {embedded[0].hashes[i] for i in keep}) \
            if pairs else 0
        folds = ADAPT_FOLDS if shared and len(keep) >= ADAPT_FOLDS else 1
        if folds > 1:
            result.notes.append(f"--adapt: the pairs share {shared} image(s) with the dataset: "
                                f"figures are the mean of {folds} folds, each ranked with a map "
                                "fitted on pairs whose images are not in it")
        result.folds = folds
    if folds > len(keep):
        raise UsageError(f"--folds {folds}: only {len(keep)} readable image(s)")
    sub = ds.subset(keep)
    _, owner = ds.flat()
    kept_captions = np.flatnonzero(np.isin(np.asarray(owner), keep))  # rows of text_vecs to keep
    _, caption_image = sub.flat()
    caption_image = np.asarray(caption_image, dtype=np.int64)  # [n_captions]
    result.images, result.captions = len(sub.images), len(caption_image)
    fold_idx = metrics.fold_indices(caption_image, len(sub.images), folds)

    if adapt is not None:
        result.adapt = {"pairs": adapt.source, "folds": adapt_folds, "models": {}}
    reranker, probs, features = None, {}, None
    if rerank:
        from ..embed.rerank import DEFAULT_RERANK_K, Reranker
        from ..store.feature_cache import FeatureCache

        rerank_k = DEFAULT_RERANK_K if rerank_k is None else rerank_k
        if rerank_k < 1:
            raise UsageError("--rerank-k must be at least 1")
        features = FeatureCache.from_env() if cache else None
        reranker = Reranker(rerank_model, device=device, precision=precision)
        all_texts, _ = ds.flat()
        kept_texts = [all_texts[i] for i in kept_captions]
    for j, e in enumerate(embedded):
        result.encoded[e.model] = e.stats
        img = np.stack([e.image_vecs[i] for i in keep]).astype(np.float32)  # [n_images, dim]
        txt = np.ascontiguousarray(e.text_vecs[kept_captions])  # [n_captions, dim]
        fit_fold = None
        if adapt is not None:
            image_hash = np.asarray([e.hashes[i] for i in keep], dtype=str)  # [n_images]
            picks: list[dict[str, Any]] = []
            result.adapt["models"][e.model] = picks
            fit_fold = _fold_fitter(pairs[j], image_hash, adapt_methods, adapt_folds, picks)
        result.results += _rows(e.model, img, txt, caption_image, fold_idx, ks, ann, hash_bits,
                                binary, hash_method_name, fit_fold)
        if reranker is not None:
            row, stats = _rerank_row(e.model, img, txt, caption_image, fold_idx, ks, rerank_k,
                                     reranker, sub.images, kept_texts, probs, workers,
                                     rerank_progress, features)
            result.results.append(row)
            result.notes.append(
                f"exact+rerank: each query's top {rerank_k} re-scored by {reranker.model_id}: "
                f"{stats['pairs']} image-text pairs on {stats['images']} images in "
                f"{stats['seconds']:.1f} s")
    if adapt is not None:
        for model, picks in result.adapt["models"].items():
            labels = ", ".join(sorted({p["picked"] for p in picks}))
            sizes = sorted({p["pairs"] for p in picks})
            n = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
            result.notes.append(f"+adapt ({_short_names([model])[model]}): {labels}, fitted on "
                                f"{n} pairs, none sharing an image with the images it ranks")
    return result


def _fold_fitter(pairs: Pairs, image_hash: np.ndarray, methods, folds: int,
                 picks: list[dict[str, Any]]) -> Callable[[np.ndarray], Any]:
    """(image indices of a fold ``[m]``) -> the adapter to rank that fold with: fitted on
    the pairs whose images (by content) are not in the fold; one fit serves every fold
    that excludes no pair."""
    from ..query import adapt as fit

    fitted: dict[str, Any] = {}

    def for_fold(imgs: np.ndarray):
        train = ~np.isin(pairs.image_hash, image_hash[imgs])  # [n_pairs]
        if train.all() and "all" in fitted:
            return fitted["all"]
        p = pairs.select(train)
        n_images = len(np.unique(p.image_hash))
        if n_images < fit.min_images(folds):
            raise UsageError(
                f"--adapt: {n_images} captioned image(s) left to fit on once a fold's images "
                f"are held out; needs at least {fit.min_images(folds)} (more pairs, or more "
                "--folds)")
        adapter, sel = fit.select_and_fit(p.texts, p.images, p.image_hash,
                                          methods=list(methods or fit.METHODS), folds=folds)
        picks.append({"picked": sel.best.label(), "pairs": len(p), "images": n_images,
                      "cv": sel.to_json()})
        if train.all():
            fitted["all"] = adapter
        return adapter

    return for_fold


def _rerank_row(model_id, img, txt, caption_image, fold_idx, ks, k, reranker, image_paths,
                texts, probs, workers, progress,
                features=None) -> tuple[MethodResult, dict[str, Any]]:
    """The "exact+rerank" row of one model (``probs``: pair scores shared across models)."""
    from .rerank import FoldCandidates, score_pairs

    t0 = time.perf_counter()
    folds, pairs = [], {}
    for imgs, caps in fold_idx:
        ci = caption_image[caps] - imgs[0]
        cand = FoldCandidates(img[imgs], txt[caps], np.asarray(imgs), np.asarray(caps), k)
        cand.pairs(pairs)
        folds.append((cand, exact_method(img[imgs], txt[caps], ci)))
    stats = score_pairs(reranker, image_paths, texts, pairs, probs,
                        workers=workers or 2, progress=progress, cache=features)
    summaries = [metrics.summarise(*cand.ranks(probs, caption_image, base), ks)
                 for cand, base in folds]
    summary = metrics.mean_of(summaries)
    return MethodResult(model_id, "exact+rerank", summary["t2i"], summary["i2t"], summary["rsum"],
                        time.perf_counter() - t0), stats


def _rows(model_id, img, txt, caption_image, fold_idx, ks, ann, hash_bits, binary,
          hash_method_name, fit_fold=None) -> list[MethodResult]:
    """Every method's row for one model, each averaged over the folds."""
    runs: dict[str, list[tuple[Ranks, float]]] = {}

    def record(method: str, ranks: Ranks, seconds: float) -> None:
        runs.setdefault(method, []).append((ranks, seconds))

    codes = []
    for bits in hash_bits:
        t0 = time.perf_counter()
        try:
            hasher = binary.fit(img, bits, method=hash_method_name, seed=0)  # on the image vectors
        except ValueError as e:
            raise UsageError(f"--hash-bits {bits}: {e}") from None
        img_codes, txt_codes = hasher.codes(img), hasher.codes(txt)  # [n, words] uint64
        codes.append((bits, img_codes, txt_codes, time.perf_counter() - t0))

    for imgs, caps in fold_idx:
        ci = caption_image[caps] - imgs[0]  # [m_f], local image indices
        fi, ft = img[imgs], txt[caps]
        t0 = time.perf_counter()
        record("exact", exact_method(fi, ft, ci), time.perf_counter() - t0)
        if ann:
            t0 = time.perf_counter()
            record("hnsw", hnsw_method(fi, ft, ci, ks), time.perf_counter() - t0)
        if fit_fold is not None:
            t0 = time.perf_counter()
            adapter = fit_fold(imgs)
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            fa = adapter.apply(ft)  # [m_f, dim]: the captions mapped, the images as they are
            record("exact+adapt", exact_method(fi, fa, ci), fit_s + time.perf_counter() - t0)
            if ann:
                t0 = time.perf_counter()
                record("hnsw+adapt", hnsw_method(fi, fa, ci, ks), time.perf_counter() - t0)
        for bits, img_codes, txt_codes, fit_seconds in codes:
            share = fit_seconds / len(fold_idx)
            c = rerank_candidates(ks)
            p1, r1, h1, x1 = hash_method(binary.hamming_topk, img_codes[imgs], txt_codes[caps],
                                         fi, ft, lambda q, order: order == ci[q], c)
            p2, r2, h2, x2 = hash_method(binary.hamming_topk, txt_codes[caps], img_codes[imgs],
                                         ft, fi, lambda q, order: ci[order] == q, c)
            record(f"hash-{bits}", (p1, p2), share + h1 + h2)
            record(f"hash-{bits}+rerank", (r1, r2), share + h1 + h2 + x1 + x2)

    rows = []
    for method, per_fold in runs.items():
        summary = metrics.mean_of([metrics.summarise(t2i, i2t, ks) for (t2i, i2t), _ in per_fold])
        rows.append(MethodResult(model_id, method, summary["t2i"], summary["i2t"], summary["rsum"],
                                 sum(s for _, s in per_fold)))
    return rows


# -- output -----------------------------------------------------------------------------


def format_table(result: EvalResult, *, aligned: bool = True) -> str:
    """The table papers print: one row per (model, method); recalls in percent.

    ``aligned``: padded columns under "text->image" / "image->text" group headings (for a
    terminal); otherwise one tab-separated header and one line per row.
    """
    ks = result.ks
    metric_names = [f"R@{k}" for k in ks] + ["medr"]
    names = [r.model for r in result.results]
    short = _short_names(names)

    def cells(r: MethodResult) -> list[str]:
        out = [short[r.model], r.method]
        for d in (r.t2i, r.i2t):
            out += [_fmt(d[m], m) for m in metric_names]
        return out + [f"{r.rsum:.1f}", f"{r.seconds:.2f}"]

    header = (["model", "method"] + [f"text->image {m}" for m in metric_names]
              + [f"image->text {m}" for m in metric_names] + ["rsum", "seconds"])
    rows = [cells(r) for r in result.results]
    if not aligned:
        return "\n".join("\t".join(line) for line in [header] + rows)
    head2 = ["model", "method"] + metric_names * 2 + ["rsum", "seconds"]
    widths = [max(len(h), *(len(row[j]) for row in rows)) if rows else len(h)
              for j, h in enumerate(head2)]
    nm = len(metric_names)
    group_w = [sum(widths[2 + g * nm + j] for j in range(nm)) + 2 * (nm - 1) for g in range(2)]
    lead = widths[0] + 2 + widths[1]
    line1 = (" " * lead + "  " + "text->image".center(group_w[0]) + "  "
             + "image->text".center(group_w[1])).rstrip()

    def fmt_row(row: list[str]) -> str:
        parts = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        parts += [c.rjust(w) for c, w in zip(row[2:], widths[2:])]
        return "  ".join(parts)

    return "\n".join([line1, fmt_row(head2)] + [fmt_row(r) for r in rows])


def summary_line(result: EvalResult) -> str:
    """``flickr30k test: 1000 images, 5000 captions`` (+ folds, left-out counts)."""
    s = f"{result.dataset}{' ' + result.split if result.split else ''}: {result.images} images, " \
        f"{result.captions} captions"
    if result.folds > 1:
        s += f", mean of {result.folds} folds of ~{result.images // result.folds} images"
    if result.text_precision:
        s += f"; captions by the exported text tower, {result.text_precision}"
    if result.missing:
        s += f"; {len(result.missing)} missing image(s) left out"
    if result.skipped:
        s += f"; {len(result.skipped)} unreadable image(s) left out"
    return s


def _fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "-"
    if metric == "medr":
        return f"{v:g}" if float(v).is_integer() else f"{v:.1f}"
    return f"{v:.1f}"


def _short_names(names: list[str]) -> dict[str, str]:
    """Preset names for preset models, directory names for local models."""
    out = {}
    for n in names:
        preset = next((p.name for p in models.PRESETS if p.hub_id == n), None)
        out[n] = preset or (os.path.basename(n.rstrip("/")) if os.path.isabs(n) else n)
    return out
