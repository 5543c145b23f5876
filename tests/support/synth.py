"""Synthetic images and locally built models for tests and benchmarks.

Nothing here downloads anything: the images are drawn procedurally and the models are
built from transformers configs with random weights (or trained locally, see
``scripts/train_micro_clip.py``), then saved in the same directory layout as a Hugging Face
hub checkpoint so that the rest of itr loads them exactly as it loads a real model.

Heavy imports (numpy, torch, transformers, sentencepiece) happen inside the functions so
that importing this module stays cheap.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import tempfile
from pathlib import Path
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image
    from transformers import CLIPTokenizer

# Hues far apart so that a 32-pixel model can tell them apart after the added noise and
# the processor's bicubic resize.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

# Shape centre as a fraction of the image side. Offsets stay well inside the square because
# the CLIP image processor centre-crops: anything near a border of a non-square image would
# be cut off, and a square image is not cropped at all.
_POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}

_POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

# The standard OpenAI CLIP preprocessing constants (also used by the LAION checkpoints).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# Words a benchmark query might plausibly use; enough to give the ViT-B/32 stand-in a
# tokenizer that turns ordinary photo-search queries into whole-word tokens.
COMMON_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        """
        a an the of in on at to with and or for from by under over near behind between inside
        outside above below during after before while next front back top bottom left right
        center middle up down is are was being two three four five many some few one several
        photo picture image shot view close closeup portrait landscape selfie group family
        friends people person man woman child children baby boy girl kid kids crowd couple
        dog dogs puppy cat cats kitten bird birds horse cow sheep fish duck chicken animal
        animals pet pets car cars bus truck train bicycle bike motorcycle boat ship plane
        airplane road street city town village building buildings house home church bridge
        tower castle market shop restaurant cafe kitchen room bedroom garden park playground
        beach sea ocean lake river waterfall mountain mountains hill hills forest tree trees
        flower flowers grass field desert snow ice rain sky cloud clouds sun sunset sunrise
        moon stars night day morning evening winter summer spring autumn fall weather fog
        storm water wave waves sand rock rocks stone island coast harbor food meal dinner
        lunch breakfast cake pizza bread fruit apple banana coffee tea wine beer drink table
        chair sofa bed window door wall floor book books phone computer screen camera ball
        toy toys game party birthday wedding christmas holiday vacation trip travel hiking
        walking running swimming playing sitting standing sleeping eating smiling laughing
        dancing reading cooking riding driving flying jumping red green blue yellow purple
        orange black white gray grey brown pink gold silver colorful dark bright light old
        new big small little large tiny tall long short happy sad beautiful young blurry
        sunny cloudy snowy wet dry hot cold warm empty full old circle square triangle star
        cross shape shapes line lines pattern text sign document receipt screenshot map
        painting drawing art statue museum concert stage music guitar piano festival sport
        sports football soccer tennis basketball stadium team race school office desk street
        """.split()
    )
)


def caption(color: str, shape: str, position: str) -> str:
    """Return the English caption of a synthetic image.

    Args:
        color: a key of ``COLORS``.
        shape: one of ``SHAPES``.
        position: one of ``POSITIONS``.

    Returns:
        A caption such as ``"a red circle on the left"`` or ``"a green triangle in the center"``.
    """
    if color not in COLORS or shape not in SHAPES or position not in POSITIONS:
        raise ValueError(f"unknown combination: {color!r}, {shape!r}, {position!r}")
    return f"a {color} {shape} {_POSITION_PHRASES[position]}"


def combinations() -> list[tuple[str, str, str]]:
    """Return every ``(color, shape, position)`` triple in a fixed order (colour-major)."""
    return list(itertools.product(COLORS, SHAPES, POSITIONS))


def all_captions() -> list[str]:
    """Return the caption of every combination, in the order of ``combinations()``."""
    return [caption(*combo) for combo in combinations()]


def caption_words() -> list[str]:
    """Return the distinct words used by captions, in first-seen order."""
    return _letter_words(all_captions())


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    # Polygons are built around the centre so that every shape covers a similar area,
    # which keeps "size" from being a shortcut for "shape".
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a)) + 0.15 * r)
            for a in (-90, 30, 150)
        ]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = math.radians(-90 + 36 * k)
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        a, w = r, r * 0.36
        return [
            (cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w),
            (cx + a, cy + w), (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a),
            (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape: {shape!r}")


def draw(color: str, shape: str, position: str, size: int = 64, seed: int = 0) -> Image.Image:
    """Draw one synthetic image: a coloured shape at a position on a light, noisy background.

    The background tint, the noise, the shape's size, its offset from the nominal position
    and a small colour jitter all come from ``seed``, so the same arguments always give
    the same pixels.

    Args:
        color: a key of ``COLORS``.
        shape: one of ``SHAPES``.
        position: one of ``POSITIONS``.
        size: side of the square image in pixels.
        seed: selects the random jitter.

    Returns:
        A square RGB ``PIL.Image.Image`` of ``size`` x ``size`` pixels.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    if color not in COLORS or position not in _POSITION_CENTRES:
        raise ValueError(f"unknown combination: {color!r}, {shape!r}, {position!r}")
    # A string seed is hashed deterministically by random (unlike hash(), which is salted
    # per process), and mixing in the combination keeps equal seeds of different
    # combinations from sharing the same jitter.
    rng = random.Random(f"{color}/{shape}/{position}/{seed}")

    base = rng.randint(222, 250)
    background = tuple(min(255, base + rng.randint(-8, 5)) for _ in range(3))
    image = Image.new("RGB", (size, size), background)

    fx, fy = _POSITION_CENTRES[position]
    cx = (fx + rng.uniform(-0.04, 0.04)) * size
    cy = (fy + rng.uniform(-0.04, 0.04)) * size
    r = rng.uniform(0.15, 0.2) * size
    fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLORS[color])

    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon(_shape_polygon(shape, cx, cy, r), fill=fill)

    noise_rng = np.random.default_rng(rng.getrandbits(64))
    pixels = np.asarray(image, dtype=np.int16)
    pixels = pixels + noise_rng.integers(-6, 7, size=pixels.shape, dtype=np.int16)  # [size, size, 3]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable character table: byte-level BPE vocabularies
    # are written in these characters, so ours must be too for ByteLevel pre-tokenizing.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _letter_words(texts: Iterable[str]) -> list[str]:
    # CLIP's pre-tokenizer splits text into runs of letters (digits go one by one and
    # punctuation separately), so only letter runs can become whole-word tokens.
    seen: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"[^\W\d_]+", text.lower()):
            seen.setdefault(word, None)
    return list(seen)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    # The textbook BPE loop: repeatedly merge the adjacent pair with the lowest rank.
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def _clip_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_chars = _bytes_to_unicode()
    alphabet = [byte_chars[b] for b in range(256)]
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab[token] = len(vocab)

    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in _letter_words(words):
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        # Appending a merge of the first two leftover pieces, at the lowest priority, can
        # never change how an earlier word is segmented (that word always had a
        # higher-priority merge available), and it shortens this word by at least one
        # piece, so the loop ends with the word as a single token.
        while len(pieces := _bpe(symbols, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    # Real CLIP vocabularies end with the two specials (49406, 49407), which also keeps
    # eos the largest id, as the legacy argmax pooling of CLIPTextModel expects.
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def make_clip_tokenizer(out_dir: str | Path, words: Iterable[str]) -> CLIPTokenizer:
    """Build and save a real byte-level BPE CLIP tokenizer in which each word is one token.

    The vocabulary holds the 256 byte characters, their ``</w>`` variants, the pieces made by
    the merges, and ``<|startoftext|>`` / ``<|endoftext|>`` (last, as in CLIP). The merges
    are chosen so that every given word encodes as the single token ``word</w>``; any other
    text still encodes, in smaller pieces.

    Args:
        out_dir: directory to write ``vocab.json``, ``merges.txt``, ``tokenizer.json`` and
            ``tokenizer_config.json`` into (created if needed).
        words: words to make whole tokens; text is lower-cased and split into letter runs.

    Returns:
        The ``transformers.CLIPTokenizer``, as saved.
    """
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    word_list = _letter_words(words)
    vocab, merges = _clip_vocab_and_merges(word_list)
    # transformers 5 only writes tokenizer.json; the hub's CLIP repos also carry the two
    # classic files, which other tools (open_clip, older transformers) read.
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text(merges_text, encoding="utf-8")

    # transformers 5's CLIPTokenizer is tokenizers-backed and takes the vocab and merges
    # themselves; without model_max_length it would default to 1e30 and never truncate.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    for word in word_list:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if tokenizer.convert_ids_to_tokens(ids) != [word + "</w>"]:
            raise RuntimeError(f"tokenizer splits {word!r} into {tokenizer.convert_ids_to_tokens(ids)}")
    tokenizer.save_pretrained(out)
    return tokenizer


# --------------------------------------------------------------------------- models


def _clip_image_processor(image_size: int):
    # The PIL backend is what CLIPImageProcessor falls back to without torchvision anyway;
    # naming it directly avoids the fallback warning. It still saves itself as
    # "CLIPImageProcessor", so the directory is the hub's layout.
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=3,  # PIL bicubic, as CLIP was trained
        do_center_crop=True,
    )


def _save_clip(out_dir: Path, model, tokenizer, image_size: int) -> Path:
    from transformers import CLIPProcessor

    # transformers 5 always writes safetensors (the safe_serialization switch is gone).
    model.save_pretrained(out_dir)
    image_processor = _clip_image_processor(image_size)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    # transformers 5 nests the image processor inside processor_config.json; checkpoints on
    # the hub carry it as preprocessor_config.json, so write that too: code tested against
    # these directories must also cope with a real download.
    image_processor.save_pretrained(out_dir)
    return out_dir


def make_tiny_clip(
    out_dir: str | Path,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    proj: int = 32,
    seed: int = 0,
) -> Path:
    """Build a random-weight tiny CLIP and save it with its processor in hub layout.

    The tokenizer makes every caption word one token (see ``make_clip_tokenizer``); the
    text tower has 77 positions like CLIP; the image processor resizes the shortest edge to
    ``image_size``, centre-crops a square and normalises with CLIP's mean and std.

    Args:
        out_dir: directory to write (created if needed).
        image_size: input side in pixels.
        patch_size: ViT patch side in pixels.
        hidden: width of both towers (the MLP is 4x wider).
        layers: transformer layers in each tower.
        heads: attention heads in each tower.
        proj: dimension of the shared embedding space.
        seed: torch seed for the weights.

    Returns:
        ``out_dir`` as a ``Path``; it loads with ``AutoModel`` / ``AutoProcessor``.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel

    out = Path(out_dir)
    tokenizer = make_clip_tokenizer(out, caption_words())
    tower = dict(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_act="gelu",
        projection_dim=proj,
    )
    config = CLIPConfig(
        text_config=dict(
            tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            # The text tower pools at the first eos, so these must be the tokenizer's ids.
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
        projection_dim=proj,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    return _save_clip(out, model, tokenizer, image_size)


def make_vit_b32(out_dir: str | Path, seed: int = 0) -> Path:
    """Build a random-weight CLIP with the architecture of ``laion/CLIP-ViT-B-32-laion2B-s34B-b79K``.

    The shapes, activation and preprocessing match that checkpoint (ViT-B/32 at 224 px,
    12-layer 512-wide text tower, 512-d embeddings, GELU, vocabulary size 49408), so
    timings and memory are those of the real model; only the weight values and the
    tokenizer's vocabulary (``COMMON_WORDS`` plus caption words, ids well below 49408) differ.

    Args:
        out_dir: directory to write (created if needed); about 600 MB of safetensors.
        seed: torch seed for the weights.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel

    out = Path(out_dir)
    tokenizer = make_clip_tokenizer(out, list(COMMON_WORDS) + caption_words())
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=8,
            max_position_embeddings=77,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=32,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=512,
        ),
        projection_dim=512,
        logit_scale_init_value=2.6592,
    )
    # Building on the meta device skips transformers' per-module initialisation (seconds
    # for 150M parameters); one seeded normal fill per tensor is enough, since benchmarks
    # measure cost, which does not depend on the values.
    with torch.device("meta"):
        model = CLIPModel(config)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
                module.weight.normal_(0.0, 0.02, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        model.vision_model.embeddings.class_embedding.normal_(0.0, 0.02, generator=generator)
        model.logit_scale.fill_(config.logit_scale_init_value)
        # Buffers are not parameters: to_empty left them uninitialised too.
        for embeddings in (model.text_model.embeddings, model.vision_model.embeddings):
            ids = embeddings.position_ids
            ids.copy_(torch.arange(ids.shape[-1]).expand_as(ids))
    return _save_clip(out, model.eval(), tokenizer, 224)


def make_tiny_siglip(out_dir: str | Path, seed: int = 0) -> Path:
    """Build a random-weight tiny SigLIP and save it with its processor in hub layout.

    The tokenizer is a ``SiglipTokenizer`` over a small sentencepiece model (BPE, 128
    pieces) trained here on the captions, in which every caption word is one piece. Text is meant to be padded to ``max_length`` (16), as SigLIP was
    trained: its text tower pools the last position.

    Args:
        out_dir: directory to write (created if needed).
        seed: torch seed for the weights.

    Returns:
        ``out_dir`` as a ``Path``; it loads with ``AutoModel`` / ``AutoProcessor``.
    """
    import sentencepiece as spm
    import torch
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor, SiglipTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    max_length = 16
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "captions.txt"
        corpus.write_text("\n".join(all_captions()) + "\n", encoding="utf-8")
        prefix = str(Path(tmp) / "spiece")
        # The special ids follow Google's SigLIP spiece.model (<pad> 0, </s> 1, <unk> 2, no
        # bos). BPE rather than SigLIP's unigram: on so small a corpus the unigram trainer
        # stalls at ~40 pieces (mostly single letters) and captions overflow 16 positions,
        # while 128 BPE pieces make every caption word one piece.
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=prefix,
            vocab_size=128,
            model_type="bpe",
            character_coverage=1.0,
            hard_vocab_limit=False,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        tokenizer = SiglipTokenizer(vocab_file=prefix + ".model", model_max_length=max_length)
        # Save while the temp model file still exists: the tokenizer copies it.
        image_processor = SiglipImageProcessorPil(
            size={"height": 32, "width": 32},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            resample=3,
        )
        SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
        image_processor.save_pretrained(out)  # the hub's layout, as for CLIP

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = SiglipConfig(
        text_config=dict(
            tower,
            vocab_size=tokenizer.vocab_size,
            max_position_embeddings=max_length,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        ),
        vision_config=dict(tower, image_size=32, patch_size=8),
    )
    torch.manual_seed(seed)
    SiglipModel(config).eval().save_pretrained(out)
    return out


#: Words in other scripts that the SigLIP 2-style tokenizer holds as single pieces; other
#: characters (Arabic, Devanagari, emoji, ...) go through Gemma's byte fallback.
MULTILINGUAL_WORDS: tuple[str, ...] = ("赤い", "円", "青い", "四角", "猫", "красный", "круг",
                                       "синий", "квадрат", "rojo", "círculo", "über")


def make_gemma_tokenizer(words: Iterable[str], *, padding_side: str = "right",
                         model_max_length: int = 16):
    """A small Gemma-style fast tokenizer (``GemmaTokenizer``: BPE with byte fallback,
    spaces as ``▁``, ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2) in which each of ``words``,
    preceded by a space, is one piece.

    It appends ``<eos>`` and no ``<bos>``, as SigLIP 2's texts were tokenized.  Pieces are
    built left to right (merges ``("▁re", "d")``), so BPE rebuilds exactly those words.
    """
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab: dict[str, int] = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for w in dict.fromkeys(words):
        piece = "▁" + w
        for ch in piece:
            vocab.setdefault(ch, len(vocab))
        prefix = piece[0]
        for ch in piece[1:]:
            if prefix + ch not in vocab:
                merges.append((prefix, ch))
                vocab[prefix + ch] = len(vocab)
            prefix += ch
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=False, add_eos_token=True,
                          padding_side=padding_side, model_max_length=model_max_length)


def make_tiny_siglip2(out_dir: str | Path, *, padding_side: str = "right", seed: int = 0) -> Path:
    """Build a random-weight tiny SigLIP 2-style model and save it in hub layout.

    As the fixed-resolution SigLIP 2 checkpoints (``google/siglip2-base-patch16-224``):
    ``model_type`` "siglip", a Gemma fast tokenizer (:func:`make_gemma_tokenizer`, caption
    words and :data:`MULTILINGUAL_WORDS`), texts padded to ``max_length`` (16 here, 64
    there), bilinear resize to a square, mean and std 0.5.

    Args:
        out_dir: directory to write (created if needed).
        padding_side: the tokenizer's padding side ("right"; Gemma's own default is "left").
        seed: torch seed for the weights.
    """
    import torch
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    max_length = 16
    tokenizer = make_gemma_tokenizer(caption_words() + list(MULTILINGUAL_WORDS),
                                     padding_side=padding_side, model_max_length=max_length)
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=2,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = SiglipConfig(
        text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=max_length,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id),
        vision_config=dict(tower, image_size=32, patch_size=8),
    )
    torch.manual_seed(seed)
    SiglipModel(config).eval().save_pretrained(out)
    return out


#: open_clip preprocessing of the tiny test models: OpenAI's mean and std.
_OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def make_tiny_openclip(out_dir: str | Path, *, kind: str = "vit", seed: int = 0) -> Path:
    """Build a random-weight tiny open_clip checkpoint in the hub layout that
    ``hf-hub:`` and local folders use: ``open_clip_config.json`` (``model_cfg`` and
    ``preprocess_cfg``) and ``open_clip_model.safetensors``.  Needs open_clip (and so a
    torchvision that matches torch).

    Args:
        kind: "vit": a 2-layer ViT at 32 px, causal text tower, bicubic resize of the
            short side and centre crop (as DFN / DataComp); "mobileclip": timm's
            ``fastvit_mci0`` at 64 px with MobileCLIP's text tower (no causal mask: it
            attends to its padding), bilinear, mean 0 and std 1 (as MobileCLIP-S0/S1);
            "squash": the ViT resized to the square (open_clip's ``resize_mode`` squash).
        seed: torch seed for the weights.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
    if kind == "mobileclip":
        model_cfg = dict(embed_dim=32, custom_text=True,
                         vision_cfg=dict(timm_model_name="fastvit_mci0", timm_model_pretrained=False,
                                         timm_pool="avg", timm_proj=None, timm_drop=0.0,
                                         timm_drop_path=0.0, image_size=64),
                         text_cfg=dict(text, no_causal_mask=True))
        pre = dict(mean=[0.0] * 3, std=[1.0] * 3, interpolation="bilinear", resize_mode="shortest")
    else:
        model_cfg = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64,
                                                       patch_size=8, head_width=32),
                         text_cfg=text)
        pre = dict(mean=_OPENAI_MEAN, std=_OPENAI_STD, interpolation="bicubic",
                   resize_mode="squash" if kind == "squash" else "shortest")
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}, indent=1))
    torch.manual_seed(seed)
    model = open_clip.create_model("local-dir:" + str(out), load_weights=False)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
              str(out / "open_clip_model.safetensors"))
    return out


def _fill_random(model, seed: int) -> None:
    """Seeded values for a model built on the meta device and moved with ``to_empty``:
    layer norms 1 and 0, other biases 0, every other weight normal(0, 0.02), position ids
    counted (benchmarks measure cost, which does not depend on the values)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in norms:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=generator)
        for name, b in model.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))


def make_siglip2_b32(out_dir: str | Path, seed: int = 0) -> Path:
    """Build a random-weight SigLIP 2 with the architecture of
    ``google/siglip2-base-patch32-256``: ViT-B/32 at 256 px (64 patches, attention-pooling
    head), a 12-layer 768-wide text tower over Gemma's 256,000-token vocabulary (a 790 MB
    float32 embedding table) and 64 positions, 768-d embeddings; bilinear resize to
    256x256, mean and std 0.5.  Only the weight values and the tokenizer's vocabulary (a
    small Gemma-style one, :func:`make_gemma_tokenizer`, ids well below 256,000) differ, so
    timings and memory are the real model's.  About 1.5 GB of safetensors.
    """
    import torch
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_gemma_tokenizer(list(COMMON_WORDS) + caption_words() + list(MULTILINGUAL_WORDS),
                                     padding_side="right", model_max_length=64)
    image_processor = SiglipImageProcessorPil(size={"height": 256, "width": 256}, resample=2,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tower = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    config = SiglipConfig(
        text_config=dict(tower, vocab_size=256000, max_position_embeddings=64,
                         projection_size=768, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id),
        vision_config=dict(tower, image_size=256, patch_size=32),
    )
    with torch.device("meta"):
        model = SiglipModel(config)
    model = model.to_empty(device="cpu")
    _fill_random(model, seed)
    model.eval().save_pretrained(out)
    return out


def make_tiny_blip_itm(out_dir: str | Path, seed: int = 0) -> Path:
    """Build a random-weight tiny BLIP image-text matching model (``BlipForImageTextRetrieval``)
    and save it with its processor in hub layout.

    A BERT word-piece tokenizer whose vocabulary holds every caption word; a 2-layer,
    32-wide vision tower at 32 px and a 2-layer text encoder cross-attending to it.  The
    weights are drawn wider than transformers' default (std 0.2, not 0.02) so that the match
    probabilities of different images differ by more than float noise.

    Args:
        out_dir: directory to write (created if needed).
        seed: torch seed for the weights.

    Returns:
        ``out_dir`` as a ``Path``; it loads with ``BlipForImageTextRetrieval`` / ``BlipProcessor``.
    """
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForImageTextRetrieval,
                              BlipImageProcessorPil, BlipProcessor)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + list(dict.fromkeys(caption_words() + list(COMMON_WORDS)))
    vocab = {w: i for i, w in enumerate(words)}
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=64)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    image_processor.save_pretrained(out)  # the hub's layout, as for CLIP
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 initializer_range=0.2)
    config = BlipConfig(
        text_config=dict(tower, vocab_size=len(vocab), max_position_embeddings=64,
                         pad_token_id=vocab["[PAD]"], bos_token_id=vocab["[CLS]"],
                         sep_token_id=vocab["[SEP]"]),
        vision_config=dict(tower, image_size=32, patch_size=8),
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(config).eval()
    with torch.no_grad():  # a head wide enough that probabilities spread out
        model.itm_head.weight.normal_(0.0, 1.0)
    model.save_pretrained(out)
    return out


def make_blip_itm_base(out_dir: str | Path, seed: int = 0) -> Path:
    """Build a random-weight BLIP ITM model with the architecture of
    ``Salesforce/blip-itm-base-coco`` (ViT-B/16 at 384 px, 12-layer 768-wide BERT text
    encoder cross-attending to it, vocabulary 30524), for timing the re-ranker.

    The tokenizer's vocabulary is :data:`COMMON_WORDS` and caption words (ids well below
    30524); only the weight values differ from the real model, so timings and memory match.

    Args:
        out_dir: directory to write (created if needed); about 900 MB of safetensors.
        seed: torch seed for the weights.
    """
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForImageTextRetrieval,
                              BlipImageProcessorPil, BlipProcessor)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + list(dict.fromkeys(list(COMMON_WORDS) + caption_words()))
    vocab = {w: i for i, w in enumerate(words)}
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=512)
    image_processor = BlipImageProcessorPil()  # 384 x 384, bicubic, OpenAI CLIP mean and std
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    image_processor.save_pretrained(out)
    config = BlipConfig(text_config=dict(vocab_size=30524), vision_config=dict(image_size=384))
    # as make_vit_b32: no per-module initialisation, one seeded normal fill per tensor
    with torch.device("meta"):
        model = BlipForImageTextRetrieval(config)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "position_ids" in name:
                t.copy_(torch.arange(t.shape[-1]).expand_as(t))
            elif t.is_floating_point():
                if name.endswith("bias"):
                    t.zero_()
                elif "norm" in name.lower():
                    t.fill_(1.0)
                else:
                    t.normal_(0.0, 0.02, generator=generator)
            else:
                t.zero_()
    model.eval().save_pretrained(out)
    return out


# --------------------------------------------------------------------------- photos


def make_photo(path: str | Path, width: int, height: int, seed: int, quality: int = 90) -> Path:
    """Write a reproducible photo-like JPEG.

    Smooth colour gradients, mid-frequency texture, a few solid shapes and per-pixel
    luminance noise make the file compress like a camera photo (a few MB at 12 MP) rather
    than like a flat image, which matters for decode and I/O benchmarks.

    Args:
        path: where to write the JPEG (parent directories are created).
        width: width in pixels, e.g. 4000 for 12 MP or 1632 for 2 MP.
        height: height in pixels, e.g. 3000 or 1224.
        seed: selects the content; the same seed gives the same bytes.
        quality: JPEG quality (1-95).

    Returns:
        ``path`` as a ``Path``.
    """
    import numpy as np
    from PIL import Image, ImageChops, ImageDraw

    rng = np.random.default_rng(seed)
    # Upscaling tiny random grids is far cheaper than computing gradients per pixel.
    low = Image.fromarray(rng.integers(30, 226, size=(3, 4, 3), dtype=np.uint8), "RGB")
    image = low.resize((width, height), Image.Resampling.BICUBIC)

    pen = ImageDraw.Draw(image)
    side = min(width, height)
    for _ in range(int(rng.integers(6, 14))):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.03, 0.25) * side
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            pen.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        else:
            points = [(x + rng.uniform(-r, r), y + rng.uniform(-r, r)) for _ in range(int(rng.integers(3, 7)))]
            pen.polygon(points, fill=fill)

    texture_size = (max(2, width // 24), max(2, height // 24))
    texture = Image.fromarray(rng.integers(0, 256, size=texture_size[::-1], dtype=np.uint8), "L")
    texture = np.asarray(texture.resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
    # Luminance noise on one channel applied to all three: realistic, and a third of the
    # cost; the adding itself is left to PIL (ImageChops), which is several times faster
    # than numpy arithmetic on the full RGB array.
    grain = rng.integers(-7, 8, size=(height, width), dtype=np.int16)
    detail = ((texture - 128) >> 3) + grain + 128  # [height, width], 128 = no change
    detail_image = Image.fromarray(detail.astype(np.uint8), "L")
    image = ImageChops.add(image, Image.merge("RGB", (detail_image,) * 3), scale=1.0, offset=-128)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, "JPEG", quality=quality)
    return out


#: The real architectures the benchmarks build with random weights: name -> (folder under
#: bench/out/, factory).  Cost and memory do not depend on the weight values.
BENCH_ARCHS = {"laion-b32": ("vit-b32", "make_vit_b32"),
               "siglip2-b32": ("siglip2-b32", "make_siglip2_b32")}


def bench_model(arch: str, root: str | Path) -> Path:
    """The random-weight model of ``arch`` (:data:`BENCH_ARCHS`) under ``root``, built once."""
    folder, factory = BENCH_ARCHS[arch]
    d = Path(root) / folder
    if not (d / "model.safetensors").exists():
        globals()[factory](d)
    return d

