"""The dual encoder: loading a CLIP / SigLIP checkpoint, choosing device and precision,
and turning pixels and texts into L2-normalised vectors.

Everything here imports torch and transformers lazily: constructing an :class:`Encoder`
is the moment the ~4 s import is paid, never ``itr --help`` or a cold search with an
exported text tower (see :mod:`itrcli.embed.textonnx`).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import ModelError, UsageError
from ..gcpause import gc_paused
from ..ingest.images import Preprocess
from .hub import load_config

#: transformers ``model_type`` values whose checkpoints we can run.
SUPPORTED_TYPES = ("clip", "siglip")
#: What to use instead of a NaFlex SigLIP 2 checkpoint (``model_type`` "siglip2"): the
#: fixed-resolution ones are ``model_type`` "siglip" with a Gemma fast tokenizer.
NAFLEX_INSTEAD = "google/siglip2-base-patch16-224"
from ..constants import PRECISIONS

#: Held while a model is read (config, tokenizer, weights), transformers is imported from,
#: or a tower runs in torch, by any thread: transformers' lazy imports are not safe from two
#: threads at once ("cannot import name 'AutoTokenizer'"), and a load sets torch's default
#: dtype for the whole process while it runs (a bf16 load made another thread's float32
#: tower half bf16).  ``itr serve --watch`` is two such threads: its index run, and
#: searches that load the torch text tower while a new library has no exported one yet.
LOADING = threading.RLock()


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX-512 BF16, AMX, Arm BF16).

    ``ITR_CPU_BF16=1`` (or ``0``) overrides the detection, so that the choice ``--precision
    auto`` makes on the other kind of CPU can be tested and measured on this one.
    """
    forced = os.environ.get("ITR_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(200_000)
        flags = set()
        for line in text.splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        return False


#: transformers' defaults for the image processors whose recipe itr reads from the
#: checkpoint's ``preprocessor_config.json`` itself (``to_dict()`` of a file that names only
#: the type; tests/test_images.py checks them against transformers): importing
#: transformers' image processing takes 1.7 s, most of a run's start on onnxruntime.
PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": {
        "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]},
    "SiglipImageProcessor": {
        "do_resize": True, "size": {"height": 224, "width": 224}, "resample": 3,
        "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
}


def recipe_of(cfg: dict[str, Any]) -> Preprocess | None:
    """The recipe a ``preprocessor_config.json`` describes, where its processor is one of
    :data:`PROCESSOR_DEFAULTS` and its sizes are spelled out (an integer size follows
    transformers' own conversions: None, ask transformers)."""
    kind = str(cfg.get("image_processor_type") or "")
    for suffix in ("Fast", "Pil"):
        kind = kind.removesuffix(suffix)
    defaults = PROCESSOR_DEFAULTS.get(kind)
    if defaults is None or any(not isinstance(cfg.get(k, {}), dict) for k in ("size", "crop_size")):
        return None
    try:
        return Preprocess.from_config({**defaults, **{k: v for k, v in cfg.items() if v is not None}})
    except (ValueError, TypeError):
        return None


def _config_file(model: str, name: str, revision: str | None) -> str | None:
    """A checkpoint's file where it is at hand: in its folder, or in the local hub cache."""
    if os.path.isdir(model):
        path = os.path.join(model, name)
    else:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(model, name, revision=revision)
    return path if isinstance(path, str) and os.path.isfile(path) else None


def _processor_config(model: str, revision: str | None) -> dict[str, Any] | None:
    """The checkpoint's ``preprocessor_config.json`` where it is at hand and reads as JSON."""
    import json

    path = _config_file(model, "preprocessor_config.json", revision)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def guess_preprocess(model: str, revision: str | None = None) -> Preprocess | None:
    """``model``'s image preprocessing read from its files alone, in milliseconds (no torch,
    no transformers): an index run into a new library starts decoding with it while the
    encoder loads.  A guess: :attr:`Encoder.prep` is the recipe, and what it contradicts is
    decoded again.  None where the files are not at hand (a hub model not in the local
    cache) or do not say it."""
    try:
        from .openclip import is_openclip, preprocess_from, read_config

        if is_openclip(model):
            if not os.path.isdir(model):  # hf-hub:ORG/NAME: its folder is found by the load
                return None
            return preprocess_from(read_config(model))
        cfg = _processor_config(model, revision)
        return None if cfg is None else recipe_of(cfg) or Preprocess.from_config(cfg)
    except Exception:  # a guess: the encoder's load reports what is wrong with the files
        return None


def import_torch():
    """torch, its OpenMP threads set to sleep between parallel regions
    (``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise).  By default they
    spin while waiting for work, taking the cores from the decode threads that run beside
    the encoder (sleeping indexed 2 MP photos 20% faster on 2 cores in an earlier round; no
    difference on the AVX-512 Xeon of docs/performance.md).  OpenMP reads the setting once,
    when torch is first imported, so every import of torch on the way to an encoder (the
    device's resolution too: a run of 1,000 files or more resolves it first) goes through
    here."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    return torch


def preload(model: str, device: str = "auto", precision: str = "auto",
            revision: str | None = None) -> None:
    """Import what loading ``model``'s image-only encoder for ``device`` and ``precision``
    imports: torch (as :func:`import_torch` does) and, unless the encoder needs none of it
    (a CLIP checkpoint in fp32 or bf16 on the CPU: :func:`plain_config`), transformers'
    configuration and model machinery with the CLIP classes (about 3 s on a 2-core VM), for
    a run to do while it waits on an export child instead of after it."""
    import_torch()
    resolved = resolve_device(device)
    cpu_precision = resolve_precision(precision, resolved) if resolved == "cpu" else None
    if cpu_precision in ("fp32", "bf16") and plain_config(model, revision) is not None:
        return  # the plain tower or onnxruntime, its config.json read by itr
    with LOADING:
        import transformers

        transformers.AutoConfig  # lazy until touched
        if cpu_precision == "fp32":
            return
        transformers.CLIPModel, transformers.CLIPVisionModelWithProjection


def plain_config(model: str, revision: str | None = None):
    """A CLIP checkpoint's config.json at hand, read without transformers
    (:func:`itrcli.embed.clipvision.read_config`); None for anything else."""
    from . import clipvision

    try:
        path = _config_file(model, "config.json", revision)
    except Exception:  # not a hub id either: transformers' load reports the model error
        return None
    if path is None:
        return None
    try:
        config = clipvision.read_config(path)
    except clipvision.Unsupported:
        return None
    if config._commit_hash is None and not os.path.isdir(model):
        return None  # the revision of a hub model: transformers' config says it
    return config


def mps_available() -> bool:
    """Whether torch can use an Apple GPU (Metal Performance Shaders) here."""
    torch = import_torch()

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when an NVIDIA GPU is visible, else ``mps`` on Apple silicon,
    else ``cpu``; validates ``cuda:N`` and ``mps``."""
    torch = import_torch()

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if device == "cpu":
        return device
    if device == "mps":
        if not mps_available():
            raise UsageError("--device mps: no Apple GPU (MPS) is available here (it needs "
                             f"Apple silicon and a torch built with MPS; torch {torch.__version__})")
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device}: no CUDA GPU is available (torch {torch.__version__})")
        if ":" in device:
            try:
                n = int(device.split(":", 1)[1])
            except ValueError:
                raise UsageError(f"--device {device}: expected cuda:N") from None
            if n >= torch.cuda.device_count():
                raise ModelError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
        return device
    raise UsageError(f"--device {device}: expected auto, cpu, cuda, cuda:N or mps")


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> fp16 on GPUs (CUDA, Apple MPS: CLIP and SigLIP towers are trained in
    mixed precision; their fp16 vectors stay within
    :data:`itrcli.constants.BF16_MIN_COSINE` of fp32),
    bf16 on CPUs with native bf16, else fp32."""
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device == "cpu":
            raise UsageError("--precision fp16 needs a GPU (cuda or mps; use bf16 or fp32 on CPU)")
        return precision
    if device.startswith("cuda") or device == "mps":
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


@dataclass
class ModelInfo:
    """What the library records about its model."""

    id: str  #: hub id or absolute local directory
    revision: str | None  #: hub commit hash, when known
    model_type: str  #: "clip" | "siglip"
    dim: int
    preprocess: dict[str, Any]
    text_max_length: int
    text_padding: str  #: "longest" (CLIP) or "max_length" (SigLIP, as it was trained)


#: ``Encoder(towers=...)``: which towers are loaded at once (the other one on first use).
TOWERS = ("both", "image", "text")


class Encoder:
    """A loaded dual encoder.

    Args:
        model: hub id or local directory (see :func:`itrcli.embed.models.resolve`).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (Apple GPUs).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        towers: ``both``; ``image`` (indexing: the text tower's weights are not read until
            :meth:`encode_texts` is called); ``text`` (the text tower's export: no image
            preprocessing, ``prep`` is None).
        revision: the hub commit to load (a library's recorded ``model_revision``), else
            the cache's ``main``; ignored for a local directory.  A revision that cannot be
            loaded is a :class:`ModelError` naming it, never another revision's weights.
    """

    def __new__(cls, model: str, *args, **kwargs):
        # the backend: open_clip checkpoints (hf-hub:ORG/NAME, or a folder with
        # open_clip_config.json) are run by embed/openclip.py, the rest by transformers
        if cls is Encoder:
            from .openclip import is_openclip

            if is_openclip(model):
                from .openclip import OpenClipEncoder

                return super().__new__(OpenClipEncoder)
        return super().__new__(cls)

    def __init__(self, model: str, device: str = "auto", precision: str = "auto",
                 towers: str = "both", revision: str | None = None) -> None:
        with gc_paused():
            torch = import_torch()  # its threads sleep between batches (see there)

        if towers not in TOWERS:
            raise ValueError(f"towers={towers!r}: expected one of {TOWERS}")
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            self.precision
        ]
        self.model_id = model
        self.image_runtime = "torch"  #: what runs the image tower (see embed/imagetower.py)
        # every file of the checkpoint from that commit (a local directory has none)
        self._at = {"revision": revision} if revision and not os.path.isdir(model) else {}
        self.model = None
        self._image = self._text = self._tokenizer = None
        self._config = None  # transformers' config, read on first need (see config)
        with gc_paused(), LOADING:
            self._load(model, towers)

    @property
    def config(self):
        """The checkpoint's transformers config.  An image-only CLIP load reads config.json
        itself (:func:`plain_config`) and imports transformers only
        if a tower of transformers' needs this."""
        with LOADING:
            if self._config is None:
                self._config = self._transformers_config(self.model_id)
        return self._config

    @config.setter
    def config(self, value) -> None:
        self._config = value

    def _transformers_config(self, model: str):
        """transformers' config of ``model`` (``self._local_only`` set), a
        :class:`ModelError` for a checkpoint itr does not run."""
        import transformers

        transformers.logging.set_verbosity_error()  # torchvision fallback notices etc.
        transformers.logging.disable_progress_bar()  # "Loading weights" bars: ours only
        config, self._local_only = load_config(model, self._at.get("revision"),
                                               recorded=bool(self._at))
        if config.model_type == "siglip2":
            raise ModelError(
                f"model '{model}' is a SigLIP 2 NaFlex checkpoint (Siglip2Model, variable "
                "resolution), which itr does not run; use a fixed-resolution SigLIP 2 "
                f"checkpoint instead: {NAFLEX_INSTEAD} (preset siglip2-b16), or its -256, "
                "-384 or -512 variants")
        if config.model_type not in SUPPORTED_TYPES:
            raise ModelError(
                f"model '{model}' is a '{config.model_type}' checkpoint; itr runs dual "
                f"encoders of type {', '.join(SUPPORTED_TYPES)} (CLIPModel, SiglipModel)"
            )
        return config

    def _load(self, model: str, towers: str) -> None:
        import torch
        from safetensors import SafetensorError

        # an image-only or text-only CLIP encoder (an index run, the text tower's export)
        # has no need of transformers' config
        plain = (plain_config(model, self._at.get("revision"))
                 if towers in ("image", "text") else None)
        if plain is not None:
            self._local_only = True  # found at hand
        self._cfg = config = plain or self.config
        self.model_type = config.model_type
        self.revision = self._loaded_revision(model, config)
        try:
            if towers == "both":
                from transformers import AutoModel

                both = self._from_pretrained(AutoModel, self.dtype)
                self._image = both.get_image_features
                self._text = both.get_text_features
                self.model = both
            elif towers == "image":
                self._image = self._indexing_image_tower()
            if towers != "image":
                self._load_tokenizer()
                if towers == "text":
                    self._text = self._plain_clip_text() or self._tower("text", self.dtype)
            # the text tower's export needs no pixels (nor the image processors' imports)
            self.prep = None if towers == "text" else self._preprocess()
        except (OSError, ValueError, SafetensorError) as e:  # a damaged weights file too
            raise ModelError(_load_error(model, e)) from None
        text_cfg = config.text_config
        self.text_max_length = int(getattr(text_cfg, "max_position_embeddings", 77))
        # SigLIP was trained on texts padded to max_length; CLIP on the padded batch + mask
        self.text_padding = "max_length" if config.model_type == "siglip" else "longest"
        self.dim = int(getattr(config, "projection_dim", 0) or text_cfg.hidden_size)
        if self.device == "cpu":
            torch.set_num_threads(max(1, os.cpu_count() or 1))

    def _loaded_revision(self, model: str, config) -> str | None:
        """The hub commit the checkpoint was loaded from (None: a local directory).
        transformers 5 no longer keeps it on the config: read from the cached file's path
        (``.../snapshots/<commit>/config.json``)."""
        if os.path.isdir(model):
            return None
        commit = getattr(config, "_commit_hash", None)
        if commit:
            return commit
        try:
            from transformers.utils.hub import cached_file, extract_commit_hash

            path = cached_file(model, "config.json", local_files_only=True, **self._at)
            return extract_commit_hash(path, None) if path else None
        except Exception:  # the revision is a record, not a reason to fail the load
            return None

    def _preprocess(self) -> Preprocess:
        """The checkpoint's image recipe: read by itr where :func:`recipe_of` knows its
        processor (no import of transformers' image processing), else by transformers."""
        cfg = _processor_config(self.model_id, self._at.get("revision"))
        known = recipe_of(cfg) if cfg is not None else None
        if known is not None:
            return known
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(
            self.model_id, trust_remote_code=False, local_files_only=self._local_only, **self._at)
        return Preprocess.from_config(image_processor.to_dict())

    def _from_pretrained(self, cls, dtype, device: str | None = None, config=None):
        """``cls`` from the checkpoint in ``dtype``, in eval mode on the device.  A one-tower
        class reads only its own tower's weights from the full checkpoint; a weight it
        expects and does not find (or finds in another shape) is an error, never a random
        initialisation."""
        model, loading = cls.from_pretrained(
            self.model_id, config=config or self.config, use_safetensors=True,
            trust_remote_code=False, dtype=dtype, local_files_only=self._local_only,
            output_loading_info=True, **self._at)
        missing = [k for k in loading.get("missing_keys", ()) if not k.endswith("position_ids")]
        missing += [str(k) for k in loading.get("mismatched_keys", ())]
        if missing:
            raise ValueError(f"{cls.__name__}: the checkpoint lacks {len(missing)} weights "
                             f"({', '.join(sorted(missing)[:3])}...)")
        return model.eval().to(device or self.device)

    def _tower(self, which: str, dtype, device: str | None = None):
        """One tower as a callable: pixels or token ids -> unnormalised embeddings
        (``get_image_features`` / ``get_text_features`` of the two-tower model)."""
        import transformers

        name = {("clip", "image"): "CLIPVisionModelWithProjection",
                ("clip", "text"): "CLIPTextModelWithProjection",
                ("siglip", "image"): "SiglipVisionModel",  # its pooling head is inside
                ("siglip", "text"): "SiglipTextModel"}[(self.model_type, which)]
        import copy

        with LOADING:
            config = copy.deepcopy(getattr(self.config, f"{'vision' if which == 'image' else 'text'}_config"))
            if self.model_type == "clip":  # the projection's width is the two-tower config's
                config.projection_dim = self.config.projection_dim
            tower = self._from_pretrained(getattr(transformers, name), dtype, device, config)
        key = "image_embeds" if which == "image" else "text_embeds"

        def run(**kwargs):
            out = tower(**kwargs)
            return out[key] if self.model_type == "clip" else out.pooler_output

        run.module = tower  # the float32 export reads it
        return run

    # -- the image tower's runtime (see embed/imagetower.py) --------------------------------
    def _indexing_image_tower(self):
        """The image tower of an image-only encoder (indexing): onnxruntime where
        :mod:`itrcli.embed.imagetower` chooses it and its export is cached, else torch."""
        from .imagetower import open_for

        fast = open_for(self)
        if fast is not None:
            self.image_runtime = fast.name
            return fast
        if self.device == "cpu":
            from .heap import keep_tensor_blocks

            keep_tensor_blocks()  # 6-10% of the fp32 tower's time on two cores
        lean = self._plain_clip_tower()
        return lean if lean is not None else self._tower("image", self.dtype)

    def _plain_clip_tower(self):
        """CLIP's image tower in plain torch (:mod:`itrcli.embed.clipvision`), for float32
        or bf16 on the CPU: no import of transformers' modeling (1.7-2.4 s of a run's
        start).  None where it does not apply or cannot be built (transformers' tower then)."""
        import torch

        if (self.model_type != "clip" or self.device != "cpu"
                or self.dtype not in (torch.float32, torch.bfloat16)):
            return None
        from . import clipvision

        tower = self._plain_built("image", lambda files: clipvision.build(
            self._cfg.vision_config, int(self._cfg.projection_dim), files, self.dtype))
        if tower is None:
            return None

        def run(pixel_values):
            return tower(pixel_values)

        run.module = None  # not transformers' module: the ONNX export reads that again
        return run

    def _plain_built(self, which: str, build):
        """``build(the checkpoint's safetensors files)``: one of CLIP's towers in plain torch,
        or None, with one line under ``-v``, where it raises (Unsupported, or weights it
        cannot read: transformers' tower reads them again and reports a damaged file as the
        model error it is)."""
        from . import clipvision

        revision = self._at.get("revision")
        try:
            return build(clipvision.weight_files(
                lambda name: _config_file(self.model_id, name, revision)))
        except Exception as e:
            import logging

            logging.getLogger("itr").debug("%s tower: transformers' (%s)", which, e)
            return None

    def _plain_clip_text(self):
        """CLIP's text tower in plain torch (:func:`itrcli.embed.cliptext.plain_text`), in
        float32 on the CPU: no import of transformers' modeling in the text tower's export.
        None where it does not apply or cannot be built (transformers' tower then)."""
        import torch

        if self.model_type != "clip" or self.device != "cpu" or self.dtype != torch.float32:
            return None
        from . import cliptext

        built = self._plain_built("text", lambda files: cliptext.plain_text(
            self._cfg.text_config, int(self._cfg.projection_dim), files))
        if built is None:
            return None
        text, proj = built
        module = torch.nn.Module()
        module.text_model, module.text_projection = text, proj  # float32_text_tower reads them

        def run(input_ids, attention_mask=None):
            return proj(text(input_ids, attention_mask).pooler_output)

        run.module = module
        return run

    def float32_image_tower(self):
        """The image tower as a module, ``pixel_values`` -> unnormalised embeddings, in
        float32 on the CPU with eager attention (the graph onnxruntime runs fastest), for
        the ONNX export: the loaded torch tower when it is float32 on the CPU, else read
        again from the checkpoint (image weights only)."""
        import torch

        run = self._image
        if getattr(run, "module", None) is None or self.dtype != torch.float32 or self.device != "cpu":
            run = self._tower("image", torch.float32, "cpu")
        module = run.module
        if hasattr(module, "set_attn_implementation"):
            module.set_attn_implementation("eager")

        class ImageTower(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.tower = module

            def forward(self, pixel_values):  # [batch, 3, H, W] -> [batch, dim]
                return run(pixel_values=pixel_values)

        return ImageTower().eval()

    def _load_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(
            self.model_id, trust_remote_code=False, local_files_only=self._local_only, **self._at)

    @property
    def tokenizer(self):
        with LOADING:
            if self._tokenizer is None:
                try:
                    self._load_tokenizer()
                except (OSError, ValueError) as e:
                    raise ModelError(_load_error(self.model_id, e)) from None
        return self._tokenizer

    def _text_features(self, **kwargs):
        if self._text is None:  # loaded for indexing: the text tower on first use
            try:
                self._text = self._tower("text", self.dtype)
            except (OSError, ValueError) as e:
                raise ModelError(_load_error(self.model_id, e)) from None
        return self._text(**kwargs)

    def release_text(self) -> None:
        """Forget the text tower (loaded again on the next :meth:`encode_texts`)."""
        self._text = None
        if getattr(self, "model", None) is not None:
            self._text = self.model.get_text_features

    def float32_text_tower(self):
        """(text model, text projection or None) in float32 on the CPU, for the ONNX export.

        The loaded text tower itself when it runs in float32 on the CPU; otherwise read
        again from the checkpoint in float32 (text weights only): casting bf16 weights back
        to float32 would keep their rounding.
        """
        import torch

        text = self._text
        if text is None or self.dtype != torch.float32 or self.device != "cpu":
            text = self._tower("text", torch.float32, "cpu")
        module = getattr(text, "module", None)
        if module is None:  # the two-tower model
            module = text.__self__
        # SigLIP: the projection ("head") is inside; transformers 5's SiglipTextModel is
        # the text transformer itself
        return getattr(module, "text_model", module), getattr(module, "text_projection", None)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            id=self.model_id, revision=self.revision, model_type=self.model_type, dim=self.dim,
            preprocess=self.prep.to_config(), text_max_length=self.text_max_length,
            text_padding=self.text_padding,
        )

    def encode_pixels(self, pixels) -> "Any":
        """``[n, 3, H, W]`` float32 numpy -> ``[n, dim]`` float32 numpy, L2-normalised."""
        import torch

        x = torch.from_numpy(pixels)
        if self.device != "cpu":
            x = x.pin_memory().to(self.device, non_blocking=True)
        with LOADING, torch.inference_mode():
            out = self._image(pixel_values=x.to(self.dtype))
            feats = getattr(out, "pooler_output", out)
            return _normalise(feats)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Any]:
        return self.tokenizer(
            list(texts),
            padding=self.text_padding,
            truncation=True,
            max_length=self.text_max_length,
            return_tensors="pt",
        )

    def encode_texts(self, texts: Sequence[str]):
        """Texts -> ``[n, dim]`` float32 numpy, L2-normalised."""
        import torch

        enc = self.tokenize(texts)
        names = set(getattr(self.tokenizer, "model_input_names", ["input_ids", "attention_mask"]))
        if self.model_type == "siglip":
            names = {"input_ids"}  # SigLIP's text tower attends to its padding, as trained
        kwargs = {k: v.to(self.device) for k, v in enc.items() if k in names}
        with LOADING, torch.inference_mode():
            out = self._text_features(**kwargs)
            feats = getattr(out, "pooler_output", out)
            return _normalise(feats)


def _load_error(model: str, e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "safetensors" in msg.lower():
        return (f"model '{model}' has no safetensors weights; itr never loads pickled "
                "(.bin) weights. Convert it, or choose a checkpoint with model.safetensors")
    return f"cannot load model '{model}': {msg}"


def _normalise(feats):
    feats = feats.float()
    feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [n, dim]
    return feats.cpu().numpy()
