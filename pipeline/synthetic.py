"""Generated ImageFolder datasets for tests, smoke runs and benchmarks (no downloads needed)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# Two visually distinct classes: warm images with a bright disc, cool images with a dark bar.
CLASSES = ("hotdog", "not-hotdog")


def make_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    h = w = size
    base = np.array([200, 60, 40] if label == 0 else [40, 90, 200], dtype=np.float32)
    img = base + rng.normal(0, 25, (h, w, 3))
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
    if label == 0:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2] = [250, 220, 90]
    else:
        img[:, max(0, cx - size // 10): cx + size // 10] = [20, 30, 60]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_image_folder(root: str, train_per_class: int = 24, test_per_class: int = 12, size: int = 64,
                      seed: int = 0, classes=CLASSES, fmt: str = "JPEG") -> str:
    """Write root/{train,test}/<class>/<i>.jpg and return root."""
    rng = np.random.default_rng(seed)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                make_image(label % 2, size, rng).save(os.path.join(d, f"{i:05d}.{ext}"), fmt, quality=90)
    return root
