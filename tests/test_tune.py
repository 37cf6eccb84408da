"""A real Ray Tune search on a real local Ray: ASHA, validation protocol, best.json, resume."""

import json
import os

import pytest

from pipeline.cli import build_parser
from pipeline.config import config_from_args
from pipeline.search import run_search

SMALL = ["--data.image_size", "48", "--data.resize_size", "56", "--batch-size", "16", "--freeze-bn"]


@pytest.fixture(scope="module")
def search(ray_local, tiny_dataset, source_weights, tmp_path_factory):
    storage = str(tmp_path_factory.mktemp("tune"))
    cfg = config_from_args(build_parser().parse_args(
        ["tune", "--data", tiny_dataset, "--weights", source_weights, "--epochs", "3", "--num-samples", "4",
         "--tune.lr_min", "1e-5", "--tune.lr_max", "3e-3", "--tune.max_freeze_depth", "3",
         "--storage", storage, "--name", "search", *SMALL]))
    return cfg, run_search(cfg)


def test_search_selects_on_validation_and_uses_test_once(search, tiny_dataset):
    cfg, summary = search
    trials = summary["trials"]
    assert len(trials) == 4 and all(not t["error"] for t in trials)
    assert all(1e-5 <= t["lr"] <= 3e-3 and 0 <= t["freeze_depth"] <= 3 for t in trials)
    # ASHA (grace 1, reduction 2) stops the weak half before the last epoch.
    assert any(t["stopped_early"] for t in trials) and any(t["epochs"] == 3 for t in trials)
    best = summary["best"]
    assert best["val_acc"] == max(t["best_val_acc"] for t in trials)
    assert best["test_images"] == 24 and 0 <= best["test_acc"] <= 1
    assert best["config"]["optim"]["lr"] == best["lr"]
    saved = json.load(open(os.path.join(cfg.run.storage, "search", "best.json")))
    assert saved["best"] == best


def test_validation_split_is_stratified_and_disjoint(tiny_dataset):
    from pipeline.data import scan_image_folder, stratified_split

    index = stratified_split(scan_image_folder(tiny_dataset), 0.25, seed=0)
    assert index.counts("val") == {"hotdog": 8, "not-hotdog": 8}
    assert index.counts("train") == {"hotdog": 24, "not-hotdog": 24}
    assert not set(index.files["val"]) & set(index.files["train"])
    assert stratified_split(scan_image_folder(tiny_dataset), 0.25, seed=0).files == index.files


def test_trials_write_tensorboard_events(search):
    cfg, _ = search
    events = [f for root, _, files in os.walk(os.path.join(cfg.run.storage, "search")) for f in files
              if f.startswith("events.out.tfevents")]
    assert len(events) >= 4
