"""The OpenAPI 3.1 description of ``itr serve``'s API, served at ``/openapi.json`` and shown
by ``/docs`` (a page of the server's own: no CDN)."""

from __future__ import annotations

from typing import Any

_S = {"type": "string"}
_I = {"type": "integer"}
_N = {"type": "number"}
_B = {"type": "boolean"}

#: /api/search's query parameters: (name, schema, description); the command line's names.
SEARCH_PARAMS: list[tuple[str, dict, str]] = [
    ("q", _S, "the text to search for (always a text over HTTP)"),
    ("like", _I, "search by a file the library holds (its id): 'more like this'"),
    ("at", _N, "with like=ID of a video: its frame at this time (seconds)"),
    ("n", {**_I, "minimum": 1, "maximum": 1000, "default": 10}, "results a page (also: top)"),
    ("offset", {**_I, "minimum": 0, "default": 0}, "skip this many results (paging)"),
    ("next", _S, "the 'next' token of the previous page (instead of offset)"),
    ("add", {"type": "array", "items": _S}, "add a text to the query (repeatable)"),
    ("subtract", {"type": "array", "items": _S}, "subtract a text (repeatable)"),
    ("in", {"type": "array", "items": _S}, "only files under this folder (repeatable)"),
    ("after", {**_S, "format": "date"}, "taken on or after (YYYY-MM-DD; EXIF, else mtime)"),
    ("before", {**_S, "format": "date"}, "taken before (YYYY-MM-DD)"),
    ("camera", _S, "camera make or model contains this (any case)"),
    ("near", _S, "LAT,LON[,KM]: taken within KM of a point (GPS; default 10 km)"),
    ("glob", {"type": "array", "items": _S}, "the path ends in a match (repeatable, any)"),
    ("min_size", _S, "WxH: at least W pixels wide and H high"),
    ("kind", {"enum": ["image", "video"]}, "only images or only videos"),
    ("sort", {"enum": ["score", "date", "path"], "default": "score"}, "order of the results"),
    ("threshold", _N, "drop results scoring below this cosine"),
    ("auto_cut", {"oneOf": [_B, _N]}, "keep results standing out (true, or the floor in sd)"),
    ("exact", _B, "score every image (no HNSW)"),
    ("ef", _I, "HNSW search breadth"),
    ("frames", _B, "every matching video frame, not each video once"),
    ("all_files", _B, "each file of a photo (RAW beside JPEG, Live Photo clip), not the photo once"),
    ("hash", _B, "rank binary codes first, then by cosine"),
    ("hash_bits", _I, "code length with hash: 16, 32, 64, 128 or 256"),
    ("no_adapt", _B, "leave the text unmapped by the library's adapter"),
    ("text_only", _B, "rank by the words read in the images alone"),
    ("no_text", _B, "rank by meaning alone"),
    ("rerank", _B, "re-score the first results with an image-text matching model"),
    ("rerank_k", _I, "how many results rerank re-scores"),
    ("no_rerank_cache", _B, "neither read nor write the re-ranker's feature cache"),
]

_HIT = {"type": "object", "properties": {
    "rank": _I, "score": _N, "path": _S, "width": _I, "height": _I, "taken_at": _S,
    "time": {"type": ["number", "null"], "description": "a video frame's time (seconds)"},
    "text": {"type": "array", "items": _S, "description": "matched words (OCR libraries)"},
    "rerank_score": _N, "id": _I, "thumb": _S, "large": _S, "file": _S, "date": _S,
    "camera": _S, "lat": _N, "lon": _N, "kind": {"enum": ["image", "video"]},
    "duration": _N}}
_RESULT = {"type": "object", "properties": {
    "query": _S, "model": _S, "adapter": {"type": ["string", "null"]},
    "results": {"type": "array", "items": _HIT}, "offset": _I, "n": _I, "more": _B,
    "next": {"type": ["string", "null"]}, "timings": {"type": "object"}}}
_ERROR = {"description": "refused", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": _S}}}}}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): _ERROR for c in codes}


def spec(version: str) -> dict[str, Any]:
    """The OpenAPI object."""
    qp = [{"name": n, "in": "query", "schema": s, "description": d,
           **({"explode": True} if s.get("type") == "array" else {})}
          for n, s, d in SEARCH_PARAMS]
    idp = [{"name": "id", "in": "path", "required": True, "schema": _I}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "itr serve", "version": version,
                 "description": "Search a photo library by meaning. JSON in the vocabulary "
                                "of itr search --json; see docs/serve.md."},
        "components": {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "only when the server was started with --token"}}},
        "paths": {
            "/api/search": {
                "get": {"summary": "Search by a text (q) or by a file the library holds (like)",
                        "parameters": qp, "responses": {"200": _json(_RESULT),
                                                        **_errors(400, 401, 404, 503)}},
                "post": {"summary": "Search by an uploaded image (multipart field 'image')",
                         "parameters": [p for p in qp if p["name"] not in ("q", "like", "at")],
                         "requestBody": {"content": {"multipart/form-data": {"schema": {
                             "type": "object", "properties": {
                                 "image": {"type": "string", "format": "binary"}}}}}},
                         "responses": {"200": _json(_RESULT), **_errors(400, 401, 413, 415, 503)}},
            },
            "/api/thumb/{id}": {"get": {
                "summary": "A JPEG thumbnail (EXIF-rotated; a video's frame at t)",
                "parameters": idp + [
                    {"name": "size", "in": "query",
                     "schema": {"enum": [128, 256, 512, 1024, 2048], "default": 256}},
                    {"name": "t", "in": "query", "schema": _N}],
                "responses": {"200": {"description": "image/jpeg"}, **_errors(400, 404, 415)}}},
            "/api/file/{id}": {"get": {
                "summary": "The original file (HTTP Range supported)", "parameters": idp,
                "responses": {"200": {"description": "the file"},
                              "206": {"description": "a range of it"}, **_errors(404, 416)}}},
            "/api/item/{id}": {"get": {
                "summary": "A file's metadata and the words read in it", "parameters": idp,
                "responses": {"200": _json({"type": "object"}), **_errors(404)}}},
            "/api/info": {"get": {"summary": "What itr info --json says, and the server's state",
                                  "responses": {"200": _json({"type": "object"})}}},
            "/indices-list": {"get": {"summary": "clip-retrieval: the index names",
                                      "responses": {"200": _json({"type": "array"})}}},
            "/knn-service": {"post": {"summary": "clip-retrieval: nearest images to a text or "
                                                 "a base64 image",
                                      "responses": {"200": _json({"type": "array"}),
                                                    **_errors(400, 413, 415)}}},
            "/metadata": {"post": {"summary": "clip-retrieval: metadata of ids",
                                   "responses": {"200": _json({"type": "array"})}}},
        },
        "security": [{}, {"bearer": []}],
    }
