"""What the text and image towers' ONNX exports share: a torch module traced to a graph
whose weights are written once to one external file (:func:`trace`), onnxruntime's
optimised copy of it (:func:`save_optimised`), and the child process a large tower's
export runs in (:func:`use_child`, :func:`spawn`, :func:`die_with`).

:mod:`itrcli.embed.textonnx` exports the text tower into a library,
:mod:`itrcli.embed.imageexport` the image tower into the machine's tower cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


class ExportUnsupported(Exception):
    """This model's tower cannot be exported (a text tower whose tokenizer has no
    ``tokenizers`` form): a property of the model, not retried."""


class _Unmapped(Exception):
    """The graph has an input that is no weight of the module (the plain export is used)."""


def trace(module, args, names, axes, path: Path, *, quick: bool) -> None:
    """Trace ``module`` to ``path``, its weights to ``path``.data."""
    import warnings

    import torch

    # nn.MultiheadAttention's fused inference path (open_clip's MobileCLIP text towers, which
    # take no mask) is one operator that ONNX lacks; the plain path computes the same
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), \
            _whole_graph_inference(off=quick):
        warnings.simplefilter("ignore")  # tracer notes about constant shapes: expected
        if mha is not None:
            mha.set_fastpath_enabled(False)
        try:
            _export_graph_then_weights(module, args, names, axes, path)
        except _Unmapped:
            for f in path.parent.iterdir():
                f.unlink()
            torch.onnx.export(module, args, str(path), input_names=names,
                              output_names=["embedding"], dynamic_axes=axes,
                              opset_version=17, dynamo=False)
        finally:
            if mha is not None:
                mha.set_fastpath_enabled(fast)


class _whole_graph_inference:
    """With ``off``, the TorchScript exporter's two passes of shape and type inference over
    the whole finished graph do nothing (restored on exit; a no-op where this torch has no
    such pass).

    They take 2.8 of the exporter's 3.9 s for a ViT-B/32 text tower, and the file needs
    nothing from them: each node's types are inferred as it is converted, the outputs'
    are set from the trace, and onnxruntime infers shapes itself when it loads the graph.
    :func:`export` keeps such a graph only when it gives the torch tower's vectors.
    """

    NAME = "_jit_pass_onnx_graph_shape_type_inference"

    def __init__(self, *, off: bool) -> None:
        self.off, self.saved = off, None

    def __enter__(self) -> None:
        import torch

        if self.off and hasattr(torch._C, self.NAME):
            self.saved = getattr(torch._C, self.NAME)
            setattr(torch._C, self.NAME, lambda *args, **kwargs: None)

    def __exit__(self, *exc) -> None:
        import torch

        if self.saved is not None:
            setattr(torch._C, self.NAME, self.saved)


def _export_graph_then_weights(module, args, names, axes, path: Path) -> None:
    """``torch.onnx.export`` of the graph alone (weights as graph inputs), then each weight
    written once, straight from the module's tensor, to ``<path>.data`` as an external
    initializer.  The same graph as a plain export, for about half the exporter's memory
    (it never holds a serialised copy of the weights) and a third less time."""
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto

    torch.onnx.export(module, args, str(path), input_names=names, output_names=["embedding"],
                      dynamic_axes=axes, opset_version=17, dynamo=False, export_params=False,
                      do_constant_folding=False)  # folding needs the weights; onnxruntime folds
    model = onnx.load(str(path))
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    data = path.name + ".data"
    keep, offset = [], 0
    with open(path.parent / data, "wb") as f:
        for inp in model.graph.input:
            if inp.name in names:
                keep.append(inp)
                continue
            if inp.name not in tensors:
                raise _Unmapped(inp.name)
            a = np.ascontiguousarray(tensors[inp.name].detach().cpu().numpy())
            t = TensorProto(name=inp.name, data_type=onnx.helper.np_dtype_to_tensor_dtype(a.dtype),
                            dims=a.shape, data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data), ("offset", str(offset)), ("length", str(a.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            f.write(a.tobytes())  # one weight at a time: no copy of them all
            offset += a.nbytes
            model.graph.initializer.append(t)
    del model.graph.input[:]
    model.graph.input.extend(keep)
    onnx.save(model, str(path))


def save_optimised(src: Path, out: Path, data_file: str) -> None:
    """Save onnxruntime's own optimised graph of ``src`` (fused attention, GELU, layer
    norm) as ``out``, with every weight in one external file ``data_file`` beside it that
    onnxruntime memory-maps, so that a session loads it with optimisation off (the text
    tower: session start ~0.4 s -> ~0.1 s for ViT-B/32).  EXTENDED (not ALL) keeps the
    saved graph free of CPU-specific layouts, so an export can move between machines.
    The text and image towers' exports both go through here."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                data_file)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                "1024")
    # this session only writes the graph: no packed copies of the weights (memory)
    so.add_session_config_entry("session.disable_prepacking", "1")
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])


# -- the export in a child process -------------------------------------------------------

#: Towers smaller than this (weights on disk) are exported in the indexing process itself:
#: a child's own torch import would cost more than the tower's memory.
CHILD_MIN_BYTES = 64 << 20


def use_child(model: str) -> bool:
    """Whether an export of ``model``'s tower (text or image) runs in a child process:
    ``ITR_TEXT_EXPORT=child`` or ``inline`` decides; otherwise a child for checkpoints of
    CHILD_MIN_BYTES or more (a hub id not yet in the local cache counts as large)."""
    how = os.environ.get("ITR_TEXT_EXPORT", "").strip().lower()
    if how in ("child", "inline"):
        return how == "child"
    d = Path(model)
    if not d.is_dir():
        return True
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) >= CHILD_MIN_BYTES


class ExportProcess:
    """An export running in a child process (see :func:`spawn`)."""

    def __init__(self, proc, log) -> None:
        self.proc, self.log = proc, log

    def wait(self) -> tuple[int, str]:
        """Wait for the child: (exit status, its last line of error output or "")."""
        try:
            code = self.proc.wait()
        except BaseException:
            self.cancel()
            raise
        self.log.seek(0)
        lines = self.log.read().decode("utf-8", "replace").strip().splitlines()
        self.log.close()
        return code, (lines[-1] if lines and code else "")

    def cancel(self) -> None:
        """Stop the child (the run failed or was interrupted); its files are left for the
        next export to remove."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def spawn(module: str, args: Sequence[str]) -> ExportProcess:
    """Run ``_child_main()`` of ``module`` (an ``itrcli`` module) in a child process as
    ``python -c ... ARGS``, imported from this package's own location (never the current
    directory), with no input or output but its error output, kept for
    :meth:`ExportProcess.wait`."""
    import subprocess
    import sys
    import tempfile

    pkg_parent = str(Path(__file__).resolve().parents[2])
    code = (f"import sys; sys.path[0] = {pkg_parent!r}; "
            f"from {module} import _child_main; _child_main()")
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=log, close_fds=True)
    return ExportProcess(proc, log)


def die_with(parent: int) -> None:
    """End this process when its parent dies, so that a killed run leaves no export behind
    that outlives it: SIGKILL from the kernel at once (Linux), and a thread that looks
    every half second (everywhere: the signal is not available elsewhere)."""
    import signal
    import sys
    import threading

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before this was armed
        os._exit(1)

    def watch() -> None:
        import time

        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="itr-parent-watch", daemon=True).start()
