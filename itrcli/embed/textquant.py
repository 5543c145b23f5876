"""The exported text tower with int8 weights (``--text-precision int8``): a text search's
tower about twice as fast on the CPU, at a cosine of ~0.9993 to the float32 vector.

Made from the library's float32 export (:mod:`itrcli.embed.textonnx`) the first time a
search asks for it, and kept beside it in ``<library>/text/``: every weight matrix the
tower multiplies by is stored in 8 bits with a scale per output column (onnxruntime's
dynamic quantisation, ``MatMul`` only: the token table, layer norms and attention stay
float32), and each matrix multiply quantises its input on the fly to uint8 with one scale
for the whole input.  That scale is why :class:`~itrcli.embed.textonnx.OnnxTextEncoder`
runs an int8 tower on one text at a time: a text batched with others would get the
batch's scale, and so another vector than a search for it alone.  Integer arithmetic has
no rounding, so the vector does not depend on the thread count either.

The weights are signed where onnxruntime multiplies uint8 by int8 without overflow (x86
with AVX-512 VNNI, Arm), else unsigned: on AVX2 its uint8 x int8 kernel adds pairs of
products in 16 bits, which overflow (a cosine of 0.996 to the float32 vector, measured),
where uint8 x uint8 does not (0.9993, as with VNNI, in 1.2 times the overflowing
kernel's time).  The same text
on two kinds of CPU can differ by a cosine of ~0.998: their float kernels round apart,
and a rounding that moves an input across a step of its uint8 code moves the vector.

The int8 files are stamped with the float32 files' sizes and times and the kind of
weights: a new export (another model, ``itr index --reindex``), or a library moved to a
CPU that wants the other kind, makes them stale, and the next int8 search makes them
again.  Where the library's folder cannot be written, the int8 tower is made in a
temporary folder for this process alone.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..constants import TEXT_TOWER_DIR as DIRNAME

MODEL_FILE = "text-int8.onnx"
DATA_FILE = "text-int8.onnx.data"
STAMP_FILE = "text-int8.json"
#: The int8 files' format: another one is made again.
FORMAT = 1


def weight_kind() -> str:
    """``s8`` where onnxruntime's uint8 x int8 products cannot overflow (x86 with AVX-512
    VNNI, as the CPU itself reports it to numpy; Arm), else ``u8``."""
    import platform

    if platform.machine().lower() in ("arm64", "aarch64"):
        return "s8"
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy 1
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return "u8"
    return "s8" if features.get("AVX512VNNI") else "u8"


def encoder(library_dir: Path, *, warm: bool = False, threads: int | None = None):
    """An :class:`~itrcli.embed.textonnx.OnnxTextEncoder` of the library's int8 tower
    (:func:`model_path`: made now when missing or stale), one text at a time."""
    from .textonnx import OnnxTextEncoder

    return OnnxTextEncoder(library_dir, warm=warm, threads=threads,
                           model=model_path(library_dir), precision="int8")


def model_path(library_dir: Path) -> Path:
    """The int8 tower of the library's export, made now when missing or stale (seconds:
    ~4 s for ViT-B/32's tower).  Raises OSError or onnxruntime's errors when it cannot be
    made (the caller then searches with the float32 tower)."""
    d = Path(library_dir) / DIRNAME
    kind = weight_kind()
    source = {**_source_stamp(d), "weights": kind}
    if _stamp(d) == source:
        return d / MODEL_FILE
    log = logging.getLogger("itr")
    log.info("making the int8 text tower (once for this export)")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{DIRNAME}.tmp-int8-", dir=library_dir))
    except OSError:  # a library folder that cannot be written: this process's own copy
        staging = Path(tempfile.mkdtemp(prefix="itr-text-int8-"))
    try:
        _quantise(d, staging, kind)
        (staging / STAMP_FILE).write_text(json.dumps(source))
        if {**_source_stamp(d), "weights": kind} != source:
            raise OSError("the library's text tower was replaced while it was quantised")
        for name in (DATA_FILE, MODEL_FILE, STAMP_FILE):  # the stamp last: it says "done"
            os.replace(staging / name, d / name)
    except OSError as e:
        if not (staging / STAMP_FILE).exists():
            shutil.rmtree(staging, ignore_errors=True)
            raise
        # made, and not kept in the library (a folder that cannot be written)
        log.info("int8 text tower kept for this process only: %s", e)
        atexit.register(shutil.rmtree, staging, True)
        return staging / MODEL_FILE
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return d / MODEL_FILE


def current(library_dir: Path) -> bool:
    """Whether the library holds an int8 tower made from its export now (of either kind
    of weights: telling which this CPU wants imports numpy, which ``itr info`` does not)."""
    d = Path(library_dir) / DIRNAME
    stamp = _stamp(d)
    try:
        return stamp is not None and {k: stamp.get(k) for k in ("format", "from")} == \
            _source_stamp(d)
    except OSError:
        return False


def _quantise(export_dir: Path, out: Path, kind: str) -> None:
    """``export_dir``'s float32 tower with 8-bit weights (``kind``: :func:`weight_kind`),
    as :data:`MODEL_FILE` (graph optimised as the float32 export is, weights in
    :data:`DATA_FILE`) in ``out``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .onnxexport import save_optimised
    from .textonnx import DATA_FILE as FP32_DATA, MODEL_FILE as FP32_MODEL

    # a copy to read: onnx refuses weights in a file of several hard links (the export's
    # are shared with the machine's tower cache), and the quantiser writes its own files
    # beside the model it reads
    src = out / "source"
    src.mkdir()
    for name in (FP32_MODEL, FP32_DATA):
        shutil.copyfile(export_dir / name, src / name)
    raw = out / "raw.onnx"
    with _quiet_root_logger():
        quantize_dynamic(
            str(src / FP32_MODEL), str(raw), op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8 if kind == "s8" else QuantType.QUInt8,
            # the export's fused operators (onnxruntime's) have no types for onnx's inference
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    save_optimised(raw, out / MODEL_FILE, DATA_FILE)
    for p in out.iterdir():
        if p.name not in (MODEL_FILE, DATA_FILE):
            p.unlink() if p.is_file() else shutil.rmtree(p, ignore_errors=True)


def _quiet_root_logger():
    """The quantiser's advice goes to the root logger (``logging.warning``), which would
    also give a process without logging set up a handler on stderr for good: neither (a
    root logger with a handler is not set up again)."""
    from ..logs import handled

    return handled(logging.getLogger(), logging.NullHandler(), logging.ERROR)


def _source_stamp(export_dir: Path) -> dict:
    """What the int8 tower is made from: the float32 files' sizes and times."""
    from .textonnx import DATA_FILE as FP32_DATA, MODEL_FILE as FP32_MODEL

    files = {}
    for name in (FP32_MODEL, FP32_DATA):
        st = os.stat(export_dir / name)  # OSError: no export
        files[name] = [st.st_size, st.st_mtime_ns]
    return {"format": FORMAT, "from": files}


def _stamp(export_dir: Path) -> dict | None:
    try:
        if not (export_dir / MODEL_FILE).exists():
            return None
        return json.loads((export_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


__all__ = ["current", "encoder", "model_path", "weight_kind"]
