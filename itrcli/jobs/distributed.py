"""``itr index --engine ray``: the same run as :mod:`itrcli.jobs.indexer`, with reading,
decoding and embedding spread over a Ray cluster (Ray Data).

The driver (the ``itr index`` process) walks, plans and commits exactly as a local run:
:class:`RayIndexRun` is an :class:`~itrcli.jobs.indexer.IndexRun` whose source of read
files (:meth:`~itrcli.jobs.indexer.IndexRun._reads`) is a Ray Data pipeline instead of a
thread pool::

    paths of new and changed files (the driver's plan)
      -> read, hash, decode, preprocess   CPU tasks: indexer.read_for_vectors (a video:
                                          indexer.read_video), the local code itself
      -> embed                            an actor pool, one model load per actor (GPUs if any)
      -> rows back to the driver          committed in batches by IndexRun._flush

Workers never write the library: rows (path, size, mtime, content hash, EXIF fields,
ok/error, vector) come back to the driver, which commits them in transactions and mirrors
them into the graph as a local run does, so a killed driver resumes like a killed local
run (the next run plans again; committed files are unchanged).  Content the library
already knows (a moved or copied file) is hashed on the cluster but not decoded or
embedded, and takes its stored vector on the driver.  Ray retries a task or actor call
whose worker died; its rows reach the driver once.

Ray is optional (``pip install 'itr-search[ray]'``) and imported only here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from .. import errors
from ..errors import ItrError, LibraryError
from .indexer import IndexRun, _Read, read_for_vectors, read_video
from ..ingest.video import is_video  # no PyAV import

#: The extra that installs Ray; named in the error when it is missing.
EXTRA = "pip install 'itr-search[ray]'"

#: Object store of a local Ray instance: enough for a few batches of pixels in flight
#: (224 px: 0.6 MB per image as float32), small next to Ray's default of 30% of memory.
LOCAL_OBJECT_STORE_BYTES = 512 * 1024 * 1024

#: An embedding actor on CPU takes at most this many cores (more helps ViT little).
MAX_CPUS_PER_ACTOR = 8


def require_ray():
    """Import Ray and Ray Data; a one-line error naming the extra when they are missing."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ItrError(f"--engine ray needs Ray Data, which is not installed ({e.name or e}): "
                       f"{EXTRA}") from None
    return ray


# --- the Ray session ------------------------------------------------------------------------

@contextmanager
def ray_session(address: str | None = None, *, logs: bool = False) -> Iterator[float]:
    """Connect to ``address`` (a running cluster; ``RAY_ADDRESS`` when None and set) or start
    a local Ray instance sized to this machine; shut down on exit what was started here.
    A session already initialised in this process (tests, notebooks) is used as it is.

    Yields the seconds that starting or joining took.  ``logs``: let Ray's own log lines
    through on stderr (otherwise only its errors); stdout never carries them.
    """
    ray = require_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a CLI run
    quiet_ray_data(logs)
    if ray.is_initialized():
        yield 0.0
        return
    t0 = time.monotonic()
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = dict(include_dashboard=False, log_to_driver=logs, configure_logging=True,
                  logging_level=logging.INFO if logs else logging.ERROR)
    # The driver's C++ core writes its notices straight to fd 2 (e.g. an "E" line about
    # every actor that Ray Data starts with restarts enabled): only fatal ones, unless -v.
    # It reads the level when it starts, and announces it on fd 2.
    level = {} if logs or "RAY_BACKEND_LOG_LEVEL" in os.environ else {"RAY_BACKEND_LOG_LEVEL": "fatal"}
    try:
        with _fd2_silenced(not logs), _keep_sigterm(), _env(level):
            _init(ray, address, common)
    except Exception as e:  # ConnectionError, a version mismatch, a port in use, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise LibraryError(f"cannot start or join {where}: {msg[:300]}") from None
    quiet_ray_data(logs)  # ray.init configures logging again
    try:
        yield time.monotonic() - t0
    finally:
        ray.shutdown()


def _init(ray, address: str | None, common: dict[str, Any]) -> None:
    if address:
        ray.init(address=address, **common)
    else:
        # the workers of a local instance run this very itrcli (a checkout, a venv)
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        ray.init(num_cpus=os.cpu_count() or 1, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 runtime_env={"env_vars": {"PYTHONPATH": path}}, **common)


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _keep_sigterm() -> Iterator[None]:
    """``ray.init`` makes SIGTERM a bare ``sys.exit``; keep itr's (stop like Ctrl-C, 143)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def _fd2_silenced(on: bool) -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block (Python's own writes are flushed first)."""
    if not on:
        yield
        return
    import sys

    try:
        sys.stderr.flush()
    except Exception:
        pass
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def quiet_ray_data(logs: bool) -> None:
    """No progress bars, statistics or INFO lines from Ray Data on the driver's stderr."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = logs
    if hasattr(ctx, "enable_auto_log_stats"):
        ctx.enable_auto_log_stats = False
    # Ray Data logs a failure's whole stack at ERROR; the run reports it in one line
    level = logging.INFO if logs else logging.CRITICAL
    for name in ("ray", "ray.data"):
        lg = logging.getLogger(name)
        for h in lg.handlers:
            if not isinstance(h, logging.FileHandler) and type(h).__name__ != "SessionFileHandler":
                h.setLevel(level)
    if not logs:
        logging.getLogger("ray").setLevel(logging.CRITICAL)
    try:
        # the driver prints errors that workers raise, prefixed "(raylet)", on stdout
        import ray._private.worker as ray_worker

        ray_worker._worker_logs_enabled = logs
    except (ImportError, AttributeError):
        pass


# --- resources ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How many embedding actors, and what each reserves."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int  #: torch threads per CPU actor
    decode_cpus: float  #: reserved by each read/decode task


def plan_resources(nodes: list[dict[str, float]], device: str = "auto") -> Plan:
    """Size the actor pool from the alive nodes' resources (``{"CPU": n, "GPU": m}`` each).

    GPUs (unless ``--device cpu``): one actor per GPU.  CPUs only: about three quarters of
    the cores embed (the encoder costs several times the decoding), in actors of at most
    :data:`MAX_CPUS_PER_ACTOR` cores that fit on the smallest node; at least one core is
    left to the decode tasks.
    """
    cpus = [float(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) > 0] or [1.0]
    gpus = sum(float(n.get("GPU", 0)) for n in nodes)
    total = sum(cpus)
    if gpus >= 1 and device != "cpu":
        return Plan(actors=int(gpus), cpus_per_actor=1.0, gpus_per_actor=1.0, threads=1,
                    decode_cpus=1.0)
    if total <= 2:
        # a small machine: the actor reserves half the cores and, like the local engine's
        # encoder, runs torch on all of them; two decode tasks share the other half (they
        # wait on the disk and on Pillow, as the local engine's decode threads do)
        return Plan(actors=1, cpus_per_actor=total / 2, gpus_per_actor=0.0,
                    threads=max(1, int(max(cpus))), decode_cpus=total / 4)
    per_actor = float(max(1, min(MAX_CPUS_PER_ACTOR, int(min(cpus) * 3 // 4))))
    actors = max(1, int(total * 3 // 4 // per_actor))
    return Plan(actors=actors, cpus_per_actor=per_actor, gpus_per_actor=0.0,
                threads=int(per_actor), decode_cpus=1.0)


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


# --- the pipeline stages (run on the workers) ----------------------------------------------------

_KNOWN: dict[str, frozenset[str]] = {}  # per worker process: the library's hashes, fetched once


def _known_hashes(ref_box: list) -> frozenset[str]:
    if not ref_box:
        return frozenset()
    ref = ref_box[0]
    key = ref.hex()
    if key not in _KNOWN:
        import ray

        _KNOWN.clear()
        _KNOWN[key] = ray.get(ref)
    return _KNOWN[key]


def decode_batch(batch: dict[str, Any], *, prep, draft: bool, known: list,
                 video_budget: float | None = None) -> dict[str, Any]:
    """Read, hash and (unless known) decode each path: :func:`indexer.read_for_vectors` per
    image, :func:`indexer.read_video` per video (its frames, chosen as a local run does).

    ``batch["path"]``: file names as bytes.  Returns one row per path with its pixels,
    resized and cropped, as uint8 bytes (empty when not decoded; an image's ``[H, W, 3]``,
    a video's ``[n, H, W, 3]``, its frames' times in ``times``) and everything the driver
    commits.
    """
    import numpy as np

    known_hashes = _known_hashes(known)
    cols: dict[str, list] = {k: [] for k in ("path", "size", "mtime_ns", "hash", "error",
                                             "remember", "meta", "pixels", "shape", "times",
                                             "note")}
    for raw in batch["path"]:
        path = os.fsdecode(bytes(raw))
        r = (read_video(path, prep, known_hashes, video_budget) if is_video(path)
             else read_for_vectors(path, prep, draft, known_hashes))
        cols["path"].append(bytes(raw))
        cols["size"].append(r.size)
        cols["mtime_ns"].append(r.mtime_ns)
        cols["hash"].append(r.content_hash)
        cols["error"].append("" if r.error is None else r.error)
        cols["remember"].append(r.remember)
        cols["meta"].append(json.dumps(r.meta) if r.meta is not None else "")
        px = r.pixels  # uint8, resized and cropped, as it waits in a local run; the actor
        # normalises it as a local run does (a quarter of float32's object store)
        cols["pixels"].append(b"" if px is None else np.ascontiguousarray(px).tobytes())
        cols["shape"].append(json.dumps([px.dtype.name, *px.shape]) if px is not None else "")
        cols["times"].append(json.dumps(r.times) if r.times is not None else "")
        cols["note"].append(r.note or "")
    return {k: np.asarray(v, dtype=object if k in _OBJECT_COLUMNS else None)
            for k, v in cols.items()}


_OBJECT_COLUMNS = ("path", "hash", "error", "meta", "pixels", "shape", "times", "note")


class Embedder:
    """An actor of the pool: loads the model once, embeds the decoded rows of each batch."""

    def __init__(self, model: str, device: str, precision: str, threads: int,
                 revision: str | None = None) -> None:
        from ..embed.encoder import Encoder

        self.enc = Encoder(model, device=device, precision=precision, revision=revision)
        if self.enc.device == "cpu" and threads > 0:
            import torch

            torch.set_num_threads(threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        pixels = batch.pop("pixels")
        shapes = batch.pop("shape")
        idx = [i for i, p in enumerate(pixels) if len(p)]
        vectors = [b""] * len(pixels)
        if idx:
            # an image [H, W, 3] is one picture, a video's frames [n, H, W, 3] are n
            parts = []
            for i in idx:
                dtype, *shape = json.loads(shapes[i])
                parts.append(np.frombuffer(pixels[i], dtype=dtype).reshape(shape))
            parts = [p[None] if p.ndim == 3 else p for p in parts]
            x = np.concatenate(parts) if len(parts) > 1 else parts[0]  # [frames, H, W, 3]
            flat = self.enc.encode_pixels(self.enc.prep.normalise(x))  # [frames, dim]
            ends = np.cumsum([len(p) for p in parts])
            for i, p, e in zip(idx, parts, ends):
                vectors[i] = np.ascontiguousarray(flat[e - len(p) : e], np.float32).tobytes()
        batch["vector"] = np.asarray(vectors, dtype=object)
        return batch


def row_to_read(row: dict[str, Any]) -> _Read:
    """A row back from the cluster as the :class:`~itrcli.jobs.indexer._Read` a local
    read would have given, its vector already computed."""
    import numpy as np

    r = _Read(os.fsdecode(bytes(row["path"])), size=int(row["size"]),
              mtime_ns=int(row["mtime_ns"]), content_hash=str(row["hash"] or ""))
    if row["error"]:
        r.error, r.remember = str(row["error"]), bool(row["remember"])
        return r
    if row["meta"]:
        r.meta = json.loads(row["meta"])
    if row.get("times"):
        r.times = json.loads(row["times"])  # a video: its frames' vectors [n, dim]
    r.note = str(row.get("note") or "") or None
    if len(row["vector"]):
        v = np.frombuffer(row["vector"], dtype=np.float32).copy()
        r.vector = v if r.times is None else v.reshape(len(r.times), -1)
    return r


# --- the run ---------------------------------------------------------------------------------------

class RayIndexRun(IndexRun):
    """An :class:`IndexRun` whose files are read, decoded and embedded on a Ray cluster."""

    def __init__(self, *args, model: str, device: str = "auto", precision: str = "auto",
                 address: str | None = None, logs: bool = False, revision: str | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.summary.engine = "ray"
        self.model, self.device, self.precision = model, device, precision
        self.revision = revision  #: the library's recorded hub revision, loaded by every actor
        self.address, self.logs = address, logs
        self.start_seconds: float | None = None  #: starting or joining Ray (None: not needed)
        self.plan: Plan | None = None

    def _reads(self, todo: list[str], known_hashes: frozenset[str]) -> Iterator[_Read]:
        # Ray starts only when something must be read: an unchanged library costs nothing
        with ray_session(self.address, logs=self.logs) as started:
            self.start_seconds = started
            yield from self._pipeline(todo, known_hashes)

    def _pipeline(self, todo: list[str], known_hashes: frozenset[str]) -> Iterator[_Read]:
        import ray
        import ray.data

        self.plan = plan = plan_resources(alive_nodes(), self.device)
        known = [ray.put(known_hashes)] if known_hashes else []
        per_block = self.batch_size
        ds = ray.data.from_items([{"path": os.fsencode(p)} for p in todo],
                                 override_num_blocks=max(1, math.ceil(len(todo) / per_block)))
        ds = ds.map_batches(decode_batch, batch_size=per_block, batch_format="numpy",
                            num_cpus=plan.decode_cpus,
                            fn_kwargs={"prep": self.prep, "draft": self.draft, "known": known,
                                       "video_budget": self.video_budget})
        ds = ds.map_batches(Embedder, batch_size=per_block, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.actors),
                            num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
                            fn_constructor_kwargs={"model": self.model, "device": self.device,
                                                   "precision": self.precision,
                                                   "threads": plan.threads,
                                                   "revision": self.revision})
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1))
        while True:
            try:
                batch = next(batches, None)
            except Exception as e:
                raise cluster_error(e) from None
            if batch is None:
                return
            for i in range(len(batch["path"])):
                yield row_to_read({k: v[i] for k, v in batch.items()})


def cluster_error(e: BaseException) -> ItrError:
    """A failure on the cluster as one line: the itr error a worker raised (a model that
    cannot load there), else the first line of Ray's."""
    cur: BaseException | None = e
    seen: set[int] = set()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ItrError):
            return type(cur)(str(cur))
        cur = getattr(cur, "cause", None) or cur.__cause__
    # Ray re-raises a worker's exception with the worker's traceback as text
    text = str(e)
    found = re.findall(r"^itrcli\.errors\.(\w+): (.+)$", text, flags=re.M)
    if found:
        name, msg = found[-1]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, ItrError):
            return cls(msg.strip())
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return LibraryError("the Ray pipeline failed: " + (lines[-1][:300] if lines else type(e).__name__))
