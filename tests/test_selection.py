"""The run's model is chosen on validation (or is the last epoch), never on test.

The test split here is the validation images with their labels swapped, so that test accuracy is
1 - validation accuracy at every epoch: the epoch best on test is one of the worst on validation.
Whatever picks a checkpoint by a test metric picks a different epoch from what validation picks."""

import os
import shutil

import numpy as np
import pytest

from pipeline import data
from pipeline.checkpoint_file import load_checkpoint
from pipeline.cli import build_parser, main
from pipeline.config import config_from_args
from pipeline.predict import evaluate, resolve_checkpoint
from pipeline.runner import run_training
from pipeline.runs import list_runs, show_run
from pipeline.selection import chosen_metrics
from pipeline.synthetic import make_image_folder

VAL_FRACTION = 0.25


@pytest.fixture(scope="module")
def adversarial_dataset(tmp_path_factory):
    root = make_image_folder(str(tmp_path_factory.mktemp("adversarial")), train_per_class=24, test_per_class=1,
                             size=48)
    index = data.scan_image_folder(root)
    carved = data.stratified_split(index, VAL_FRACTION, seed=0)  # the run carves the same split
    shutil.rmtree(os.path.join(root, "test"))
    for path, label in carved.files["val"]:
        swapped = os.path.join(root, "test", index.classes[1 - label])
        os.makedirs(swapped, exist_ok=True)
        shutil.copy(path, swapped)
    return root


@pytest.fixture(scope="module")
def run(ray_local, adversarial_dataset, tmp_path_factory):
    store = tmp_path_factory.mktemp("runs")
    cfg = config_from_args(build_parser().parse_args(
        ["train", "--data", adversarial_dataset, "--weights", "none", "--epochs", "4", "--batch-size", "16",
         "--lr", "1e-4", "--data.val_fraction", str(VAL_FRACTION), "--data.image_size", "32",
         "--data.resize_size", "40", "--data.preview_images", "0", "--run.keep_checkpoints", "1",
         "--data.small_eval_side", "32",
         "--storage", str(store), "--name", "chosen"]))
    out = run_training(cfg)
    by_val = min(out.history, key=lambda h: h["val_loss"])["epoch"]
    by_test = max(out.history, key=lambda h: h["test_acc"])["epoch"]
    # The premise: test mirrors validation, and its best epoch is not validation's.
    assert all(h["test_acc"] == pytest.approx(1 - h["val_acc"]) for h in out.history), out.history
    assert by_val != by_test, out.history
    return out, by_val, by_test


def epoch_of(checkpoint_dir: str) -> int:
    return load_checkpoint(checkpoint_dir)["epoch"]


def test_the_run_keeps_and_hands_over_the_epoch_best_on_validation(run, capsys):
    out, by_val, by_test = run
    assert out.model["epoch"] == by_val and epoch_of(out.model_checkpoint) == by_val
    kept = sorted(epoch_of(os.path.join(out.run_dir, d)) for d in os.listdir(out.run_dir)
                  if d.startswith("checkpoint_2"))
    assert kept == sorted({by_val, 4})  # keep_checkpoints 1: the best on validation, and the latest to resume
    assert by_test not in kept or by_test == 4
    assert list_runs(os.path.dirname(out.run_dir))[0]["model_epoch"] == by_val
    shown = show_run(out.run_dir)
    assert f" * epoch {by_val}: " in shown and "val loss" in shown


def test_download_best_evaluate_and_predict_use_the_runs_model(run, adversarial_dataset, tmp_path, capsys):
    out, by_val, _ = run
    assert main(["runs", "download", out.run_dir, str(tmp_path / "dl"), "--best"]) == 0
    downloaded = capsys.readouterr().out.strip().rsplit(" ", 1)[-1]
    assert epoch_of(downloaded) == by_val
    assert epoch_of(resolve_checkpoint(out.run_dir).path) == by_val  # `evaluate RUN` and `predict RUN`
    result = evaluate(out.run_dir, adversarial_dataset, split="test")
    model = next(h for h in out.history if h["epoch"] == by_val)
    assert result["epoch"] == by_val and result["accuracy"] == pytest.approx(model["test_acc"])


def test_without_a_validation_split_the_model_is_the_last_epoch():
    rows = [{"epoch": 1, "test_acc": 0.9}, {"epoch": 2, "test_acc": 0.6}, {"epoch": 3, "test_acc": 0.7}]
    assert chosen_metrics(rows)["epoch"] == 3
    with_val = [{**r, "val_loss": v} for r, v in zip(rows, (0.5, 0.3, 0.3), strict=True)]
    assert chosen_metrics(with_val)["epoch"] == 3  # a tie goes to the later epoch


def test_small_photo_copies_are_scored_after_the_last_epoch_as_evaluate_scores_them(run, adversarial_dataset):
    out, _, _ = run
    *earlier, last = out.history
    assert not any("val_small_acc" in h or "test_small_acc" in h for h in earlier)
    classes = ["hotdog", "not-hotdog"]
    for split in ("val", "test", "val_small", "test_small"):
        by_class = last[f"{split}_acc_by_class"]
        assert list(by_class) == classes
        assert np.mean(list(by_class.values())) == pytest.approx(last[f"{split}_acc"])  # balanced splits
    final = next(os.path.join(out.run_dir, d) for d in os.listdir(out.run_dir)
                 if d.startswith("checkpoint_2") and epoch_of(os.path.join(out.run_dir, d)) == last["epoch"])
    result = evaluate(final, adversarial_dataset, split="test", small_side=32)
    small = result["small_photos"]
    assert result["accuracy"] == pytest.approx(last["test_acc"]) and result["per_class_accuracy"] == pytest.approx(
        last["test_acc_by_class"])
    assert small["accuracy"] == pytest.approx(last["test_small_acc"])
    assert small["per_class_accuracy"] == pytest.approx(last["test_small_acc_by_class"])
    assert small["drop"] == pytest.approx(result["accuracy"] - small["accuracy"])
