"""A real Ray Tune search on a real local Ray: ASHA, validation protocol, best.json, resume; and the
experiment command, whose tuned row is such a search."""

import json
import os
import re

import numpy as np
import pytest
import torch
from pyarrow.fs import copy_files
from ray.train import Checkpoint

from pipeline import data, storage
from pipeline.checkpoint_file import load_checkpoint
from pipeline.cli import build_parser
from pipeline.config import config_from_args, with_overrides
from pipeline.console import TRIAL_END_WARNING
from pipeline.experiment import run_experiment
from pipeline.inference import Classifier
from pipeline.model import evaluated_weights
from pipeline.probe import PENALTIES
from pipeline.search import run_search, trial_base
from tests.secret_scan import credential_hits, held_secrets

SMALL = ["--data.image_size", "48", "--data.resize_size", "56", "--batch-size", "16", "--freeze-bn"]


@pytest.fixture(scope="module")
def search(ray_local, s3, tiny_dataset, source_weights):
    """The experiment, its trials and checkpoints on the SeaweedFS S3 server."""
    cfg = config_from_args(build_parser().parse_args(
        ["tune", "--data", tiny_dataset, "--weights", source_weights, "--epochs", "3", "--num-samples", "4",
         "--tune.space", "{optim.lr: {loguniform: [1e-5, 3e-3]}, model.freeze_depth: {randint: [0, 4]}, "
         "data.crop_min_scale: {choice: [0.25, 0.5]}}", "--tune.retrain",
         "--tune.eval_crop_sizes", "0,56", "--tune.wise_alphas", "1,0.5",
         "--storage", "s3://runs/tune", "--name", "search", *SMALL]))
    return cfg, run_search(cfg)


def s3_keys(prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def asha_stops(curves: list[list[float]], grace: int, rf: int, max_t: int) -> list[bool]:
    """Which trials Ray's ASHA (one bracket) stops before max_t, for trials run one after another:
    at each rung a trial is stopped when its metric is below the (1 - 1/rf) quantile of the trials
    that reached the rung before it (ties continue)."""
    rungs: dict[int, list[float]] = {}
    m = grace
    while m < max_t:
        rungs[m] = []
        m *= rf
    stops = []
    for curve in curves:
        stopped = False
        for epoch, acc in enumerate(curve, 1):
            if epoch in rungs:
                earlier = rungs[epoch]
                stopped = bool(earlier) and acc < np.percentile(earlier, 100 * (1 - 1 / rf))
                earlier.append(acc)
                if stopped:
                    break
        assert len(curve) == (epoch if stopped else max_t), curve  # reported every epoch until stopped
        stops.append(stopped)
    return stops


def test_asha_stops_below_the_rung_quantile():
    assert asha_stops([[0.5, 0.6, 0.7], [0.4], [0.9, 0.5], [0.9, 0.9, 0.9]], 1, 2, 3) == [False, True, True, False]
    assert asha_stops([[1.0, 1.0, 1.0]] * 3, 1, 2, 3) == [False, False, False]


def test_search_selects_on_validation_and_uses_test_once(search, tiny_dataset):
    cfg, summary = search
    trials = summary["trials"]
    assert len(trials) == 4 and all(not t["error"] for t in trials)
    samples = [t["overrides"] for t in trials]  # each trial's sample of tune.space, as overrides
    assert all(list(s) == ["optim.lr", "model.freeze_depth", "data.crop_min_scale"] for s in samples)
    assert all(1e-5 <= s["optim.lr"] <= 3e-3 and 0 <= s["model.freeze_depth"] <= 3 for s in samples)
    # Every stop is ASHA's (grace 1, reduction 2, max_t = epochs) on the reported val_loss curves
    # (tune.select_metric 'loss': lower is better, so the replay ranks the negated losses).
    # Whether a tiny search stops anything depends on how training went, so the test checks the
    # decisions, not their number.
    assert summary["metric"] == "val_loss"
    in_order = sorted(trials, key=lambda t: t["trial"])  # one trial at a time here: ids are run order
    curves = [[-x for x in t["val_loss_curve"]] for t in in_order]
    assert [t["stopped_early"] for t in in_order] == asha_stops(curves, 1, 2, 3)
    assert any(t["epochs"] == 3 for t in trials)
    best = summary["best"]
    # Judged by the last epoch (tune.select_epoch 'last', what the retrain reproduces): trials that
    # ran every epoch rank first, by their last val_loss, and the pick is the last checkpoint.
    assert all(t["val_loss"] == t["val_loss_curve"][-1] and t["selected_epoch"] == t["epochs"] for t in trials)
    # Of the trials that ran every epoch and scored within one standard error of the best
    # (tune.select_tolerance 1), the pick is the one whose weights moved least from the start.
    finished = [t for t in trials if t["epochs"] == 3]
    assert best["trial"] in [t["trial"] for t in finished] and best["epoch"] == 3
    assert trials[0]["val_loss"] == min(t["val_loss"] for t in finished)
    assert best["best_scoring_trial"] == trials[0]["trial"]
    assert best["trial_margin"] == pytest.approx(trials[0]["val_loss_se"])  # 0 where every image's loss is 0
    peers = [t for t in finished if t["val_loss"] <= trials[0]["val_loss"] + best["trial_margin"]]
    picked = min(peers, key=lambda t: t["weight_distance"])
    assert best["trial"] == picked["trial"] and best["val_loss"] == picked["val_loss"]
    assert best["weight_distance"] == picked["weight_distance"] > 0
    assert best["test_images"] == 24 and 0 <= best["test_acc"] <= 1
    # The pick is the overrides that reproduce it: its trial's sample, its WiSE-FT alpha, its eval crop.
    pick = best["overrides"]
    assert list(pick) == ["optim.lr", "model.freeze_depth", "data.crop_min_scale", "model.wise_alpha",
                          "data.eval_crop_size"]
    assert {k: pick[k] for k in samples[0]} == picked["overrides"]
    assert with_overrides(trial_base(cfg), pick).to_dict() == best["config"]
    assert all(s["data.crop_min_scale"] in (0.25, 0.5) for s in samples)
    assert best["checkpoint"].startswith("s3://runs/tune/search/trials/")
    # The eval crop: chosen after the search on val by the pick's loss, ties to the first listed.
    losses = best["val_loss_by_eval_crop"]
    assert list(losses) == list(best["val_acc_by_eval_crop"]) == ["0", "56"]
    assert pick["data.eval_crop_size"] == int(min(losses, key=losses.get))
    # WiSE-FT's alpha: every trial scored each alpha every epoch and reported the smallest within one
    # standard error of the lowest loss, so the checkpoint and its alpha were chosen together; test is
    # scored with it.
    accs, losses = best["val_acc_by_wise_alpha"], best["val_loss_by_wise_alpha"]
    assert list(accs) == list(losses) == ["1", "0.5"]
    within = [a for a, loss in losses.items() if loss <= min(losses.values()) + best["wise_alpha_margin"]]
    alpha = pick["model.wise_alpha"]
    assert alpha == min(map(float, within))
    assert best["val_loss"] == losses[f"{alpha:g}"] and best["val_acc"] == accs[f"{alpha:g}"]
    assert all(t["wise_alpha"] in (1.0, 0.5) for t in trials)
    # Those scores are the checkpoint's own: its weights interpolated as reported, on the val images.
    val_files = data.stratified_split(data.scan_image_folder(tiny_dataset), cfg.tune.val_fraction,
                                      seed=cfg.optim.seed).files["val"]
    labels = np.array([y for _, y in val_files])
    fs, path = storage.resolve(best["checkpoint"])
    with Checkpoint(path, filesystem=fs).as_directory() as d:
        state = load_checkpoint(d)  # the distance: alpha x |evaluated - start| over the trained weights
        weights = evaluated_weights(state)
        moved = sum(float((weights[n].double() - w.double()).square().sum())
                    for n, w in state["start_weights"].items()) ** 0.5
        assert best["weight_distance"] == pytest.approx(alpha * moved, rel=1e-6)
        for alpha, reported in accs.items():
            clf = Classifier(d, wise_alpha=float(alpha))
            probs = clf.probabilities(np.stack([clf.prepare(open(path, "rb").read()) for path, _ in val_files]))
            assert float((probs.argmax(1) == labels).mean()) == pytest.approx(reported, abs=1e-9), alpha
            nll = -np.log(probs[np.arange(len(labels)), labels])
            assert float(nll.mean()) == pytest.approx(losses[alpha], rel=1e-4, abs=1e-6), alpha
            if losses[alpha] == min(losses.values()):  # the margin: one standard error of the best loss
                assert best["wise_alpha_margin"] == pytest.approx(nll.std() / np.sqrt(len(nll)), rel=1e-3, abs=1e-6)
    saved = json.loads(storage.read_bytes("s3://runs/tune/search/best.json"))
    assert saved["best"] == best
    # The final model: the best config retrained on train + val (54 + 10 images), test reported as is.
    assert summary["final"]["train_images"] == 64 and summary["final"]["epochs"] == 3
    assert summary["final"]["test_images"] == 24 and summary["final"]["checkpoint"].startswith("s3://runs/tune/")


def test_validation_split_is_stratified_and_disjoint(tiny_dataset):
    from pipeline.data import scan_image_folder, stratified_split

    index = stratified_split(scan_image_folder(tiny_dataset), 0.25, seed=0)
    assert index.counts("val") == {"hotdog": 8, "not-hotdog": 8}
    assert index.counts("train") == {"hotdog": 24, "not-hotdog": 24}
    assert not set(index.files["val"]) & set(index.files["train"])
    assert stratified_split(scan_image_folder(tiny_dataset), 0.25, seed=0).files == index.files


def test_trials_write_tensorboard_events(search):
    events = [k for k in s3_keys("tune/search/") if "/events.out.tfevents" in k]
    assert len(events) >= 4


def test_report_renders_in_headless_chromium(search, tmp_path):
    import shutil
    import subprocess

    from pipeline.report import build_report

    out = build_report("s3://runs/tune/search")
    assert out == "s3://runs/tune/search/report.html"
    page = storage.read_bytes(out).decode()
    local = tmp_path / "report.html"
    local.write_text(page)
    assert page.count("<img ") >= 3 and "test acc" in page
    best = search[1]["best"]
    # The pick as the overrides that reproduce it, each path with its value.
    pick = best["overrides"]
    assert all(f"<code>{path}</code> = {format(v, '.3g') if isinstance(v, float) else v}" in page
               for path, v in pick.items()) and "data.crop_min_scale" in pick and "model.wise_alpha" in pick
    assert "Last validation loss over optim.lr and model.freeze_depth" in page
    assert ("stopped by ASHA" in page) == any(t["stopped_early"] for t in search[1]["trials"])
    assert "Misclassified test images" in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium not installed (.ci/run installs it)")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,3000",
                    f"--screenshot={shot}", f"file://{local}"], check=True, capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colors = len(img.resize((200, 600)).getcolors(maxcolors=200 * 600))
    assert img.size == (1000, 3000) and colors > 200  # plots drawn, not a blank page


def test_killed_search_resumes_with_the_same_command(ray_local, s3, tiny_dataset, source_weights, tmp_path):
    """A search on S3 storage, its driver and local Ray killed after a trial, then resumed. Its Ray
    keeps its session folder under ray_tmp, which the credential scan reads afterwards."""
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    args = [sys.executable, "-m", "pipeline.cli", "tune", "--data", tiny_dataset, "--weights", source_weights,
            "--epochs", "2", "--num-samples", "2", "--tune.space", "{optim.lr: {loguniform: [1e-5, 3e-3]}}",
            "--storage", "s3://runs/resumed",
            "--name", "killed", *SMALL]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, env=env)
    for line in first.stdout:
        if re.search(r" 2/2 ", line):  # the trial table: the first trial is done, kill the driver and its Ray
            time.sleep(2)
            os.killpg(first.pid, signal.SIGKILL)
            break
    first.wait()
    assert "resumed/killed/best.json" not in s3_keys("resumed/killed/")
    # A driver killed at an arbitrary moment may have died just after Tune saved its state and before
    # the project recorded that state's digests: a plain rerun then refuses (run.resume auto), and
    # --run.resume must, the user vouching for the storage, resumes.
    second = subprocess.run([*args, "--run.resume", "must"], capture_output=True, text=True, timeout=900, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming the search" in second.stdout
    # The console shows the trial table, not Tune's own output or warnings a healthy search produces.
    for noise in ("Configuration for experiment", "To visualize your results", "invalid value", TRIAL_END_WARNING):
        assert noise not in second.stdout + second.stderr, noise
    summary = json.loads(storage.read_bytes("s3://runs/resumed/killed/best.json"))
    assert len(summary["trials"]) == 2 and all(not t["error"] for t in summary["trials"])
    assert "resumed/killed/tuner.pkl" in s3_keys("resumed/killed/")
    hits, scanned = credential_hits(held_secrets(), folders=[ray_tmp])  # the bucket is scanned below
    assert scanned > 50 and not hits, hits
    import shutil

    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_experiment_command_with_a_tuned_recipe(ray_local, tiny_dataset, source_weights, tmp_path):
    """`finetune experiment` end to end on generated data: zero-shot, a seed-recipe row and the
    tuned row, whose search and training follow experiment.tuned_recipe and nothing else does.

    It lives here, after the searches, because a trial that Tune stops can leave its placement
    group behind on a Ray without the dashboard's state API (the test session's): later trainers
    that claim their full CPU share would then wait for data tasks forever. The experiment's own
    rows claim light logical CPUs (runner.with_light_cpu_claim), so it runs fine after them."""
    categories = tmp_path / "categories.txt"
    categories.write_text("\n".join("hotdog" if i == 934 else f"class{i}" for i in range(1000)))
    cfg = config_from_args(build_parser().parse_args(
        ["experiment", "--data", tiny_dataset, "--weights", source_weights, "--model.categories", str(categories),
         "--data.image_size", "48", "--data.resize_size", "56", "--batch-size", "16", "--freeze-bn",
         "--epochs", "2", "--seeds", "1", "--rows", "zero_shot,finetune_defaults,finetune_tuned",
         "--num-samples", "2", "--tune.space", "{optim.lr: {loguniform: [1e-5, 1e-1]}, model.freeze_depth: "
         "{randint: [0, 3]}, data.crop_min_scale: {choice: [0.25, 0.5]}}",
         "--tune.eval_crop_sizes", "56",  # one choice: the tuned row must evaluate on 56 px crops
         "--tune.wise_alphas", "0.5",  # and with WiSE-FT at 0.5
         "--experiment.tuned_recipe", "{optim.epochs: 3, optim.schedule: cosine, data.batch_size: 8, "
         "data.eval_flip: true, model.probe_init: true}",
         "--experiment.small_photo_side", "40", "--storage", "s3://runs/experiment", "--name", "exp"]))
    results = json.loads(json.dumps(run_experiment(cfg)).replace("s3://runs/experiment", str(tmp_path / "runs")))
    copy_files("runs/experiment/exp", str(tmp_path / "runs" / "exp"), source_filesystem=storage.resolve("s3://runs")[0])
    rows = results["rows"]
    assert list(rows) == ["zero_shot", "finetune_defaults", "finetune_tuned"]
    assert results["reuse_rows"] == {"hotdog": 934} and 0 <= rows["zero_shot"]["test_acc_mean"] <= 1
    assert len(rows["finetune_defaults"]["runs"][0]["curve"]) == 2  # the base recipe
    tuned = rows["finetune_tuned"]
    assert len(tuned["runs"][0]["curve"]) == 3 and tuned["tuned"]["data.crop_min_scale"] in (0.25, 0.5)
    assert tuned["tuned"]["data.eval_crop_size"] == 56 and list(tuned["search_val_acc_by_eval_crop"]) == ["56"]
    state = load_checkpoint(tuned["runs"][0]["checkpoint"])
    assert state["config"]["data"]["eval_crop_size"] == 56 and state["config"]["model"]["wise_alpha"] == 0.5
    # The start weights travel in the checkpoint: the source's backbone and the linear-probe head
    # (fitted from the reused hotdog row: moved away from it), and the checkpoint's model,
    # interpolated as the row evaluated it, reproduces the reported test acc.
    source = torch.load(source_weights, weights_only=True)
    assert tuned["probe_head"]["penalty"] in PENALTIES and state["config"]["model"]["probe_init"]
    assert not torch.equal(state["start_weights"]["fc.weight"][0], source["fc.weight"][934])
    assert torch.equal(state["start_weights"]["layer4.1.conv2.weight"], source["layer4.1.conv2.weight"])
    clf = Classifier(tuned["runs"][0]["checkpoint"])
    assert clf.wise_alpha == 0.5 and clf.preset.eval_size == 56
    test_files = data.scan_image_folder(tiny_dataset).files["test"]
    images = np.stack([clf.prepare(open(path, "rb").read()) for path, _ in test_files])
    acc = float((clf.probabilities(images).argmax(1) == np.array([y for _, y in test_files])).mean())
    assert acc == pytest.approx(tuned["runs"][0]["test_acc"], abs=1e-9)
    assert rows["finetune_defaults"]["runs"][0]["test_images"] == tuned["runs"][0]["test_images"] == 24
    search = json.loads((tmp_path / "runs" / "exp" / "tune" / "best.json").read_text())
    assert search["best"]["config"]["optim"]["epochs"] == 3 and search["best"]["config"]["data"]["eval_flip"]
    assert all(t["epochs"] <= 3 for t in search["trials"])
    table = (tmp_path / "runs" / "exp" / "results.md").read_text()
    assert ("recipe optim.epochs=3, optim.schedule=cosine, data.batch_size=8, data.eval_flip=True, "
            "model.probe_init=True") in table
    assert "model.wise_alpha=0.5, data.eval_crop_size=56" in table  # the pick, as the overrides it is
    # Every row is scored on the small-photo copy of test too, with per-class accuracy on both.
    assert "Small photos: each test image shrunk to a longest side of at most 40 px" in table
    for key in rows:
        assert 0 <= rows[key]["test_small_acc_mean"] <= 1 and list(rows[key]["test_small_acc_by_class_mean"]) == [
            "hotdog", "not-hotdog"]
    assert tuned["runs"][0]["test_small_acc"] == pytest.approx(
        float(np.mean(list(tuned["runs"][0]["test_small_acc_by_class"].values()))))
    assert (tmp_path / "runs" / "exp" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Its search's report says test was not read there (the rows report it).
    from pipeline.report import build_report

    page = open(build_report(str(tmp_path / "runs" / "exp" / "tune"))).read()
    assert "test set not read" in page and "confusion matrix" not in page
    assert "<code>model.wise_alpha</code> = 0.5" in page


def test_trials_rank_by_the_epoch_and_metric_the_search_judges():
    from pipeline.config import Config
    from pipeline.selection import rank_key

    cfg = Config()
    cfg.optim.epochs = 3
    stopped = {"epochs": 1, "val_loss": 0.2, "val_acc": 0.9}
    finished = {"epochs": 3, "val_loss": 0.3, "val_acc": 0.7}
    assert rank_key(finished, cfg) > rank_key(stopped, cfg)  # 'last': a trial stopped early is no rival
    assert rank_key({**finished, "val_loss": 0.25}, cfg) > rank_key(finished, cfg)  # 'loss': lower is better
    assert rank_key({**finished, "val_loss": None}, cfg) < rank_key(finished, cfg)
    cfg.tune.select_epoch = "best"
    assert rank_key(stopped, cfg) > rank_key(finished, cfg)
    cfg.tune.select_metric = "accuracy"
    worse = {**stopped, "val_acc": 0.6}
    assert rank_key({**finished, "val_acc": 0.8}, cfg) > rank_key(finished, cfg) > rank_key(worse, cfg)


def test_the_pick_is_the_trial_nearest_the_start_within_one_standard_error_of_the_best():
    from pipeline.config import Config
    from pipeline.selection import pick_trial, rank_key

    cfg = Config()
    cfg.optim.epochs = 10
    # This session's seefood search, AMD box: trial 6 scored best, trial 0 within one standard
    # error of it with its weights moved less than half as far; trial 7 was stopped by ASHA.
    t6 = {"trial": "t6", "epochs": 10, "val_loss": 0.177, "val_loss_se": 0.057, "weight_distance": 0.637}
    t0 = {"trial": "t0", "epochs": 10, "val_loss": 0.186, "val_loss_se": 0.045, "weight_distance": 0.279}
    t7 = {"trial": "t7", "epochs": 8, "val_loss": 0.192, "val_loss_se": 0.045, "weight_distance": 0.2}
    far = {"trial": "far", "epochs": 10, "val_loss": 0.25, "val_loss_se": 0.05, "weight_distance": 0.1}
    trials = sorted([t7, far, t0, t6], key=lambda t: rank_key(t, cfg), reverse=True)
    assert trials[0] is t6
    pick, margin = pick_trial(trials, cfg)
    assert pick is t0 and margin == pytest.approx(0.057)  # t7: stopped early; far: 0.25 > 0.234
    cfg.tune.select_tolerance = 0.0
    assert pick_trial(trials, cfg) == (t6, 0.0)
    cfg.tune.select_tolerance = 2.0
    assert pick_trial(trials, cfg)[0] is far  # 0.25 <= 0.291
    # Searches saved before trials reported a standard error and a distance: the best-ranked trial.
    old = [{k: v for k, v in t.items() if k not in ("val_loss_se", "weight_distance")} for t in trials]
    assert pick_trial(old, cfg) == (old[0], 0.0)


def test_no_credential_is_stored_anywhere_after_train_tune_resumed_tune_and_experiment(
        ray_local, s3, tmp_path_factory):
    """The searches above ran on S3 storage with the keys in the environment: the search (with its
    final retraining, a plain TorchTrainer run), the killed and resumed search, the experiment. No key
    is in any object of any bucket, in any file this session's tests wrote, or in the session Ray's
    folder (its logs, the runtime env agent's included)."""
    expected = ("tune/search/tuner.pkl", "resumed/killed/tuner.pkl", "experiment/exp/tune/tuner.pkl")
    missing = [k for k in expected if k not in s3_keys(k)]
    assert not missing, f"run the whole module: {missing} were not written"
    skip = {str(s3.data_dir)}  # the server's own files hold its identities
    hits, scanned = credential_hits(held_secrets(), buckets=("runs", "datasets"),
                                    folders=[str(tmp_path_factory.getbasetemp()), ray_local], skip=skip)
    assert scanned > 500 and not hits, hits
