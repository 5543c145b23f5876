"""Making the image tower's ONNX export (:mod:`itrcli.embed.imagetower` runs it): traced
from the torch tower read again in float32, optimised once by onnxruntime, checked against
torch's vectors on the run's first photos, timed against torch on them (on this CPU), and
published in the machine's tower cache; in a child process for a large tower, before the
run loads its encoder (the two peaks of memory never add up).
"""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from ..gcpause import give_back_memory
from . import onnxexport, towercache
from .imagetower import (CHECK_FILE, DATA_FILE, FORMAT, KIND, MIN_COSINE, MODEL_FILE, ONNX,
                         TORCH, _cosines, _session, check_pixels, cpu_identity, log,
                         requested)
from .onnxexport import save_optimised


#: Timed passes of each runtime over the export's check photos (the best one counts).
TIMED_PASSES = 2


def _rate(run, n: int) -> float:
    """Images a second of ``run()`` over ``n`` images: the best of :data:`TIMED_PASSES`
    passes (the caller has run it once: warm)."""
    import time

    best = float("inf")
    for _ in range(TIMED_PASSES):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return n / max(best, 1e-9)



class ExportFailed(Exception):
    """The export was made and did not give torch's vectors (or could not be made)."""


def export(encoder, sample_paths: Sequence[str], *, release: bool = False) -> Path:
    """Export ``encoder``'s image tower (read again in float32 from the checkpoint) to the
    tower cache, checked on the photos ``sample_paths`` (those that decode; at least one).

    ``release``: drop the encoder's torch image tower once it is traced (the child
    process of :func:`start`, which has no other use for it), so that its weights are gone
    before onnxruntime loads its own copies.

    The tower is traced the quick way first (without the exporter's whole-graph shape
    inference, as the text tower is: 13% less memory at the export's peak and 1.5 s less
    for ViT-B/32, the same speed in onnxruntime); if that fails, or its graph does not
    give torch's vectors, it is traced again the exporter's usual way.

    Returns the cache entry.  Raises :class:`ExportFailed` (or what torch / onnxruntime
    raise) when it cannot be made or does not give torch's vectors; nothing is cached then.
    """
    import numpy as np
    import torch

    from ..ingest.images import DecodeError, decode_file

    pixels = []
    for p in sample_paths:
        try:
            px = decode_file(str(p), encoder.prep)[0]
        except (DecodeError, OSError):
            continue
        if px is not None:
            pixels.append(px)
    if not pixels:
        raise ExportFailed("no photo to check the export on")
    real = np.stack(pixels).astype(np.float32)  # [n, 3, H, W]
    fixed = check_pixels((1, *real.shape[1:]))
    tower = encoder.float32_image_tower()
    timed = requested() == "auto"  # a forced runtime needs no timings
    x = torch.from_numpy(real)
    with torch.inference_mode(False), torch.no_grad():
        want_real = tower(x).numpy()  # [n, dim]
        want_fixed = tower(torch.from_numpy(fixed)).numpy()  # [1, dim]
        # torch's rate on the same photos, warm, as indexing runs it (float32, every core):
        # the tower the encoder indexes with (embed/clipvision's where it is CLIP's)
        as_indexing = (encoder._image is not None and encoder.image_runtime == TORCH
                       and encoder.dtype == torch.float32 and encoder.device == "cpu")
        indexing = partial(encoder._image, pixel_values=x) if as_indexing else partial(tower, x)
        if timed:
            indexing()
        torch_rate = _rate(indexing, len(real)) if timed else None
    del tower, indexing
    checks = ((real, want_real), (real[:1], want_real[:1]), (fixed, want_fixed))
    try:
        return _export(encoder, checks, release, quick=True, torch_rate=torch_rate)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        log.debug("image tower: the quick trace failed (%s: %s); tracing the usual way",
                  type(e).__name__, str(e)[:200])
        return _export(encoder, checks, release, quick=False, torch_rate=torch_rate)


def _export(encoder, checks, release: bool, *, quick: bool, torch_rate: float | None) -> Path:
    """One try of :func:`export`: trace, optimise, check against ``checks`` (``(pixels,
    torch's vectors)`` pairs, the fixed picture last), time onnxruntime on the same photos
    as indexing runs it (when ``torch_rate`` was timed), publish."""
    import torch

    model, revision = encoder.model_id, encoder.revision
    tower = encoder.float32_image_tower()  # read again if a first try released it
    tmp = towercache.staging(model, revision, KIND)
    try:
        raw = tmp / "raw"
        raw.mkdir()
        _trace(tower, checks[0][0][:2], raw / MODEL_FILE, quick=quick)
        del tower
        if release:
            encoder._image = None
            give_back_memory()
        # onnxruntime's optimised graph (BiasGelu, layer norm, scaled-matmul fusions; its
        # transformers optimiser's fused Attention was measured 10% slower: not used)
        save_optimised(raw / MODEL_FILE, tmp / MODEL_FILE, DATA_FILE)
        if release:
            give_back_memory()  # the optimising session's copies, before the checking one's
        shutil.rmtree(raw)
        # timing: packed weights, as indexing runs it; else none (less memory at the peak)
        sess = _session(tmp, prepack=torch_rate is not None)
        worst = 1.0
        # the run's photos in one batch and one at a time: the batch axis is dynamic
        for x, want in checks:
            (got,) = sess.run(["embedding"], {"pixel_values": x})
            if got.shape != want.shape:
                raise ExportFailed(f"exported image tower gives {got.shape}, torch {want.shape}")
            worst = min(worst, float(_cosines(got, want).min()))
        if not worst >= MIN_COSINE:
            raise ExportFailed(f"exported image tower differs from torch: cosine {worst:.6f} "
                               f"< {MIN_COSINE}")
        rates = None
        if torch_rate is not None:  # the check above warmed it on the same photos
            feed = {"pixel_values": checks[0][0]}
            onnx_rate = _rate(partial(sess.run, ["embedding"], feed), len(checks[0][0]))
            rates = {TORCH: round(torch_rate, 2), ONNX: round(onnx_rate, 2),
                     "photos": len(checks[0][0]), "cpu": cpu_identity()}
        del sess
        fixed, want_fixed = checks[-1]
        (tmp / CHECK_FILE).write_text(json.dumps({
            "format": FORMAT, "shape": list(fixed.shape),
            "vector": [float(v) for v in want_fixed[0]]}))
        import onnxruntime

        return towercache.publish(tmp, model, revision, KIND, {
            "format": FORMAT, "min_cosine": round(worst, 7), "photos": len(checks[0][0]),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "quick_trace": quick, "rates": rates})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _trace(tower, example, path: Path, *, quick: bool) -> None:
    """The tower traced to ``path`` (weights written once to ``path``.data), the batch axis
    dynamic, by the tracer the text tower's export uses (:func:`onnxexport.trace`)."""
    import torch

    axes = {"pixel_values": {0: "batch"}, "embedding": {0: "batch"}}
    onnxexport.trace(tower, (torch.from_numpy(example),), ["pixel_values"], axes, path, quick=quick)




# -- the export in a child process ---------------------------------------------------------

def start(model: str, revision: str | None, sample_paths: Sequence[str]):
    """Start exporting ``model``'s image tower in a child process that dies with its
    parent; an :class:`itrcli.embed.onnxexport.ExportProcess` (``wait()``:
    exit status 0 when exported, and the last line of its error output)."""
    return onnxexport.spawn(__name__, [json.dumps({"model": model, "revision": revision,
                                        "paths": list(map(str, sample_paths)),
                                        "parent": os.getpid()})])


def _child_main() -> None:
    """``python -c ... ARGS_JSON``: the child of :func:`start`."""
    import sys

    a = json.loads(sys.argv[1])
    onnxexport.die_with(int(a["parent"]))
    code = 1
    try:
        export(torch_encoder(a["model"], a["revision"]), a["paths"], release=True)
        code = 0
    except Exception as e:
        print(f"image tower export failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(code)


def torch_encoder(model: str, revision: str | None):
    """A float32 CPU encoder of ``model``'s image tower that runs torch (what an export is
    made from and checked against)."""
    from .encoder import Encoder

    saved = os.environ.get("ITR_IMAGE_RUNTIME")
    os.environ["ITR_IMAGE_RUNTIME"] = "torch"
    try:
        return Encoder(model, device="cpu", precision="fp32", towers="image", revision=revision)
    finally:
        if saved is None:
            del os.environ["ITR_IMAGE_RUNTIME"]
        else:
            os.environ["ITR_IMAGE_RUNTIME"] = saved


def export_for_run(model: str, revision: str | None, sample_paths: Sequence[str],
                   encoder: Any = None) -> str | None:
    """Make the export for an index run, before it loads its encoder (in a child process
    for a large tower, else here with ``encoder`` or one loaded for it).  Returns None when
    exported, else one line saying why not.  Never raises (but for Ctrl-C)."""
    try:
        if onnxexport.use_child(model):
            code, why = start(model, revision, sample_paths).wait()
            return None if code == 0 else (why or f"exit status {code}")
        export(encoder if encoder is not None else torch_encoder(model, revision), sample_paths)
        return None
    except KeyboardInterrupt:
        raise
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:300]}"
