"""What the routes of ``itr serve`` share: refusals as JSON, the library's answers
(searches, an item, info, the links of a hit), and uploads read and checked.  The
functions that take ``lib`` run on the library's thread
(:class:`~itrcli.serve.live.LiveLibrary`); none lets a client's path reach the file
system (files are looked up by id)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

from starlette.requests import Request
from starlette.responses import Response

from ..errors import ItrError, LibraryError, ModelError, UsageError


class HTTPError(Exception):
    """A refusal with its status and one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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


def path_id(request: Request) -> int:
    raw = request.path_params["id"]
    try:
        n = int(raw)
    except ValueError:
        raise HTTPError(400, f"{raw!r}: an id is a whole number") from None
    if n < 0 or n >= 1 << 63:
        raise HTTPError(404, f"no file with id {raw} in the library")
    return n


def row_of(lib, fid: int) -> dict[str, Any]:
    row = lib.store.rows([fid]).get(fid)
    if row is None:
        raise HTTPError(404, f"no file with id {fid} in the library")
    return row


def fs_path(row: dict[str, Any]) -> str:
    from ..store.db import fs_path_of

    return fs_path_of(row["path"], row["fsname"])


def base_url(request: Request) -> str:
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

def search(lib, req, like: int | None, base: str) -> dict[str, Any]:
    if like is not None:
        row = row_of(lib, like)
        path = fs_path(row)
        if not os.path.isfile(path):
            raise HTTPError(404, f"file gone since it was indexed: {row['path']}")
        req = req.replace(image=path)
    return result_json(lib, lib.search(req), base)


def search_image(lib, req, path: str, base: str) -> dict[str, Any]:
    try:
        return result_json(lib, lib.search(req.replace(image=path)), base)
    except UsageError as e:  # the message names the temporary file: not the client's business
        raise UsageError(str(e).replace(path, "the uploaded image")) from None


def thumb_source(lib, fid: int, t: float | None):
    from ..show.thumbs import source_for

    row = row_of(lib, fid)
    if row.get("duration") is None:
        t = None
    elif t is None:
        times = lib.store.frames(fid)[1]
        t = times[0] if times else 0.0
    return source_for(lib.store, row["path"], t)


def item(lib, fid: int, base: str) -> dict[str, Any]:
    row = row_of(lib, fid)
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
            "exists": os.path.exists(fs_path(row)),
            **links(base, fid, row["hash"], frames[0] if frames else None)}


def info(lib) -> dict[str, Any]:
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


def upload_name(name: str) -> str:
    """The file name an upload is read and saved under: ``upload``, with the extension it
    was sent with when itr reads that kind of file (a camera RAW is told by its name, not
    its bytes)."""
    from ..ingest.images import supported_extensions

    ext = os.path.splitext(os.path.basename(name or ""))[1].lower()
    return "upload" + (ext if ext in supported_extensions() else "")


@contextmanager
def saved_upload(data: bytes, name: str = "") -> Iterator[str]:
    """The path of ``data`` saved under :func:`upload_name` in a private temporary folder,
    removed afterwards (what a search by an uploaded image reads)."""
    with tempfile.TemporaryDirectory(prefix="itr-upload-") as d:
        path = os.path.join(d, upload_name(name))
        with open(path, "wb") as f:
            f.write(data)
        yield path


def check_image(data: bytes, name: str = "") -> None:
    """Decode an upload with the guards of an index run (size, pixel bombs, odd modes);
    ``name``: the name it was sent under (a camera RAW's says what it is)."""
    from ..ingest.images import DecodeError, open_image

    if not data:
        raise HTTPError(415, "not an image: empty upload")
    try:
        open_image(data, name=upload_name(name))
    except (DecodeError, OSError, ValueError, SyntaxError) as e:
        why = str(e) or type(e).__name__
        raise HTTPError(415, why if why.startswith("not an image") else f"not an image: {why}"
                        ) from None


# -- the application -----------------------------------------------------------------------------
