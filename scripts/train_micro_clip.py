#!/usr/bin/env python
"""Train the micro CLIP test fixture on procedurally drawn shapes.

The model is a tiny CLIP (see ``support.synth.make_tiny_clip``) trained from scratch with
the standard symmetric contrastive loss on images of coloured shapes paired with their
captions ("a red circle on the left"). Every batch holds each colour x shape x position
combination exactly once, so a batch has no duplicate captions (which would otherwise be
counted as negatives) and every hard negative (same colour and shape, another position...)
is present.

It runs on CPU in a few minutes, is deterministic (seeded, fixed thread count) and writes
the model in hub layout (safetensors + processor files) to ``tests/fixtures/micro-clip/``
together with a README that records the held-out figures.

Usage:
    python scripts/train_micro_clip.py [--out tests/fixtures/micro-clip] [--steps N]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # test support: model factories, drawings

from support import synth  # noqa: E402

# One place for the recipe, so the README can quote it.
IMAGE_SIZE = 32  # the processor's output side; images are drawn at synth.draw's default 64
PATCH_SIZE = 8
HIDDEN = 64
LAYERS = 3
HEADS = 4
PROJ = 64
TRAIN_SEEDS = 96  # drawn images per combination in the training pool
HELD_OUT_SEED = 1_000_000  # held-out images use seeds from here on, never seen in training
STEPS = 800
LR = 2e-3
WARMUP = 100
WEIGHT_DECAY = 0.05
SEED = 0


def pixel_values(processor, images: list) -> torch.Tensor:
    """Preprocess PIL images exactly as itr will, in chunks to bound memory."""
    chunks = [
        processor(images=images[i : i + 512], return_tensors="pt")["pixel_values"] for i in range(0, len(images), 512)
    ]
    return torch.cat(chunks)  # [n, 3, IMAGE_SIZE, IMAGE_SIZE]


def embed(model, pixels: torch.Tensor, text: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Return L2-normalised image and text embeddings."""
    image_features = model.get_image_features(pixel_values=pixels).pooler_output  # [n_images, PROJ]
    text_features = model.get_text_features(**text).pooler_output  # [n_texts, PROJ]
    return F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)


def recall_at(similarity: torch.Tensor, k: int) -> float:
    """Fraction of rows whose own index (the diagonal) is among the k highest scores."""
    top = similarity.topk(k, dim=1).indices  # [n, k]
    hits = (top == torch.arange(similarity.shape[0])[:, None]).any(dim=1)
    return hits.float().mean().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "micro-clip")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    # Wall time depends on what else the machine runs; the load average puts it in context.
    load_at_start = os.getloadavg()[0]

    from transformers import AutoProcessor, CLIPModel

    # Build the fixture directory with the factory so the tokenizer, processor and config
    # are exactly those of make_tiny_clip; training then only replaces the weights.
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    synth.make_tiny_clip(
        out, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden=HIDDEN, layers=LAYERS, heads=HEADS, proj=PROJ, seed=SEED
    )
    model = CLIPModel.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)

    combos = synth.combinations()
    captions = [synth.caption(*combo) for combo in combos]
    n = len(combos)
    text = processor(text=captions, return_tensors="pt", padding=True)
    text = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}

    pool = pixel_values(processor, [synth.draw(*combo, seed=s) for s in range(TRAIN_SEEDS) for combo in combos])
    pool = pool.view(TRAIN_SEEDS, n, *pool.shape[1:])  # [seed, combination, 3, H, W]
    print(f"drew {TRAIN_SEEDS * n} training images in {time.perf_counter() - started:.1f}s", file=sys.stderr)

    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in name)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    def lr_factor(step: int) -> float:
        # Linear warm-up then cosine decay to zero, the usual CLIP schedule.
        if step < WARMUP:
            return (step + 1) / WARMUP
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, args.steps - WARMUP)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(SEED)
    targets = torch.arange(n)
    model.train()
    train_started = time.perf_counter()
    running = 0.0
    for step in range(args.steps):
        # One randomly chosen drawing of every combination: captions are all distinct.
        seeds = torch.randint(0, TRAIN_SEEDS, (n,), generator=generator)
        pixels = pool[seeds, targets]  # [n, 3, H, W]
        image_embeds, text_embeds = embed(model, pixels, text)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * image_embeds @ text_embeds.T  # [n images, n captions]
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            # CLIP's own guard: a logit scale above 100 makes the loss unstable.
            model.logit_scale.clamp_(0, math.log(100))
        running += loss.item()
        if (step + 1) % 50 == 0:
            print(
                f"step {step + 1:5d}  loss {running / 50:.4f}  scale {scale.item():6.2f}  "
                f"{time.perf_counter() - train_started:6.1f}s",
                flush=True,
            )
            running = 0.0
    train_seconds = time.perf_counter() - train_started

    model.eval()
    model.save_pretrained(out)

    # Evaluate the saved fixture, loaded back the way itr loads a model, on drawings with
    # unseen seeds: one per combination, so caption i's only relevant image is image i.
    from transformers import AutoModel

    fixture = AutoModel.from_pretrained(out).eval()
    fixture_processor = AutoProcessor.from_pretrained(out)
    held_out = [synth.draw(*combo, seed=HELD_OUT_SEED + i) for i, combo in enumerate(combos)]
    with torch.no_grad():
        image_embeds, text_embeds = embed(
            fixture,
            pixel_values(fixture_processor, held_out),
            {k: v for k, v in fixture_processor(text=captions, return_tensors="pt", padding=True).items()},
        )
    similarity = text_embeds @ image_embeds.T  # [caption, image]
    figures = {
        "t2i_r1": recall_at(similarity, 1),
        "t2i_r5": recall_at(similarity, 5),
        "i2t_r1": recall_at(similarity.T, 1),
    }
    # Which attribute the image->text errors get wrong, to see what the model has learnt.
    best = similarity.T.argmax(dim=1).tolist()
    attribute_accuracy = {
        name: float(np.mean([combos[b][a] == combos[i][a] for i, b in enumerate(best)]))
        for a, name in enumerate(("colour", "shape", "position"))
    }
    total_seconds = time.perf_counter() - started
    size_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())

    report = (
        f"held-out: {n} images (seeds {HELD_OUT_SEED}+), one per caption; {n} captions\n"
        f"text->image R@1 {figures['t2i_r1']:.1%}  R@5 {figures['t2i_r5']:.1%}  "
        f"(chance {1 / n:.1%} / {5 / n:.1%})\n"
        f"image->text R@1 {figures['i2t_r1']:.1%}  (chance {1 / n:.1%})\n"
        "image->text top-1 attribute accuracy: "
        + "  ".join(f"{k} {v:.1%}" for k, v in attribute_accuracy.items())
        + f"\ntraining {args.steps} steps in {train_seconds:.0f}s, {total_seconds:.0f}s in all "
        f"({torch.get_num_threads()} threads on {os.cpu_count()} CPUs, load average {load_at_start:.1f} "
        f"at start); fixture {size_bytes / 1e6:.2f} MB"
    )
    print(report)
    write_readme(out, args.steps, report)
    return 0


def write_readme(out: Path, steps: int, report: str) -> None:
    """Record how the fixture was made, next to it."""
    command = "python scripts/train_micro_clip.py" + ("" if steps == STEPS else f" --steps {steps}")
    (out / "README.md").write_text(
        f"""# micro-clip test fixture

Generated by `scripts/train_micro_clip.py`; do not edit. Rebuild with:

    {command}

A tiny CLIP (transformers `CLIPModel`, hub layout: `config.json`, `model.safetensors`,
tokenizer and processor files) trained from scratch on CPU with the symmetric CLIP
contrastive loss, on synthetic images from `support.synth.draw` (a coloured shape on a
light, noisy background) paired with captions such as "a red circle on the left":
{len(synth.COLORS)} colours x {len(synth.SHAPES)} shapes x {len(synth.POSITIONS)} positions
= {len(synth.combinations())} captions, {TRAIN_SEEDS} drawings of each.

Architecture: {IMAGE_SIZE} px images, patch {PATCH_SIZE}, width {HIDDEN}, {LAYERS} layers,
{HEADS} heads in each tower, {PROJ}-d embeddings; the tokenizer makes every caption word
one token. Training: {steps} steps of {len(synth.combinations())} pairs (every caption
once per batch), AdamW lr {LR}, warm-up {WARMUP} steps then cosine, weight decay
{WEIGHT_DECAY}, seed {SEED}.

Output of the run that made this directory:

```
{report}
```
""",
        encoding="utf-8",
    )


if __name__ == "__main__":
    raise SystemExit(main())
