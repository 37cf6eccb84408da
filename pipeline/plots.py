"""PNG figures: learning curves (the seed's live plot) and image grids (the seed's show_images)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def learning_curves(history: list[dict], title: str = "") -> bytes:
    """Train loss, train acc and test acc per epoch on one axis, like d2l's Animator."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [h["train_loss"] for h in history], "-", label="train loss")
    ax.plot(epochs, [h["train_acc"] for h in history], "m--", label="train acc")
    ax.plot(epochs, [h["test_acc"] for h in history], "g-.", label="test acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(min(epochs) - 0.1 if epochs else 0, max(epochs) + 0.1 if epochs else 1)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _png(fig)


def image_grid(images: list[np.ndarray], titles: list[str], cols: int = 4, scale: float = 2.0) -> bytes:
    """uint8 HWC images in a grid with a title each."""
    rows = max(1, (len(images) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * scale, rows * scale), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(img)
        ax.set_title(title, fontsize=8)
    return _png(fig)
