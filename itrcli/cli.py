"""The ``itr`` command line: parses arguments, calls :mod:`itrcli.library`, formats output.

No heavy import at module level: ``itr --help`` and shell completion must stay instant.
Library errors become ``Error: ...`` on stderr with the exit codes of
:class:`itrcli.errors.ExitCode`; tracebacks only with ``-v``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

from . import __version__
from .constants import PRECISIONS, TEXT_PRECISIONS
from .errors import ExitCode, ItrError, Terminated, UsageError
from .embed.models import PRESETS, RERANK_PRESETS, preset_names, rerank_preset_names
from .embed.rerank import DEFAULT_RERANK_K

app = typer.Typer(
    name="itr",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# --- shared options (one vocabulary across commands) -----------------------------------

def _complete_model(incomplete: str) -> list[str]:
    return [n for n in preset_names() if n.startswith(incomplete)]


def _complete_rerank_model(incomplete: str) -> list[str]:
    return [n for n in rerank_preset_names() if n.startswith(incomplete)]


DbOpt = Annotated[
    Optional[Path],
    typer.Option("--db", envvar="ITR_DB", help="library directory [default: ~/.local/share/itr]",
                 show_default=False, file_okay=False),
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option("-m", "--model", envvar="ITR_MODEL", autocompletion=_complete_model,
                 help="preset name, Hugging Face id or local directory [default: the library's, "
                      "else laion-b32]", show_default=False),
]
def _check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value or ""):
        raise typer.BadParameter("expected auto, cpu, cuda, cuda:N or mps")
    return value


def _check_precision(value: str) -> str:
    if value not in PRECISIONS:
        raise typer.BadParameter("expected auto, fp32, bf16 or fp16")
    return value


DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps",
                                        callback=_check_device)]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto, fp32, bf16 or fp16",
                                           callback=_check_precision)]


def _check_text_precision(value: str) -> str:
    if value not in TEXT_PRECISIONS:
        raise typer.BadParameter("expected fp32 or int8")
    return value


TextPrecisionOpt = Annotated[str, typer.Option(
    "--text-precision", envvar="ITR_TEXT_PRECISION", callback=_check_text_precision,
    help="the text tower on the CPU: fp32, or int8 (about twice as fast, vectors at a "
         "cosine of ~0.999)")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="images per encoder batch")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", min=1, help="decode threads [default: CPUs, at most 4]", show_default=False)]
IncludeHiddenOpt = Annotated[bool, typer.Option(
    "--include-hidden", help="include hidden files and directories")]
ExcludeOpt = Annotated[Optional[List[str]], typer.Option(
    "--exclude", metavar="GLOB", help="skip names or paths matching GLOB (repeatable)")]
FollowSymlinksOpt = Annotated[bool, typer.Option(
    "--follow-symlinks", help="follow symlinked directories (never loops)")]
WaitOpt = Annotated[float, typer.Option(
    "--wait", min=0, metavar="SECONDS", help="wait this long for another index run to finish")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="no progress or summary on stderr")]
VerboseOpt = Annotated[bool, typer.Option("-v", "--verbose", help="tracebacks for unexpected errors")]
# the dataset options of eval and adapt (PAIRS are read like an eval DATASET)
DatasetFormatOpt = Annotated[Optional[str], typer.Option(
    "--format", help="karpathy, coco, csv or folder [default: detected]", show_default=False)]
LimitOpt = Annotated[Optional[int], typer.Option(
    "--limit", min=1, metavar="N", help="only the first N images", show_default=False)]
RerankModelOpt = Annotated[Optional[str], typer.Option(
    "--rerank-model", envvar="ITR_RERANK_MODEL", metavar="MODEL",
    autocompletion=_complete_rerank_model,
    help="re-ranker: preset name, Hugging Face id or local directory "
         "[default: blip-itm-base-coco]", show_default=False)]
NoCacheOpt = Annotated[bool, typer.Option(
    "--no-cache", help="neither read nor write the embedding cache")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"itr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Search a local photo collection by meaning (CLIP-style image-text retrieval)

    \b
    Example:
        itr index ~/photos && itr search "two children on a lawn"
    """


# --- commands ------------------------------------------------------------------------

@app.command()
def index(
    paths: Annotated[List[Path], typer.Argument(help="directories or files to index", metavar="PATH",
                                                exists=True,
                                                show_default=False)],
    db: DbOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = None,
    include_hidden: IncludeHiddenOpt = False,
    exclude: ExcludeOpt = None,
    follow_symlinks: FollowSymlinksOpt = False,
    no_prune: Annotated[bool, typer.Option("--no-prune",
                        help="keep library entries of files deleted from disk")] = False,
    reindex: Annotated[bool, typer.Option("--reindex",
                       help="re-embed everything (e.g. with another --model)")] = False,
    ocr: Annotated[Optional[bool], typer.Option(
        "--ocr/--no-ocr", show_default=False,
        help="read the text in images, now and on later runs (needs itr-search[ocr]); --no-ocr "
             "stops and forgets it [default: the library's setting]")] = None,
    no_video: Annotated[bool, typer.Option("--no-video",
                        help="skip videos (those already indexed are kept)")] = False,
    wait: WaitOpt = 0.0,
    engine: Annotated[str, typer.Option(
        "--engine", metavar="local|ray",
        help="local (this process) or ray (read, decode and embed on a Ray cluster; "
             "needs itr-search[ray])")] = "local",
    address: Annotated[Optional[str], typer.Option(
        "--address", metavar="ADDR", show_default=False,
        help="with --engine ray: the cluster to join [default: RAY_ADDRESS, else a local "
             "Ray on this machine's cores]")] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Add new and changed images and videos under PATH to the library, drop deleted ones

    Unchanged files (same size and mtime) are not read again; moved or renamed files keep
    their vectors; files that cannot be read are listed and skipped (exit code stays 0).
    With --ocr the text in each image is read too (beside the encoder), so that searches
    match it; the library keeps doing so until --no-ocr.
    Videos (with PyAV installed: pip install 'itr-search[video]') get a few frames each, with
    their times.
    With --engine ray, new and changed files are read, decoded and embedded on a Ray
    cluster (or a local Ray) and committed here, with the same results.

    \b
    Example:
        itr index ~/photos --exclude '*.thumb.jpg' -q
        itr index ~/photos --ocr
        itr index ~/photos --no-video
        itr index /archive/photos --engine ray --address head-node:6379
    """
    from .library import Library
    from .show.output import err, print_json

    with _log_to_stderr(verbose), Library.open(db, create=True) as lib:
        had_ocr = lib.ocr
        s = _index_paths(lib, paths, model=model, device=device, precision=precision,
                         batch_size=batch_size, workers=workers, include_hidden=include_hidden,
                         exclude=exclude, follow_symlinks=follow_symlinks, prune=not no_prune,
                         reindex=reindex, wait=wait, quiet=quiet, see_json=True, ocr=ocr,
                         video=not no_video, engine=engine.strip().lower(), address=address,
                         engine_logs=verbose)
    if json_:
        print_json(s.to_json())
    if not quiet and ocr is False:
        err("text reading is off for this library" + (
            ": its stored text is forgotten; 'itr index --ocr' reads it again" if had_ocr else ""))
    if not quiet:
        _print_summary(s)
    if s.interrupted:
        raise typer.Exit(ExitCode.INTERRUPTED)


@contextlib.contextmanager
def _log_to_stderr(on: bool):
    """With ``on`` (``-v``): the ``itr`` logger's lines (e.g. which runtime runs the image
    tower, and why) on stderr as ``itr: ...``, for the command's duration."""
    import logging

    if not on:
        yield
        return

    class ToStderr(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            sys.stderr.write(f"itr: {record.getMessage()}\n")

    from .logs import handled

    with handled(logging.getLogger("itr"), ToStderr(), logging.DEBUG):
        yield


def _index_paths(lib, paths, *, quiet: bool, see_json: bool, exclude, **options):
    """The one index call behind `itr index` and `itr hash PATH...`: progress on stderr
    (a bar on a terminal, log lines otherwise), then the skipped files, listed once."""
    from .show.output import BarProgress, LogProgress, err, is_tty, one_line

    progress = None if quiet else (BarProgress() if is_tty(sys.stderr) else LogProgress())
    s = lib.index([str(p) for p in paths], exclude=exclude or [], progress=progress, **options)
    if not quiet:
        _print_skipped(s.errors, "see --json" if see_json else None)
        for e in s.text.errors[:20] if s.text is not None else ():  # OCR failures (--ocr)
            err(f"{one_line(e['path'])}: {e['error']}")
    return s


def _print_skipped(errors: list[dict[str, str]], more_hint: str | None = "see --json",
                   most: int = 20) -> None:
    """``skipped PATH: reason`` lines on stderr, at most ``most`` of them."""
    from .show.output import err, one_line

    for e in errors[:most]:
        # a video cut short is indexed in part, not skipped
        verb = "" if e["error"].startswith("partly indexed") else "skipped "
        err(f"{verb}{one_line(e['path'])}: {e['error']}")
    if len(errors) > most:
        err(f"... and {len(errors) - most} more skipped" + (f" ({more_hint})" if more_hint else ""))


def _print_summary(s) -> None:
    from .show.output import err, index_summary_line, passed_over_line

    err(("interrupted: " if s.interrupted else "") + index_summary_line(s))
    if (line := passed_over_line(s.passed_over)) is not None:
        err(line)


@app.command("hash")
def hash_cmd(
    paths: Annotated[Optional[List[Path]], typer.Argument(
        help="directories or files to hash (indexed first, like itr index)",
        metavar="PATH", exists=True, show_default=False)] = None,
    bits: Annotated[int, typer.Option("--bits", help="code length: 16, 32, 64, 128 or 256")] = 64,
    method: Annotated[str, typer.Option("--method",
                      help="itq (learned on the library) or lsh (random hyperplanes)")] = "itq",
    text: Annotated[Optional[List[str]], typer.Option("--text", metavar="QUERY",
                    help="also print the code of a text (repeatable)")] = None,
    dupes: Annotated[bool, typer.Option("--dupes",
                     help="print groups of near-duplicate files instead of codes")] = False,
    threshold: Annotated[Optional[float], typer.Option("--threshold", metavar="S", min=-1.0,
                         max=1.0, help="with --dupes: cosine that confirms a pair [default: 0.95]",
                         show_default=False)] = None,
    db: DbOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = None,
    include_hidden: IncludeHiddenOpt = False,
    exclude: ExcludeOpt = None,
    follow_symlinks: FollowSymlinksOpt = False,
    wait: WaitOpt = 0.0,
    html: Annotated[Optional[str], typer.Option(
        "--html", metavar="FILE", show_default=False,
        help="with --dupes: also write an HTML page of the groups to FILE (- for stdout)")] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Print short binary codes of images and videos (HEXCODE  PATH), or near-duplicate groups

    Files not yet in the library are indexed first (nothing is pruned). The hash is learned
    on the library's own vectors (ITQ) and refitted when the library has changed by more
    than 20%; texts (--text) get codes in the same space; a video's code is that of the mean
    of its frames. --dupes prints one group per paragraph: pairs close in Hamming distance
    whose cosine is at least --threshold.

    \b
    Example:
        itr hash ~/photos --bits 64 > codes.txt
        itr hash --text "a dog on a beach"
        itr hash --dupes ~/photos/2023 --threshold 0.97 --html dupes.html
    """
    from .library import Library
    from .query.binary import check_options
    from .show.output import err, for_stream, print_json

    check_options(bits, method)
    texts = list(text or [])
    if any(not t.strip() for t in texts):
        raise UsageError("empty --text")
    if dupes and texts:
        raise UsageError("--dupes compares images; it does not take --text")
    if threshold is not None and not dupes:
        raise UsageError("--threshold goes with --dupes")
    if not paths and not texts:
        raise UsageError("give PATH... to hash images, or --text QUERY")
    if dupes and not paths:
        raise UsageError("--dupes needs PATH...")
    if html is not None and not dupes:
        raise UsageError("--html goes with --dupes")
    if html == "-" and json_:
        raise UsageError("--html - writes the page to stdout: not with --json")

    files: list[tuple[str, int]] = []  # (path as shown, file id), in path order
    with Library.open(db, create=bool(paths)) as lib:
        if paths:
            s = _index_paths(lib, paths, model=model, device=device, precision=precision,
                             batch_size=batch_size, workers=workers, include_hidden=include_hidden,
                             exclude=exclude, follow_symlinks=follow_symlinks, prune=False,
                             wait=wait, quiet=quiet, see_json=False, list_indexed=True)
            if not quiet and (s.added or s.updated or s.interrupted):
                _print_summary(s)
            if s.interrupted:
                raise typer.Exit(ExitCode.INTERRUPTED)
            # the files under PATH that the library now holds (unreadable ones were skipped)
            files = s.indexed_files  # from the run's change detection when it changed nothing
            if files is None:
                files = lib.indexed(s.found)
        else:
            lib.require_model(model)

        if dupes:
            out = lib.near_duplicates(files, bits=bits, method=method, threshold=threshold)
            if html is not None:
                from .show.contact_sheet import write_dupes_html
                from .show.thumbs import ThumbnailCache

                with ThumbnailCache.for_library(lib.directory) as cache:  # trims on exit
                    try:
                        write_dupes_html(out, html, store=lib.store, cache=cache)
                    except OSError as e:
                        raise UsageError(f"--html {html}: {e.strerror or e}") from None
            if html == "-":
                pass  # the page is stdout: no text listing (the summary stays on stderr)
            elif json_:
                print_json(out)
            else:
                shown = for_stream(sys.stdout)  # a terminal gets no control character
                sys.stdout.write("\n".join("".join(shown(p) + "\n" for p in g) for g in out))
            if not quiet:
                err(f"groups of near-duplicates: {len(out)} ({sum(map(len, out))} of "
                    f"{len(files)} files)")
            return

        results = lib.binary_codes(files, texts, bits=bits, method=method, device=device,
                                 precision=precision)
    if json_:
        print_json(results)
    else:
        shown = for_stream(sys.stdout)
        sys.stdout.write("".join(f"{r['code']}  {shown(r.get('path', r.get('text')))}\n"
                                 for r in results))


@app.command()
def search(
    query: Annotated[Optional[str], typer.Argument(
        help="text, or the path of an image file (image query)", show_default=False,
        metavar="QUERY")] = None,
    db: DbOpt = None,
    top: Annotated[int, typer.Option("-n", "--top", min=1, help="number of results")] = 10,
    image: Annotated[Optional[Path], typer.Option("--image", help="force an image query",
                     dir_okay=False, show_default=False)] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="force a text query",
                    show_default=False)] = None,
    add: Annotated[Optional[List[str]], typer.Option("--add", metavar="Q",
                   help="add a text or image to the query (repeatable)")] = None,
    subtract: Annotated[Optional[List[str]], typer.Option("--subtract", metavar="Q",
                        help="subtract a text or image from the query (repeatable)")] = None,
    in_dirs: Annotated[Optional[List[Path]], typer.Option("--in", metavar="DIR",
                       help="only files under DIR (repeatable)", file_okay=False)] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", metavar="S",
                         help="drop results scoring below S (cosine)")] = None,
    after: Annotated[Optional[str], typer.Option("--after", metavar="YYYY-MM-DD",
                     help="taken on or after this date (EXIF, else mtime)")] = None,
    before: Annotated[Optional[str], typer.Option("--before", metavar="YYYY-MM-DD",
                      help="taken before this date (EXIF, else mtime)")] = None,
    camera: Annotated[Optional[str], typer.Option("--camera", metavar="TEXT", show_default=False,
                      help="camera make or model contains TEXT (any case)")] = None,
    near: Annotated[Optional[str], typer.Option("--near", metavar="LAT,LON[,KM]", show_default=False,
                    help="taken within KM of a point (GPS; default 10 km)")] = None,
    glob: Annotated[Optional[List[str]], typer.Option("--glob", metavar="PATTERN",
                    help="the path ends in a match of PATTERN (repeatable, any)")] = None,
    min_size: Annotated[Optional[str], typer.Option("--min-size", metavar="WxH", show_default=False,
                        help="at least W pixels wide and H high")] = None,
    kind: Annotated[Optional[str], typer.Option("--kind", metavar="image|video", show_default=False,
                    help="only images or only videos")] = None,
    sort: Annotated[str, typer.Option("--sort", metavar="score|date|path",
                    help="order of the best results: score, date (newest first) or path")] = "score",
    auto_cut: Annotated[bool, typer.Option("--auto-cut", help="keep only results standing out "
                        "from the library's scores for this query")] = False,
    exact: Annotated[bool, typer.Option("--exact", help="score every image (no HNSW)")] = False,
    frames: Annotated[bool, typer.Option("--frames",
                      help="list every matching video frame, not each video once")] = False,
    all_files: Annotated[bool, typer.Option(
        "--all-files", help="list each file of a photo (a RAW beside its JPEG, a Live "
                            "Photo's clip), not the photo once")] = False,
    at: Annotated[Optional[float], typer.Option("--at", metavar="SECONDS", show_default=False,
                  help="with a video as query: use its frame at this time")] = None,
    hash_: Annotated[bool, typer.Option("--hash", help="fast then slow: rank binary codes by "
                                        "Hamming distance, re-rank the best by cosine")] = False,
    hash_bits: Annotated[int, typer.Option("--hash-bits", metavar="B",
                         help="code length for --hash: 16, 32, 64, 128 or 256")] = 64,
    no_adapt: Annotated[bool, typer.Option("--no-adapt",
                        help="leave text queries unmapped by the library's adapter (itr adapt)")] = False,
    text_only: Annotated[bool, typer.Option(
        "--text-only", help="rank by the words read in the images alone (itr index --ocr)")] = False,
    no_text: Annotated[bool, typer.Option(
        "--no-text", help="rank by meaning alone, ignoring the words read in the images")] = False,
    rerank: Annotated[bool, typer.Option(
        "--rerank", help="re-score the first results with an image-text matching model "
                         "(BLIP ITM; text queries)")] = False,
    rerank_k: Annotated[int, typer.Option("--rerank-k", min=1, metavar="K",
                        help="how many results --rerank re-scores")] = DEFAULT_RERANK_K,
    rerank_model: RerankModelOpt = None,
    no_rerank_cache: Annotated[bool, typer.Option(
        "--no-rerank-cache", help="neither read nor write the re-ranker's image feature cache "
                                  "(ITR_RERANK_CACHE_BYTES=0 turns it off for good)")] = False,
    paths_only: Annotated[bool, typer.Option("--paths", help="print paths only, one per line")] = False,
    null: Annotated[bool, typer.Option("-0", "--null", help="NUL-terminated paths (for xargs -0)")] = False,
    preview: Annotated[bool, typer.Option(
        "--preview", help="show each result's image in the terminal (kitty, iTerm2, WezTerm, "
                          "sixel)")] = False,
    preview_protocol: Annotated[str, typer.Option(
        "--preview-protocol", metavar="auto|kitty|iterm|sixel",
        help="image protocol for --preview (implies it) instead of detecting one")] = "auto",
    preview_height: Annotated[int, typer.Option(
        "--preview-height", min=1, max=100, metavar="ROWS",
        help="height of a preview in text rows")] = 8,
    html: Annotated[Optional[str], typer.Option(
        "--html", metavar="FILE",
        help="also write a self-contained HTML contact sheet to FILE (- for stdout, alone)",
        show_default=False)] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    text_precision: TextPrecisionOpt = "fp32",
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Rank the library's images against a text or image query

    On a terminal: a table, with --preview each image inline. Piped: score<TAB>path lines
    (score<TAB>path<TAB>seconds for a video frame). Also --paths, -0, --json, and --html
    for a contact sheet. A video ranks once, at its best frame, unless --frames; a photo
    once (the JPEG of a RAW+JPEG pair, the HEIC of a Live Photo; --json names the other
    files as alternates), unless --all-files. On a
    library indexed with --ocr, the words of a text query are also matched in the images'
    text (word beginnings; "quoted phrases" as phrases) and both rankings fused; the
    matched words are shown. With --rerank, the first --rerank-k results are re-scored by
    an image-text matching model and printed in its order (piped: match<TAB>score<TAB>path,
    match '-' past K); the rest follow.

    \b
    Example:
        itr search "two children on a lawn" -n 5 --preview
        itr search 'acme invoice' --text-only
        itr search "a dog catching a frisbee" --rerank --rerank-k 20
        itr search ~/photos/beach.jpg --subtract "people" --html beach.html
        itr search "beach" -0 | xargs -0 cp -t /tmp/beach
        itr search "harbour at dusk" --near 43.30,5.37,20 --camera pixel --sort date
        itr search clip.mp4 --at 12.5 --frames
    """
    from .library import Library
    from .query.request import SearchRequest
    from .show.output import err, is_tty, one_line, print_json
    from .show.results import Pictures, piped_lines, write_table

    if query is not None and not query.strip():
        raise UsageError("empty query")
    if text_only and no_text:
        raise UsageError("--text-only and --no-text exclude each other")
    if text_only and (threshold is not None or hash_):
        raise UsageError("--threshold and --hash rank by cosine: not with --text-only")
    protocol = preview_protocol.strip().lower()
    if protocol != "auto" and protocol not in _preview_protocols():
        raise UsageError(f"--preview-protocol {preview_protocol!r}: expected auto, "
                         f"{', '.join(_preview_protocols())}")
    preview = preview or protocol != "auto"
    if html == "-" and (json_ or null or paths_only):
        raise UsageError("--html - writes the page to stdout: not with --json, --paths or -0")
    request = SearchRequest.build(
        query, image=str(image) if image else None, text=text, add=add or (),
        subtract=subtract or (), top=top, in_dirs=[str(d) for d in in_dirs or []],
        threshold=threshold, after=after, before=before, camera=camera, near=near,
        globs=glob or (), min_size=min_size, kind=kind, sort=sort, auto_cut=auto_cut,
        exact=exact, hash_bits=hash_bits if hash_ else None, adapt=not no_adapt,
        text_match="only" if text_only else "none" if no_text else "auto", frames=frames,
        all_files=all_files, at=at, rerank=rerank, rerank_k=rerank_k, rerank_model=rerank_model,
        rerank_cache=not no_rerank_cache, device=device, precision=precision,
        text_precision=text_precision)
    out = sys.stdout
    table = not (json_ or null or paths_only) and html != "-"
    with _log_to_stderr(verbose), Library.open(db, readonly=True) as lib:
        result = lib.search(request, progress=_rerank_progress() if rerank else None)
        for h in result:
            if h.rerank_error:
                err(f"itr: not re-ranked (now unreadable) {one_line(h.path)}: {h.rerank_error}")
        if result.rerank_cache and result.rerank_cache["error"]:
            err(f"itr: re-rank feature cache not written: {result.rerank_cache['error']}")
        pictures = None
        if html is not None or (preview and table and is_tty(out)):
            pictures = Pictures(lib.store, lib.directory, result)
        try:
            if html is not None:
                try:
                    pictures.write_sheet(html)  # type: ignore[union-attr]
                except OSError as e:
                    raise UsageError(f"--html {html}: {e.strerror or e}") from None
                if html == "-":
                    return
            if not result and not (table and is_tty(out)) and (camera or near or glob or min_size
                                                                or kind):
                err("no results with these filters")  # on a terminal the table says "no results"
            if json_:
                print_json(result.to_json())
            elif null:
                out.write("".join(h.path + "\0" for h in result))
            elif paths_only:
                out.write("".join(h.path + "\n" for h in result))
            elif is_tty(out):
                if result.adapter and is_tty(sys.stderr):
                    err(f"text mapped by the library's {result.adapter} adapter (--no-adapt: without)")
                previews = None
                if preview and pictures is not None:
                    previews = pictures.previews(out, protocol=protocol, rows=preview_height)
                write_table(out, result, previews)
                if not result:
                    sys.stderr.write("no results\n")
            else:
                if preview:
                    err("itr: no image previews: stdout is not a terminal")
                out.write(piped_lines(result))
        finally:
            if pictures is not None:
                pictures.close()


@app.command("text")
def text_cmd(
    paths: Annotated[List[Path], typer.Argument(
        help="image files, or directories of them", metavar="PATH", exists=True,
        show_default=False)],
    db: DbOpt = None,
    include_hidden: IncludeHiddenOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Print the text read in images: from the library when indexed with --ocr, else read now

    One line of text per line read; with several images, a "==> PATH <==" header before
    each. --json: a list of {path, source, lines: [{text, box, confidence}]}. Reading
    needs itr-search[ocr]; an unreadable image is reported on stderr and makes the exit code 1.

    \b
    Example:
        itr text ~/photos/receipt.jpg
        itr text ~/photos/2023 --json > text.json
    """
    from .errors import LibraryError
    from .library import Library, read_text
    from .show.output import err, for_stream, one_line, print_json

    try:
        lib = Library.open(db, readonly=True)
    except LibraryError:
        lib = None  # no library: every image is read now
    try:
        results = read_text(paths, library=lib, include_hidden=include_hidden)
    finally:
        if lib is not None:
            lib.close()
    bad = [r for r in results if "error" in r]
    if json_:
        print_json(results)
    else:
        out = []
        shown = for_stream(sys.stdout)  # a terminal gets no control character
        for r in results:
            if "error" in r:
                continue
            if len(results) > 1:
                out.append(f"==> {shown(r['path'])} <==")
            out += [shown(ln["text"]) for ln in r["lines"]]
        sys.stdout.write("".join(line + "\n" for line in out))
    if not quiet:
        for r in bad:
            err(f"{one_line(r['path'])}: {r['error']}")
    if bad:
        raise typer.Exit(ExitCode.ERROR)


def _encoder_line(data: dict) -> str:
    """``itr info``'s encoder line: the runtime that encoded the library, and what this
    machine's export timed (the reason ``auto`` picks a runtime here)."""
    runtime, timing = data["image_runtime"], data.get("image_runtime_timing")
    line = f"images by {runtime}" if runtime else "-"
    if timing:
        line += (f" (timed here: onnxruntime {timing['onnxruntime']:.1f} img/s, torch "
                 f"{timing['torch']:.1f}; fp32 indexing here uses {timing['chosen']})")
    return line


@app.command()
def info(db: DbOpt = None, json_: JsonOpt = False, verbose: VerboseOpt = False) -> None:
    """Show the library's location, model, counts, indexed roots and size on disk

    \b
    Example:
        itr info --json
    """
    from .library import Library
    from .show.output import for_stream, human_bytes, print_json
    from .show.thumbs import cache_stats, cap_bytes_from_env

    with Library.open(db, readonly=True) as lib:
        data = lib.info()
        data["thumbnail_cache"] = {**cache_stats(lib.directory), "cap_bytes": cap_bytes_from_env()}
    if json_:
        print_json(data)
        return
    lines = [
        ("library", data["library"]),
        ("model", data["model"] or f"(none yet; new libraries: {data['default_model']})"),
        ("revision", data["model_revision"] or "-"),
        ("dimension", str(data["dim"] or "-")),
        ("precision", data["precision"] or "-"),
        ("encoder", _encoder_line(data)),
        ("files", str(data["files"])),
        ("metadata", "{gps} with GPS, {camera} with camera, {taken_at} with capture time"
                     .format(**data["metadata"])),
        ("videos", f"{data['videos']} ({data['frames']} frames)"),
        ("roots", ", ".join(data["roots"]) or "-"),
        ("text", ("onnx (fast cold search)" + (", and its int8 copy" if data["text_int8"] else ""))
         if data["fast_text_search"] else "torch (no ONNX export)"),
        ("search", f"HNSW ef {data['search_ef']} (recall@10 {data['search_recall']:.3f} on "
                   "text-like queries)" if data["search_ef"] else "HNSW ef 128 (not measured yet)"),
        ("adapter", _adapter_line(data["adapter"])),
        ("ocr", (f"on: {data['ocr']['images_read']} images read, {data['ocr']['with_text']} with "
                 f"text ({data['ocr']['lines']} lines), {data['ocr']['failed']} failed")
         if data["ocr"]["enabled"] else "off (itr index --ocr reads the text in images)"),
        ("size", human_bytes(data["sizes"]["total"])),
        ("storage", _storage_line(data["storage"])),
        ("thumbs", f"{data['thumbnail_cache']['thumbnails']} "
                   f"({human_bytes(data['thumbnail_cache']['bytes'])} of "
                   f"{human_bytes(data['thumbnail_cache']['cap_bytes'])})"),
    ]
    # a terminal gets no control character of a path; a pipe gets the paths exactly (not
    # typer.echo, which drops what looks like a colour code when piped)
    shown = for_stream(sys.stdout)
    sys.stdout.write("".join(f"{k + ':':<11}{shown(v)}\n" for k, v in lines))


def _storage_line(st: dict) -> str:
    per = f"{st['bytes_per_image']:,} bytes per image" if st["bytes_per_image"] else "empty"
    line = f"{per}; vectors {st['vector_dtype']}, {st['page_size'] // 1024} KiB pages"
    return line if st["compact"] else line + " (run 'itr check --compact' to store it densely)"


def _adapter_line(a: dict | None) -> str:
    if a is None:
        return "none (itr adapt PAIRS fits one)"
    from .query.adapt import Candidate

    cv = a["cv"]
    line = (f"{Candidate(a['method'], a['params']).label()} on {a['pairs']} pairs "
            f"({a['images']} images) of {a['source']}, pairs hash {a['pairs_hash'][:12]}; "
            f"held-out text->image R@1 {cv['baseline']['R@1']:.1f} -> {cv['adapted']['R@1']:.1f}")
    return line if a["active"] else line + " (fitted for another model: not used)"


@app.command()
def adapt(
    pairs: Annotated[Optional[Path], typer.Argument(
        help="captioned photos: Karpathy or COCO captions JSON, image,caption CSV, or a "
             "folder of images + .txt", metavar="PAIRS", show_default=False)] = None,
    images: Annotated[Optional[Path], typer.Option("--images", metavar="DIR", file_okay=False,
                      help="directory the pairs' image paths are relative to [default: "
                           "the file's directory]", show_default=False)] = None,
    format_: DatasetFormatOpt = None,
    split: Annotated[Optional[str], typer.Option("--split",
                     help="Karpathy split to fit on [default: test]", show_default=False)] = None,
    limit: LimitOpt = None,
    method: Annotated[Optional[List[str]], typer.Option(
        "--method", metavar="METHOD",
        help="ridge, procrustes or cca; repeat to choose among several [default: all three]",
        show_default=False)] = None,
    folds: Annotated[int, typer.Option("--folds", min=2,
                     help="cross-validation folds (grouped by image)")] = 5,
    remove: Annotated[bool, typer.Option("--remove", help="drop the library's adapter")] = False,
    no_cache: NoCacheOpt = False,
    db: DbOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Fit a map from text queries towards your images on your own captioned photos

    Embeds the pairs with the library's model (its stored vectors where it has the images),
    fits ridge, orthogonal Procrustes and regularised CCA maps, and keeps the one with the
    best held-out text->image recall in k-fold cross-validation (folds never share an
    image); nothing is stored when no map beats the model as it is. The map is applied to
    text queries only (the image vectors and the graph are unchanged); itr search --no-adapt
    compares.

    \b
    Example:
        itr adapt catalogue.csv --images ~/museum/photos
        itr search "crimson orb" --no-adapt
        itr adapt --remove
    """
    from .library import Library
    from .show.output import BarProgress, err, is_tty, one_line, print_json

    if remove:
        if pairs is not None:
            raise UsageError("--remove takes no PAIRS")
        with Library.open(db) as lib:
            removed = lib.remove_adapter()
        if json_:
            print_json({"removed": removed})
        elif not quiet:
            err("adapter removed" if removed else "no adapter to remove")
        return
    if pairs is None:
        raise UsageError("give PAIRS (captioned photos), or --remove")
    from .evaluation.datasets import load
    from .query.adapt import Candidate

    ds = load(pairs, format=format_, images=images, split=split, limit=limit)
    if not quiet and ds.missing_report():
        err(f"warning: {ds.missing_report()}")
    progress = BarProgress("encoding") if not quiet and is_tty(sys.stderr) else None
    with Library.open(db) as lib:
        r = lib.adapt(ds, methods=method, folds=folds, device=device, precision=precision,
                      batch_size=batch_size, workers=workers, cache=not no_cache,
                      progress=progress)
        where = lib.directory
    cv = r["cv"]
    if json_:
        print_json(r)
    else:
        rows = [("method", "params", "R@1", "R@5", "R@10")]
        rows += [(m["method"], Candidate(m["method"], m["params"]).label()[len(m["method"]) + 1:],
                  f"{m['R@1']:.1f}", f"{m['R@5']:.1f}", f"{m['R@10']:.1f}") for m in cv["methods"]]
        w = [max(len(row[j]) for row in rows) for j in range(5)]
        for row in rows:
            typer.echo("  ".join([row[0].ljust(w[0]), row[1].ljust(w[1])]
                                 + [c.rjust(w[j + 2]) for j, c in enumerate(row[2:])]).rstrip())
        picked = Candidate(r["method"], r["params"]).label()
        base, got = cv["baseline"], cv["adapted"]
        basis = (f"held-out text->image recall, mean of {cv['folds']} folds over {cv['images']} "
                 f"images and {cv['pairs']} pairs")
        if r["stored"]:
            typer.echo(f"picked {picked}: best {basis} (R@1 {base['R@1']:.1f} -> "
                       f"{got['R@1']:.1f}, R@5 {base['R@5']:.1f} -> {got['R@5']:.1f})")
        else:
            typer.echo(f"picked none: no map beats the model as it is on {basis}")
    if not quiet:
        for note in r["notes"]:
            err(f"note: {note}")
        for s_ in r["skipped"][:20]:
            err(f"skipped {one_line(s_['path'])}: {s_['error']}")
        if len(r["skipped"]) > 20:
            err(f"... and {len(r['skipped']) - 20} more skipped (see --json)")
        if r["stored"]:
            err(f"stored in {where} (pairs hash {r['pairs_hash'][:12]}); itr search maps text "
                "queries with it (--no-adapt: without)")
        else:
            err("nothing stored; the library's adapter, if any, is unchanged")


@app.command("eval")
def eval_cmd(
    dataset: Annotated[Path, typer.Argument(
        help="Karpathy or COCO captions JSON, image,caption CSV, or a folder of images + .txt",
        metavar="DATASET", show_default=False)],
    images: Annotated[Optional[Path], typer.Option("--images", metavar="DIR", file_okay=False,
                      help="directory the dataset's image paths are relative to [default: "
                           "the dataset file's directory]", show_default=False)] = None,
    format_: DatasetFormatOpt = None,
    split: Annotated[Optional[str], typer.Option("--split",
                     help="Karpathy split to evaluate [default: test]", show_default=False)] = None,
    limit: LimitOpt = None,
    model: Annotated[Optional[List[str]], typer.Option(
        "-m", "--model", envvar="ITR_MODEL", autocompletion=_complete_model, metavar="MODEL",
        help="preset name, Hugging Face id or local directory; repeat to compare models "
             "[default: laion-b32]", show_default=False)] = None,
    recall: Annotated[str, typer.Option("-k", "--recall", metavar="K,K,...",
                      help="the K of R@K")] = "1,5,10",
    folds: Annotated[Optional[int], typer.Option("--folds", min=1,
                     help="mean over this many image folds (5 on COCO 5K: the 1K protocol) "
                          "[default: 1; 5 when --adapt's pairs share images with DATASET]",
                     show_default=False)] = None,
    adapt: Annotated[Optional[Path], typer.Option(
        "--adapt", metavar="PAIRS", show_default=False,
        help="add +adapt rows: rank each fold with a map fitted on these pairs (same "
             "formats and --images) minus those showing the fold's images")] = None,
    ann: Annotated[bool, typer.Option("--ann", help="add rows for HNSW search")] = False,
    hash_bits: Annotated[Optional[str], typer.Option("--hash-bits", metavar="B,B,...",
                         help="add rows for B-bit binary codes, pure Hamming and re-ranked",
                         show_default=False)] = None,
    rerank: Annotated[bool, typer.Option(
        "--rerank", help="add exact+rerank rows: each query's top K re-scored by an "
                         "image-text matching model")] = False,
    rerank_k: Annotated[int, typer.Option("--rerank-k", min=1, metavar="K",
                        help="how many candidates --rerank re-scores per query")] = DEFAULT_RERANK_K,
    rerank_model: RerankModelOpt = None,
    no_cache: NoCacheOpt = False,
    db: Annotated[Optional[Path], typer.Option(
        "--db", file_okay=False, show_default=False,
        help="reuse the vectors of this library where its model matches (ITR_DB is not read)")] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    text_precision: Annotated[Optional[str], typer.Option(
        "--text-precision", metavar="fp32|int8", show_default=False,
        callback=lambda v: v if v is None else _check_text_precision(v),
        help="embed the captions as itr search does: the exported text tower (fp32) or its "
             "int8 copy [default: the model's own text tower at --precision]")] = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Measure text->image and image->text recall@K on an image-caption dataset

    Prints R@K and the median rank in both directions, and rsum, one row per model and
    method (exact; with --ann, HNSW; with --hash-bits, binary codes; with --adapt, the
    query map of itr adapt, cross-validated; with --rerank, the exact top K re-scored by an
    image-text matching model). Embeddings are cached, so a second run encodes nothing.

    \b
    Example:
        itr eval dataset_flickr30k.json --images flickr30k-images
        itr eval dataset_flickr30k.json --images flickr30k-images --rerank --rerank-k 16
        itr eval dataset_coco.json --images coco --folds 5 --ann --hash-bits 64,128
        itr eval captions.csv -m laion-b32 -m openai-b32 --json
        itr eval catalogue.csv --adapt catalogue.csv
    """
    from .evaluation.datasets import load
    from .evaluation.evaluate import format_table, parse_int_list, summary_line
    from .library import Library, evaluate
    from .show.output import BarProgress, err, is_tty, print_json

    ks = parse_int_list(recall, "--recall")
    bits = parse_int_list(hash_bits, "--hash-bits") if hash_bits else ()
    ds = load(dataset, format=format_, images=images, split=split, limit=limit)
    if not quiet and ds.missing_report():
        err(f"warning: {ds.missing_report()}")
    pairs = None
    if adapt is not None:
        pairs = load(adapt, images=images)
        if not quiet and pairs.missing_report():
            err(f"warning: --adapt: {pairs.missing_report()}")
    progress = BarProgress("encoding") if not quiet and is_tty(sys.stderr) else None
    lib = Library.open(db, readonly=True) if db is not None else None
    try:
        result = evaluate(ds, model or [None], library=lib, ks=ks, ann=ann, hash_bits=bits,
                          folds=folds, adapt=pairs, device=device, precision=precision,
                          batch_size=batch_size, workers=workers, cache=not no_cache,
                          progress=progress, rerank=rerank, rerank_k=rerank_k,
                          rerank_model=rerank_model, text_precision=text_precision,
                          rerank_progress=BarProgress("re-ranking")
                          if rerank and not quiet and is_tty(sys.stderr) else None)
    finally:
        if lib is not None:
            lib.close()
    if json_:
        print_json(result.to_json())
    else:
        typer.echo(format_table(result, aligned=is_tty(sys.stdout)))
    if not quiet:
        for note in result.notes[:20]:
            err(f"note: {note}")
        _print_skipped(result.skipped)
        err(summary_line(result))


@app.command()
def check(
    db: DbOpt = None,
    repair: Annotated[bool, typer.Option("--repair",
                      help="fix what is found: rebuild the graph, drop orphan or damaged "
                           "vectors, remove leftovers of killed runs")] = False,
    prune: Annotated[bool, typer.Option("--prune",
                     help="with --repair: also forget indexed files that no longer exist")] = False,
    no_files: Annotated[bool, typer.Option("--no-files",
                        help="do not look for vanished or changed files on disk")] = False,
    compact: Annotated[bool, typer.Option("--compact",
                       help="first store a library made before 0.2.0 densely: float16 "
                            "vectors in 16 KiB pages (resumable)")] = False,
    wait: Annotated[float, typer.Option("--wait", min=0, metavar="SECONDS",
                    help="with --repair or --compact: wait this long for a running index "
                         "to finish")] = 0.0,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Verify the library: database, rows vs vectors vs graph, vanished files

    Exit code 1 when an error is found (after --repair: when one remains); vanished files
    are a warning, not an error. Runs beside a running `itr index` (it reads the last commit).
    --compact converts, then checks; interrupted, it goes on where it stopped next time.

    \b
    Example:
        itr check
        itr check --repair --prune -q
        itr check --compact
    """
    from .library import Library
    from .show.output import BarProgress, LogProgress, err, human_bytes, is_tty, one_line, print_json

    if prune and not repair:
        raise UsageError("--prune goes with --repair")
    done = None
    with Library.open(db, readonly=not (repair or compact)) as lib:
        if compact:
            progress = None if quiet else (
                BarProgress("compacting", unit="vector", rate="vectors/s") if is_tty(sys.stderr)
                else LogProgress(unit="vectors", rate="vectors/s"))
            done = lib.compact(progress=progress, wait=wait)
            if not quiet:
                err(f"compacted: {done.converted} vectors to float16, database "
                    f"{human_bytes(done.bytes_before)} -> {human_bytes(done.bytes_after)} "
                    f"({done.page_size // 1024} KiB pages) in {done.seconds:.1f}s"
                    if done.converted or done.rewritten else "compacted: already dense")
        report = lib.repair(prune=prune, wait=wait) if repair else lib.check(files=not no_files)
    if json_:
        print_json({**report.to_json(), **({"compact": done.to_json()} if done else {})})
    if not quiet:
        for line in report.repaired:
            err(f"repaired: {line}")
        for f in report.findings:
            err(f"{f.severity}: {f.message}")
            for ex in f.examples:
                err(f"  {one_line(ex)}")
            if f.count > len(f.examples) and f.examples:
                err(f"  ... and {f.count - len(f.examples)} more")
        graph = report.graph_file or "none saved"
        err(f"{'ok' if report.ok else 'PROBLEMS FOUND'}: {report.files} files, {report.vectors} "
            f"vectors, graph {graph}" + ("" if report.ok or repair else
                                         "; run 'itr check --repair' to fix"))
    if not report.ok:
        raise typer.Exit(ExitCode.ERROR)


@app.command("models")
def models_cmd(json_: JsonOpt = False) -> None:
    """List the model presets with size, CPU cost, published R@1 and licence, then the re-rankers

    \b
    Example:
        itr models
    """
    from .embed.models import DEFAULT_PRESET, DEFAULT_RERANK_PRESET
    from .show.output import print_json

    if json_:
        print_json([{"kind": "encoder", "name": p.name, "model": p.hub_id, "params_m": p.params_m,
                     "flickr30k_t2i_r1": p.flickr_t2i_r1, "flickr30k_i2t_r1": p.flickr_i2t_r1,
                     "coco_t2i_r1": p.coco_t2i_r1, "coco_i2t_r1": p.coco_i2t_r1,
                     "revision": p.revision, "license": p.license, "cpu_cost": p.cpu_cost,
                     "note": p.note, "default": p.name == DEFAULT_PRESET} for p in PRESETS]
                   + [{"kind": "reranker", "name": p.name, "model": p.hub_id,
                       "revision": p.revision, "params_m": p.params_m, "input_px": p.input_px,
                       "coco_t2i_r1": p.coco_t2i_r1, "coco_i2t_r1": p.coco_i2t_r1,
                       "flickr30k_t2i_r1": p.flickr_t2i_r1, "flickr30k_i2t_r1": p.flickr_i2t_r1,
                       "default": p.name == DEFAULT_RERANK_PRESET} for p in RERANK_PRESETS])
        return
    fmt = "{:<2}{:<21}{:<54}{:>7}{:>8}{:>10}{:>6}{:>7}{:>6}  {}"
    typer.echo(fmt.format("", "", "", "", "CPU", "Flickr30k", "", "COCO", "", "").rstrip())
    typer.echo(fmt.format("", "NAME", "MODEL", "PARAMS", "COST", "T2I", "I2T", "T2I", "I2T",
                          "LICENCE"))
    for p in PRESETS:
        cost = ("-" if p.cpu_cost is None else
                f"{p.cpu_cost:.2f}x" if p.cpu_cost < 10 else f"{p.cpu_cost:.1f}x")
        typer.echo(fmt.format("*" if p.name == DEFAULT_PRESET else "", p.name, p.hub_id,
                              f"{p.params_m}M", cost, _pct(p.flickr_t2i_r1),
                              _pct(p.flickr_i2t_r1), _pct(p.coco_t2i_r1), _pct(p.coco_i2t_r1),
                              p.license))
    typer.echo("\n* default.  Published zero-shot recall@1, percent: Flickr30k 1K and COCO 5K "
               "test (sources: itrcli/embed/models.py). CPU cost: image tower time per image "
               "relative to laion-b32 (bench/model_cost.py). hf-hub: models need "
               "pip install 'itr-search[openclip]'.")
    typer.echo("\nRe-rankers (itr search --rerank, --rerank-model):")
    rfmt = "{:<2}{:<20}{:<38}{:>7}{:>11}{:>11}"
    typer.echo(rfmt.format("", "NAME", "MODEL", "PARAMS", "T2I R@1", "I2T R@1"))
    for p in RERANK_PRESETS:
        typer.echo(rfmt.format("*" if p.name == DEFAULT_RERANK_PRESET else "", p.name, p.hub_id,
                              f"{p.params_m}M", _pct(p.flickr_t2i_r1), _pct(p.flickr_i2t_r1)))
    typer.echo("\n* default.  R@1: published Flickr30k 1K test, percent, COCO-fine-tuned model "
               "re-ranking its own top 128.")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


@app.command()
def path(db: DbOpt = None) -> None:
    """Print the library directory that commands would use

    \b
    Example:
        du -sh "$(itr path)"
    """
    from .paths import default_library_dir

    typer.echo(str((db or default_library_dir()).expanduser().absolute()))


@app.command()
def serve(
    db: DbOpt = None,
    host: Annotated[str, typer.Option(
        "--host", help="address to listen on; anything but loopback needs --token")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535,
                                      help="port to listen on (0: a free one)")] = 8765,
    token: Annotated[Optional[str], typer.Option(
        "--token", envvar="ITR_SERVE_TOKEN", show_default=False,
        help="require this token (Authorization: Bearer, or the cookie that /?token= "
             "sets)")] = None,
    open_: Annotated[bool, typer.Option("--open", help="open the page in a web browser")] = False,
    watch: Annotated[Optional[List[Path]], typer.Option(
        "--watch", metavar="PATH", exists=True, show_default=False,
        help="index PATH now and after every change under it (repeatable)")] = None,
    rescan: Annotated[float, typer.Option(
        "--rescan", min=1, metavar="SECONDS",
        help="with --watch: also rescan this often (file events miss network mounts)")] = 600.0,
    cors: Annotated[Optional[str], typer.Option(
        "--cors", metavar="ORIGIN", show_default=False,
        help="let this web origin call the API (e.g. a clip-retrieval front end)")] = None,
    allow_host: Annotated[Optional[List[str]], typer.Option(
        "--allow-host", metavar="NAME", show_default=False,
        help="also answer to this Host name (a reverse proxy's; repeatable)")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    text_precision: TextPrecisionOpt = "fp32",
    include_hidden: IncludeHiddenOpt = False,
    exclude: ExcludeOpt = None,
    follow_symlinks: FollowSymlinksOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Serve the library on a local web page and a JSON API, warm and kept current

    Prints its URL on stderr; Ctrl-C or SIGTERM stops it (exit 0). Binds 127.0.0.1
    unless --host says otherwise, which then needs --token. Searches load the text tower
    and the graph once, and see each commit of a concurrent itr index (cron) at once.
    With --watch the folders are indexed now and again after each change (file events,
    and a rescan every --rescan seconds). The API: /api/search?q=... (the options of
    itr search by name), /api/thumb/ID, /api/file/ID, /api/info, clip-retrieval's
    /knn-service; described at /docs. Needs itr-search[serve].

    \b
    Example:
        itr serve --open
        itr serve --watch ~/photos --exclude '*.tmp'
        ITR_SERVE_TOKEN=$(openssl rand -hex 16) itr serve --host 0.0.0.0
        curl 'http://127.0.0.1:8765/api/search?q=harbour+at+dusk&n=5'
    """
    from importlib.util import find_spec

    from .paths import default_library_dir
    from .serve.security import check_bind

    check_bind(host, token)
    missing = [m for m in ("starlette", "uvicorn", "multipart", "watchfiles") if find_spec(m) is None]
    if missing:
        from .errors import ItrError

        raise ItrError(f"itr serve needs {', '.join(missing)}: pip install 'itr-search[serve]'")
    from .serve.app import ServeOptions
    from .serve.server import serve as run
    from .serve.watch import WatchOptions

    directory = (db or default_library_dir()).expanduser().absolute()
    options = ServeOptions(directory, host=host, port=port, token=token, cors=cors,
                           allow_hosts=tuple(allow_host or ()), text_precision=text_precision)
    watching = None
    if watch:
        watching = WatchOptions([str(p) for p in watch], model=model, device=device,
                                precision=precision, exclude=list(exclude or ()),
                                include_hidden=include_hidden,
                                follow_symlinks=follow_symlinks, rescan=rescan)
    elif model or exclude or include_hidden or follow_symlinks:
        raise UsageError("--model, --exclude, --include-hidden and --follow-symlinks go "
                         "with --watch")
    with _log_to_stderr(verbose):
        run(options, watch=watching, open_browser=open_)


# --- entry point -----------------------------------------------------------------------

def _stop_signals() -> list[int]:
    """The signals that stop a run as Ctrl-C does: SIGTERM, and on Windows Ctrl-Break."""
    return [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGBREAK", None))
            if s is not None]


def _stop_on_sigterm(seen: list[int]) -> dict[int, Any] | None:
    """Make SIGTERM (kill, `timeout`, systemd, cron wrappers) and Ctrl-Break (Windows) stop
    a run the way Ctrl-C does: the batch in progress rolled back, committed ones kept, the
    graph saved.  A second one ends the process at once (as safe as kill -9).  Returns the
    previous handlers, or None when handlers cannot be set (not the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum, frame):
        seen.append(signum)
        signal.signal(signum, signal.SIG_DFL)
        raise Terminated()

    return {s: signal.signal(s, on_term) for s in _stop_signals()}


def _safe_console() -> None:
    """Names that the console's encoding cannot show never stop the output: on Windows,
    piped output is UTF-8 (as on the other systems, so scripts get exact names); any
    stream whose encoding is not UTF-8 writes what it cannot encode as escapes."""
    import codecs

    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is None:
            continue
        try:
            if os.name == "nt" and not stream.isatty():
                reconfigure(encoding="utf-8")
            elif codecs.lookup(stream.encoding or "ascii").name != "utf-8":
                reconfigure(errors="backslashreplace")
        except (LookupError, ValueError, OSError):
            pass


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: maps errors to one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["search"], ["serve"]) and "numpy" not in sys.modules:
        # one matrix-vector product needs no BLAS thread pool, and starting one costs a
        # cold search tens of milliseconds
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    verbose = any(a in ("-v", "--verbose") for a in args)
    # Pillow warns of an image past the first step of its bomb guard (89 MP by default: a
    # 100 MP medium-format photo); in this program a file decodes or gets a one-line reason
    # (the library leaves Pillow's warnings and its guard to the program that imports it)
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit",
                            module=r"PIL\.")
    # corrupt EXIF and odd palettes make Pillow warn; unattended runs must not print noise
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    code: int = ExitCode.OK
    if "_ITR_COMPLETE" in os.environ:
        # Typer(add_completion=False) keeps --install-completion out of every help page,
        # and leaves the shell completion handlers unregistered: register them here
        from typer.completion import completion_init

        completion_init()
    _safe_console()
    terminated: list[int] = []
    previous = _stop_on_sigterm(terminated)
    try:
        rv = app(args=args, prog_name="itr", standalone_mode=False)
        code = rv if isinstance(rv, int) else ExitCode.OK
    except typer.Exit as e:
        code = e.exit_code
    except typer.TyperException as e:  # usage errors: usage + the message, exit 2
        show = getattr(e, "show", None)
        if show is not None:
            show()
        else:
            sys.stderr.write(f"Error: {e}\n")
        code = getattr(e, "exit_code", ExitCode.USAGE)
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("terminated\n" if terminated else "interrupted\n")
        code = ExitCode.INTERRUPTED
    except ItrError as e:
        if verbose:
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"Error: {_one_line(str(e))}\n")  # it may name a file
        code = e.exit_code
    except BrokenPipeError:
        # `itr search ... | head`: the reader left; that is not an error
        _silence_stdout()
        code = ExitCode.OK
    except Exception as e:  # a bug
        if verbose:
            raise
        sys.stderr.write(
            f"Error: unexpected {type(e).__name__}: {_one_line(str(e))} (this is a bug; run "
            "again with -v for the traceback)\n"
        )
        code = ExitCode.ERROR
    finally:
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)
    if terminated and code == ExitCode.INTERRUPTED:
        code = ExitCode.TERMINATED
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    if argv is None:
        # The process is about to end: spare its exit the collector's walks over every
        # object left (torch and transformers make ~10^6: 2.0 s of an index run's exit
        # here, 0.4 s frozen; a cold search's exit 0.15 s, 0.05 s frozen).  Only for the
        # process itself; main([...]) called from Python changes nothing.
        import gc

        gc.freeze()
    sys.exit(int(code))


def _one_line(text: str) -> str:
    from .show.output import one_line

    return one_line(text)


def _rerank_progress():
    from .embed.rerank import SlowProgress  # no torch import there until a model loads

    return SlowProgress()


def _preview_protocols() -> tuple[str, ...]:
    from .show.preview import PROTOCOLS  # only when asked: the module imports Pillow

    return PROTOCOLS


def _silence_stdout() -> None:
    # Python flushes stdout at exit; after EPIPE that would print a second error
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


__all__ = ["app", "main", "UsageError"]
