"""Batch inference and evaluation of a trained checkpoint, on Ray Data actors.

Each actor copies the checkpoint once and keeps the model loaded; images stream through
in batches (decode + eval crop on the actor), so a prefix of any size runs in bounded memory.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
import torch

from pipeline import data, storage
from pipeline.checkpoint_file import CHECKPOINT_FILE
from pipeline.inference import Classifier, Confusion
from pipeline.selection import chosen_checkpoint
from pipeline.start import init_ray
from pipeline.transforms import IMAGE_EXTENSIONS, SMALL_PHOTO_QUALITY


def resolve_checkpoint(uri: str) -> ray.train.Checkpoint:
    """A checkpoint folder (holding checkpoint.pt), or a run folder: the run's model (selection.chosen_checkpoint)."""
    fs, path = storage.resolve(uri)
    if fs.get_file_info(f"{path}/{CHECKPOINT_FILE}").type == pafs.FileType.File:
        return ray.train.Checkpoint(path, filesystem=fs)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such checkpoint or run folder")
    result = ray.train.Result.from_path(path, storage_filesystem=fs)
    ckpt = chosen_checkpoint(result)
    if ckpt is None:
        raise FileNotFoundError(f"{uri}: a run folder without checkpoints")
    return ckpt


def _actor_options(actors: int) -> dict:
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus:
        return {"num_gpus": 1, "concurrency": max(1, min(actors or int(gpus), int(gpus)))}
    return {"num_cpus": 1, "concurrency": max(1, actors or 1)}


class _Predictor:
    """One loaded model per actor; a batch of encoded images (or eval-cropped arrays) -> predictions."""

    def __init__(self, checkpoint: ray.train.Checkpoint):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":  # one actor per CPU it was given: do not oversubscribe
            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        with checkpoint.as_directory() as d:  # a download is removed once loaded: one per actor
            self.clf = Classifier(d, device=device)

    def __call__(self, batch: dict) -> dict:
        errors = None
        if "bytes" in batch:
            images, errors = [], []
            for encoded in batch["bytes"]:
                # A bad image gets an empty prediction and the decoder's reason, never a crash.
                image, why = data.decode_or_reason(encoded, self.clf.preset, center_crop=True)
                images += [image] if image is not None else []
                errors.append(why)
            ok = np.array([not why for why in errors], dtype=bool)
            stack = np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
        else:
            ok, stack = np.ones(len(batch["image"]), dtype=bool), np.stack(list(batch["image"]))
        n, classes = len(ok), self.clf.classes
        probs = np.full((n, len(classes)), np.nan, dtype=np.float32)
        if len(stack):
            probs[ok] = self.clf.probabilities(stack)
        pred = np.where(ok, np.nan_to_num(probs, nan=-1).argmax(1), -1)
        out = {"label": np.array([classes[p] if p >= 0 else "" for p in pred]),
               "probability": np.where(ok, np.nanmax(np.nan_to_num(probs, nan=-1), 1), np.nan),
               "pred_index": pred, **{f"p_{c}": probs[:, i] for i, c in enumerate(classes)}}
        if errors is not None:
            out["error"] = np.array(errors, dtype=object)
        if "path" in batch:
            out["path"] = batch["path"]
        if "label" in batch:  # a labelled, decoded split (evaluate): keep the true label
            out["label_index"] = batch["label"]
        return out


def predict(checkpoint_uri: str, images: str, output: str, fmt: str = "", batch_size: int = 64,
            actors: int = 0) -> dict:
    """Predict every image under a folder or s3:// prefix; write path,label,probability(+p_<class>)."""
    t0 = time.perf_counter()
    fmt = fmt or ("parquet" if output.rstrip("/").endswith(".parquet") else "csv")
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"--format {fmt!r}: valid: csv, parquet")
    init_ray()
    ckpt = resolve_checkpoint(checkpoint_uri)
    fs, path = storage.resolve(images)
    ds = ray.data.read_binary_files(path, filesystem=fs, include_paths=True,
                                    file_extensions=[e.lstrip(".") for e in IMAGE_EXTENSIONS])
    preds = ds.map_batches(_Predictor, fn_constructor_kwargs={"checkpoint": ckpt}, batch_size=batch_size,
                           batch_format="numpy", **_actor_options(actors))
    if images.startswith("s3://"):
        preds = preds.map_batches(lambda b: {**b, "path": np.array(["s3://" + p for p in b["path"]])},
                                  batch_format="numpy")
    preds = preds.drop_columns(["pred_index"]).select_columns(
        ["path", "label", "probability"] + [c for c in preds.columns() if c.startswith("p_")] + ["error"])
    out_fs, out_path = storage.resolve(output)
    getattr(preds, f"write_{fmt}")(out_path, filesystem=out_fs)
    written = ray.data.read_parquet(out_path, filesystem=out_fs) if fmt == "parquet" else \
        ray.data.read_csv(out_path, filesystem=out_fs)
    n = written.count()
    undecodable = written.filter(lambda r: r["label"] in ("", None) or r["label"] != r["label"]).count()
    print(f"predicted {n} images ({undecodable} undecodable) with {checkpoint_uri} in "
          f"{time.perf_counter() - t0:.1f} s -> {output} ({fmt})", flush=True)
    return {"images": n, "undecodable": undecodable, "output": output}


def _confusion(ckpt, clf: Classifier, index: data.ImageFolderIndex, split: str, preset, batch_size: int,
               actors: int) -> tuple[Confusion, int]:
    """(confusion matrix, undecodable images skipped) of a checkpoint on a split, decoded with preset."""
    decoded = data.decode_split(index, split, preset, center_crop=True, max_bad_fraction=1.0)
    preds = decoded.dataset.map_batches(_Predictor, fn_constructor_kwargs={"checkpoint": ckpt},
                                        batch_size=batch_size, batch_format="numpy", **_actor_options(actors))
    conf = Confusion(len(clf.classes))
    for batch in preds.select_columns(["label_index", "pred_index"]).iter_batches(batch_format="numpy"):
        conf.add(batch["label_index"], batch["pred_index"])
    return conf, len(decoded.bad_files)


def _confusion_lines(title: str, conf: Confusion, classes: list[str]) -> list[str]:
    width = max(len(c) for c in classes)
    per_class = conf.per_class_accuracy(classes)
    lines = [title, "confusion (rows: true, columns: predicted):",
             " " * (width + 2) + " ".join(f"{c[:8]:>8}" for c in classes)]
    for c, row in zip(classes, conf.counts.tolist(), strict=True):
        acc = f"{per_class[c]:.3f}" if per_class[c] is not None else "-"
        lines.append(f"{c:>{width}}  " + " ".join(f"{v:>8}" for v in row) + f"   acc {acc}")
    return lines


def evaluate(checkpoint_uri: str, dataset: str, split: str = "test", output: str = "", batch_size: int = 64,
             actors: int = 0, small_side: int = 0) -> dict:
    """Accuracy, per-class accuracy and the confusion matrix of a checkpoint on <dataset>/<split>/<class>/*;
    with small_side, the same on the split's small-photo copy (transforms.small_photo) too."""
    t0 = time.perf_counter()
    init_ray()
    ckpt = resolve_checkpoint(checkpoint_uri)
    with ckpt.as_directory() as d:
        clf = Classifier(d)
    index = data.scan_image_folder(dataset, splits=(split,))
    unknown = sorted(set(index.classes) - set(clf.classes))
    if unknown:
        raise data.DatasetError(f"{dataset}/{split}: classes {unknown} are not among the checkpoint's {clf.classes}")
    # Labels in the checkpoint's class order, whatever subset of classes the folder has.
    remap = {i: clf.classes.index(name) for i, name in enumerate(index.classes)}
    index.files[split] = [(p, remap[y]) for p, y in index.files[split]]
    conf, skipped = _confusion(ckpt, clf, index, split, clf.preset, batch_size, actors)
    result = {"checkpoint": checkpoint_uri, "dataset": dataset, "split": split, "images": conf.images,
              "skipped_images": skipped, "accuracy": conf.accuracy,
              "per_class_accuracy": conf.per_class_accuracy(clf.classes), "classes": clf.classes,
              "confusion": conf.counts.tolist(), "epoch": clf.epoch}
    lines = _confusion_lines(f"{split} accuracy {conf.accuracy:.4f} on {conf.images} images (checkpoint epoch "
                             f"{clf.epoch}; {skipped} undecodable skipped)", conf, clf.classes)
    if small_side:
        small, _ = _confusion(ckpt, clf, index, split, dataclasses.replace(clf.preset, small_side=small_side),
                              batch_size, actors)
        result["small_photos"] = {"max_side": small_side, "images": small.images, "accuracy": small.accuracy,
                                  "drop": conf.accuracy - small.accuracy,
                                  "per_class_accuracy": small.per_class_accuracy(clf.classes),
                                  "confusion": small.counts.tolist()}
        lines += _confusion_lines(f"small photos (longest side <= {small_side} px, JPEG quality "
                                  f"{SMALL_PHOTO_QUALITY}): accuracy {small.accuracy:.4f} on {small.images} images, "
                                  f"{conf.accuracy - small.accuracy:+.4f} below full size", small, clf.classes)
    result["wall_time_s"] = time.perf_counter() - t0
    print("\n".join(lines), flush=True)
    if output:
        storage.write_bytes(output, json.dumps(result, indent=1).encode())
        print(f"wrote {output}", flush=True)
    return result
