"""Every kind of bad input: `data check` reports it, training skips and counts it, never crashes."""

import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.check import check_dataset, format_report
from pipeline.cli import build_parser
from pipeline.config import config_from_args
from pipeline.data import DatasetError, scan_image_folder
from pipeline.runner import run_training
from pipeline.synthetic import make_image, make_image_folder

UNDECODABLE = ("truncated.jpg", "empty.jpg", "text.jpg", "strip.png")


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy_dataset(tmp_path_factory):
    root = make_image_folder(str(tmp_path_factory.mktemp("messy")), train_per_class=32, test_per_class=12, size=64)
    rng = np.random.default_rng(1)
    d = os.path.join(root, "train", "hotdog")
    good = make_image(0, 64, rng)
    open(os.path.join(d, "truncated.jpg"), "wb").write(jpeg(good)[:400])
    open(os.path.join(d, "empty.jpg"), "wb").close()
    open(os.path.join(d, "text.jpg"), "w").write("this is not an image\n")
    good.convert("CMYK").save(os.path.join(d, "cmyk.jpg"))
    Image.fromarray(np.asarray(good.convert("L"), np.uint16) * 257).save(os.path.join(d, "sixteen.png"))
    good.convert("L").save(os.path.join(d, "gray.png"))
    good.convert("RGBA").save(os.path.join(d, "rgba.png"))
    good.convert("P").save(os.path.join(d, "palette.png"))
    good.resize((1, 1)).save(os.path.join(d, "tiny.png"))
    Image.new("RGB", (10000, 10000), (200, 60, 40)).save(os.path.join(d, "huge.jpg"), quality=50)
    # A few hundred bytes that would ask for gigabytes once the short side is resized to resize_size.
    Image.new("1", (100_000, 1)).save(os.path.join(d, "strip.png"), optimize=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    good.resize((96, 64)).save(os.path.join(d, "rotated.jpg"), exif=exif.tobytes())
    open(os.path.join(d, ".DS_Store"), "wb").write(b"\x00\x00\x00\x01Bud1")
    os.makedirs(os.path.join(d, "nested", "deeper"))
    good.save(os.path.join(d, "nested", "deeper", "nested.jpg"))
    open(os.path.join(d, "notes.txt"), "w").write("not an image file\n")
    return root


def test_scan_skips_hidden_and_non_image_files_and_walks_nested_folders(messy_dataset):
    index = scan_image_folder(messy_dataset)
    names = {os.path.basename(p) for p, _ in index.files["train"]}
    assert "nested.jpg" in names and ".DS_Store" not in names and "notes.txt" not in names
    assert index.counts("train") == {"hotdog": 32 + 13, "not-hotdog": 32}


def test_check_reports_every_bad_input(messy_dataset):
    report = check_dataset(messy_dataset)
    text = format_report(report)
    bad = {os.path.basename(f.path): f.error for f in report.files if f.error}
    assert set(bad) == set(UNDECODABLE)
    assert "100000x1: aspect ratio 100000:1, over 20:1 (data.max_aspect_ratio)" in bad["strip.png"]
    modes = {f.mode for f in report.files}
    assert {"CMYK", "I;16", "L", "RGBA", "P", "RGB"} <= modes
    sizes = {f.size for f in report.files}
    assert (1, 1) in sizes and (10000, 10000) in sizes
    assert f"undecodable: {len(UNDECODABLE)}" in text and report.ok  # skippable, not a problem
    print(text)


@pytest.mark.parametrize("cache", ["always", "never"])  # decoded once, or streamed: counted every epoch
def test_training_skips_and_counts_bad_images(ray_local, messy_dataset, tmp_path, cache):
    cfg = config_from_args(build_parser().parse_args(
        ["train", "--data", messy_dataset, "--weights", "none", "--epochs", "1", "--batch-size", "16",
         "--data.max_bad_fraction", "0.1", "--data.cache_decoded", cache,
         "--data.image_size", "48", "--data.resize_size", "56", "--data.preview_images", "0",
         "--storage", str(tmp_path), "--name", "messy"]))
    out = run_training(cfg)
    assert out.history[0]["skipped_images"] == len(UNDECODABLE)
    assert out.history[0]["test_images"] == 24
    if cache == "never":
        return
    # The same zoo through batch prediction: every file gets a row; the bad ones an empty label and
    # the decoder's reason.
    from pipeline.predict import predict

    result = predict(out.model_checkpoint, os.path.join(messy_dataset, "train", "hotdog"), str(tmp_path / "p.csv"))
    import pandas as pd

    rows = pd.concat(pd.read_csv(os.path.join(tmp_path, "p.csv", f)) for f in os.listdir(tmp_path / "p.csv"))
    bad = rows[rows["error"].notna()].set_index(rows[rows["error"].notna()]["path"].map(os.path.basename))
    assert result["undecodable"] == len(UNDECODABLE) and set(bad.index) == set(UNDECODABLE)
    assert "aspect ratio 100000:1" in bad.loc["strip.png", "error"]


def test_too_many_bad_images_stop_before_training(ray_local, messy_dataset, tmp_path):
    cfg = config_from_args(build_parser().parse_args(
        ["train", "--data", messy_dataset, "--weights", "none", "--data.max_bad_fraction", "0.01",
         "--storage", str(tmp_path), "--name", "toomany"]))
    with pytest.raises(DatasetError, match=r"4 of 77 train images cannot be decoded .* > data.max_bad_fraction"):
        run_training(cfg)
    assert not os.path.exists(os.path.join(tmp_path, "toomany", "metrics.json"))


def test_too_many_bad_images_stop_a_streamed_run_after_the_epoch_that_found_them(ray_local, messy_dataset, tmp_path):
    """Streamed, the bad files are found only while training reads them: the first epoch counts
    them and the run stops there with the data error, not a worker crash to retry."""
    cfg = config_from_args(build_parser().parse_args(
        ["train", "--data", messy_dataset, "--weights", "none", "--epochs", "3", "--batch-size", "16",
         "--data.image_size", "48", "--data.resize_size", "56", "--data.preview_images", "0",
         "--data.cache_decoded", "never", "--data.max_bad_fraction", "0.01",
         "--storage", str(tmp_path), "--name", "streamed"]))
    with pytest.raises(DatasetError, match=r"^4 of 77 train images could not be decoded in epoch 1 \(5.2% > "
                                           r"data.max_bad_fraction 1.0%\); `finetune data check` names them$"):
        run_training(cfg)
    run = os.path.join(tmp_path, "streamed")
    assert not os.path.exists(os.path.join(run, "metrics.json"))
    assert not [f for f in os.listdir(run) if f.startswith("checkpoint_")]  # the bad epoch is not kept


def test_layout_problems_are_clear(tmp_path):
    root = make_image_folder(str(tmp_path / "ds"), train_per_class=2, test_per_class=2, size=32)
    os.makedirs(os.path.join(root, "train", "empty-class"))
    report = check_dataset(root)
    assert not report.ok and any("'empty-class' has no usable images in train/" in p for p in report.problems)
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "check", root], capture_output=True, text=True)
    assert p.returncode == 1 and "PROBLEM: class 'empty-class'" in p.stdout
    shutil.rmtree(os.path.join(root, "test"))
    with pytest.raises(DatasetError, match="missing 'test/' folder"):
        scan_image_folder(root)


def test_train_test_overlap_is_a_problem_unless_allowed(tmp_path):
    root = make_image_folder(str(tmp_path / "ds"), train_per_class=3, test_per_class=3, size=32)
    shutil.copy(os.path.join(root, "train", "hotdog", "00000.jpg"), os.path.join(root, "test", "hotdog", "dup.jpg"))
    assert any("both train/ and test/" in p for p in check_dataset(root).problems)
    assert check_dataset(root, allow_overlap=True).ok
