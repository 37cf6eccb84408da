"""Generated ImageFolder datasets for tests, smoke runs and benchmarks (no downloads needed)."""

from __future__ import annotations

import multiprocessing
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


def generate_images(root: str, per_class: int, size: int, test_per_class: int = 0) -> str:
    """A generated 2-class ImageFolder of size x size JPEGs, written in parallel; reused if present."""
    marker = os.path.join(root, ".complete")
    if os.path.exists(marker):
        return root
    jobs = [(root, split, label, start, min(start + 500, n), size)
            for split, n in (("train", per_class), ("test", test_per_class)) if n
            for label in (0, 1) for start in range(0, n, 500)]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        pool.starmap(_write_chunk, jobs)
    open(marker, "w").close()
    return root


def _write_chunk(root, split, label, start, stop, size):
    rng = np.random.default_rng([label, start, size, split == "train"])
    d = os.path.join(root, split, ("hotdog", "not-hotdog")[label])
    os.makedirs(d, exist_ok=True)
    for i in range(start, stop):
        make_image(label, size, rng).save(os.path.join(d, f"{i:06d}.jpg"), "JPEG", quality=90)
