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

import json
import mimetypes
import os
import sys
import tempfile
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
from ..errors import ItrError, LibraryError, ModelError, UsageError
from . import params
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


class HTTPError(Exception):
    """A refusal with its status and one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8", "replace")
    return Response(body, status, headers=headers, media_type="application/json")


def error_response(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


def log(line: str) -> None:
    """One line on the server's stderr."""
    try:
        sys.stderr.write(f"itr serve: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def endpoint(fn):
    """A route whose failures become ``{"error": ...}`` answers."""
    async def route(request: Request) -> Response:
        try:
            return await fn(request)
        except HTTPError as e:
            return error_response(e.status, str(e))
        except UsageError as e:
            return error_response(400, str(e))
        except (LibraryError, ModelError) as e:
            return error_response(503, str(e))
        except ItrError as e:
            return error_response(500, str(e))
        except Exception as e:  # a bug: one line, and the server goes on
            log(f"{request.method} {request.url.path}: unexpected {type(e).__name__}: {e}")
            return error_response(500, f"unexpected {type(e).__name__} (this is a bug; "
                                       "the server's stderr has a line about it)")
    route.__name__ = fn.__name__
    route.__doc__ = fn.__doc__
    return route


def _id(request: Request) -> int:
    raw = request.path_params["id"]
    try:
        n = int(raw)
    except ValueError:
        raise HTTPError(400, f"{raw!r}: an id is a whole number") from None
    if n < 0 or n >= 1 << 63:
        raise HTTPError(404, f"no file with id {raw} in the library")
    return n


def _row(lib, fid: int) -> dict[str, Any]:
    row = lib.store.rows([fid]).get(fid)
    if row is None:
        raise HTTPError(404, f"no file with id {fid} in the library")
    return row


def _fs_path(row: dict[str, Any]) -> str:
    from ..store.db import fs_path_of

    return fs_path_of(row["path"], row["fsname"])


def _base(request: Request) -> str:
    """The server's own URL as this client reaches it (its Host was checked)."""
    return str(request.base_url).rstrip("/")


def links(base: str, fid: int, content_hash: str | None, time_s: float | None = None
          ) -> dict[str, str]:
    """The ``thumb``, ``large`` and ``file`` URLs of a file (a video hit's frame at ``time_s``).
    The content hash in the thumbnail URL lets browsers keep it for good."""
    v = f"v={content_hash[:12]}" if content_hash else ""
    t = f"&t={time_s:.3f}" if time_s is not None else ""
    return {"thumb": f"{base}/api/thumb/{fid}?{v}{t}",
            "large": f"{base}/api/thumb/{fid}?size=2048&{v}{t}",
            "file": f"{base}/api/file/{fid}"}


def result_json(lib, result, base: str) -> dict[str, Any]:
    """``SearchResult.to_json()`` (the ``itr search --json`` object) with, on each hit, its
    id, URLs and what the page shows (date, camera, place, kind)."""
    hits = result.hits
    rows = lib.store.rows(h.id for h in hits)
    out = result.to_json()
    for h, d in zip(hits, out["results"]):
        r = rows.get(h.id, {})
        d["id"] = h.id
        d.update(links(base, h.id, r.get("hash"), h.time))
        d.update(date=h.date, camera=r.get("camera"), lat=r.get("lat"), lon=r.get("lon"),
                 kind="video" if r.get("duration") is not None else "image",
                 duration=r.get("duration"))
    req = result.request
    out.update(offset=req.offset, n=req.top, more=result.more,
               timings={k: round(v, 6) for k, v in result.timings.items()})
    return out


# -- on the library's thread -----------------------------------------------------------------

def _search(lib, req, like: int | None, base: str) -> dict[str, Any]:
    if like is not None:
        row = _row(lib, like)
        path = _fs_path(row)
        if not os.path.isfile(path):
            raise HTTPError(404, f"file gone since it was indexed: {row['path']}")
        req = req.replace(image=path)
    return result_json(lib, lib.search(req), base)


def _search_image(lib, req, path: str, base: str) -> dict[str, Any]:
    try:
        return result_json(lib, lib.search(req.replace(image=path)), base)
    except UsageError as e:  # the message names the temporary file: not the client's business
        raise UsageError(str(e).replace(path, "the uploaded image")) from None


def _thumb_source(lib, fid: int, t: float | None):
    from ..show.thumbs import source_for

    row = _row(lib, fid)
    if row.get("duration") is None:
        t = None
    elif t is None:
        times = lib.store.frames(fid)[1]
        t = times[0] if times else 0.0
    return source_for(lib.store, row["path"], t)


def _item(lib, fid: int, base: str) -> dict[str, Any]:
    row = _row(lib, fid)
    words = None
    if lib.store.words.has_tables():
        lines = lib.store.words.lines_of(row["hash"])
        words = None if lines is None else [ln.text for ln in lines]
    video = row.get("duration") is not None
    frames = lib.store.frames(fid)[1] if video else None
    from ..query.search import Hit

    date = Hit(0, 0.0, row["path"], None, None, row["taken_at"], fid, row["mtime_ns"]).date
    return {"id": fid, "path": row["path"], "size": row["size"], "width": row["width"],
            "height": row["height"], "taken_at": row["taken_at"], "date": date,
            "camera": row.get("camera"), "lat": row.get("lat"), "lon": row.get("lon"),
            "kind": "video" if video else "image", "duration": row.get("duration"),
            "frames": frames, "indexed_at": row.get("indexed_at"), "text": words,
            "exists": os.path.exists(_fs_path(row)),
            **links(base, fid, row["hash"], frames[0] if frames else None)}


def _info(lib) -> dict[str, Any]:
    from ..show.thumbs import cache_stats, cap_bytes_from_env

    data = lib.info()
    data["thumbnail_cache"] = {**cache_stats(lib.directory), "cap_bytes": cap_bytes_from_env()}
    return data


# -- uploads -----------------------------------------------------------------------------------

async def read_body(request: Request, cap: int) -> bytes:
    """The request's body, refused (413) past ``cap`` bytes before it is all read."""
    n = request.headers.get("content-length")
    if n is not None and n.strip().isdigit() and int(n) > cap:
        raise HTTPError(413, f"upload larger than {cap:,} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise HTTPError(413, f"upload larger than {cap:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_image(request: Request, cap: int) -> tuple[bytes, str]:
    """The uploaded image: multipart field ``image``, or the body itself (``image/*``).
    Returns (bytes, the name it was sent under)."""
    ctype = request.headers.get("content-type", "")
    body = await read_body(request, cap)
    if ctype.startswith("multipart/form-data"):
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def once():
            yield body
            yield b""

        parser = MultiPartParser(request.headers, once(), max_files=1, max_fields=16,
                                 max_part_size=cap)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise HTTPError(400, f"malformed upload: {e.message}") from None
        f = form.get("image")
        if f is None or isinstance(f, str):
            raise HTTPError(400, "POST an image as the multipart field 'image'")
        try:
            return await f.read(), f.filename or "upload"
        finally:
            await f.close()
    if ctype.startswith(("image/", "application/octet-stream")):
        return body, "upload"
    raise HTTPError(415, "POST an image as the multipart field 'image' (or as an image/* body)")


def check_image(data: bytes) -> None:
    """Decode an upload with the guards of an index run (size, pixel bombs, odd modes)."""
    from ..ingest.images import DecodeError, open_image

    if not data:
        raise HTTPError(415, "not an image: empty upload")
    try:
        open_image(data)
    except (DecodeError, OSError, ValueError, SyntaxError) as e:
        why = str(e) or type(e).__name__
        raise HTTPError(415, why if why.startswith("not an image") else f"not an image: {why}"
                        ) from None


# -- the application -----------------------------------------------------------------------------

def create_app(options: ServeOptions, live: LiveLibrary | None = None) -> Starlette:
    """The ASGI application over the library at ``options.directory``.

    ``live``: the library's thread (made here if None; closed at shutdown either way).
    """
    from ..show.thumbs import ThumbnailCache
    from ..ingest.images import DecodeError

    live = live or LiveLibrary(options.directory)
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

    @endpoint
    async def page(request: Request) -> Response:
        """The web page."""
        body, mime = static["index.html"]
        return Response(body, media_type=mime, headers={"cache-control": "no-cache"})

    @endpoint
    async def static_file(request: Request) -> Response:
        got = static.get(request.path_params["name"])
        if got is None:
            raise HTTPError(404, "no such file")
        return Response(got[0], media_type=got[1], headers={"cache-control": "no-cache"})

    @endpoint
    async def docs(request: Request) -> Response:
        body, mime = static["docs.html"]
        return Response(body, media_type=mime, headers={"cache-control": "no-cache"})

    @endpoint
    async def openapi(request: Request) -> Response:
        from .openapi import spec

        return json_response(spec(__version__))

    @endpoint
    async def search(request: Request) -> Response:
        """GET: a text (q) or a file the library holds (like=ID); POST: an uploaded image."""
        post = request.method == "POST"
        req, extra = params.search_request(request.query_params.multi_items(),
                                           need_query=not post)
        if extra["next"]:
            req = req.replace(offset=params.offset_of(extra["next"], req))
        base = _base(request)
        if post:
            if req.text is not None or extra["like"] is not None:
                raise HTTPError(400, "POST searches by the uploaded image: no q or like")
            data, name = await read_image(request, options.max_upload)
            await anyio.to_thread.run_sync(check_image, data, limiter=decode)
            with tempfile.TemporaryDirectory(prefix="itr-upload-") as d:
                path = os.path.join(d, "upload")
                with open(path, "wb") as f:
                    f.write(data)
                out = await live.run(_search_image, req, path, base)
            out["query"] = name
        else:
            plain = (extra["like"] is None and req.text is not None and not req.add
                     and not req.subtract and req.device in ("auto", "cpu"))
            out = await live.run(_search, req, extra["like"], base,
                                 text=req.text if plain else None)
        out["next"] = params.next_token(req) if out["more"] else None
        return json_response(out)

    @endpoint
    async def thumb(request: Request) -> Response:
        fid = _id(request)
        q = request.query_params
        try:
            size = int(q.get("size", DEFAULT_THUMB))
            t = float(q["t"]) if q.get("t") else None
        except ValueError:
            raise HTTPError(400, "size is a whole number, t a number of seconds") from None
        if size not in THUMB_SIZES:
            raise HTTPError(400, f"size={size}: one of {', '.join(map(str, THUMB_SIZES))}")
        if t is not None and not (0 <= t < 1e7):
            raise HTTPError(400, f"t={t}: seconds from the start")
        src = await live.run(_thumb_source, fid, t)
        try:
            data = await anyio.to_thread.run_sync(thumbs.get, src, (size, size), limiter=decode)
        except DecodeError as e:
            raise HTTPError(415, f"no thumbnail: {e}") from None
        except OSError as e:
            raise HTTPError(404, f"file gone or unreadable: {e.strerror or e}") from None
        await anyio.to_thread.run_sync(trim, limiter=decode)
        cache = ("private, max-age=31536000, immutable" if q.get("v") and src.content_hash
                 and q["v"] == src.content_hash[:12] else "private, no-cache")
        return Response(data, media_type="image/jpeg", headers={"cache-control": cache})

    @endpoint
    async def file(request: Request) -> Response:
        """The original file, with HTTP Range (videos seek)."""
        fid = _id(request)
        path = await live.run(lambda lib, i: _fs_path(_row(lib, i)), fid)
        if not os.path.isfile(path):
            raise HTTPError(404, "file gone since it was indexed")
        mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return FileResponse(path, media_type=mime, filename=os.path.basename(path),
                            content_disposition_type="inline",
                            headers={"cache-control": "private, no-cache"})

    @endpoint
    async def item(request: Request) -> Response:
        """One file's metadata and the words read in it."""
        return json_response(await live.run(_item, _id(request), _base(request)))

    @endpoint
    async def info(request: Request) -> Response:
        """What ``itr info --json`` says, and the server's own state under ``serve``."""
        data = await live.run(_info)
        w = options.watcher
        data["serve"] = {"version": __version__, "reopened": live.reopened,
                         "watch": w.status() if w is not None else None}
        return json_response(data)

    @endpoint
    async def not_found(request: Request) -> Response:
        raise HTTPError(404, f"no such route: {request.url.path}")

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
        *clip_routes(live, options, endpoint=endpoint),
    ]

    async def on_404(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        msg = "method not allowed" if status == 405 else f"no such route: {request.url.path}"
        return error_response(status, msg)

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
