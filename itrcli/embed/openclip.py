"""open_clip checkpoints, the second backend of the dual encoder.

A model is an open_clip one when it is named ``hf-hub:ORG/NAME`` or is a local folder
holding ``open_clip_config.json`` and ``open_clip_model.safetensors``.  Only safetensors
weights are read, never a pickle (``open_clip_pytorch_model.bin`` is left alone).

The model is built by ``open_clip.create_model`` from the folder's config with no weights,
then only the towers asked for are read from the safetensors file (indexing reads the image
tower's weights alone).  Images are preprocessed by itr's own code with open_clip's
``preprocess_val`` recipe (:func:`preprocess_from`: resize, centre crop with torchvision's
rounding, mean and std), so decoding keeps its draft mode and worker threads; a test checks
the vectors against open_clip's own pipeline.  Texts are tokenized by open_clip's own
tokenizer; the exported ONNX text tower (:mod:`itrcli.embed.textonnx`) uses the same
vocabulary as a ``tokenizers`` BPE, checked to give the same ids.

open_clip (and timm, which its MobileCLIP towers use) import torchvision: ``pip install
'itr-search[openclip]'`` with a torchvision that matches the installed torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import ModelError
from .encoder import Encoder, ModelInfo  # noqa: F401  (ModelInfo: re-exported for callers)

PREFIX = "hf-hub:"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
#: ``model_type`` recorded for a library of an open_clip checkpoint.
MODEL_TYPE = "open_clip"
#: open_clip's ``interpolation`` names -> PIL resampling filters (as torchvision maps them).
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4, "hamming": 5}


def is_openclip(model: str | None) -> bool:
    """Whether ``model`` (a resolved ``--model`` value) names an open_clip checkpoint."""
    if not model:
        return False
    if model.startswith(PREFIX):
        return True
    return os.path.isdir(model) and os.path.isfile(os.path.join(model, CONFIG_FILE))


def hub_id(model: str) -> str:
    """``hf-hub:ORG/NAME`` -> ``ORG/NAME``."""
    return model[len(PREFIX):] if model.startswith(PREFIX) else model


def available() -> bool:
    """Whether open_clip can be imported here (it needs a torchvision that matches torch)."""
    try:
        import open_clip  # noqa: F401
    except Exception:
        return False
    return True


def _import():
    try:
        import open_clip
    except Exception as e:  # ImportError, or torchvision's operators missing beside this torch
        raise ModelError(
            "open_clip checkpoints need open_clip_torch and a torchvision that matches the "
            f"installed torch: pip install 'itr-search[openclip]' ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    return open_clip


def checkpoint_dir(model: str, revision: str | None = None) -> tuple[Path, str | None]:
    """(local folder holding the config and safetensors weights, hub commit or None).

    A hub checkpoint is read from the local Hugging Face cache first, then downloaded
    where the hub is reachable; only the two files are fetched.  Raises
    :class:`ModelError` naming what is missing."""
    if not model.startswith(PREFIX):
        d = Path(model)
        if not (d / CONFIG_FILE).is_file():
            raise ModelError(f"model '{model}': no {CONFIG_FILE} in that folder")
        if not (d / WEIGHTS_FILE).is_file():
            raise ModelError(_no_safetensors(model))
        return d.resolve(), None
    from huggingface_hub import hf_hub_download

    from .hub import (hub_offline, hub_reachable, not_found_message, revision_missing,
                      snapshot_commit)

    repo = hub_id(model)
    at = {"revision": revision} if revision else {}

    def fetch(name: str, local: bool) -> str:
        return hf_hub_download(repo, name, local_files_only=local, **at)

    paths = None
    try:
        paths = [fetch(CONFIG_FILE, True), fetch(WEIGHTS_FILE, True)]
    except Exception as e:
        if hub_offline() or not hub_reachable():
            raise ModelError(revision_missing(repo, revision) if revision
                             else not_found_message(repo, e).replace(repo, model, 1)) from None
    if paths is None:
        try:
            cfg = fetch(CONFIG_FILE, False)
        except Exception as e:
            raise ModelError(not_found_message(repo, e).replace(repo, model, 1)) from None
        try:
            paths = [cfg, fetch(WEIGHTS_FILE, False)]
        except Exception:
            raise ModelError(_no_safetensors(model)) from None
    folder = Path(paths[0]).parent
    return folder, snapshot_commit(folder)


def _no_safetensors(model: str) -> str:
    return (f"model '{model}' has no {WEIGHTS_FILE}; itr never loads pickled weights "
            "(open_clip_pytorch_model.bin). Convert it, or choose a checkpoint with safetensors")


def read_config(folder: Path) -> dict[str, Any]:
    """``open_clip_config.json``: ``{"model_cfg": ..., "preprocess_cfg": ...}`` (a bare model
    config is taken as ``model_cfg``)."""
    cfg = json.loads((Path(folder) / CONFIG_FILE).read_text())
    if "model_cfg" not in cfg:
        cfg = {"model_cfg": cfg, "preprocess_cfg": {}}
    return cfg


def preprocess_from(config: dict[str, Any]):
    """open_clip's ``preprocess_val`` as itr's :class:`~itrcli.ingest.images.Preprocess`.

    ``resize_mode`` "shortest" (the default): the short side resized to the image size,
    then a centre crop (torchvision rounds its offset); "squash": resized to the square.
    Mean and std from ``preprocess_cfg`` (open_clip's OpenAI defaults otherwise)."""
    from ..ingest.images import Preprocess

    pre = config.get("preprocess_cfg") or {}
    size = pre.get("size") or config["model_cfg"].get("vision_cfg", {}).get("image_size", 224)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode = pre.get("resize_mode", "shortest")
    interp = str(pre.get("interpolation", "bicubic")).lower()
    if interp not in _RESAMPLE:
        raise ModelError(f"open_clip interpolation '{interp}' is not supported")
    mean = tuple(pre.get("mean", (0.48145466, 0.4578275, 0.40821073)))
    std = tuple(pre.get("std", (0.26862954, 0.26130258, 0.27577711)))
    common = dict(resample=_RESAMPLE[interp], mean=mean, std=std, rescale_factor=1 / 255)
    if mode == "squash":
        return Preprocess(shortest_edge=None, height=h, width=w, center_crop=False,
                          crop_height=0, crop_width=0, **common)
    if mode != "shortest" or h != w:
        raise ModelError(f"open_clip resize_mode '{mode}' at {w}x{h} is not supported "
                         "(shortest with a square image size, or squash)")
    return Preprocess(shortest_edge=h, center_crop=True, crop_height=h, crop_width=w,
                      crop_round=True, **common)


def _is_image_key(key: str) -> bool:
    return key.startswith("visual.")


def _is_shared_key(key: str) -> bool:
    return key in ("logit_scale", "logit_bias")


class OpenClipEncoder(Encoder):
    """:class:`Encoder` over an open_clip model (made by ``Encoder(...)`` for such a
    model; the same interface)."""

    def _load(self, model: str, towers: str) -> None:
        import torch

        open_clip = _import()
        folder, commit = checkpoint_dir(model, self._at.get("revision"))
        cfg = read_config(folder)
        self.model_type = MODEL_TYPE
        self.config = cfg
        self._folder = folder
        self.revision = commit
        model_cfg = cfg["model_cfg"]
        self.dim = int(model_cfg["embed_dim"])
        self.text_max_length = int(model_cfg.get("text_cfg", {}).get("context_length", 77))
        # open_clip pads every text to its context length with 0 and attends to no mask
        # (causal towers pool the end token; MobileCLIP's attend to the padding as trained)
        self.text_padding = "max_length"
        try:
            self.prep = None if towers == "text" else preprocess_from(cfg)
            net = self._build(open_clip, folder)
            want = {"image": _is_image_key, "text": lambda k: not _is_image_key(k),
                    "both": lambda k: True}[towers]
            self._read_weights(net, folder, want)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise ModelError(f"cannot load model '{model}': {str(e).splitlines()[0][:300]}") from None
        net = net.eval()
        if towers != "text":
            _reparameterize(net.visual)
        if towers == "image":
            _drop_text(net)
        elif towers == "text":
            net.visual = None
        # kept in float32 on the CPU for the export when it runs so (Module.to is in place)
        fp32_cpu = self.dtype == torch.float32 and self.device == "cpu"
        self._net_fp32 = net if towers != "image" and fp32_cpu else None
        self._net = net = net.to(self.device, self.dtype)
        self.model = net if towers == "both" else None  # a two-tower encoder is kept whole
        self._image = (lambda pixel_values: net.encode_image(pixel_values)) if towers != "text" else None
        self._text = (lambda input_ids: net.encode_text(input_ids)) if towers != "image" else None
        self._open_clip = open_clip
        if towers != "image":
            self._load_tokenizer()
        if self.device == "cpu":
            torch.set_num_threads(max(1, os.cpu_count() or 1))

    def _build(self, open_clip, folder: Path):
        """The architecture from the folder's config, no weights read (a pickle never is)."""
        import logging

        # open_clip warns through the root logger that no weights were loaded (we read
        # them next); a handler of our own for the call keeps logging's basicConfig off
        root, quiet = logging.getLogger(), logging.NullHandler()
        root.addHandler(quiet)
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            return open_clip.create_model("local-dir:" + str(folder), load_weights=False,
                                          device="cpu", precision="fp32")
        finally:
            logging.disable(level)
            root.removeHandler(quiet)

    def _read_weights(self, net, folder: Path, want) -> None:
        """The checkpoint's tensors that ``want(key)`` selects, into ``net``; any such tensor
        missing or in another shape is an error, never a random initialisation."""
        from safetensors import safe_open

        own = net.state_dict()
        needed = {k for k in own if want(k) or _is_shared_key(k)}
        got: dict[str, Any] = {}
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
            for k in f.keys():
                if k in needed:
                    t = f.get_tensor(k)
                    if tuple(t.shape) != tuple(own[k].shape):
                        raise ValueError(f"weight {k}: shape {tuple(t.shape)}, the model has "
                                         f"{tuple(own[k].shape)}")
                    got[k] = t
        # non-persistent buffers are not in state_dict; a persistent one the file lacks is
        missing = sorted(needed - set(got))
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} weights ({', '.join(missing[:3])}...)")
        net.load_state_dict(got, strict=False)

    def _load_tokenizer(self) -> None:
        self._tokenizer = self._open_clip.get_tokenizer("local-dir:" + str(self._folder))

    @property
    def tokenizer(self):
        from .encoder import LOADING

        with LOADING:  # (see there)
            if self._tokenizer is None:  # loaded for indexing: on first use
                self._load_tokenizer()
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> dict[str, Any]:
        """``{"input_ids": [n, context_length] int64}``, as open_clip tokenizes."""
        ids = self.tokenizer(list(texts), context_length=self.text_max_length)
        return {"input_ids": ids}

    def _text_features(self, **kwargs):
        if self._text is None:  # loaded for indexing: the text tower on first use
            net = self._float32_text_net().to(self.device, self.dtype)
            self._text = lambda input_ids: net.encode_text(input_ids)
        return self._text(kwargs["input_ids"].to(self.device))

    def _float32_text_net(self):
        """The model with the text tower's weights alone, float32 on the CPU."""
        net = self._build(self._open_clip, self._folder)
        self._read_weights(net, self._folder, lambda k: not _is_image_key(k))
        net.visual = None
        return net.eval()

    def encode_texts(self, texts: Sequence[str]):
        import torch

        from .encoder import LOADING, _normalise

        ids = self.tokenize(texts)["input_ids"]
        with LOADING, torch.inference_mode():
            return _normalise(self._text_features(input_ids=ids))

    def release_text(self) -> None:
        self._text = None
        self._net_fp32 = None

    def float32_text_tower(self):
        raise NotImplementedError("open_clip: use text_export_tower()")

    def text_export_tower(self):
        """A torch module ``input_ids -> L2-normalised [n, dim]`` in float32 on the CPU,
        for the ONNX export: the loaded tower, or read again from the checkpoint in float32."""
        import torch

        net = self._net_fp32 if self._net_fp32 is not None else self._float32_text_net()

        class TextTower(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, input_ids):
                return self.net.encode_text(input_ids, normalize=True)  # [batch, dim]

        return TextTower()

    def export_tokenizer(self):
        """open_clip's tokenizer as a ``tokenizers.Tokenizer`` (CLIP's BPE, lower case,
        ``<start_of_text>`` and ``<end_of_text>`` around; no padding or truncation set)."""
        tok = self.tokenizer
        inner = getattr(tok, "tokenizer", None)  # open_clip's HFTokenizer wraps transformers'
        if inner is not None and hasattr(inner, "backend_tokenizer"):
            return inner.backend_tokenizer
        if not hasattr(tok, "encoder") or not hasattr(tok, "bpe_ranks"):
            from .onnxexport import ExportUnsupported

            raise ExportUnsupported(f"open_clip tokenizer {type(tok).__name__} has no BPE form")
        return _clip_bpe_tokenizer(tok)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(id=self.model_id, revision=self.revision, model_type=self.model_type,
                         dim=self.dim, preprocess=self.prep.to_config(),
                         text_max_length=self.text_max_length, text_padding=self.text_padding)


def _reparameterize(visual) -> None:
    """Fold the training-time branches of re-parameterisable image towers (MobileCLIP's
    FastViT / MobileOne blocks) into single convolutions, as their authors run them for
    inference: the same function, about half the time on a CPU.  A no-op for a ViT."""
    try:
        from timm.utils.model import reparameterize_model
    except Exception:  # no timm: no such tower either
        return
    reparameterize_model(visual, inplace=True)


def _drop_text(net) -> None:
    """Forget the text tower's modules and weights (indexing encodes images only)."""
    for name in ("text", "transformer", "token_embedding", "ln_final", "positional_embedding",
                 "text_projection"):
        if name in net._modules or name in net._parameters:
            setattr(net, name, None)


def _clip_bpe_tokenizer(simple):
    """open_clip's ``SimpleTokenizer`` (vocabulary and merges) as a ``tokenizers`` BPE with
    CLIP's normalisation and pre-tokenisation, adding start and end tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = dict(simple.encoder)
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    sot, eot = simple.sot_token_id, simple.eot_token_id
    inv = {v: k for k, v in vocab.items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>",
                               unk_token=None, fuse_unk=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{inv[sot]} $A {inv[eot]}", special_tokens=[(inv[sot], sot), (inv[eot], eot)])
    return tok
