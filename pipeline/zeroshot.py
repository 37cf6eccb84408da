"""The source classifier on the target classes: zero-shot accuracy and the reused head's calibration.

Both read the source network's own 1000-way logits through the matched categories (see
model.match_classes); nothing here trains.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.archs import ARCHS
from pipeline.model import class_probabilities, replace_head
from pipeline.normalize import Normalizer

CALIBRATION_IMAGES = 512  # enough to place one threshold; keeps the driver's CPU pass short


def zero_shot_predict(source_logits: np.ndarray, rows: dict[int, int], num_classes: int) -> np.ndarray | None:
    """Target-class predictions from the source classifier's logits, or None when no rule exists.

    A matched class is predicted where its source category is the top-1. With exactly one
    unmatched class (hot dog vs not hot dog), that class is "the rest": predicted wherever
    any other category wins. With every class matched, the top-1 among the matched categories
    decides. Two or more unmatched classes cannot be told apart by the source classifier."""
    unmatched = [t for t in range(num_classes) if t not in rows]
    if not rows or len(unmatched) > 1:
        return None
    if not unmatched:
        targets = np.array(sorted(rows))
        return targets[source_logits[:, [rows[t] for t in targets]].argmax(1)]
    top = source_logits.argmax(1)
    pred = np.full(len(top), unmatched[0])
    for target, src in rows.items():
        pred[top == src] = target
    return pred


@torch.inference_mode()
def source_logits(source, arch: str, dataset, preset=None, limit: int | None = None,
                  mirror: bool = False, features: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of the unchanged source network on a decoded split (fp32, on the driver).
    preset: center-crop the images first (the uncropped training copy). mirror: log of the mean
    of the image's and its mirror's probabilities instead (data.eval_flip; same argmax rule).
    features: the head's inputs (the pooled features) instead of the logits; with mirror, the
    mirrored images' features follow all the originals' as more rows, in the same order."""
    model = ARCHS[arch].build()
    model.load_state_dict(source.state_dict)
    if features:
        replace_head(model, arch, torch.nn.Identity())
    model.eval()
    normalize = Normalizer(source.mean, source.std, channels_last=False)
    logits, mirrored, labels = [], [], []
    ds = dataset.limit(limit) if limit else dataset
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        images = batch["image"]
        if preset is not None:
            images = np.stack([preset.eval(img) for img in images])
        x = normalize(torch.as_tensor(np.asarray(images)))
        if features:
            logits.append(model(x).numpy())
            mirrored += [model(x.flip(3)).numpy()] if mirror else []
        else:
            logits.append((class_probabilities(model, x, mirror=True).log() if mirror else model(x)).numpy())
        labels.append(batch["label"])
    labels = np.concatenate(labels)
    return np.concatenate(logits + mirrored), np.tile(labels, 2) if mirrored else labels


def zero_shot_accuracy(prep, arch: str, split: str = "test", mirror: bool = False) -> dict | None:
    """The source network's accuracy on a split through zero_shot_predict; None when it has no rule."""
    if prep.source.state_dict is None:
        return None
    logits, labels = source_logits(prep.source, arch, prep.splits[split].dataset, mirror=mirror)
    pred = zero_shot_predict(logits, prep.reuse_rows, len(prep.classes))
    if pred is None:
        return None
    by_class = {c: (float((pred[labels == i] == i).mean()) if (labels == i).any() else None)
                for i, c in enumerate(prep.classes)}
    return {"test_acc": float((pred == labels).mean()), "test_images": int(len(labels)), "test_acc_by_class": by_class}


def rest_threshold(logits: np.ndarray, labels: np.ndarray, rows: dict[int, int], rest: int) -> tuple[float, float]:
    """(t, accuracy): the rule "a matched class when its source logit exceeds t, else the rest"
    that is most accurate on these images.

    A reused head with the rest class's bias at t starts out making exactly this decision: the
    matched rows ARE the source rows, and a Xavier row adds only small noise to a bias. With the
    bias left at 0 instead, every image whose matched logit is positive starts as that class, and
    the first epoch is spent unlearning it."""
    score = logits[:, [rows[t] for t in sorted(rows)]].max(1)
    is_rest = labels == rest
    cuts = np.unique(score)
    cands = np.concatenate([[cuts[0] - 1.0], (cuts[:-1] + cuts[1:]) / 2, [cuts[-1] + 1.0]])
    order = np.argsort(score)
    s_sorted, rest_sorted = score[order], is_rest[order]
    below = np.searchsorted(s_sorted, cands)  # images with score < t are called "rest"
    rest_below = np.concatenate([[0], np.cumsum(rest_sorted)])[below]
    other_above = (~is_rest).sum() - (below - rest_below)
    acc = (rest_below + other_above) / len(score)
    best = int(np.argmax(acc))
    return float(cands[best]), float(acc[best])


def calibrate_rest_bias(prep, arch: str) -> dict[int, float]:
    """{rest class: bias} when exactly one class has no source category, fitted on training images."""
    unmatched = [t for t in range(len(prep.classes)) if t not in prep.reuse_rows]
    if prep.source.state_dict is None or not prep.reuse_rows or len(unmatched) != 1:
        return {}
    logits, labels = source_logits(prep.source, arch, prep.splits["train"].dataset, prep.preset,
                                   limit=CALIBRATION_IMAGES)
    t, acc = rest_threshold(logits, labels, prep.reuse_rows, unmatched[0])
    print(f"classifier reuse: {prep.classes[unmatched[0]]} starts with bias {t:.2f}, the source's own "
          f"decision rule fitted on {len(labels)} train images (accuracy {acc:.3f} before training)", flush=True)
    return {unmatched[0]: t}
