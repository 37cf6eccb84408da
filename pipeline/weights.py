"""Pretrained weight files: where they come from, and what is checked before a byte is unpickled.

Every file is hashed on every load, from the cache too: a pinned `model.weights_sha256` must match
in full; without a pin, torchvision's own files must match the sha256 prefix in their names, and
any other file's sha256 is printed so that it can be pinned. Loading is `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import torch

from pipeline.archs import ARCHS
from pipeline.config import ModelConfig
from pipeline.storage import sha256_file

SIDECAR_FIELDS = {"mean": list, "std": list, "categories": list}


class WeightsError(RuntimeError):
    """A weights file or sidecar that must not be loaded: names the file and what to do."""


def verify(path: str, pinned: str, prefix: str = "") -> str:
    """The file's sha256, once it matches the pinned digest (in full) or else the published prefix."""
    digest = sha256_file(path)
    if pinned and digest != pinned:
        raise WeightsError(f"{path}: sha256 {digest} does not match model.weights_sha256 {pinned}; not loading it")
    if not pinned and prefix and not digest.startswith(prefix):
        raise WeightsError(f"{path}: sha256 {digest} does not start with {prefix}, the prefix its file name "
                           "promises; not loading it (delete the file to download it again)")
    return digest


def imagenet_file(cfg: ModelConfig, progress: bool = False) -> tuple[str, str]:
    """torchvision's ImageNet weights for cfg.arch in torch hub's cache, downloaded (from
    model.weights_mirror when set) only when absent, and verified on every call: (path, sha256)."""
    enum = ARCHS[cfg.arch].imagenet_weights()
    name = enum.url.rsplit("/", 1)[1]
    found = re.search(r"-([a-f0-9]{8,})\.", name)  # torchvision's names carry their sha256's prefix
    prefix = found.group(1) if found else ""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if not os.path.exists(cached):
        url = f"{cfg.weights_mirror.rstrip('/')}/{name}" if cfg.weights_mirror else enum.url
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        fd, part = tempfile.mkstemp(dir=os.path.dirname(cached), prefix=name, suffix=".part")
        os.close(fd)
        try:
            torch.hub.download_url_to_file(url, part, progress=progress)
            verify(part, cfg.weights_sha256, prefix)  # before it enters the cache
            os.replace(part, cached)
        finally:
            if os.path.exists(part):
                os.remove(part)
    return cached, verify(cached, cfg.weights_sha256, prefix)


def load_state_dict(path: str) -> dict:
    """Tensors only: a pickle that asks for anything else is refused by torch itself."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several kinds for a file that is not a state_dict
        refused = re.search(r"(unsupported GLOBAL \S+|Unsupported global: GLOBAL \S+)", str(e))
        detail = refused.group(0) if refused else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise WeightsError(f"{path}: not a loadable state_dict ({detail}); only tensors are loaded") from None


def read_sidecar(path: str, pinned: str = "") -> dict:
    """The weights' sidecar (<weights>.json: mean, std, categories), {} when there is none. One that
    exists must parse and hold the right types: a silent fallback to ImageNet's mean and std would
    train on wrongly normalized images. With model.sidecar_sha256 set it must match too."""
    side = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(side):
        if pinned:
            raise WeightsError(f"{side}: missing, but model.sidecar_sha256 is set")
        return {}
    verify(side, pinned)
    try:
        with open(side) as fh:
            meta = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{side}: the weights' sidecar cannot be read ({e}); fix or remove it") from None
    bad = [] if isinstance(meta, dict) else ["content"]
    bad += [k for k, typ in SIDECAR_FIELDS.items() if not bad and k in meta and not isinstance(meta[k], typ)]
    bad += [k for k in ("mean", "std") if not bad and isinstance(meta.get(k), list)
            and (len(meta[k]) != 3 or not all(isinstance(x, (int, float)) for x in meta[k]))]
    if bad:
        raise WeightsError(f"{side}: the weights' sidecar has bad {', '.join(bad)} (expected a JSON "
                           "object with mean and std of 3 numbers each and a list of categories)")
    return meta
