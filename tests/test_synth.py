"""Tests for the synthetic images and the locally built models in itrcli.synth."""

from __future__ import annotations

from pathlib import Path


from support import synth

# tiny_clip, tiny_siglip and micro_clip are the session fixtures of conftest.py.


def _features(model, processor, images, texts, **text_kwargs):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        tokens = processor(text=texts, return_tensors="pt", **text_kwargs)
        image = model.get_image_features(pixel_values=pixels).pooler_output  # [n_images, dim]
        text = model.get_text_features(input_ids=tokens["input_ids"]).pooler_output  # [n_texts, dim]
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def test_captions_cover_every_combination() -> None:
    captions = synth.all_captions()
    assert len(captions) == len(set(captions)) == len(synth.COLORS) * len(synth.SHAPES) * len(synth.POSITIONS)
    assert synth.caption("red", "circle", "left") == "a red circle on the left"
    assert synth.caption("blue", "square", "top") == "a blue square at the top"
    assert synth.caption("green", "triangle", "center") == "a green triangle in the center"


def test_draw_is_deterministic_square_rgb() -> None:
    image = synth.draw("red", "circle", "left", size=48, seed=3)
    assert image.mode == "RGB" and image.size == (48, 48)
    assert image.tobytes() == synth.draw("red", "circle", "left", size=48, seed=3).tobytes()
    assert image.tobytes() != synth.draw("red", "circle", "left", size=48, seed=4).tobytes()
    # The shape is on the left: the left half holds far more strongly red pixels.
    pixels = image.load()
    red = [(x, y) for x in range(48) for y in range(48) if pixels[x, y][0] > 150 and pixels[x, y][1] < 100]
    assert red and sum(x < 24 for x, _ in red) > 0.9 * len(red)


def test_clip_tokenizer_makes_caption_words_single_tokens(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tokenizer = synth.make_clip_tokenizer(tmp_path, synth.caption_words())
    text = "a red circle on the left"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == (
        ["<|startoftext|>"] + [f"{word}</w>" for word in text.split()] + ["<|endoftext|>"]
    )
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == ids
    # The tokenizers library alone (as a lean runtime would use) gives the same ids.
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids == ids
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    # Unknown words still encode, in smaller pieces.
    assert len(tokenizer("zebra", add_special_tokens=False)["input_ids"]) > 1


def test_tiny_clip_loads_by_path(tiny_clip: Path) -> None:
    from transformers import AutoModel, AutoProcessor

    assert (tiny_clip / "model.safetensors").is_file()
    model = AutoModel.from_pretrained(tiny_clip).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip)
    images = [synth.draw("blue", "star", "top", seed=s) for s in range(2)]
    image, text = _features(model, processor, images, synth.all_captions()[:3], padding=True)
    assert image.shape == (2, 32) and text.shape == (3, 32)


def test_tiny_siglip_loads_by_path_and_pads_to_max_length(tiny_siglip: Path) -> None:
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(tiny_siglip).eval()
    processor = AutoProcessor.from_pretrained(tiny_siglip)
    max_length = model.config.text_config.max_position_embeddings
    tokens = processor(text=["a red circle on the left", "a dog"], padding="max_length", return_tensors="pt")
    assert tokens["input_ids"].shape == (2, max_length)
    image, text = _features(
        model, processor, [synth.draw("red", "circle", "left")], ["a red circle on the left"], padding="max_length"
    )
    assert image.shape == (1, 32) and text.shape == (1, 32)


def test_make_photo_is_reproducible(tmp_path: Path) -> None:
    from PIL import Image

    first = synth.make_photo(tmp_path / "a.jpg", 320, 240, seed=7)
    second = synth.make_photo(tmp_path / "b.jpg", 320, 240, seed=7)
    assert first.read_bytes() == second.read_bytes()
    with Image.open(first) as image:
        assert image.format == "JPEG" and image.size == (320, 240)


def test_micro_clip_fixture_ranks_the_right_caption_first(micro_clip: Path) -> None:
    import torch
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(micro_clip).eval()
    processor = AutoProcessor.from_pretrained(micro_clip)
    captions = synth.all_captions()
    # A seed far from the training pool's, so this drawing was never seen in training.
    image, text = _features(
        model, processor, [synth.draw("red", "circle", "left", seed=424242)], captions, padding=True
    )
    scores = (image @ text.T)[0]  # [n_captions]
    assert captions[int(torch.argmax(scores))] == "a red circle on the left"
