"""LP-FT's first step (Kumar et al. 2022): the new head fitted as a linear probe on the frozen
pretrained network's features, before fine-tuning starts from it (model.probe_init).

Fine-tuning from a random or half-fitted head spends its first steps pushing large head gradients
into the backbone; a head that already fits the data leaves the features less distorted. WiSE-FT's
interpolation (model.wise_alpha) also runs toward this start, so a start that classifies the
target classes well, rather than the source classifier's own decision rule, is a better end.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.archs import ARCHS
from pipeline.zeroshot import source_logits

PROBE_IMAGES = 1024  # the driver's CPU pass: a few seconds to a minute; enough images for 2-class heads
PENALTIES = tuple(10.0 ** k for k in range(-5, 2))  # L2 strengths tried, per feature-weight squared
FOLDS = 5


def start_head(source, arch: str, num_classes: int, reuse_rows: dict, rest_bias: dict) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) the penalty pulls toward: the reused source rows (and the rest class's
    calibrated bias), zero elsewhere. Without reuse, all zero: plain ridge-penalized regression."""
    source_weight, source_bias = (source.state_dict[f"{ARCHS[arch].head}.{name}"] for name in ("weight", "bias"))
    weight, bias = np.zeros((num_classes, source_weight.shape[1])), np.zeros(num_classes)
    for target, src in reuse_rows.items():
        weight[target] = source_weight[src].double().numpy()
        bias[target] = float(source_bias[src])
    for target, b in rest_bias.items():
        bias[target] = b
    return weight, bias


def fit_logistic(x: torch.Tensor, y: torch.Tensor, weight0: torch.Tensor, bias0: torch.Tensor,
                 penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over (W, b) of mean cross-entropy(x W^T + b, y) + penalty / 2 x ||W - weight0||^2,
    from (weight0, bias0), by full-batch L-BFGS in float64 (convex: the start only saves steps)."""
    w = weight0.clone().requires_grad_(True)
    b = bias0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w.T + b, y) + penalty / 2 * (w - weight0).square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def cross_validated_penalty(x: torch.Tensor, y: torch.Tensor, groups: np.ndarray, weight0: torch.Tensor,
                            bias0: torch.Tensor) -> tuple[float, dict]:
    """(penalty, {penalty: held-out mean cross-entropy}) over PENALTIES by FOLDS-fold cross-validation.
    Folds split by group (an image and its mirror stay together: else the mirror leaks the answer)
    and are stratified by class, drawn from a fixed seed: the same images give the same head."""
    rng = np.random.default_rng(0)
    fold_of_group = {}
    for label in np.unique(y.numpy()):
        ids = np.unique(groups[y.numpy() == label])
        for i, g in enumerate(rng.permutation(ids)):
            fold_of_group[g] = i % FOLDS
    fold = np.array([fold_of_group[g] for g in groups])
    scores = {}
    for penalty in PENALTIES:
        held_out = 0.0
        for k in range(FOLDS):
            train, test = torch.as_tensor(fold != k), torch.as_tensor(fold == k)
            w, b = fit_logistic(x[train], y[train], weight0, bias0, penalty)
            held_out += float(nn.functional.cross_entropy(x[test] @ w.T + b, y[test], reduction="sum"))
        scores[penalty] = held_out / len(y)
    return min(scores, key=lambda p: (scores[p], -p)), scores


def fit_probe_head(prep, arch: str, reuse: bool) -> dict:
    """{"weight", "bias"} (float32 arrays) for build_model's head_init: the linear probe on the training
    images' center crops and mirrors, with the cross-validated penalty toward start_head (the reused
    rows where reuse is on, else zero); "toward_reused" says which."""
    feats, labels = source_logits(prep.source, arch, prep.splits["train"].dataset, prep.preset,
                                  limit=PROBE_IMAGES, mirror=True, features=True)
    n = len(labels) // 2
    x, y = torch.as_tensor(feats, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.int64)
    rows, rest_bias = (prep.reuse_rows, prep.rest_bias) if reuse else ({}, {})
    w0, b0 = (torch.as_tensor(a) for a in start_head(prep.source, arch, len(prep.classes), rows, rest_bias))
    penalty, scores = cross_validated_penalty(x, y, np.tile(np.arange(n), 2), w0, b0)
    w, b = fit_logistic(x, y, w0, b0, penalty)

    def accuracy(weight, bias) -> float:
        return float(((x @ weight.T + bias).argmax(1) == y).double().mean())

    print(f"probe head (LP-FT): fitted on {n} train images and their mirrors, L2 penalty {penalty:g} toward the "
          f"{'reused rows' if rows else 'zero head'} ({FOLDS}-fold held-out loss {scores[penalty]:.3f}; "
          f"{', '.join(f'{p:g}: {s:.3f}' for p, s in scores.items())}); train accuracy "
          f"{accuracy(w0, b0):.3f} at the start, {accuracy(w, b):.3f} fitted", flush=True)
    return {"weight": w.float().numpy(), "bias": b.float().numpy(), "penalty": penalty,
            "cv_loss": scores[penalty], "toward_reused": bool(rows)}
