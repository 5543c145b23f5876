"""clip-retrieval's ``clip back`` API over an itr library, so that its front end and its
``ClipClient`` scripts work against ``itr serve`` (``--cors ORIGIN`` for a front end served
from elsewhere).

- ``GET /indices-list``: ``["<library name>"]`` (the library directory's name).
- ``POST /knn-service`` with ``{"text": ..., "image": base64, "modality": "image",
  "num_images": N, "indice_name": ..., "deduplicate": bool, ...}``: ``[{"id",
  "similarity", "url", "caption", ...}]``, best first.  ``url`` is the file's URL here,
  ``caption`` its path.  ``image_url`` and ``embedding_input`` are refused (the server
  fetches nothing; it embeds with the library's model only), as is ``modality: "text"``
  (an itr library holds images, not captions).  ``use_mclip``, ``use_safety_model``,
  ``use_violence_detector``, ``aesthetic_*`` are accepted and have no effect.
- ``POST /metadata`` with ``{"ids": [...], "indice_name": ...}``: ``[{"id", "metadata":
  {...}}]``.

The same library thread, searches and guards as ``/api`` (:mod:`itrcli.serve.app`, :mod:`itrcli.serve.answers`).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from ..query.request import SearchRequest
from .params import MAX_TOP

#: clip back's deduplication: results closer than this cosine to a better one are dropped.
DEDUP_COSINE = 0.94


def _name(options) -> str:
    return options.directory.name or "itr"


def _entry(base: str, hit: dict[str, Any], similarity: float | None = None) -> dict[str, Any]:
    out = {"id": hit["id"], "url": hit["file"], "caption": hit["path"], "path": hit["path"],
           "thumb": hit["thumb"]}
    if similarity is not None:
        out["similarity"] = similarity
    return out


def _dedup(lib, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop the images whose stored vector is within DEDUP_COSINE of a better result's."""
    ids = [r["id"] for r in results if r["kind"] == "image"]
    got, vecs = lib.store.vectors(ids)
    by_id = dict(zip(got.tolist(), vecs))
    kept, kept_vecs = [], []
    for r in results:
        v = by_id.get(r["id"])
        if v is not None and any(float(v @ k) > DEDUP_COSINE for k in kept_vecs):
            continue
        kept.append(r)
        if v is not None:
            kept_vecs.append(v)
    return kept


def routes(live, options, *, endpoint) -> list[Route]:
    from .answers import (HTTPError, base_url, check_image, json_response, read_body,
                          saved_upload, search, search_image)

    async def body_json(request: Request) -> dict[str, Any]:
        raw = await read_body(request, options.max_upload * 4 // 3 + 4096)
        try:
            data = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "the body is not a JSON object")
        return data

    def check_index(data: dict[str, Any]) -> None:
        name = data.get("indice_name")
        if name not in (None, "", _name(options)):
            raise HTTPError(400, f"indice_name {name!r}: this server has {_name(options)!r}")

    @endpoint
    async def indices_list(request: Request):
        return json_response([_name(options)])

    @endpoint
    async def knn_service(request: Request):
        import anyio

        data = await body_json(request)
        check_index(data)
        if data.get("modality", "image") != "image":
            raise HTTPError(400, "modality: an itr library holds images (modality 'image')")
        if data.get("image_url"):
            raise HTTPError(400, "image_url: this server fetches nothing; send the image "
                                 "itself (image: base64)")
        if data.get("embedding_input") is not None:
            raise HTTPError(400, "embedding_input: not supported; send a text or an image")
        try:
            n = int(data.get("num_images", 40))
            n_ids = int(data.get("num_result_ids", n) or n)
        except (TypeError, ValueError):
            raise HTTPError(400, "num_images: a whole number") from None
        if not 1 <= n <= MAX_TOP:
            raise HTTPError(400, f"num_images: 1 to {MAX_TOP}")
        top = min(max(n, n_ids), MAX_TOP)
        dedup = bool(data.get("deduplicate", False))
        base = base_url(request)
        text, image = data.get("text"), data.get("image")
        if text and image:
            raise HTTPError(400, "text or image, not both")
        if text:
            if not isinstance(text, str):
                raise HTTPError(400, "text: a string")
            req = SearchRequest.build(None, text=text, top=top)

            def run(lib):
                out = search(lib, req, None, base)["results"]
                return (_dedup(lib, out) if dedup else out)[:n]

            results = await live.run(run)
        elif image:
            if not isinstance(image, str):
                raise HTTPError(400, "image: a base64 string")
            try:
                raw = base64.b64decode(image, validate=False)
            except (binascii.Error, ValueError):
                raise HTTPError(400, "image: not base64") from None
            if len(raw) > options.max_upload:
                raise HTTPError(413, f"image larger than {options.max_upload:,} bytes")
            await anyio.to_thread.run_sync(check_image, raw)
            req = SearchRequest.build(None, top=top)
            with saved_upload(raw) as path:

                def run(lib):
                    out = search_image(lib, req, path, base)["results"]
                    return (_dedup(lib, out) if dedup else out)[:n]

                results = await live.run(run)
        else:
            raise HTTPError(400, "must fill one of text and image")
        return json_response([_entry(base, r, r["score"]) for r in results])

    @endpoint
    async def metadata(request: Request):
        data = await body_json(request)
        check_index(data)
        ids = data.get("ids", [])
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise HTTPError(400, "ids: a list of whole numbers")
        if len(ids) > MAX_TOP:
            raise HTTPError(400, f"ids: at most {MAX_TOP}")
        base = base_url(request)

        def run(lib):
            from .answers import links

            rows = lib.store.rows(i for i in ids if 0 <= i < 1 << 63)
            out = []
            for i in ids:
                r = rows.get(i)
                if r is None:
                    out.append({"id": i, "metadata": {}})
                    continue
                link = links(base, i, r["hash"])
                hit = {"id": i, "path": r["path"], **link}
                out.append({"id": i, "metadata": {
                    **{k: v for k, v in _entry(base, hit).items() if k != "id"},
                    "taken_at": r["taken_at"], "width": r["width"], "height": r["height"]}})
            return out

        return json_response(await live.run(run))

    return [
        Route("/indices-list", indices_list, methods=["GET"]),
        Route("/knn-service", knn_service, methods=["POST"]),
        Route("/metadata", metadata, methods=["POST"]),
    ]


__all__ = ["DEDUP_COSINE", "routes"]
