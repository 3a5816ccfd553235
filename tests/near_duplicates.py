"""Near-duplicate photos for the dedup tests and measurements: unrelated originals (tiles of scikit-learn's two
sample photos where it is installed, and generated scenes of coloured shapes) and their variants as people make
them: resized to 50-80 %, re-encoded as JPEG at quality 40-70, cropped 2-5 %, and rotated with the EXIF
orientation tag set so that a viewer shows them upright."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# EXIF orientation -> the transpose that, applied to the upright image, gives the stored pixels (its inverse is
# what a viewer applies).
STORED_AS = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
KINDS = ("resized", "reencoded", "cropped", "rotated")


def sample_tiles() -> list[Image.Image]:
    """Six 200 x 200 tiles of each of scikit-learn's sample photos (china.jpg, flower.jpg), none overlapping."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return []
    tiles = []
    for array in load_sample_images().images:  # 427 x 640
        image = Image.fromarray(array)
        tiles += [image.crop((x, y, x + 200, y + 200)) for y in (0, 210) for x in (0, 215, 430)]
    return tiles


def scene(seed: int, width: int = 320, height: int = 240) -> Image.Image:
    """A photo-like scene: a smooth background and a few soft shapes of random colours, placed by `seed`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * x + np.sin(angle) * y
    base = rng.uniform(40, 215, 3) + 80 * ramp[..., None] * rng.choice([-1, 1], 3)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 7)):
        x0, y0 = rng.uniform(-0.2, 0.9) * width, rng.uniform(-0.2, 0.9) * height
        w, h = rng.uniform(0.15, 0.6) * width, rng.uniform(0.15, 0.6) * height
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noise = rng.normal(0, 6, (height, width, 3))
    image = image.filter(ImageFilter.GaussianBlur(2))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8), "RGB")


def originals(n: int) -> list[Image.Image]:
    """`n` unrelated photos: the sample tiles first, then scenes."""
    photos = sample_tiles()[:n]
    return photos + [scene(seed) for seed in range(n - len(photos))]


def jpeg(image: Image.Image, quality: int = 90, exif: Image.Exif | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, **({"exif": exif} if exif is not None else {}))
    return buffer.getvalue()


def variant(image: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """One near-duplicate of `image` as JPEG bytes."""
    if kind == "resized":
        scale = rng.uniform(0.5, 0.8)
        return jpeg(image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS))
    if kind == "reencoded":
        return jpeg(image, quality=int(rng.integers(40, 71)))
    if kind == "cropped":
        fx, fy = rng.uniform(0.02, 0.05, 2)
        left, top = round(image.width * fx * rng.random()), round(image.height * fy * rng.random())
        right, bottom = image.width - round(image.width * fx) + left, image.height - round(image.height * fy) + top
        return jpeg(image.crop((left, top, right, bottom)))
    orientation = int(rng.choice(list(STORED_AS)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(image.transpose(STORED_AS[orientation]), exif=exif)


def near_duplicate_set(n_originals: int, seed: int = 0) -> list[tuple[str, bytes, int]]:
    """(name, JPEG bytes, original's index) for each original and one variant of each kind."""
    rng = np.random.default_rng(seed)
    items = []
    for i, image in enumerate(originals(n_originals)):
        items.append((f"photo-{i:03d}.jpg", jpeg(image), i))
        items += [(f"photo-{i:03d}-{kind}.jpg", variant(image, kind, rng), i) for kind in KINDS]
    return items
