"""Names and limits shared across the package: no heavy imports, safe for ``itr --help``.

Each thing on disk has one owner module that builds its paths from these names:
``itr.db`` (:mod:`itrcli.store.db`), ``hnsw/`` (:mod:`itrcli.store.vindex`), ``text/``
(:mod:`itrcli.embed.textonnx`), ``lock`` (:mod:`itrcli.store.lock`), ``thumbs/``
(:mod:`itrcli.show.thumbs`).
"""

from __future__ import annotations

#: File extensions that ``itr index`` picks up (lower case, with the dot); HEIF ones when
#: pillow-heif imports (a dependency), AVIF ones when Pillow decodes AVIF, RAW ones when
#: rawpy imports (:func:`itrcli.ingest.images.supported_extensions`).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)
HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif"})
AVIF_EXTENSIONS = frozenset({".avif", ".avifs"})
#: Video extensions (``itr index`` reads them with PyAV, a dependency, unless
#: ``--no-video``; see :mod:`itrcli.ingest.video`).
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".3gp"})
#: Camera RAW formats, decoded through rawpy (LibRaw; :mod:`itrcli.ingest.raw`).
RAW_EXTENSIONS = frozenset({
    ".cr2", ".cr3", ".nef", ".nrw", ".arw", ".sr2", ".srf", ".dng", ".raf", ".orf", ".rw2",
    ".pef", ".srw", ".3fr", ".iiq", ".kdc", ".dcr", ".mrw", ".x3f", ".erf", ".mef", ".mos",
})
#: Every extension itr knows as a photo or a video: those a run does not read (RAW without
#: rawpy, HEIF without pillow-heif, videos without PyAV...) are counted as passed over, by
#: extension.
MEDIA_EXTENSIONS = (IMAGE_EXTENSIONS | HEIF_EXTENSIONS | AVIF_EXTENSIONS | VIDEO_EXTENSIONS
                    | RAW_EXTENSIONS)

#: ``--precision`` values; ``auto`` is bf16 on CPUs with native bf16, fp16 on CUDA, else fp32.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: ``--text-precision``: the text tower of a CPU search (int8: embed/textquant.py)
TEXT_PRECISIONS = ("fp32", "int8")

#: bf16 against fp32, per vector: the cosine we guarantee (measured: 0.99994 at worst on the
#: ViT-B/32 architecture, bench/precision.py; 0.99997 on the tests' tiny model).
BF16_MIN_COSINE = 0.999

#: The library directory's entries.
DB_NAME = "itr.db"
#: The thumbnail cache's folder in a library (:mod:`itrcli.show.thumbs`).
THUMBS_DIR = "thumbs"
GRAPH_DIR = "hnsw"
#: Where ``itr index --reindex`` builds the new library before swapping it in
#: (:meth:`itrcli.library.Library.index`).
REINDEX_DIR = ".reindex"
TEXT_TOWER_DIR = "text"
