"""ImageFolder datasets on Ray Data: scan, decode once, augment per epoch, shard per worker."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.data
from ray.data.expressions import random as random_column

from pipeline import storage
from pipeline.transforms import IMAGE_EXTENSIONS, ImagePreset

SPLITS = ("train", "test")
ROWS_PER_BLOCK = 64  # small blocks keep decode/augment tasks short and pipelined


class DatasetError(ValueError):
    """The dataset cannot be trained on as it is (layout, classes, too many bad files)."""


@dataclass
class ImageFolderIndex:
    """Files and labels of an ImageFolder tree; classes sorted as torchvision's ImageFolder does."""

    root: str
    classes: list[str]
    files: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # split -> [(path, label)]
    skipped: dict[str, int] = field(default_factory=dict)  # what the scan left out, and how many
    fingerprint: dict = field(default_factory=dict)  # {"files": n, "sha256": of the sorted paths and sizes}

    def counts(self, split: str) -> dict[str, int]:
        c = {name: 0 for name in self.classes}
        for _, label in self.files[split]:
            c[self.classes[label]] += 1
        return c


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def scan_image_folder(root: str, splits=SPLITS) -> ImageFolderIndex:
    """List <root>/<split>/<class>/**/<image> for each split (local or s3://)."""
    try:
        return _scan(root, splits)
    except OSError as e:  # the storage refused or failed a listing: not a layout problem
        raise storage.StorageError(f"cannot list {root}: {e}") from None


def _local_entries(split_dir: str, skipped: dict) -> list[tuple[str, bool, int]]:
    """(path relative to split_dir, is a folder, size) under a local split, walked without following
    links: a link may point anywhere on the machine, or at a folder above itself. Links and names
    that are not UTF-8 are skipped and counted in `skipped`."""
    out = []
    base = os.fsencode(split_dir)
    for root, dirs, files in os.walk(base):  # bytes: every name, decodable or not
        for name in [*dirs, *files]:
            full = os.path.join(root, name)
            try:
                rel = os.path.relpath(full, base).decode("utf-8")
            except UnicodeDecodeError:
                skipped["names that are not UTF-8"] = skipped.get("names that are not UTF-8", 0) + 1
                continue
            if os.path.islink(full):
                skipped["symbolic links"] = skipped.get("symbolic links", 0) + 1
                continue
            out.append((rel.replace(os.sep, "/"), name in dirs, 0 if name in dirs else os.stat(full).st_size))
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return out


def _listing(fs: pafs.FileSystem, split_dir: str, local: bool, skipped: dict) -> list[tuple[str, bool, int]]:
    if local:
        return _local_entries(split_dir, skipped)
    return [(e.path[len(split_dir) + 1:], e.type == pafs.FileType.Directory, e.size or 0)
            for e in fs.get_file_info(pafs.FileSelector(split_dir, recursive=True))]


def _scan(root: str, splits) -> ImageFolderIndex:
    fs, base = storage.resolve(root)
    local = not root.startswith("s3://")
    classes: list[str] | None = None
    files: dict[str, list[tuple[str, int]]] = {}
    skipped: dict[str, int] = {}
    digest, count = hashlib.sha256(), 0  # the dataset's fingerprint: sorted paths (per split) and sizes
    for split in splits:
        split_dir = f"{base}/{split}" if local else posixpath.join(base, split)
        if fs.get_file_info(split_dir).type != pafs.FileType.Directory:
            raise DatasetError(f"{root}: missing '{split}/' folder (expected {split}/<class>/<images>)")
        entries = _listing(fs, split_dir, local, skipped)
        split_classes = sorted({rel for rel, is_dir, _ in entries if is_dir and "/" not in rel and not _is_hidden(rel)})
        if not split_classes:
            # Object stores have no directories: derive classes from the keys.
            split_classes = sorted({rel.split("/")[0] for rel, is_dir, _ in entries
                                    if not is_dir and "/" in rel and not _is_hidden(rel)})
        if classes is None:
            classes = split_classes
            if not classes:
                raise DatasetError(f"{root}: no class folders under {split}/")
        extra = sorted(set(split_classes) - set(classes))
        if extra:
            raise DatasetError(f"{root}: classes {extra} appear in {split}/ but not in {splits[0]}/")
        index = {name: i for i, name in enumerate(classes)}
        images = sorted((rel, size) for rel, is_dir, size in entries
                        if not is_dir and "/" in rel and not _is_hidden(rel) and rel.lower().endswith(IMAGE_EXTENSIONS))
        files[split] = [(f"{split_dir}/{rel}", index[rel.split("/")[0]]) for rel, _ in images]
        digest.update(json.dumps([split, images]).encode())
        count += len(images)
    assert classes is not None
    return ImageFolderIndex(root=root, classes=classes, files=files, skipped=skipped,
                            fingerprint={"files": count, "sha256": digest.hexdigest()})


SMALL_COPY = "_small"


def small_copy_name(split: str) -> str:
    """The name of a split's small-photo copy (data.small_eval_side): 'test' -> 'test_small'."""
    return split + SMALL_COPY


def stratified_split(index: ImageFolderIndex, fraction: float, seed: int) -> ImageFolderIndex:
    """Carve a validation split out of train: the same fraction of every class, fixed by seed."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in range(len(index.classes)):
        items = [it for it in index.files["train"] if it[1] == label]
        rng.shuffle(items)
        n_val = int(round(len(items) * fraction)) if len(items) > 1 else 0
        val += items[:n_val]
        train += items[n_val:]
    files = {"train": sorted(train), "val": sorted(val), **{k: v for k, v in index.files.items() if k != "train"}}
    return ImageFolderIndex(root=index.root, classes=index.classes, files=files, skipped=index.skipped,
                            fingerprint=index.fingerprint)


# ---------------------------------------------------------------- Ray Data stages

def read_file(filesystem: pafs.FileSystem, path: str) -> bytes:
    """A file's bytes. A read that fails (after pyarrow's retries) is the storage's problem, never a
    bad image: throttling, an expired token or a lost permission must stop the run, not shrink it."""
    try:
        with filesystem.open_input_stream(path) as f:
            return f.read()
    except OSError as e:
        raise storage.StorageError(f"cannot read {path}: {e}") from None


def decode_or_reason(data: bytes, preset: ImagePreset, center_crop: bool) -> tuple[np.ndarray | None, str]:
    """(image, "") or (None, why it is a bad image): the decoder's own errors and refused sizes."""
    try:
        img = preset.decode(data)
        return (preset.eval(img) if center_crop else img), ""
    except Exception as e:  # noqa: BLE001 - whatever the decoder raises, the file is a bad image
        return None, f"{type(e).__name__}: {e}"[:300]


def _decode_images(paths, filesystem: pafs.FileSystem, preset: ImagePreset, center_crop: bool) -> list:
    """Decoded images, None where a file is not a decodable image (counted by the caller)."""
    return [decode_or_reason(read_file(filesystem, p), preset, center_crop)[0] for p in paths]


def _decode_batch(batch: dict, *, filesystem: pafs.FileSystem, preset: ImagePreset, center_crop: bool) -> dict:
    """Read + decode, dropping undecodable files in the same pass (the decoded copy is never
    copied again to filter it)."""
    images = _decode_images(batch["path"], filesystem, preset, center_crop)
    keep = np.array([im is not None for im in images], dtype=bool)
    good = [im for im in images if im is not None]
    if good and len({im.shape for im in good}) == 1:
        image = np.stack(good)  # eval crops: one fixed-shape tensor column
    else:
        image = np.empty(len(good), dtype=object)
        image[:] = good
    return {"image": image, "label": np.asarray(batch["label"])[keep]}


def _undecodable_paths(batch: dict, *, filesystem: pafs.FileSystem, preset: ImagePreset) -> dict:
    """'path (reason)' of every bad image in the batch."""
    found = [(p, decode_or_reason(read_file(filesystem, p), preset, False)[1]) for p in batch["path"]]
    return {"path": np.array([f"{p} ({why})" for p, why in found if why], dtype=object)}


AUGMENT_SEED = "augment_seed"


def _augment_batch(batch: dict, *, preset: ImagePreset) -> dict:
    # Each row's crop and flip come from its own seed column, which Ray Data redraws on every
    # pass (epoch) from the run's seed: reproducible per row whatever task or batch it lands in.
    rngs = [np.random.default_rng(int(u * 2**53)) for u in batch[AUGMENT_SEED]]
    return {"image": np.stack([preset.train(img, rng) for img, rng in zip(batch["image"], rngs, strict=True)]),
            "label": batch["label"]}


def _epoch_seed(seed: int) -> ray.data.RandomSeedConfig:
    """A seed Ray Data combines with the execution count: the same sequence of per-epoch draws on
    every run with this seed, a different draw every epoch."""
    return ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True)


@dataclass
class DecodedSplit:
    """A split decoded once and held in Ray's object store, or (items set) a lazy read + decode
    that streams on every pass: bounded memory for datasets larger than the object store."""

    dataset: ray.data.Dataset  # columns: image (uint8 HWC), label
    num_images: int
    bad_files: list[str]  # 'path (reason)'
    items: list | None = None  # streaming only: the (path, label) list, for exact per-rank shards
    decode_args: tuple = ()  # streaming only: (filesystem, preset, center_crop, task_cpus) to rebuild a shard

    @property
    def streaming(self) -> bool:
        return self.items is not None


def _items_dataset(items: list) -> ray.data.Dataset:
    return ray.data.from_items([{"path": p, "label": y} for p, y in items],
                               override_num_blocks=max(1, min(len(items) // ROWS_PER_BLOCK + 1, 4096)))


def _decoded(items: list, fs, preset: ImagePreset, center_crop: bool, task_cpus: float = 1.0,
             randomize_seed: int | None = None) -> ray.data.Dataset:
    ds = _items_dataset(items)
    if randomize_seed is not None:
        ds = ds.randomize_block_order(seed=_epoch_seed(randomize_seed))
    return ds.map_batches(_decode_batch, batch_size=ROWS_PER_BLOCK, batch_format="numpy", num_cpus=task_cpus,
                          fn_kwargs={"filesystem": fs, "preset": preset, "center_crop": center_crop})


def keeps_decoded_copy(mode: str, need: int, object_store: float) -> bool:
    """data.cache_decoded: whether the splits are decoded once and kept (need: their decoded bytes),
    or streamed. auto keeps them when they fill at most half the object store."""
    return mode == "always" or (mode == "auto" and need <= object_store / 2)


def decoded_bytes(num_images: int, preset: ImagePreset, center_crop: bool) -> int:
    """Estimated object-store size of a decoded split (4:3 images, shorter side resize_size)."""
    side = preset.eval_size ** 2 if center_crop else preset.resize_size ** 2 * 4 // 3
    return num_images * side * 3


def _split_items(index: ImageFolderIndex, split: str, shuffle_seed: int | None) -> list:
    items = list(index.files[split])
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(items)
    if not items:
        raise DatasetError(f"{index.root}: no images under {split}/")
    return items


def stream_split(index: ImageFolderIndex, split: str, preset: ImagePreset, *, center_crop: bool,
                 shuffle_seed: int | None = None, task_cpus: float = 1.0) -> DecodedSplit:
    """The lazy variant of decode_split: files are read and decoded on every pass; undecodable
    files are dropped as they come (their count is not known before the first pass)."""
    items = _split_items(index, split, shuffle_seed)
    fs, _ = storage.resolve(index.root)
    return DecodedSplit(_decoded(items, fs, preset, center_crop, task_cpus), len(items), [], items=items,
                        decode_args=(fs, preset, center_crop, task_cpus))


def decode_split(index: ImageFolderIndex, split: str, preset: ImagePreset, *, center_crop: bool,
                 max_bad_fraction: float, shuffle_seed: int | None = None) -> DecodedSplit:
    """Read and decode every image of a split once; count and drop the undecodable ones.

    shuffle_seed: shuffle the file list first, so every block mixes classes (the files
    are sorted by class, and per-epoch shuffling only reorders blocks and rows nearby)."""
    items = _split_items(index, split, shuffle_seed)
    fs, _ = storage.resolve(index.root)
    # Just under a CPU per task: as many tasks run, and the splits decoding side by side never see a
    # cluster with no CPU left (Ray Data warns then that the job "will hang").
    good = _decoded(items, fs, preset, center_crop, task_cpus=0.95).materialize()
    n_bad = len(items) - good.count()  # count() of a materialized dataset reads only block metadata
    bad_files: list[str] = []
    if n_bad:
        # Rare, so found by a second look at the files rather than carried through the decoded copy.
        bad_files = sorted(r["path"] for r in _items_dataset(items).map_batches(
            _undecodable_paths, batch_size=ROWS_PER_BLOCK, batch_format="numpy",
            fn_kwargs={"filesystem": fs, "preset": preset}).take_all())
        if n_bad / len(items) > max_bad_fraction:
            raise DatasetError(
                f"{index.root}: {n_bad} of {len(items)} {split} images cannot be decoded "
                f"({n_bad / len(items):.1%} > data.max_bad_fraction {max_bad_fraction:.1%}); "
                f"first: {bad_files[:3]}")
    return DecodedSplit(dataset=good, num_images=len(items) - n_bad, bad_files=bad_files)


def train_stream(decoded: DecodedSplit, preset: ImagePreset, task_cpus: float = 1.0, *,
                 seed: int) -> ray.data.Dataset:
    """The per-epoch augmentation stage over the decoded copy (lazy: re-run every epoch).

    Block order and every row's crop and flip are redrawn each epoch from seed; the training
    loop's local shuffle buffer mixes rows across blocks. task_cpus below 1 lets crop/flip tasks
    fit beside training workers that hold most CPUs."""
    if decoded.streaming:
        # Randomize the blocks of file paths, not of decoded images: randomize_block_order is
        # an all-to-all step that holds every input block, and here that would be the whole
        # decoded split in the object store (memory growing with the dataset).
        source = _decoded(decoded.items, *decoded.decode_args, randomize_seed=seed)
    else:
        source = decoded.dataset.randomize_block_order(seed=_epoch_seed(seed))
    source = source.with_column(AUGMENT_SEED, random_column(seed=seed, reseed_after_execution=True), num_cpus=task_cpus)
    return source.map_batches(_augment_batch, batch_size=32, batch_format="numpy", num_cpus=task_cpus,
                              fn_kwargs={"preset": preset})


def split_for_ranks(decoded: DecodedSplit, world_size: int) -> list[ray.data.Dataset]:
    """Exact, disjoint shards for evaluation: each image counted once.

    Ray Train's own split uses equal=True, which may drop rows to balance them;
    that is right for training (DDP needs equal steps) but wrong for metrics."""
    n = decoded.num_images
    cuts = [n * r // world_size for r in range(1, world_size)]
    if not cuts:
        return [decoded.dataset]
    if decoded.streaming:  # split the file list, not the (not yet decoded) rows
        bounds = [0, *cuts, n]
        return [_decoded(decoded.items[a:b], *decoded.decode_args) for a, b in zip(bounds, bounds[1:], strict=False)]
    return list(decoded.dataset.split_at_indices(cuts))


def undecodable_this_epoch(streamed_files: dict[str, int], metrics: dict, world: int) -> dict[str, int]:
    """Per streamed split, the files that gave no image this epoch (none when the splits were
    decoded once: those were counted and checked on the driver). Exact for the evaluation splits,
    whose shards are exact; a lower bound for train, whose equal split may also drop up to
    world - 1 good rows to balance the ranks."""
    return {split: max(0, n - metrics[f"{split}_images"] - (world - 1 if split == "train" else 0))
            for split, n in streamed_files.items() if f"{split}_images" in metrics}


def too_many_undecodable(bad: dict[str, int], files: dict[str, int], limit: float, epoch: int) -> str:
    """The data error that stops a streamed run, or "": a split whose undecodable share this
    epoch (of its files) is over limit (data.max_bad_fraction)."""
    over = [f"{bad[s]} of {files[s]} {s} images could not be decoded in epoch {epoch} "
            f"({bad[s] / files[s]:.1%} > data.max_bad_fraction {limit:.1%})" for s in bad if bad[s] / files[s] > limit]
    return "; ".join(over) + "; `finetune data check` names them" if over else ""
