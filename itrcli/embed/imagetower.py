"""The image tower's runtime, chosen per machine by measurement: onnxruntime or torch for
float32 on the CPU, whichever the export timed faster on this CPU; torch everywhere else
(bf16 on CPUs with native bf16, CUDA).

Why: on a CPU without native bf16 the image tower is float32, and onnxruntime's own kernels
(MLAS) ran ViT-B/32 1.21-1.34x torch's on a 2-core AVX2 EPYC but 0.96-1.1x on an AVX-512
Xeon (docs/performance.md): no rule of CPU flags says which wins, so the export times both
on its check photos, on this machine, and records the rates (:func:`timed_choice`).
onnxruntime is used where it was at least :data:`MIN_GAIN` times torch's rate (its packed
weights cost memory; a tie is not worth them); an export without timings of this CPU (made
by an older itr, or timed on another machine sharing the cache) keeps the old rule,
onnxruntime.  torch's native bf16 kernels are 2-3x any float32 runtime where the CPU has
them, and CUDA is torch's: neither is timed.  ``ITR_IMAGE_RUNTIME=torch`` or ``onnx``
forces a choice (``onnx`` still applies only to float32 on the CPU).

The export (made by :mod:`itrcli.embed.imageexport`: the tower traced to ONNX with eager
attention, optimised once by onnxruntime: GELU, layer norm and scaled-matmul fusions, saved
with its weights in one external file) is made once per model and revision and kept in the per-machine tower cache
(:mod:`itrcli.embed.towercache`, kind :data:`KIND`), so the first library of a model on a
machine pays for it and every later run of every library uses it.  It is made at the start
of the first index run that needs it and may encode :data:`WORTH_EXPORTING` files or more
(a smaller run would spend more on the export than it saves), before the run loads its
encoder (in a child process for a large tower, while the run holds no model: the two peaks
of memory never add up), so that the whole run encodes with it, and it is kept only when
it gives the torch tower's vectors on the run's first photos: cosine >= :data:`MIN_COSINE`
for each.  Each use checks it again on one fixed picture; any failure (a damaged file, an
onnxruntime that will not load it, an error while encoding) falls back to torch with one
line on the ``itr`` logger (shown under ``-v``), and a damaged export is removed, to be
made again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

from . import towercache

#: The tower cache's kind for this export; FORMAT changes when the exporter's output does.
KIND = "image-onnx"
FORMAT = 1
MODEL_FILE = "image.onnx"
DATA_FILE = "image.onnx.data"
CHECK_FILE = "check.json"
#: What the export must give: every vector at least this cosine from torch's (float32).
MIN_COSINE = 0.99999
#: Files a run must have to encode before it makes the export (:func:`worth_exporting`).
WORTH_EXPORTING = 1000
#: onnxruntime is chosen where the export timed it at least this times torch's rate.
MIN_GAIN = 1.05
#: ``ITR_IMAGE_RUNTIME`` values.
CHOICES = ("auto", "torch", "onnx")
#: The names recorded in the library (``image_runtime`` in ``itr info``).
ONNX, TORCH = "onnxruntime", "torch"

log = logging.getLogger("itr")


def requested() -> str:
    """``ITR_IMAGE_RUNTIME`` (``auto`` when unset; an unknown value is ``auto``, said once
    on the ``itr`` logger)."""
    value = os.environ.get("ITR_IMAGE_RUNTIME", "").strip().lower() or "auto"
    if value not in CHOICES:
        log.info("ITR_IMAGE_RUNTIME=%s: expected one of %s; using auto", value, ", ".join(CHOICES))
        return "auto"
    return value


def wants_onnx(device: str, precision: str) -> bool:
    """Whether an encoder on ``device`` at ``precision`` (both resolved) runs its image
    tower with onnxruntime: float32 on the CPU, unless ``ITR_IMAGE_RUNTIME=torch``, and
    onnxruntime importable."""
    if requested() == "torch" or device != "cpu" or precision != "fp32":
        return False
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def worth_exporting(count: int) -> bool:
    """Whether a run that may encode ``count`` files should make the export first (when it
    is due): one of :data:`WORTH_EXPORTING` or more, where the time onnxruntime saves
    exceeds the export's (about 9 s once per machine, against onnxruntime's 1.21-1.34x
    torch's speed on AVX2, and nothing on AVX-512: docs/performance.md), or any run with
    ``ITR_IMAGE_RUNTIME=onnx``.  A smaller run encodes with torch and leaves the export to
    the first large one."""
    return count >= WORTH_EXPORTING or requested() == "onnx"


def export_due(model: str, revision: str | None, device: str, precision: str) -> bool:
    """Whether an index run on ``device`` at ``precision`` should leave an export of
    ``model`` behind: it would use one, and the cache has none."""
    return wants_onnx(device, precision) and towercache.lookup(model, revision, KIND) is None


# -- running the export ------------------------------------------------------------------

def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _session(d: Path, *, prepack: bool = True):
    """The tower's session; ``prepack=False`` (the export's own check, a few photos): no
    packed copy of the weights beside onnxruntime's (a third of the speed, 350 MB less
    for ViT-B/32 at the export's peak)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = _threads()
    so.inter_op_num_threads = 1
    # optimised and saved at export (portable fusions); the CPU-specific layouts on top
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # sleep rather than spin between batches, as torch's threads do (OMP_WAIT_POLICY):
    # the decode threads beside the encoder need the cores
    if os.environ.get("ITR_ORT_SPIN", "") != "1":
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(d / MODEL_FILE), sess_options=so,
                                providers=["CPUExecutionProvider"])


class OnnxImageTower:
    """``pixel_values`` (a float32 torch tensor ``[n, 3, H, W]``) -> unnormalised
    embeddings ``[n, dim]`` (a torch tensor), like the torch tower's callable.  An error
    while encoding hands the encoder (and this batch) to torch, for good."""

    name = ONNX

    def __init__(self, d: Path, encoder) -> None:
        self.session = _session(d)
        self.encoder = encoder

    def __call__(self, pixel_values):
        import numpy as np
        import torch

        try:
            x = np.ascontiguousarray(pixel_values.float().numpy())
            (out,) = self.session.run(["embedding"], {"pixel_values": x})
            return torch.from_numpy(out)
        except Exception as e:
            log.info("image tower: onnxruntime failed while encoding (%s: %s); using torch",
                     type(e).__name__, str(e)[:200])
            enc = self.encoder
            self.encoder = None
            enc._image = enc._tower("image", enc.dtype)
            enc.image_runtime = TORCH
            return enc._image(pixel_values=pixel_values)


def open_for(encoder) -> OnnxImageTower | None:
    """The onnxruntime image tower for ``encoder`` when it is chosen and its export is in
    the cache and still gives its check vector; else None (torch), with one line on the
    ``itr`` logger saying why when an export was there and failed (then removed)."""
    if not wants_onnx(encoder.device, encoder.precision):
        return None
    model, revision = encoder.model_id, encoder.revision
    d = towercache.lookup(model, revision, KIND)
    if d is None:
        log.debug("image tower: torch (no onnxruntime export of this model yet; the first "
                  "run of %s files or more makes it)", f"{WORTH_EXPORTING:,}")
        return None
    if requested() == "auto":
        chosen, why = timed_choice(d)
        if chosen == TORCH:
            log.debug("image tower: torch (%s)", why)
            return None
        log.debug("image tower: onnxruntime chosen (%s)", why)
    try:
        check = json.loads((d / CHECK_FILE).read_text())
        if check.get("format") != FORMAT:
            raise ValueError(f"export format {check.get('format')}, expected {FORMAT}")
        tower = OnnxImageTower(d, None)
        import numpy as np

        (got,) = tower.session.run(["embedding"], {"pixel_values": check_pixels(check["shape"])})
        want = np.asarray(check["vector"], dtype=np.float32)
        cos = _cosines(got, want[None])[0]
        if not cos >= MIN_COSINE:
            raise ValueError(f"check vector off: cosine {cos:.6f}")
    except Exception as e:
        log.info("image tower: onnxruntime export unusable (%s: %s); using torch",
                 type(e).__name__, str(e)[:200])
        towercache.remove(model, revision, KIND)
        return None
    tower.encoder = encoder
    log.debug("image tower: onnxruntime (the export in %s)", d)
    return tower


def cpu_identity() -> str:
    """What the export's timings hold for: this CPU's model and instruction-set flags and the
    cores this process may use (a short digest)."""
    import hashlib
    import platform

    ident = [platform.machine(), str(_threads())]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            seen = set()
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features") and key not in seen:
                    seen.add(key)
                    ident.append(line.strip())
    except OSError:  # macOS, Windows: what the platform names (no /proc)
        ident.append(platform.processor())
    ident.append(_detected_isa())
    return hashlib.blake2b("\n".join(ident).encode(), digest_size=8).hexdigest()


def _detected_isa() -> str:
    """The instruction sets this process's libraries detect at run time (numpy asks CPUID,
    as torch and onnxruntime do): they can differ from /proc/cpuinfo's flags where CPUID is
    masked for the process (bench/avx2only), and a timing holds only for the kernels run."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        try:  # numpy 1.x
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return ""
    return " ".join(sorted(k for k, v in __cpu_features__.items() if v))


def _rates_here(d: Path) -> tuple[float, float, int] | str:
    """(torch img/s, onnxruntime img/s, photos) that the export in ``d`` timed on this CPU,
    or why there are none."""
    try:
        rates = json.loads((d / towercache.DONE).read_text()).get("rates") or {}
        torch_rate, onnx_rate = float(rates[TORCH]), float(rates[ONNX])
        photos = int(rates.get("photos", 0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "the export has no timings"
    if rates.get("cpu") != cpu_identity():
        return "the export was timed on another CPU"
    return torch_rate, onnx_rate, photos


def _faster(torch_rate: float, onnx_rate: float) -> str:
    """The runtime ``auto`` uses for these rates: onnxruntime from :data:`MIN_GAIN` x torch's."""
    return ONNX if onnx_rate >= MIN_GAIN * torch_rate else TORCH


def timed_choice(d: Path) -> tuple[str, str]:
    """(:data:`ONNX` or :data:`TORCH`, why) for the export in ``d`` under ``auto``: the
    runtime its timings on this CPU found faster (onnxruntime only by :data:`MIN_GAIN` or
    more); without timings of this CPU, onnxruntime (the rule before timings)."""
    got = _rates_here(d)
    if isinstance(got, str):
        return ONNX, got + "; onnxruntime by rule"
    torch_rate, onnx_rate, _ = got
    said = (f"timed on this CPU at the export: onnxruntime {onnx_rate:.1f} img/s, "
            f"torch {torch_rate:.1f}")
    if _faster(torch_rate, onnx_rate) == ONNX:
        return ONNX, said
    return TORCH, said + f"; onnxruntime is used from {MIN_GAIN}x torch's rate"


def machine_timing(model: str, revision: str | None) -> dict | None:
    """What this machine's export of ``model`` timed (``torch`` and ``onnxruntime`` img/s,
    ``photos``) and what ``auto`` makes of it (``chosen``), when the export is here and was
    timed on this CPU; else None (``itr info``).  Reads two small files; imports nothing."""
    d = towercache.lookup(model, revision, KIND)
    got = _rates_here(d) if d is not None else None
    if not isinstance(got, tuple):
        return None
    torch_rate, onnx_rate, photos = got
    return {TORCH: torch_rate, ONNX: onnx_rate, "photos": photos,
            "chosen": _faster(torch_rate, onnx_rate)}


def check_pixels(shape: Sequence[int]):
    """The one fixed picture each use of an export is checked on: ``[1, 3, H, W]``."""
    import numpy as np

    return np.random.default_rng(20261206).standard_normal(tuple(shape)).astype(np.float32)


def _cosines(a, b):
    import numpy as np

    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return (a * b).sum(-1)
