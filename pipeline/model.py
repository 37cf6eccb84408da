"""torchvision classifiers with a new head, pretrained weights and freezing options."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch
import torchvision
from torch import nn

from pipeline.archs import ARCHS
from pipeline.config import ConfigError, ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

@dataclass
class SourceWeights:
    """A pretrained state_dict with what belongs to it: normalization and category names."""

    state_dict: dict | None
    mean: tuple
    std: tuple
    categories: list[str] | None
    sha256: str = ""  # of the weights file, verified before loading ("" for weights 'none')


def load_source_weights(cfg: ModelConfig, progress: bool = False) -> SourceWeights:
    """Resolve cfg.weights to a verified state_dict plus mean/std (flags override what the weights carry)."""
    from pipeline import weights

    if cfg.arch not in ARCHS:
        raise ConfigError("model.arch", cfg.arch, f"valid: {', '.join(ARCHS)}")
    digest = ""
    if cfg.weights == "none":
        sd, mean, std, cats = None, IMAGENET_MEAN, IMAGENET_STD, None
    elif cfg.weights == "imagenet":
        path, digest = weights.imagenet_file(cfg, progress)
        sd = weights.load_state_dict(path)
        enum = ARCHS[cfg.arch].imagenet_weights()
        preset = enum.transforms()
        mean, std, cats = tuple(preset.mean), tuple(preset.std), list(enum.meta["categories"])
    else:
        path = cfg.weights
        if path.startswith("s3://"):  # air-gapped clusters: weights in the object store, cached locally
            from pipeline.storage import cached_download, s3_client, split_s3

            path = cached_download(path, cfg.weights_sha256)
            sidecar_uri = cfg.weights.rsplit(".", 1)[0] + ".json"
            bucket, key = split_s3(sidecar_uri)
            listed = s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("Contents", [])
            if any(o["Key"] == key for o in listed):  # optional; one that exists must download
                os.replace(cached_download(sidecar_uri, cfg.sidecar_sha256), os.path.splitext(path)[0] + ".json")
        digest = weights.verify(path, cfg.weights_sha256)
        sd = weights.load_state_dict(path)
        if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
            sd = evaluated_weights(sd)  # one of our own checkpoints
        side = weights.read_sidecar(path, cfg.sidecar_sha256)
        mean = tuple(side.get("mean", IMAGENET_MEAN))
        std = tuple(side.get("std", IMAGENET_STD))
        cats = side.get("categories")
    mean = tuple(cfg.mean) if cfg.mean else mean
    std = tuple(cfg.std) if cfg.std else std
    if cfg.categories == "imagenet":
        cats = imagenet_categories()
    elif cfg.categories:
        with open(cfg.categories) as fh:
            cats = [line.strip() for line in fh if line.strip()]
    return SourceWeights(sd, mean, std, cats, digest)


def imagenet_categories() -> list[str]:
    """torchvision's ImageNet-1k class names, in its index order (934 = 'hotdog'); no download."""
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def normalize_class_name(name: str) -> str:
    """'Hot Dog', 'hot_dog', 'hot-dog' and 'hotdog' all become 'hotdog'."""
    return re.sub(r"[^0-9a-z]+", "", name.lower())


@dataclass
class ClassMatch:
    """Which target classes start from which source classifier rows."""

    rows: dict[int, int] = field(default_factory=dict)  # target class index -> source category index
    ambiguous: dict[int, list[int]] = field(default_factory=dict)  # several source categories: not reused

    def describe(self, classes: list[str], categories: list[str]) -> str:
        parts = [f"{classes[t]} -> {categories[s]!r} ({s})" for t, s in sorted(self.rows.items())]
        parts += [f"{classes[t]} -> ambiguous {[categories[s] for s in ss]} (not reused)"
                  for t, ss in sorted(self.ambiguous.items())]
        unmatched = [classes[t] for t in range(len(classes)) if t not in self.rows and t not in self.ambiguous]
        parts += [f"{name} -> no source category (Xavier)" for name in unmatched]
        return "; ".join(parts)


def match_classes(classes: list[str], categories: list[str] | None) -> ClassMatch:
    """Match target class names to source category names after normalize_class_name.

    A name that matches several source categories (ImageNet has two 'crane's) is left
    unmatched: picking one would be a guess."""
    match = ClassMatch()
    if not categories:
        return match
    by_name: dict[str, list[int]] = {}
    for i, cat in enumerate(categories):
        by_name.setdefault(normalize_class_name(cat), []).append(i)
    for t, name in enumerate(classes):
        hits = by_name.get(normalize_class_name(name), [])
        if len(hits) == 1:
            match.rows[t] = hits[0]
        elif hits:
            match.ambiguous[t] = hits
    return match


def head_of(model: nn.Module, arch: str) -> nn.Linear:
    return model.get_submodule(ARCHS[arch].head)


def build_model(arch: str, num_classes: int, source: SourceWeights | None = None,
                reuse_rows: dict[int, int] | None = None, rest_bias: dict[int, float] | None = None,
                head_init: dict | None = None) -> nn.Module:
    """The architecture with source weights loaded (strict) and a fresh Xavier-normal head,
    whose rows in reuse_rows (target class -> source category) are copied from the source head;
    rest_bias sets an unmatched class's bias (see zeroshot.rest_threshold). head_init
    ({"weight", "bias"}: a fitted head, see probe.fit_probe_head) replaces the whole head."""
    model = ARCHS[arch].build()
    if source is not None and source.state_dict is not None:
        model.load_state_dict(source.state_dict, strict=True)
    old = head_of(model, arch)
    head = nn.Linear(old.in_features, num_classes)
    nn.init.xavier_normal_(head.weight)
    nn.init.zeros_(head.bias)
    if reuse_rows and source is not None and source.state_dict is not None:
        with torch.no_grad():
            for target, src in reuse_rows.items():
                head.weight[target] = old.weight[src]
                head.bias[target] = old.bias[src]
            for target, bias in (rest_bias or {}).items():
                head.bias[target] = bias
    if head_init is not None:
        with torch.no_grad():
            # copy_ takes any array-like; as_tensor would warn at the read-only arrays Ray's object store hands out.
            head.weight.copy_(torch.tensor(head_init["weight"]))
            head.bias.copy_(torch.tensor(head_init["bias"]))
    replace_head(model, arch, head)
    return model


def replace_head(model: nn.Module, arch: str, module: nn.Module) -> None:
    parent_name, _, leaf = ARCHS[arch].head.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def freeze_batchnorm(model: nn.Module) -> None:
    """Freeze BN affine parameters; set_train_mode keeps the layers in eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters():
                p.requires_grad_(False)


def frozen_stages(model: nn.Module, arch: str, depth: int) -> list[nn.Module]:
    """The modules of the first `depth` stages (archs.Arch.stages)."""
    if hasattr(model, "module"):  # DDP
        model = model.module
    return [model.get_submodule(name) for stage in ARCHS[arch].stages[:depth] for name in stage]


def freeze_bottom(model: nn.Module, arch: str, depth: int) -> None:
    for m in frozen_stages(model, arch, depth):
        m.requires_grad_(False)


def set_train_mode(model: nn.Module, freeze_bn: bool, arch: str = "", freeze_depth: int = 0) -> None:
    """model.train(), except frozen BN layers and frozen stages stay in eval mode (running statistics)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    for m in frozen_stages(model, arch, freeze_depth) if freeze_depth else []:
        m.eval()


def param_groups(model: nn.Module, arch: str, lr: float, head_lr_mult: float) -> list[dict]:
    """Backbone at lr, head at lr x head_lr_mult (one group when the multiplier is 1)."""
    head_ids = {id(p) for p in head_of(model, arch).parameters()}
    head = [p for p in model.parameters() if id(p) in head_ids and p.requires_grad]
    body = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    if head_lr_mult == 1.0:
        return [{"params": body + head, "lr": lr, "name": "all"}]
    return [{"params": body, "lr": lr, "name": "backbone"},
            {"params": head, "lr": lr * head_lr_mult, "name": "head"}]


def build_for_config(cfg, num_classes: int, source: SourceWeights | None = None,
                     reuse_rows: dict[int, int] | None = None, rest_bias: dict[int, float] | None = None,
                     probe_head: dict | None = None) -> nn.Module:
    """build_model plus the config's freezing: what every worker trains and every checkpoint holds."""
    reuse = cfg.model.reuse_classifier
    model = build_model(cfg.model.arch, num_classes, source, reuse_rows if reuse else None,
                        rest_bias if reuse else None, probe_head if cfg.model.probe_init else None)
    if cfg.model.freeze_bn:
        freeze_batchnorm(model)
    freeze_bottom(model, cfg.model.arch, cfg.model.freeze_depth)
    return model


def trainable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the parameters that train (frozen ones never leave their start)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class WeightAverage:
    """Exponential moving average of a model's trainable weights (Polyak averaging; torchvision
    references' --model-ema), updated after every optimizer step. Averaging over the last epochs
    evens out the step-to-step noise that, on a small dataset, moves test accuracy by points
    from one epoch to the next.

    The first update copies the weights and later ones keep the plain mean of the steps so far
    until the window (1 / (1 - decay) steps) fills: the average never holds the start weights, so
    an early epoch's (a search trial's first report) is already the trained model's."""

    def __init__(self, model: nn.Module, half_life_steps: float):
        self.decay = 0.5 ** (1 / half_life_steps)
        self.steps = 0
        self.weights = trainable_weights(model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, self.steps / (self.steps + 1))
        params = dict(model.named_parameters())
        for name, average in self.weights.items():
            average.lerp_(params[name].detach(), 1 - decay)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.steps = state["decay"], state["steps"]
        for name, w in state["weights"].items():
            self.weights[name].copy_(w)


def evaluated_weights(state: dict) -> dict:
    """A checkpoint's model weights as its run evaluated them: with the weight average in place of
    the trained weights where the run kept one (optim.ema_half_life)."""
    return {**state["model"], **state["ema"]["weights"]} if "ema" in state else state["model"]


def interpolate_weights(start: dict, trained: dict, alpha: float) -> dict:
    """WiSE-FT's weight-space ensemble: start + alpha x (trained - start) for the tensors in start;
    every other entry of trained (frozen weights, buffers) as it is."""
    out = dict(trained)
    for name, s in start.items():
        out[name] = torch.lerp(s.to(trained[name]), trained[name], alpha)
    return out


def class_probabilities(model: nn.Module, x: torch.Tensor, *, mirror: bool = False, bf16: bool = False) -> torch.Tensor:
    """Softmax of a normalized NCHW batch (fp32), averaged with the mirrored batch's when mirror is set."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        probs = torch.softmax(model(x).float(), 1)
        if mirror:
            probs = (probs + torch.softmax(model(x.flip(3)).float(), 1)) / 2
    return probs


def make_optimizer(model: nn.Module, cfg) -> torch.optim.SGD:
    """SGD over param_groups with the config's derived lr, head multiplier, momentum and decay."""
    return torch.optim.SGD(param_groups(model, cfg.model.arch, cfg.lr, cfg.head_lr_mult), lr=cfg.lr,
                           momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def make_scheduler(optimizer, cfg, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier: linear warmup over warmup_epochs, then cosine to 0 (or constant)."""
    total = max(1, cfg.optim.epochs * steps_per_epoch)
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    cosine = cfg.optim.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if not cosine:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
