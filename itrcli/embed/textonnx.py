"""The text tower exported to ONNX, for sub-second cold searches.

Importing torch + transformers costs ~4.5 s; onnxruntime + tokenizers cost ~0.1 s.  When a
library is bound to a model, its text tower (projection and L2 normalisation included) is
exported once to ``<library>/text/`` with the weights as external data (which onnxruntime
memory-maps: a 3x faster session start) together with ``tokenizer.json`` and the
tokenizer settings.  :class:`OnnxTextEncoder` runs it with no torch import at all.  If the
export is missing or fails, search falls back to the torch encoder: same vectors, slower.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from ..constants import TEXT_TOWER_DIR as DIRNAME
MODEL_FILE = "text.onnx"
DATA_FILE = "text.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
SETTINGS_FILE = "settings.json"


def export(encoder, library_dir: Path) -> Path:
    """Export ``encoder``'s text tower and tokenizer to ``<library>/text`` atomically.

    Raises whatever torch/onnx raise; callers treat a failure as "no fast path".
    """
    import torch

    out = Path(library_dir) / DIRNAME
    tmp = Path(library_dir) / f".{DIRNAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = _fast_tokenizer(encoder.tokenizer)
    tok.save(str(tmp / TOKENIZER_FILE))
    pad_id = _pad_id(encoder.tokenizer)
    use_mask = encoder.model_type != "siglip"
    settings = {
        "max_length": encoder.text_max_length,
        "padding": encoder.text_padding,
        "pad_id": pad_id,
        "use_attention_mask": use_mask,
        "dim": encoder.dim,
        "model": encoder.model_id,
        "lowercase": bool(getattr(encoder.tokenizer, "do_lower_case", False))
        and encoder.model_type == "siglip",
        # Gemma's tokenizer (SigLIP 2) pads on the left unless its config says otherwise;
        # SigLIP pools the last position, so the side changes the vector
        "padding_side": getattr(encoder.tokenizer, "padding_side", "right") or "right",
        "truncation_side": getattr(encoder.tokenizer, "truncation_side", "right") or "right",
    }

    # Only the text tower, in float32 from the checkpoint's own weights (a bf16 or fp16
    # model cast back to float32 would carry its rounding into every cold search).
    text_model, proj = encoder.float32_text_tower()

    class TextTower(torch.nn.Module):
        """``get_text_features`` of CLIP/SigLIP, then L2 normalisation."""

        def __init__(self) -> None:
            super().__init__()
            self.text_model = text_model
            self.proj = proj

        def forward(self, input_ids, attention_mask=None):
            out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
            f = out.pooler_output  # [batch, hidden]
            if self.proj is not None:
                f = self.proj(f)  # [batch, dim]
            return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    sample = encoder.tokenize(["a photo of a dog", "two children on a lawn"])
    ids = sample["input_ids"]
    args: tuple[Any, ...] = (ids,)
    names = ["input_ids"]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "embedding": {0: "batch"}}
    if use_mask:
        args = (ids, sample["attention_mask"])
        names.append("attention_mask")
        axes["attention_mask"] = {0: "batch", 1: "seq"}
    raw = tmp / "raw"  # the plain export; onnxruntime's optimised copy replaces it
    raw.mkdir()
    onnx_path = raw / MODEL_FILE
    import warnings

    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about constant shapes: expected
        torch.onnx.export(TextTower(), args, str(onnx_path), input_names=names,
                          output_names=["embedding"], dynamic_axes=axes, opset_version=17,
                          dynamo=False)
    _optimise(onnx_path, tmp)
    shutil.rmtree(raw)
    (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _optimise(src: Path, d: Path) -> None:
    """Save onnxruntime's own optimised graph of ``src`` (fused attention, GELU, layer
    norm) as ``d/text.onnx``, with every weight in one external file that onnxruntime
    memory-maps, so that each search loads it with optimisation off: session start drops
    from ~0.4 s to ~0.1 s for ViT-B/32.  EXTENDED (not ALL) keeps the saved graph free of
    CPU-specific layouts, so a library can move between machines."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(d / MODEL_FILE)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                DATA_FILE)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                "1024")
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])


def _fast_tokenizer(hf_tokenizer):
    """The ``tokenizers.Tokenizer`` behind a transformers tokenizer (converted if slow)."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None) or getattr(hf_tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "save"):
        tok = backend
    else:
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        tok = convert_slow_tokenizer(hf_tokenizer)
    tok = type(tok).from_str(tok.to_str())  # a copy we may reconfigure
    tok.no_padding()
    tok.no_truncation()
    return tok


def _pad_id(hf_tokenizer) -> int:
    pid = getattr(hf_tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(hf_tokenizer, "eos_token_id", 0) or 0
    return int(pid)


class OnnxTextEncoder:
    """Texts -> L2-normalised vectors with onnxruntime + tokenizers (no torch)."""

    def __init__(self, library_dir: Path) -> None:
        d = Path(library_dir) / DIRNAME
        self.settings = json.loads((d / SETTINGS_FILE).read_text())
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(d / TOKENIZER_FILE))
        ml = int(self.settings["max_length"])
        # exports written before the sides were recorded padded and truncated on the right
        self.tok.enable_truncation(max_length=ml,
                                   direction=self.settings.get("truncation_side", "right"))
        side = self.settings.get("padding_side", "right")
        if self.settings["padding"] == "max_length":
            self.tok.enable_padding(pad_id=int(self.settings["pad_id"]), length=ml, direction=side)
        else:
            self.tok.enable_padding(pad_id=int(self.settings["pad_id"]), direction=side)
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = min(2, os.cpu_count() or 1)
        # optimised once at export (see _optimise); pre-packing weights costs more at
        # session start than it saves on one short text
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.add_session_config_entry("session.disable_prepacking", "1")
        self.session = ort.InferenceSession(str(d / MODEL_FILE), sess_options=so,
                                            providers=["CPUExecutionProvider"])
        self.dim = int(self.settings["dim"])

    @staticmethod
    def available(library_dir: Path) -> bool:
        d = Path(library_dir) / DIRNAME
        return (d / MODEL_FILE).exists() and (d / SETTINGS_FILE).exists()

    def tokenize(self, texts: Sequence[str]):
        import numpy as np

        if self.settings.get("lowercase"):
            texts = [t.lower() for t in texts]
        encs = self.tok.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encs], dtype=np.int64)  # [batch, seq]
        mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask

    def encode_texts(self, texts: Sequence[str]):
        """``[n, dim]`` float32, L2-normalised."""
        import numpy as np

        ids, mask = self.tokenize(texts)
        feeds = {"input_ids": ids}
        if self.settings["use_attention_mask"]:
            feeds["attention_mask"] = mask
        (out,) = self.session.run(["embedding"], feeds)
        return np.asarray(out, dtype=np.float32)


def remove_export(library_dir: Path) -> None:
    """Delete the exported text tower (``--reindex``: it belongs to the old model)."""
    shutil.rmtree(Path(library_dir) / DIRNAME, ignore_errors=True)
