"""Finding a checkpoint: a local directory, else the local Hugging Face cache, else the hub.

One copy of the loading order that the dual encoder (:mod:`itrcli.embed.encoder`) and the
re-ranker (:mod:`itrcli.embed.rerank`) share: the local files first (no network round trip
on every run), the hub only when it is reachable, and a one-line :class:`ModelError` that
says where the model was looked for and how to get it.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ModelError


def load_config(name: str, revision: str | None = None, *,
                option: str = "--model / ITR_MODEL", recorded: bool = False) -> tuple[Any, bool]:
    """The checkpoint's transformers config, and whether it was found locally (the files
    that follow are then read with ``local_files_only``).

    Args:
        name: hub id or local directory.
        revision: the hub commit to load (None: the cache's ``main``).
        option: the option that names the model, for the error message.
        recorded: ``revision`` is the one a library was embedded with: its absence is
            reported as such (never another revision's weights).
    Raises:
        ModelError: not found locally, and the hub is off, unreachable or lacks it.
    """
    from transformers import AutoConfig

    at = {"revision": revision} if revision else {}

    def missing(e: BaseException) -> ModelError:
        if recorded and revision:
            return ModelError(revision_missing(name, revision))
        return ModelError(not_found_message(name, e, option, revision))

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=False, local_files_only=True,
                                          **at), True
    except (OSError, ValueError) as e:
        if os.path.isdir(name) or hub_offline() or not hub_reachable():
            raise missing(e) from None
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=False, **at), False
    except (OSError, ValueError) as e:
        raise missing(e) from None


def snapshot_commit(folder: str | os.PathLike) -> str | None:
    """The hub commit whose files ``folder`` holds when it is a snapshot of the Hugging
    Face cache (``.../snapshots/<commit>``), else None (a checkpoint of one's own)."""
    folder = os.path.normpath(os.path.abspath(folder))
    parent, name = os.path.split(folder)
    return name if os.path.basename(parent) == "snapshots" and name else None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so that an offline machine fails in seconds, not after the hub
    client's retries (about 30 s)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def not_found_message(model: str, err: BaseException, option: str = "--model / ITR_MODEL",
                       revision: str | None = None) -> str:
    where = "the local Hugging Face cache" + ("" if hub_offline() else " or the hub")
    rev = f" --revision {revision}" if revision else ""
    return (
        f"cannot load model '{model}': it is not a local directory and was not found in "
        f"{where} ({type(err).__name__}). Download it once where there is network "
        f"(`hf download {model}{rev}`), or point {option} at a local directory "
        "holding config.json, model.safetensors and the processor files"
    )


def revision_missing(model: str, revision: str) -> str:
    from .models import model_revision

    have = model_revision(model)
    has = f"holds revision {have}" if have else "holds no revision of it"
    return (
        f"model '{model}' at revision {revision}, the one this library was embedded with, "
        f"cannot be loaded (the local Hugging Face cache {has}); download that revision "
        f"(`hf download {model} --revision {revision}`), or re-embed the library with the "
        "current one: itr index PATH --reindex"
    )


