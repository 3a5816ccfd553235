"""A tiny CLIP-style model trained here, in seconds on a CPU, on generated pictures of coloured shapes and their
captions: zero-shot tagging and text search are tested on what it learnt, with no download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("square", "circle", "triangle")
CLASSES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
CAPTIONS = ("a photo of a {}.", "a {}", "{}", "a picture of a {}.")
POOL = 1200  # training pictures, drawn once
CONFIG = {"embed_dim": 64,  # image tokens averaged, not a class token: shapes are learnt in hundreds of steps
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32,
                         "pool_type": "avg"},
          "text_cfg": {"context_length": 10, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def picture(colour: str, shape: str, seed: int, size: int = 32) -> Image.Image:
    """A shape of one colour, placed and sized at random, on a random pale background."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(150, 256, 3)))
    draw = ImageDraw.Draw(image)
    extent = int(rng.integers(size * 4 // 10, size * 7 // 10))
    x, y = (int(v) for v in rng.integers(2, size - extent - 2, 2))
    box = (x, y, x + extent, y + extent)
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[colour])
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(x + extent // 2, y), (x, y + extent), (x + extent, y + extent)], fill=fill)
    return image


def train(folder: Path, steps: int = 800, seed: int = 0) -> tuple[Path, Path]:
    """(the model config JSON, the trained checkpoint) under `folder`: AdamW with a one-cycle schedule and clipped
    gradients, 45-48 of 48 held-out pictures right whatever the seed or thread count. Trained on one thread: its
    steps are too small to gain from two, and two threads on a busy machine wait on each other (15 s against 230)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(folder, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(folder: Path, steps: int, seed: int) -> tuple[Path, Path]:
    import open_clip

    torch.manual_seed(seed)
    config = folder / "tiny-shapes-clip.json"
    config.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(str(config))
    model, _, preprocess = open_clip.create_model_and_transforms(config.stem, pretrained=None)
    tokenizer = open_clip.get_tokenizer(config.stem)
    texts = tokenizer([c.format(name) for name in CLASSES for c in CAPTIONS])  # class-major
    # Only the rows of the captions' tokens are trained (a dense 49,408-row table was a quarter of the time); sorted
    # ids keep the end token each caption's largest, where the text tower pools.
    used, texts = texts.unique(return_inverse=True)
    vocabulary = model.token_embedding
    model.token_embedding = torch.nn.Embedding.from_pretrained(vocabulary.weight[used].clone(), freeze=False)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    pool_classes = np.arange(POOL) % len(CLASSES)
    sizes = rng.choice([32, 40, 48, 64], POOL)  # drawn at several sizes, resized as a job resizes them
    pool = torch.stack([preprocess(picture(*CLASSES[c].split(), seed=seed * POOL + i, size=int(sizes[i])))
                        for i, c in enumerate(pool_classes)])
    model.train()
    for _ in range(steps):
        chosen = rng.integers(0, POOL, 64)
        image_features = model.encode_image(pool[chosen], normalize=True)
        text_features = model.encode_text(texts, normalize=True).view(len(CLASSES), len(CAPTIONS), -1)
        logits = model.logit_scale.exp() * torch.einsum("nd,kcd->nkc", image_features, text_features)
        target = torch.as_tensor(pool_classes[chosen])
        loss = sum(torch.nn.functional.cross_entropy(logits[:, :, c], target) for c in range(len(CAPTIONS)))
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6)
    with torch.no_grad():
        vocabulary.weight[used] = model.token_embedding.weight
    model.token_embedding = vocabulary
    checkpoint = folder / "tiny-shapes-clip.pt"
    torch.save(model.eval().state_dict(), checkpoint)
    return config, checkpoint


def save_hf_clip(folder: Path) -> Path:
    """An untrained tiny transformers CLIP with its tokenizer (a character vocabulary: no download) and image
    processor, saved as `save_pretrained` writes them."""
    import string

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,'!?-")
    vocab = {token: i for i, token in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>",
                                                 "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
               "pad_token_id": vocab["<|endoftext|>"]}
    model = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(vocab), max_position_embeddings=48, **special),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16))
    saved = folder / "hf-clip"
    model.save_pretrained(saved)
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(saved)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(saved)
    return saved
