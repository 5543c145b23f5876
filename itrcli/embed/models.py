"""Named model presets, the default model, and resolving a ``--model`` value.

Published zero-shot retrieval recall@1, in percent: Flickr30k (1K test) and COCO (5K
test), text->image and image->text; ``None`` where no such figure was published.  Sources:
the CLIP paper (Radford et al. 2021, Table 13) for ``openai-l14-336``; OpenCLIP's
benchmark of the same weights (docs/openclip_retrieval_results.csv in mlfoundations/
open_clip) for ``laion-b32``, ``openai-b32`` and ``siglip-b16``; the SigLIP 2 authors'
checkpoint table (big_vision/configs/proj/image_text/README_siglip2.md, the paper's
Table 1), which gives COCO only, for ``siglip2-*``.  Re-rankers (image-text matching
models, :mod:`itrcli.embed.rerank`) have their own presets and option,
``--rerank-model`` / ``ITR_RERANK_MODEL``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str
    params_m: int  #: parameters, millions (both towers)
    flickr_t2i_r1: float | None
    flickr_i2t_r1: float | None
    note: str = ""
    coco_t2i_r1: float | None = None
    coco_i2t_r1: float | None = None
    license: str = "MIT"  #: the weights' licence
    revision: str | None = None  #: the hub commit loaded (None: main)
    #: image tower CPU time per image relative to laion-b32's (bench/model_cost.py, fp32,
    #: random weights of the real architecture); None where not measured
    cpu_cost: float | None = None

    @property
    def permissive(self) -> bool:
        """Whether the licence lets anyone use the weights (may be a default)."""
        return self.license in ("MIT", "Apache-2.0")


#: open_clip presets' licences.
APPLE_AMLR = "Apple AMLR (research only)"


#: The note of a preset whose retrieval figures no published source at hand gives.
NO_PUBLISHED_R1 = "no published Flickr30k/COCO R@1 found"


def _openclip(name: str, hub: str, revision: str | None, params_m: int, license: str,
              note: str, r1: tuple | None = None) -> Preset:
    f_t2i, f_i2t, c_t2i, c_i2t = r1 or (None, None, None, None)
    if r1 is None:  # said, not left blank: no source at hand gives this checkpoint's figures
        note += f"; {NO_PUBLISHED_R1}"
    return Preset(name, "hf-hub:" + hub, params_m, f_t2i, f_i2t, note, c_t2i, c_i2t,
                  license=license, revision=revision)


def _siglip2(name: str, hub: str, params_m: int, coco_t2i: float, coco_i2t: float,
             note: str = "") -> Preset:
    return Preset(name, hub, params_m, None, None,
                  note or "SigLIP 2, multilingual (Gemma fast tokenizer: ONNX text tower)",
                  coco_t2i, coco_i2t, license="Apache-2.0")


PRESETS: tuple[Preset, ...] = (
    Preset("laion-b32", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", 151, 66.8, 84.1,
           "OpenCLIP on LAION-2B; best quality at ViT-B/32 cost", 39.3, 56.3),
    Preset("openai-b32", "openai/clip-vit-base-patch32", 151, 58.8, 78.9, "the original CLIP",
           30.4, 50.1),
    Preset("openai-l14-336", "openai/clip-vit-large-patch14-336", 428, 68.7, 88.0,
           "slow on CPU; for re-ranking or a GPU", 37.8, 58.4),
    Preset("siglip-b16", "google/siglip-base-patch16-224", 203, 74.7, 89.1, "sigmoid loss CLIP",
           47.8, 65.7, license="Apache-2.0"),
    # the SigLIP 2 paper, Table 1 (B/32 at 256 px): Flickr30k and COCO, both directions
    Preset("siglip2-b32", "google/siglip2-base-patch32-256", 377, 75.5, 89.3,
           "SigLIP 2 B/32 at 256 px, multilingual; 768-d vectors", 47.2, 63.7,
           license="Apache-2.0"),
    _siglip2("siglip2-b16", "google/siglip2-base-patch16-224", 375, 52.1, 68.9),
    _siglip2("siglip2-b16-256", "google/siglip2-base-patch16-256", 375, 53.2, 69.7),
    _siglip2("siglip2-b16-384", "google/siglip2-base-patch16-384", 376, 54.6, 71.4),
    _siglip2("siglip2-b16-512", "google/siglip2-base-patch16-512", 376, 55.2, 71.2),
    _siglip2("siglip2-l16-256", "google/siglip2-large-patch16-256", 882, 54.7, 71.5),
    _siglip2("siglip2-l16-384", "google/siglip2-large-patch16-384", 882, 55.3, 71.4),
    _siglip2("siglip2-l16-512", "google/siglip2-large-patch16-512", 882, 55.2, 72.1),
    _siglip2("siglip2-so400m14-224", "google/siglip2-so400m-patch14-224", 1136, 55.1, 71.5),
    _siglip2("siglip2-so400m14-384", "google/siglip2-so400m-patch14-384", 1136, 55.8, 71.7),
    _siglip2("siglip2-so400m16-256", "google/siglip2-so400m-patch16-256", 1136, 55.4, 71.5),
    _siglip2("siglip2-so400m16-384", "google/siglip2-so400m-patch16-384", 1136, 56.0, 71.2),
    _siglip2("siglip2-so400m16-512", "google/siglip2-so400m-patch16-512", 1136, 56.0, 71.3),
    _siglip2("siglip2-g16-256", "google/siglip2-giant-opt-patch16-256", 1871, 55.7, 72.5),
    _siglip2("siglip2-g16-384", "google/siglip2-giant-opt-patch16-384", 1871, 56.1, 72.8),
)
# open_clip checkpoints (embed/openclip.py; pip install 'itr-search[openclip]').  Revisions: the
# commit that added the weights, where one was found; None (main) where none was found,
# said in the note.  Published R@1: OpenCLIP's benchmark (docs/openclip_retrieval_results.csv)
# where it lists the checkpoint; None where no source at hand gives it.
OPENCLIP_PRESETS: tuple[Preset, ...] = (
    _openclip("mobileclip-s0", "apple/MobileCLIP-S0-OpenCLIP", None, 54, APPLE_AMLR,
              "MobileCLIP S0; no open_clip safetensors release found (revision unknown)"),
    _openclip("mobileclip-s1", "apple/MobileCLIP-S1-OpenCLIP",
              "d147e67ab3c9c7a209064ec89c075e6623a47ae9", 85, APPLE_AMLR, "MobileCLIP S1"),
    _openclip("mobileclip-s2", "apple/MobileCLIP-S2-OpenCLIP", None, 99, APPLE_AMLR,
              "MobileCLIP S2 (revision not found: main)"),
    _openclip("mobileclip-b", "apple/MobileCLIP-B-OpenCLIP", None, 150, APPLE_AMLR,
              "MobileCLIP B (revision not found: main)"),
    _openclip("mobileclip2-s0", "timm/MobileCLIP2-S0-OpenCLIP", None, 75, APPLE_AMLR,
              "MobileCLIP2 S0 (revision not found: main)"),
    _openclip("mobileclip2-s2", "timm/MobileCLIP2-S2-OpenCLIP", None, 99, APPLE_AMLR,
              "MobileCLIP2 S2 (revision not found: main)"),
    _openclip("mobileclip2-b", "timm/MobileCLIP2-B-OpenCLIP", None, 150, APPLE_AMLR,
              "MobileCLIP2 B (revision not found: main)"),
    _openclip("mobileclip2-s3", "timm/MobileCLIP2-S3-OpenCLIP", None, 249, APPLE_AMLR,
              "MobileCLIP2 S3 (revision not found: main)"),
    _openclip("mobileclip2-s4", "timm/MobileCLIP2-S4-OpenCLIP", None, 447, APPLE_AMLR,
              "MobileCLIP2 S4 (revision not found: main)"),
    _openclip("mobileclip2-l14", "timm/MobileCLIP2-L-14-OpenCLIP", None, 428, APPLE_AMLR,
              "MobileCLIP2 L/14 (revision not found: main)"),
    _openclip("dfn-b16", "apple/DFN2B-CLIP-ViT-B-16", "5add2d7e0f38e33579305b3ef956d636742d849e",
              150, APPLE_AMLR, "DFN-2B ViT-B/16; its weights may be pickle-only"),
    _openclip("dfn-l14", "apple/DFN2B-CLIP-ViT-L-14", "fa63e19ee6cc8df2cf3c959682a2e8a74c3a727e",
              428, APPLE_AMLR, "DFN-2B ViT-L/14; its weights may be pickle-only"),
    _openclip("datacomp-b32-256", "laion/CLIP-ViT-B-32-256x256-DataComp-s34B-b86K", None, 151,
              "MIT", "DataComp-1B ViT-B/32 at 256 px (revision not found: main)",
              (64.9, 84.8, 39.9, 57.9)),
)
PRESETS = PRESETS + OPENCLIP_PRESETS
#: Image tower CPU time per image relative to laion-b32's, fp32, measured by
#: bench/model_cost.py (random weights of each preset's architecture at its own image size;
#: the transformers presets by their open_clip twins; laion-b32 timed between every two) on
#: a 2-core Intel Xeon VM with AVX-512, 2026-12-06; docs/performance.md has the table.
CPU_COST: dict[str, float] = {
    "openai-b32": 1.11,
    "openai-l14-336": 50.14,
    "siglip-b16": 3.96,
    "siglip2-b16": 4.1,
    "siglip2-b16-256": 5.52,
    "siglip2-b16-384": 18.14,
    "siglip2-b16-512": 34.03,
    "siglip2-l16-256": 20.08,
    "siglip2-l16-384": 52.03,
    "siglip2-l16-512": 123.61,
    "siglip2-so400m14-224": 26.29,
    "siglip2-so400m14-384": 82.61,
    "siglip2-so400m16-256": 25.97,
    "siglip2-so400m16-384": 60.33,
    "siglip2-so400m16-512": 129.71,
    "siglip2-g16-256": 65.58,
    "siglip2-g16-384": 161.48,
    "mobileclip-s0": 1.13,
    "mobileclip-s1": 2.04,
    "mobileclip-s2": 3.0,
    "mobileclip-b": 3.91,
    "mobileclip2-s0": 1.14,
    "mobileclip2-s2": 3.11,
    "mobileclip2-b": 4.01,
    "mobileclip2-s3": 4.91,
    "mobileclip2-s4": 8.5,
    "mobileclip2-l14": 17.97,
    "dfn-b16": 4.15,
    "dfn-l14": 18.43,
    "datacomp-b32-256": 1.29,
    "siglip2-b32": 1.37,
    "laion-b32": 1.0,
}
PRESETS = tuple(replace(p, cpu_cost=CPU_COST.get(p.name)) for p in PRESETS)
#: The model of a new library: the figures in docs/performance.md ("The default model")
#: keep laion-b32 (SigLIP 2 B/32's 768-d vectors miss the disk goal); never a preset whose
#: licence is not permissive.
DEFAULT_PRESET = "laion-b32"
DEFAULT_MODEL = next(p.hub_id for p in PRESETS if p.name == DEFAULT_PRESET)


def resolve(model: str | None) -> str:
    """A preset name, hub id or local directory -> what ``from_pretrained`` takes.

    ``None`` means ``$ITR_MODEL``, else the default preset.
    """
    model = model or os.environ.get("ITR_MODEL") or DEFAULT_MODEL
    for p in PRESETS:
        if model == p.name:
            return p.hub_id
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    return model


def preset_names() -> list[str]:
    return [p.name for p in PRESETS]


def preset_revision(model: str) -> str | None:
    """The revision a preset pins for ``model`` (a resolved id), else None (main)."""
    for p in PRESETS:
        if model in (p.hub_id, p.name):
            return p.revision
    return None


def default_preset() -> Preset:
    return next(p for p in PRESETS if p.name == DEFAULT_PRESET)


@dataclass(frozen=True)
class RerankPreset:
    """An image-text matching checkpoint for ``--rerank``.

    Published figures: the paper's fine-tuned COCO 5K test and zero-shot Flickr30k 1K test
    recall@1 (percent), ranking the dual encoder's top k by the matching head.
    """

    name: str
    hub_id: str
    revision: str | None  #: the hub revision to load (None: main)
    params_m: int
    input_px: int  #: side of the square the re-ranker sees
    coco_t2i_r1: float | None
    coco_i2t_r1: float | None
    flickr_t2i_r1: float | None
    flickr_i2t_r1: float | None
    note: str = ""


RERANK_PRESETS: tuple[RerankPreset, ...] = (
    # Only this pull-request revision of the repository carries model.safetensors (main has
    # pickled weights only, which itr never loads).  Figures: BLIP (Li et al. 2022), ViT-B
    # pre-trained on 129M images, fine-tuned on COCO, ITM re-ranking of the top k=256 (COCO)
    # and k=128 (Flickr30k) of its own contrastive ranking: Tables 5 and 6.
    RerankPreset("blip-itm-base-coco", "Salesforce/blip-itm-base-coco", "refs/pr/5", 224, 384,
                 64.3, 81.9, 85.0, 96.0, "BLIP ViT-B image-text matching head, COCO fine-tuned"),
)
DEFAULT_RERANK_PRESET = "blip-itm-base-coco"


def resolve_reranker(model: str | None) -> tuple[str, str | None]:
    """A re-rank preset name, hub id or local directory -> (what ``from_pretrained`` takes,
    revision).  ``None`` means ``$ITR_RERANK_MODEL``, else the default re-rank preset."""
    model = model or os.environ.get("ITR_RERANK_MODEL") or DEFAULT_RERANK_PRESET
    for p in RERANK_PRESETS:
        if model in (p.name, p.hub_id):
            return p.hub_id, p.revision
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded), None
    return model, None


def rerank_preset_names() -> list[str]:
    return [p.name for p in RERANK_PRESETS]


def model_revision(model_id: str) -> str | None:
    """The revision to key a cache on, without loading the model (the evaluation
    embedding cache, the re-ranker's feature cache).

    A local directory: a fingerprint of its ``config.json`` and the names, sizes and
    modification times of its weight files (retraining in place changes it).  A hub id:
    the commit that ``refs/main`` points to in the local Hugging Face cache.  None when
    unknown (the loaded model's own revision is used then).
    """
    p = Path(model_id)
    if p.is_dir():
        h = hashlib.blake2b(digest_size=8)
        try:
            h.update((p / "config.json").read_bytes())
        except OSError:
            pass
        for f in sorted(p.iterdir()):
            if f.suffix in (".safetensors", ".json", ".txt", ".model"):
                st = f.stat()
                h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return "local-" + h.hexdigest()
    if model_id.startswith("hf-hub:"):  # an open_clip checkpoint on the hub
        model_id = model_id[len("hf-hub:"):]
    try:
        from huggingface_hub import constants

        ref = Path(constants.HF_HUB_CACHE) / ("models--" + model_id.replace("/", "--")) / "refs" / "main"
        return ref.read_text().strip() or None
    except Exception:  # no hub cache, no such model: the loaded model tells us
        return None
