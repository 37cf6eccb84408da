"""A run's checkpoint on disk: one torch file with everything, and the config beside it for humans."""

from __future__ import annotations

import os

import torch
import yaml

from pipeline.redact import redact_tree
from pipeline.scratch import scratch_folder

CHECKPOINT_FILE = "checkpoint.pt"
STAGING_PREFIX = "ray-finetune-checkpoint-"


def save_checkpoint(directory: str, state: dict) -> None:
    """checkpoint.pt (everything, loadable with weights_only=True) + config.yaml for humans; a URL
    credential in the config is saved as ***."""
    state = {**state, "config": redact_tree(state["config"])}
    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
    with open(os.path.join(directory, "config.yaml"), "w") as fh:
        yaml.safe_dump(state["config"], fh, sort_keys=False)


def load_checkpoint(directory: str) -> dict:
    return torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def staging_directory():
    """A fresh local folder to write a checkpoint into before Ray Train uploads it, removed after."""
    return scratch_folder(STAGING_PREFIX)
