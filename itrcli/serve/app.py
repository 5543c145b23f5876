"""The web application of ``itr serve`` (Starlette): the JSON API, clip-retrieval's
``clip back`` routes and the page.

Every route that reads the library hands its work to the library's thread
(:class:`~itrcli.serve.live.LiveLibrary`), which looks a file up by its id: no path from a
client reaches the file system.  Errors are ``{"error": "..."}`` with a 4xx status
(UsageError 400, unknown id or a file gone 404, too large 413, not an image 415) or 503
(no library, an empty one, a model that cannot load); anything unexpected is a 500 with
one line on stderr, never a traceback, and the server goes on.  The API is described in
``docs/serve.md``.
"""

from __future__ import annotations

import mimetypes
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from .. import __version__
from . import answers, params
from .live import LiveLibrary
from .security import Guard

STATIC = Path(__file__).parent / "static"
#: Thumbnail boxes a client may ask for (each is cached: a free size would fill the cache).
THUMB_SIZES = (128, 256, 512, 1024, 2048)
DEFAULT_THUMB = 256
#: Largest upload (an image to search by), in bytes.
UPLOAD_MAX_BYTES = 32 << 20
#: Seconds between two trims of the thumbnail cache to its cap.
TRIM_EVERY = 60.0


@dataclass
class ServeOptions:
    """What ``itr serve`` was asked for (see ``itr serve --help``)."""

    directory: Path
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    cors: str | None = None
    allow_hosts: tuple[str, ...] = ()
    max_upload: int = UPLOAD_MAX_BYTES
    #: the ``--watch`` job (:class:`itrcli.serve.watch.Watcher`), reported by /api/info
    watcher: Any = None
    decode_threads: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    #: the text tower's precision: ``fp32`` or ``int8`` (:mod:`itrcli.embed.textquant`)
    text_precision: str = "fp32"


def create_app(options: ServeOptions, live: LiveLibrary | None = None) -> Starlette:
    """The ASGI application over the library at ``options.directory``.

    ``live``: the library's thread (made here if None; closed at shutdown either way).
    """
    from ..show.thumbs import ThumbnailCache
    from ..ingest.images import DecodeError

    live = live or LiveLibrary(options.directory, options.text_precision)
    thumbs = ThumbnailCache.for_library(options.directory)
    decode = anyio.CapacityLimiter(options.decode_threads)
    trimmed = [time.monotonic()]
    trim_lock = threading.Lock()
    static = _static_files()

    def trim() -> None:
        if thumbs.wrote and time.monotonic() - trimmed[0] > TRIM_EVERY and trim_lock.acquire(False):
            try:
                trimmed[0] = time.monotonic()
                thumbs.trim()
            finally:
                trim_lock.release()

    @answers.endpoint
    async def page(request: Request) -> Response:
        """The web page."""
        body, mime = static["index.html"]
        return Response(body, media_type=mime, headers={"cache-control": "no-cache"})

    @answers.endpoint
    async def static_file(request: Request) -> Response:
        got = static.get(request.path_params["name"])
        if got is None:
            raise answers.HTTPError(404, "no such file")
        return Response(got[0], media_type=got[1], headers={"cache-control": "no-cache"})

    @answers.endpoint
    async def docs(request: Request) -> Response:
        body, mime = static["docs.html"]
        return Response(body, media_type=mime, headers={"cache-control": "no-cache"})

    @answers.endpoint
    async def openapi(request: Request) -> Response:
        from .openapi import spec

        return answers.json_response(spec(__version__))

    @answers.endpoint
    async def search(request: Request) -> Response:
        """GET: a text (q) or a file the library holds (like=ID); POST: an uploaded image."""
        post = request.method == "POST"
        req, extra = params.search_request(request.query_params.multi_items(),
                                           need_query=not post)
        if extra["next"]:
            req = req.replace(offset=params.offset_of(extra["next"], req))
        base = answers.base_url(request)
        if post:
            if req.text is not None or extra["like"] is not None:
                raise answers.HTTPError(400, "POST searches by the uploaded image: no q or like")
            data, name = await answers.read_image(request, options.max_upload)
            await anyio.to_thread.run_sync(answers.check_image, data, name, limiter=decode)
            with answers.saved_upload(data, name) as path:  # a RAW keeps its extension
                out = await live.run(answers.search_image, req, path, base)
            out["query"] = name
        else:
            plain = (extra["like"] is None and req.text is not None and not req.add
                     and not req.subtract and req.device in ("auto", "cpu"))
            out = await live.run(answers.search, req, extra["like"], base,
                                 text=req.text if plain else None)
        out["next"] = params.next_token(req) if out["more"] else None
        return answers.json_response(out)

    @answers.endpoint
    async def thumb(request: Request) -> Response:
        fid = answers.path_id(request)
        q = request.query_params
        try:
            size = int(q.get("size", DEFAULT_THUMB))
            t = float(q["t"]) if q.get("t") else None
        except ValueError:
            raise answers.HTTPError(400, "size is a whole number, t a number of seconds") from None
        if size not in THUMB_SIZES:
            raise answers.HTTPError(400, f"size={size}: one of {', '.join(map(str, THUMB_SIZES))}")
        if t is not None and not (0 <= t < 1e7):
            raise answers.HTTPError(400, f"t={t}: seconds from the start")
        src = await live.run(answers.thumb_source, fid, t)
        try:
            data = await anyio.to_thread.run_sync(thumbs.get, src, (size, size), limiter=decode)
        except DecodeError as e:
            raise answers.HTTPError(415, f"no thumbnail: {e}") from None
        except OSError as e:
            raise answers.HTTPError(404, f"file gone or unreadable: {e.strerror or e}") from None
        await anyio.to_thread.run_sync(trim, limiter=decode)
        cache = ("private, max-age=31536000, immutable" if q.get("v") and src.content_hash
                 and q["v"] == src.content_hash[:12] else "private, no-cache")
        return Response(data, media_type="image/jpeg", headers={"cache-control": cache})

    @answers.endpoint
    async def file(request: Request) -> Response:
        """The original file, with HTTP Range (videos seek)."""
        fid = answers.path_id(request)
        path = await live.run(lambda lib, i: answers.fs_path(answers.row_of(lib, i)), fid)
        if not os.path.isfile(path):
            raise answers.HTTPError(404, "file gone since it was indexed")
        mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return FileResponse(path, media_type=mime, filename=os.path.basename(path),
                            content_disposition_type="inline",
                            headers={"cache-control": "private, no-cache"})

    @answers.endpoint
    async def item(request: Request) -> Response:
        """One file's metadata and the words read in it."""
        return answers.json_response(await live.run(answers.item, answers.path_id(request), answers.base_url(request)))

    @answers.endpoint
    async def info(request: Request) -> Response:
        """What ``itr info --json`` says, and the server's own state under ``serve``."""
        data = await live.run(answers.info)
        w = options.watcher
        data["serve"] = {"version": __version__, "reopened": live.reopened,
                         "text_precision": options.text_precision,
                         "watch": w.status() if w is not None else None}
        return answers.json_response(data)

    @answers.endpoint
    async def not_found(request: Request) -> Response:
        raise answers.HTTPError(404, f"no such route: {request.url.path}")

    from .clipback import routes as clip_routes

    routes = [
        Route("/", page, methods=["GET", "HEAD"]),
        Route("/static/{name}", static_file, methods=["GET", "HEAD"]),
        Route("/docs", docs, methods=["GET", "HEAD"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/api/search", search, methods=["GET", "POST"]),
        Route("/api/thumb/{id}", thumb, methods=["GET", "HEAD"]),
        Route("/api/file/{id}", file, methods=["GET", "HEAD"]),
        Route("/api/item/{id}", item, methods=["GET"]),
        Route("/api/info", info, methods=["GET"]),
        *clip_routes(live, options, endpoint=answers.endpoint),
    ]

    async def on_404(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        msg = "method not allowed" if status == 405 else f"no such route: {request.url.path}"
        return answers.error_response(status, msg)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await anyio.to_thread.run_sync(live.warm)
        try:
            yield
        finally:
            thumbs.trim()
            live.close()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: on_404, 405: on_404},
                    middleware=[Middleware(Guard, host=options.host, port=options.port,
                                           token=options.token, cors=options.cors,
                                           allow_hosts=options.allow_hosts)])
    app.state.live = live
    app.state.options = options
    return app


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files, read once (a name not listed here is never served)."""
    types = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
             ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
    out = {}
    for p in STATIC.iterdir():
        if p.is_file() and p.suffix in types:
            out[p.name] = (p.read_bytes(), types[p.suffix])
    return out


__all__ = ["ServeOptions", "THUMB_SIZES", "UPLOAD_MAX_BYTES", "create_app"]
