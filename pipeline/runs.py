"""`finetune runs list|show|download`: the runs kept in a storage location (local or s3://)."""

from __future__ import annotations

import logging
import os
import posixpath

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.selection import chosen_checkpoint, chosen_metrics

SNAPSHOT = "checkpoint_manager_snapshot.json"  # written by Ray Train next to the checkpoints


def _read_json(uri: str):
    """The file's JSON, None when it is missing; StorageError when it is truncated or not JSON."""
    try:
        return storage.read_json(uri)
    except (FileNotFoundError, OSError):
        return None


def list_runs(store: str) -> list[dict]:
    """One row per run folder: name, epochs finished, the run's model (its epoch, val loss, test
    accuracy), state."""
    fs, base = storage.resolve(store)
    rows = []
    for info in sorted(fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)), key=lambda i: i.path):
        if info.type != pafs.FileType.Directory:
            continue
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        run = storage.join(store, name)
        row = {"name": name, "epochs": None, "model_epoch": None, "val_loss": None, "test_acc": None}
        try:
            history = _read_json(storage.join(run, "metrics.json"))
            snap = _read_json(storage.join(run, SNAPSHOT))
        except storage.StorageError as e:  # one damaged run must not hide the others
            rows.append({**row, "state": f"unreadable: {e}"})
            continue
        if history:
            rows.append({**row, **_model_row(history), "epochs": len(history), "state": "finished"})
        elif snap:
            results = [r["metrics"] for r in snap.get("checkpoint_results", [])]
            latest = snap.get("latest_checkpoint_result") or {}
            rows.append({**row, **(_model_row(results) if results else {}),
                         "epochs": latest.get("metrics", {}).get("epoch", 0),
                         "state": "unfinished (rerun the same --name to resume)"})
    return rows


def _model_row(rows: list[dict]) -> dict:
    pick = chosen_metrics(rows)
    return {"model_epoch": pick["epoch"], "val_loss": pick.get("val_loss"), "test_acc": pick.get("test_acc")}


def _result(run: str):
    import ray.train

    fs, path = storage.resolve(run)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no "snapshot found" banner here
    return ray.train.Result.from_path(path, storage_filesystem=fs)


def show_run(run: str) -> str:
    history = _read_json(storage.join(run, "metrics.json"))
    result = _result(run)
    lines = [f"run {run}"]
    if history is None:  # unfinished: what the checkpoints reported
        history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
    val = any(h.get("val_loss") is not None for h in history)
    lines.append(f"{'epoch':>5} {'loss':>8} {'train acc':>10}" + (f" {'val loss':>9} {'val acc':>8}" if val else "")
                 + f" {'test acc':>9} {'img/s':>8} {'time s':>8}")
    for h in history:
        lines.append(f"{h['epoch']:>5} {h['train_loss']:>8.3f} {h['train_acc']:>10.3f}"
                     + (f" {h['val_loss']:>9.3f} {h['val_acc']:>8.3f}" if val else "")
                     + f" {h['test_acc']:>9.3f} {h['examples_per_sec']:>8.1f} {h['epoch_time_s']:>8.1f}")
    model = chosen_checkpoint(result)
    lines.append("checkpoints kept (* the run's model: " + ("lowest val loss)" if val else "the last epoch)"))
    for ckpt, metrics in sorted(result.best_checkpoints, key=lambda cm: -cm[1]["epoch"]):
        mark = "*" if model is not None and ckpt.path == model.path else " "
        where = storage.s3_uri(run, ckpt.path)
        lines.append(f" {mark} epoch {metrics['epoch']}: test acc {metrics['test_acc']:.3f}  {where}")
    return "\n".join(lines)


def _checkpoint_folder(run: str, ckpt_path: str) -> str:
    """The checkpoint's folder name, once it is known to be a folder directly inside the run: the
    snapshot that names it is a file in storage, and whoever can write there can write any path."""
    _, run_path = storage.resolve(run)
    path = posixpath.normpath(ckpt_path[len("s3://"):] if ckpt_path.startswith("s3://") else ckpt_path)
    name = posixpath.basename(path)
    if posixpath.dirname(path) != posixpath.normpath(run_path) or not name.startswith("checkpoint_"):
        raise storage.StorageError(f"{run}: its checkpoint snapshot names {ckpt_path!r}, which is not a "
                                   "checkpoint folder of this run; not downloading it")
    return name


def _copy_tree(fs: pafs.FileSystem, src: str, dest: str) -> None:
    """Copy every file under src into dest; a key that would land outside dest is refused."""
    root = os.path.realpath(dest)
    for info in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path, src)
        target = os.path.realpath(os.path.join(root, *rel.split("/")))
        if os.path.commonpath([root, target]) != root:
            raise storage.StorageError(f"refusing {info.path!r}: it would be written outside {dest}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with fs.open_input_stream(info.path) as fin, open(target, "wb") as out:
            out.write(fin.read())


def download_run(run: str, dest: str, best: bool = False) -> str:
    """Copy the latest checkpoint (best: the run's model, chosen_checkpoint) and the run's artifacts to
    a local folder."""
    result = _result(run)
    ckpt = chosen_checkpoint(result) if best else result.checkpoint
    if ckpt is None:
        raise FileNotFoundError(f"{run}: no checkpoint")
    target = os.path.join(dest, _checkpoint_folder(run, ckpt.path))
    os.makedirs(target, exist_ok=True)
    _copy_tree(ckpt.filesystem, ckpt.path, target)
    for name in ("metrics.json", "metrics.csv", "curves.png", "preview.png"):
        try:
            data = storage.read_bytes(storage.join(run, name))
        except (FileNotFoundError, OSError):
            continue
        with open(os.path.join(dest, name), "wb") as fh:
            fh.write(data)
    return target
