"""PNG figures: learning curves (the seed's live plot) and image grids (the seed's show_images)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

# Every text here comes from data (class folder names, trial ids): a name such as 'a$\\foo$b' is a
# label, not mathtext for matplotlib to parse (and fail on).
matplotlib.rcParams["text.parse_math"] = False


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def learning_curves(history: list[dict], title: str = "") -> bytes:
    """Train loss, train acc, val acc (when the run has a validation split) and test acc per epoch on
    one axis, like d2l's Animator."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [h["train_loss"] for h in history], "-", label="train loss")
    ax.plot(epochs, [h["train_acc"] for h in history], "m--", label="train acc")
    if all("val_acc" in h for h in history):
        ax.plot(epochs, [h["val_acc"] for h in history], "c:", label="val acc")
    ax.plot(epochs, [h["test_acc"] for h in history], "g-.", label="test acc")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
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


def trial_curves(trials: list[dict], metric: str = "val_acc", pick: str = "") -> bytes:
    """metric ('val_acc' or 'val_loss') per epoch of every trial; trials ASHA stopped end in an x, and
    the pick is drawn thick."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in trials:
        curve = t.get(f"{metric}_curve")
        if not curve:
            continue
        epochs = list(range(1, len(curve) + 1))
        picked = t["trial"] == pick
        line, = ax.plot(epochs, curve, "-o", ms=3, alpha=1.0 if picked else 0.7, lw=3 if picked else 1,
                        label=("pick: " if picked else "") + _sample_label(t.get("overrides", {})))
        if t["stopped_early"]:
            ax.plot(epochs[-1], curve[-1], "x", ms=10, mew=2, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("trials (thick: the pick; x: stopped early by ASHA)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right" if metric.endswith("loss") else "lower right")
    return _png(fig)


def _sample_label(sample: dict) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]} {v:.2g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]} {v}"
                     for k, v in sample.items())


def sample_scatter(trials: list[dict], x: str, y: str, metric: str = "val_acc", pick: str = "") -> bytes:
    """The last value of metric over two searched config paths (x on a log scale when it spans more
    than a decade); the pick ringed in red."""
    fig, ax = plt.subplots(figsize=(6, 4))
    done = [t for t in trials if t.get(f"{metric}_curve") and {x, y} <= set(t.get("overrides", {}))]
    last = [t[f"{metric}_curve"][-1] for t in done]
    xs, ys = [t["overrides"][x] for t in done], [t["overrides"][y] for t in done]
    sc = ax.scatter(xs, ys, c=last,
                    s=[60 + 30 * len(t[f"{metric}_curve"]) for t in done],
                    cmap="viridis_r" if metric.endswith("loss") else "viridis", edgecolors="k")
    for t, px, py in zip(done, xs, ys, strict=True):
        if t["trial"] == pick:
            ax.scatter([px], [py], s=400, facecolors="none", edgecolors="r", linewidths=2)
    if xs and min(xs) > 0 and max(xs) > 10 * min(xs):
        ax.set_xscale("log")
        # Log ticks are mathtext by default, and mathtext is off here (data-derived labels).
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    if all(isinstance(v, int) for v in ys):
        ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    fig.colorbar(sc, label=f"last {metric.replace('_', ' ')} (size: epochs run; red ring: the pick)")
    ax.grid(True, alpha=0.3)
    return _png(fig)


def confusion(matrix: list[list[int]], classes: list[str], title: str = "") -> bytes:
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _png(fig)


def experiment_curves(rows: dict[str, list[list[float]]], baseline: float | None, title: str = "") -> bytes:
    """Test accuracy per epoch of every experiment row: the mean over seeds, the band min..max."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, curves in rows.items():
        n = min(len(c) for c in curves)
        acc = np.array([c[:n] for c in curves])
        epochs = np.arange(1, n + 1)
        line, = ax.plot(epochs, acc.mean(0), "-o", ms=3, label=label)
        if len(curves) > 1:
            ax.fill_between(epochs, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.15)
    if baseline is not None:
        ax.axhline(baseline, color="k", ls="--", lw=1, label=f"zero-shot ({baseline:.3f})")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    # Beside the axes: the rows span the whole height (chance at 0.5 to fine-tuned near 1), so no
    # corner inside is free of curves.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    if title:
        ax.set_title(title)
    return _png(fig)
