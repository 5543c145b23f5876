"""The ``itr`` command line: parses arguments, calls :mod:`itrcli.library`, formats output.

No heavy import at module level: ``itr --help`` and shell completion must stay instant.
Library errors become ``Error: ...`` on stderr with the exit codes of
:class:`itrcli.errors.ExitCode`; tracebacks only with ``-v``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import __version__
from .errors import ExitCode, ItrError, UsageError
from .models import PRESETS, preset_names

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
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value or ""):
        raise typer.BadParameter("expected auto, cpu, cuda or cuda:N")
    return value


def _check_precision(value: str) -> str:
    if value not in ("auto", "fp32", "bf16", "fp16"):
        raise typer.BadParameter("expected auto, fp32, bf16 or fp16")
    return value


DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N",
                                        callback=_check_device)]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto, fp32, bf16 or fp16",
                                           callback=_check_precision)]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="images per encoder batch")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="no progress or summary on stderr")]
VerboseOpt = Annotated[bool, typer.Option("-v", "--verbose", help="tracebacks for unexpected errors")]


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
    workers: Annotated[Optional[int], typer.Option("--workers", min=1,
                       help="decode threads [default: CPUs, at most 4]", show_default=False)] = None,
    include_hidden: Annotated[bool, typer.Option("--include-hidden",
                              help="index hidden files and directories too")] = False,
    exclude: Annotated[Optional[List[str]], typer.Option("--exclude",
                       help="skip names or paths matching GLOB (repeatable)",
                       metavar="GLOB")] = None,
    follow_symlinks: Annotated[bool, typer.Option("--follow-symlinks",
                               help="follow symlinked directories (never loops)")] = False,
    no_prune: Annotated[bool, typer.Option("--no-prune",
                        help="keep library entries of files deleted from disk")] = False,
    reindex: Annotated[bool, typer.Option("--reindex",
                       help="re-embed everything (e.g. with another --model)")] = False,
    wait: Annotated[float, typer.Option("--wait", min=0, metavar="SECONDS",
                    help="wait this long for another index run to finish")] = 0.0,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Add new and changed images under PATH to the library, drop deleted ones

    Unchanged files (same size and mtime) are not read again; moved or renamed files keep
    their vectors; files that cannot be read are listed and skipped (exit code stays 0).

    \b
    Example:
        itr index ~/photos --exclude '*.thumb.jpg' -q
    """
    from .library import Library
    from .output import BarProgress, LogProgress, err, index_summary_line, is_tty, print_json

    progress = None if quiet else (BarProgress() if is_tty(sys.stderr) else LogProgress())
    with Library.open(db, create=True) as lib:
        s = lib.index([str(p) for p in paths], model=model, device=device, precision=precision,
                      batch_size=batch_size, workers=workers, include_hidden=include_hidden,
                      exclude=exclude or [], follow_symlinks=follow_symlinks,
                      prune=not no_prune, reindex=reindex, wait=wait, progress=progress)
    if json_:
        print_json(s.to_json())
    if not quiet:
        for e in s.errors[:20]:
            err(f"skipped {e['path']}: {e['error']}")
        if len(s.errors) > 20:
            err(f"... and {len(s.errors) - 20} more skipped (see --json)")
        err(("interrupted: " if s.interrupted else "") + index_summary_line(s))
    if s.interrupted:
        raise typer.Exit(ExitCode.INTERRUPTED)


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
    exact: Annotated[bool, typer.Option("--exact", help="score every image (no HNSW)")] = False,
    paths_only: Annotated[bool, typer.Option("--paths", help="print paths only, one per line")] = False,
    null: Annotated[bool, typer.Option("-0", "--null", help="NUL-terminated paths (for xargs -0)")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Rank the library's images against a text or image query

    On a terminal: a table. Piped: score<TAB>path lines. Also --paths, -0 and --json.

    \b
    Example:
        itr search "two children on a lawn" -n 5
        itr search ~/photos/beach.jpg --subtract "people"
        itr search "beach" -0 | xargs -0 cp -t /tmp/beach
    """
    from .library import Library
    from .output import is_tty, print_json

    if query is not None and not query.strip():
        raise UsageError("empty query")
    with Library.open(db, readonly=True) as lib:
        hits = lib.search(query, image=str(image) if image else None, text=text,
                          add=add or [], subtract=subtract or [], top=top,
                          in_dirs=[str(d) for d in in_dirs or []], threshold=threshold,
                          after=after, before=before, exact=exact, device=device,
                          precision=precision)
        model = lib.model
    out = sys.stdout
    if json_:
        q = query if query is not None else (str(image) if image else text)
        print_json({"query": q, "model": model, "results": [h.to_json() for h in hits]})
    elif null:
        out.write("".join(h.path + "\0" for h in hits))
    elif paths_only:
        out.write("".join(h.path + "\n" for h in hits))
    elif is_tty(out):
        width = max([len(str(len(hits)))] + [1])
        for h in hits:
            date = (h.taken_at or "")[:10] or "-"
            out.write(f"{h.rank:>{width}}  {h.score:.4f}  {date:<10}  {h.path}\n")
        if not hits:
            sys.stderr.write("no results\n")
    else:
        out.write("".join(f"{h.score:.4f}\t{h.path}\n" for h in hits))


@app.command()
def info(db: DbOpt = None, json_: JsonOpt = False, verbose: VerboseOpt = False) -> None:
    """Show the library's location, model, counts, indexed roots and size on disk

    \b
    Example:
        itr info --json
    """
    from .library import Library
    from .output import human_bytes, print_json

    with Library.open(db, readonly=True) as lib:
        data = lib.info()
    if json_:
        print_json(data)
        return
    lines = [
        ("library", data["library"]),
        ("model", data["model"] or "(none yet)"),
        ("revision", data["model_revision"] or "-"),
        ("dimension", str(data["dim"] or "-")),
        ("precision", data["precision"] or "-"),
        ("files", str(data["files"])),
        ("roots", ", ".join(data["roots"]) or "-"),
        ("size", human_bytes(data["sizes"]["total"])),
    ]
    for k, v in lines:
        typer.echo(f"{k + ':':<11}{v}")


@app.command("models")
def models_cmd(json_: JsonOpt = False) -> None:
    """List the named model presets with size and published Flickr30k R@1

    \b
    Example:
        itr models
    """
    from .models import DEFAULT_PRESET
    from .output import print_json

    if json_:
        print_json([{"name": p.name, "model": p.hub_id, "params_m": p.params_m,
                     "flickr30k_t2i_r1": p.flickr_t2i_r1, "flickr30k_i2t_r1": p.flickr_i2t_r1,
                     "default": p.name == DEFAULT_PRESET} for p in PRESETS])
        return
    fmt = "{:<2}{:<16}{:<42}{:>7}{:>11}{:>11}"
    typer.echo(fmt.format("", "NAME", "MODEL", "PARAMS", "T2I R@1", "I2T R@1"))
    for p in PRESETS:
        typer.echo(fmt.format("*" if p.name == DEFAULT_PRESET else "", p.name, p.hub_id,
                              f"{p.params_m}M", _pct(p.flickr_t2i_r1), _pct(p.flickr_i2t_r1)))
    typer.echo("\n* default.  R@1: published zero-shot Flickr30k 1K test, percent.")


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


# --- entry point -----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: maps errors to one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    verbose = any(a in ("-v", "--verbose") for a in args)
    code: int = ExitCode.OK
    if "_ITR_COMPLETE" in os.environ:
        # Typer(add_completion=False) keeps --install-completion out of every help page,
        # and leaves the shell completion handlers unregistered: register them here
        from typer.completion import completion_init

        completion_init()
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
        sys.stderr.write("interrupted\n")
        code = ExitCode.INTERRUPTED
    except ItrError as e:
        if verbose:
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"Error: {e}\n")
        code = e.exit_code
    except BrokenPipeError:
        # `itr search ... | head`: the reader left; that is not an error
        _silence_stdout()
        code = ExitCode.OK
    except Exception as e:  # a bug
        if verbose:
            raise
        sys.stderr.write(
            f"Error: unexpected {type(e).__name__}: {e} (this is a bug; run again with -v "
            "for the traceback)\n"
        )
        code = ExitCode.ERROR
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    sys.exit(int(code))


def _silence_stdout() -> None:
    # Python flushes stdout at exit; after EPIPE that would print a second error
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


__all__ = ["app", "main", "UsageError"]
