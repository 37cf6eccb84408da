"""Driver side of a training run: resources, datasets, TorchTrainer, artifacts."""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from pipeline import console, data, plots, runstate, selection, start, storage
from pipeline.config import Config
from pipeline.heap import worker_malloc_env
from pipeline.model import load_source_weights, match_classes
from pipeline.resources import Resources, plan_resources, worker_count
from pipeline.start import begin, run_name
from pipeline.transforms import ImagePreset
from pipeline.worker_main import train_loop_per_worker
from pipeline.worker_spec import WorkerSpec


@dataclass
class TrainOutcome:
    run_dir: str
    history: list[dict]
    model: dict  # the metrics of the run's model (selection.chosen_metrics)
    model_checkpoint: str
    wall_s: float


def _write_artifacts(run_dir: str, history: list[dict], title: str) -> None:
    storage.write_bytes(storage.join(run_dir, "metrics.json"), json.dumps(history, indent=1).encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    storage.write_bytes(storage.join(run_dir, "metrics.csv"), buf.getvalue().encode())
    storage.write_bytes(storage.join(run_dir, "curves.png"), plots.learning_curves(history, title))


def _preview(decoded: data.DecodedSplit, preset: ImagePreset, classes: list[str], n: int) -> bytes:
    """A few training images through the same augmentation, drawn here rather than by running
    the per-epoch stream (which would cost a Ray Data execution before the first step)."""
    rng = np.random.default_rng()
    rows = decoded.dataset.take(n)
    return plots.image_grid([preset.train(r["image"], rng) for r in rows], [classes[r["label"]] for r in rows])


@dataclass
class Prepared:
    """Everything decoded and resolved once on the driver, shared by one run or by all Tune trials."""

    classes: list[str]
    preset: ImagePreset
    source: object  # SourceWeights
    source_ref: object  # its ObjectRef (None from scratch): workers fetch it from the object store
    splits: dict  # split name -> data.DecodedSplit
    skipped: int
    res: Resources
    index: data.ImageFolderIndex
    reuse_rows: dict  # target class -> source category whose classifier row it starts from
    rest_bias: dict  # the one unmatched class -> its starting bias (zeroshot.calibrate_rest_bias)
    probe_head: dict | None = None  # the linear-probe head runs with model.probe_init start from (probe.py)


def load_split(cfg: Config, index: data.ImageFolderIndex, split: str, preset: ImagePreset, res: Resources, *,
               cache: bool) -> data.DecodedSplit:
    """One split, decoded once into the object store (cache) or streamed: train keeps whole
    images for the per-epoch crops, the others are center-cropped for evaluation."""
    kwargs = {"center_crop": split != "train", "shuffle_seed": cfg.optim.seed if split == "train" else None}
    if cache:
        return data.decode_split(index, split, preset, max_bad_fraction=cfg.data.max_bad_fraction, **kwargs)
    # Decoding runs beside training here: it gets the CPU share kept for the data tasks.
    return data.stream_split(index, split, preset, task_cpus=res.data_task_cpus, **kwargs)


def prepare(cfg: Config, val_fraction: float = 0.0, index: data.ImageFolderIndex | None = None) -> Prepared:
    """Scan, load weights, decode every split once. val_fraction > 0 carves a stratified
    validation split out of train (what a search, or a run with data.val_fraction, chooses on;
    test is only reported)."""
    t0 = time.perf_counter()
    res = plan_resources(cfg, ray.cluster_resources())
    print(f"resources: {res}  workers={cfg.scaling.workers}", flush=True)
    if index is None:  # a caller that scanned already passes its index
        index = data.scan_image_folder(cfg.data.path)
    if val_fraction:
        index = data.stratified_split(index, val_fraction, seed=cfg.optim.seed)
    source = load_source_weights(cfg.model, progress=sys.stderr.isatty())
    if source.sha256 and not cfg.model.weights_sha256:
        print(f"weights sha256 {source.sha256} (pin it with --model.weights_sha256)", flush=True)
    preset = ImagePreset.from_data_config(cfg.to_dict()["data"])
    # split name -> (the index's split it reads, its preset): every split, and the small-photo copy
    # of each evaluation split when data.small_eval_side asks for them
    loads = {split: (split, preset) for split in index.files}
    if cfg.data.small_eval_side:
        small = dataclasses.replace(preset, small_side=cfg.data.small_eval_side)
        loads.update({data.small_copy_name(s): (s, small) for s in index.files if s != "train"})
    need = sum(data.decoded_bytes(len(index.files[s]), preset, s != "train") for s, _ in loads.values())
    store = ray.cluster_resources().get("object_store_memory", 0)
    cache = data.keeps_decoded_copy(cfg.data.cache_decoded, need, store)
    # All splits decode at once: one Ray Data execution per split, run side by side, so the
    # small eval split does not wait for train to finish (or the other way round).
    with ThreadPoolExecutor(len(loads)) as pool:
        futures = {name: pool.submit(load_split, cfg, index, split, p, res, cache=cache)
                   for name, (split, p) in loads.items()}
        splits = {name: f.result() for name, f in futures.items()}
    skipped = sum(len(d.bad_files) for d in splits.values())
    sizes = ", ".join(f"{k} {v.num_images}" for k, v in splits.items())
    mode = (f"decoded once, {need / 2**30:.2f} GiB cached" if cache else
            f"streamed: read + decoded every epoch ({need / 2**30:.1f} GiB would not fit half the object store)")
    print(f"data: {mode}", flush=True)
    print(f"data: {len(index.classes)} classes {index.classes}; {sizes} images; skipped {skipped} undecodable"
          f" | normalization mean={tuple(round(x, 4) for x in source.mean)}"
          f" std={tuple(round(x, 4) for x in source.std)}"
          f" | decoded in {time.perf_counter() - t0:.1f} s", flush=True)
    ref = ray.put(source) if source.state_dict is not None else None
    match = match_classes(index.classes, source.categories if source.state_dict is not None else None)
    if cfg.model.reuse_classifier and source.state_dict is not None:
        print("classifier reuse: " + (match.describe(index.classes, source.categories) if source.categories
                                      else "the weights carry no category names (see model.categories)"),
              flush=True)
    prep = Prepared(index.classes, preset, source, ref, splits, skipped, res, index, match.rows, {})
    if cfg.model.reuse_classifier and match.rows:
        from pipeline.zeroshot import calibrate_rest_bias

        prep.rest_bias = calibrate_rest_bias(prep, cfg.model.arch)
    return with_probe_head(prep, cfg)


def with_probe_head(prep: Prepared, cfg: Config) -> Prepared:
    """prep with the linear-probe head fitted on its train split, if cfg asks for one (model.probe_init)
    and prep has none fitted the same way yet: runs of one prepared dataset share it."""
    if not lacks_probe_head(prep, cfg):
        return prep
    from pipeline.probe import fit_probe_head

    return dataclasses.replace(prep, probe_head=fit_probe_head(prep, cfg.model.arch, _probe_toward_reused(prep, cfg)))


def _probe_toward_reused(prep: Prepared, cfg: Config) -> bool:
    return cfg.model.reuse_classifier and bool(prep.reuse_rows)


def lacks_probe_head(prep: Prepared, cfg: Config) -> bool:
    """Whether cfg wants a probe head that prep does not hold (none, or one fitted toward another start)."""
    return cfg.model.probe_init and (prep.probe_head is None
                                     or prep.probe_head["toward_reused"] != _probe_toward_reused(prep, cfg))


def with_eval_crop(prep: Prepared, cfg: Config, eval_crop: int, splits: tuple[str, ...] = ("val", "test")) -> Prepared:
    """prep with these evaluation splits decoded again at another center-crop size (a selection
    made after decoding: tune.eval_crop_sizes); the others, train included, are kept as they are."""
    if eval_crop == prep.preset.eval_crop:
        return prep
    preset = dataclasses.replace(prep.preset, eval_crop=eval_crop)
    small = dataclasses.replace(preset, small_side=cfg.data.small_eval_side)
    redo = {name: load_split(cfg, prep.index, name, preset, prep.res, cache=not split.streaming)
            for name, split in prep.splits.items() if name in splits}
    redo.update({data.small_copy_name(s): load_split(cfg, prep.index, s, small, prep.res, cache=not split.streaming)
                 for s in splits if (split := prep.splits.get(data.small_copy_name(s))) is not None})
    return dataclasses.replace(prep, preset=preset, splits={**prep.splits, **redo})


def with_light_cpu_claim(prep: Prepared, cfg: Config) -> Prepared:
    """On CPU-only clusters, workers claim 0.25 logical CPU each instead of their real share, for
    callers that run many TorchTrainers back to back (a search, the experiment's rows), unless
    scaling.cpus_per_worker says what a worker claims.

    A TorchTrainer's CPU claim can outlive it: its reservation with Ray Data's resource
    coordinator lasts up to 180 s after it stops, and when Tune ends a trial's actor before its
    controller has cleaned up, the placement group stays until Ray Train's PlacementGroupCleaner
    removes it (which needs the dashboard's state API). With full claims the next trainer's data
    tasks then find no CPU and wait. Threads still follow the real CPU share (res.torch_threads)."""
    if prep.res.use_gpu or cfg.scaling.cpus_per_worker is not None:  # a claim the user set is kept
        return prep
    return dataclasses.replace(prep, res=dataclasses.replace(prep.res, cpus_per_worker=0.25))


def worker_spec(cfg: Config, prep: Prepared, in_search: bool, eval_splits: tuple[str, ...], board) -> WorkerSpec:
    source = prep.source_ref if cfg.pretrained else None  # a row from scratch shares data, not weights
    reuse = cfg.model.reuse_classifier and source is not None
    # Search trials (they evaluate on val) of a search that offers tune.wise_alphas score every alpha
    # each epoch and report the chosen one, so that ASHA and the checkpoint choice judge a trial by the
    # model it would be used as; with tune.select_tolerance they also report how far their weights
    # moved from the start. Runs that need neither keep no copy of the start weights.
    rule = selection.alpha_rule(cfg) if in_search else None
    keep = (cfg.model.wise_alpha != 1 or (rule is not None and any(a != 1 for a in rule.alphas))
            or (in_search and cfg.tune.select_tolerance > 0))
    return WorkerSpec(
        config=cfg.to_dict(), classes=tuple(prep.classes), mean=tuple(prep.source.mean), std=tuple(prep.source.std),
        train_images=prep.splits["train"].num_images,
        eval_images={s: prep.splits[s].num_images for s in eval_splits},
        eval_shards={s: {n: data.split_for_ranks(prep.splits[s], n) for n in cfg.scaling.group_sizes()}
                     for s in eval_splits},
        skipped_images=prep.skipped,
        streamed_files={s: prep.splits[s].num_images for s in ("train", *eval_splits) if prep.splits[s].streaming},
        max_bad_fraction=cfg.data.max_bad_fraction, torch_threads=prep.res.torch_threads,
        alpha_rule=rule, keep_start_weights=keep,
        source=source, reuse_rows=prep.reuse_rows if reuse else None,
        rest_bias=prep.rest_bias if reuse else None, probe_head=prep.probe_head if cfg.model.probe_init else None,
        board=board)


def make_trainer(cfg: Config, prep: Prepared, *, name: str, storage_path: str, fs, in_search: bool = False,
                 callbacks=None, board=None) -> TorchTrainer:
    """A TorchTrainer for cfg over the prepared data. Every epoch it evaluates the validation split,
    if prep has one, and (outside a search trial, which never reads test) the test split; after the
    last, their small-photo copies, if prep has them. Rank 0
    posts its progress and lines to board (a console.ProgressBoard), if given."""
    if lacks_probe_head(prep, cfg):
        raise ValueError("model.probe_init: the prepared data has no probe head fitted for this config "
                         "(see with_probe_head)")
    train = prep.splits["train"]
    # The crop scale may differ per run (a Tune trial's choice), the extra augmentation per row; the decoded
    # copy depends on neither.
    augment = dataclasses.replace(prep.preset, scale=(cfg.data.crop_min_scale, 1.0),
                                  auto_augment=cfg.data.auto_augment, low_res_prob=cfg.data.low_res_prob)
    # 'val' chooses (a search reads nothing else), 'test' is reported; each with its small-photo copy
    wanted = ("val",) if in_search else ("val", "test")
    eval_splits = tuple(s for s in (*wanted, *map(data.small_copy_name, wanted)) if s in prep.splits)
    datasets = {"train": data.train_stream(train, augment, prep.res.data_task_cpus, seed=cfg.optim.seed)}
    res = prep.res
    # Checkpoints kept beside the latest: with a validation split, the best on it (a search trial's by
    # what the search scores, so that a search judging best epochs finds its pick; a run's by
    # val_loss, as selection.chosen_metrics picks); without, the latest ones. Never by test.
    score, order = ((cfg.tune.objective() if in_search else selection.SELECT_ON) if "val" in eval_splits
                    else (None, "max"))
    # Ray Train's default is the driver's options; copied here rather than through
    # DataConfig.default_ingest_options, which passes the deprecated exclude_resources along.
    ingest = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    # One worker takes every row in the seeded order, so a rerun with the same seed repeats
    # exactly. With several, rows go to whichever rank asks first: nothing to keep.
    ingest.preserve_order = cfg.scaling.workers == 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": worker_spec(cfg, prep, in_search, eval_splits, board)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=worker_count(cfg), use_gpu=res.use_gpu,
            elastic_resize_monitor_interval_s=cfg.scaling.resize_interval_s,
            resources_per_worker={"CPU": res.cpus_per_worker,
                                  **({"GPU": cfg.scaling.gpus_per_worker} if res.use_gpu else {})}),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs, callbacks=callbacks,
            # Ray sets OMP_NUM_THREADS to the whole CPUs a worker holds (1 for 1.5) before torch
            # starts, and torch.set_num_threads cannot widen OpenMP's pool after that: measured
            # here, a 2-thread worker then trains at 19 img/s instead of 52.
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(res.torch_threads),
                                             **worker_malloc_env(cfg.scaling.heap_reuse)}},
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our epoch line says it all
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                                         checkpoint_score_attribute=score,
                                                         checkpoint_score_order=order)),
    )


def fit_in_view(cfg: Config, prep: Prepared, **trainer_args) -> ray.train.Result:
    """fit(make_trainer(...)) with the run's progress drawn by this process (console.ProgressView)."""
    board = console.new_board()
    with console.ProgressView(board):
        return fit(make_trainer(cfg, prep, board=board, **trainer_args))


def fit(trainer: TorchTrainer) -> ray.train.Result:
    """trainer.fit(), with what the user can act on raised as this project's own errors: a
    streamed split with too many undecodable files (DatasetError), and a storage read that still
    failed when the worker group ran out of restarts (StorageError)."""
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        cause = storage_failure(e)
        if cause:
            raise storage.StorageError(cause) from None
        raise
    problem = (result.return_value or [{}])[-1].get("data_error")
    if problem:
        raise data.DatasetError(problem)
    return result


def storage_failure(error: BaseException) -> str:
    """The StorageError message inside a training failure (a worker's error, the Ray Data task
    error inside it, their causes), or "". A task's error reaches the driver as a RayTaskError
    whose text holds the original's last line."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        found = re.findall(r"StorageError: (cannot \S+ .+)", str(e))
        if found:
            return found[-1]
        if isinstance(e, storage.StorageError):
            return str(e)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None), *getattr(e, "worker_failures", {}).values()]
    return ""


def _train(cfg: Config, name: str, run_dir: str, index: data.ImageFolderIndex,
           clock: start.StartupClock) -> ray.train.Result:
    prep = prepare(cfg, val_fraction=cfg.data.val_fraction, index=index)
    clock.mark("data decoded")
    fs, storage_path = storage.resolve(cfg.run.storage)
    # The preview is drawn while Ray Train starts its processes, not before.
    with ThreadPoolExecutor(1) as pool:
        preview = pool.submit(_write_preview, cfg, prep, run_dir) if cfg.data.preview_images else None
        clock.mark("trainer started")
        result = fit_in_view(cfg, prep, name=name, storage_path=storage_path, fs=fs)
        if preview is not None:
            preview.result()
    return result


def _write_preview(cfg: Config, prep: Prepared, run_dir: str) -> None:
    storage.write_bytes(storage.join(run_dir, "preview.png"),
                        _preview(prep.splits["train"], prep.preset, prep.classes, cfg.data.preview_images))


WORKER_STAGES = {"worker_start_unix": "worker up", "model_ready_unix": "model built",
                 "first_batch_unix": "first batch", "first_step_unix": "first step"}


def _small_photo_line(last: dict) -> str:
    """What data.small_eval_side measured after the last epoch, per split and class ("" if nothing)."""
    parts = [f"{split} {last[f'{split}_small_acc']:.3f} (full size {last[f'{split}_acc']:.3f}; per class "
             + ", ".join(f"{c} {v:.3f}" for c, v in last[f"{split}_small_acc_by_class"].items() if v is not None) + ")"
             for split in ("val", "test") if f"{split}_small_acc" in last]
    return f"small photos, last epoch: {'; '.join(parts)}\n" if parts else ""


def run_training(cfg: Config) -> TrainOutcome:
    """The whole local or cluster run; cfg must already be validated."""
    t_start = time.perf_counter()
    name = run_name(cfg)
    run_dir = storage.join(cfg.run.storage, name)
    cfg = begin(cfg)
    index = data.scan_image_folder(cfg.data.path)
    ident = runstate.identity(cfg.to_dict(), index.classes, index.fingerprint)
    resuming = runstate.check_resume(run_dir, cfg.run.resume, ident)  # before anything is written there
    print(f"run: {run_dir}{'  (resuming)' if resuming else ''}", flush=True)
    with runstate.Lease(run_dir):
        if not resuming:
            storage.write_bytes(storage.join(run_dir, runstate.IDENTITY), json.dumps(ident, indent=1).encode())
        clock = start.StartupClock(start.COMMAND_START_UNIX)
        clock.mark("Ray + imports", start.RAY_READY_UNIX)
        result = _train(cfg, name, run_dir, index, clock)
    history = result.return_value or []
    for key, stage in WORKER_STAGES.items():  # this attempt's (a resumed run's first epochs ran before)
        clock.mark(stage, history[-1].get(key, 0.0) if history else 0.0)
    model_ckpt = selection.chosen_checkpoint(result)
    model = selection.chosen_metrics(history)
    _write_artifacts(run_dir, history, f"{cfg.model.arch} on {os.path.basename(cfg.data.path.rstrip('/'))}")
    wall = time.perf_counter() - t_start
    model_path = storage.s3_uri(cfg.run.storage, model_ckpt.path if model_ckpt else "")
    why = (f"lowest val loss {model['val_loss']:.3f} (val acc {model['val_acc']:.3f})" if "val_loss" in model
           else "the last epoch")
    print(f"model: epoch {model['epoch']}, {why}\n"
          f"test acc {model['test_acc']:.3f} on {model['test_images']} images (reported; never used to choose)"
          f"  train acc {model['train_acc']:.3f}  loss {model['train_loss']:.3f}\n{_small_photo_line(history[-1])}"
          f"checkpoint: {model_path}\n"
          f"run folder: {run_dir}  (metrics.csv, metrics.json, curves.png, preview.png)\n{clock.line()}\n"
          f"wall time {wall:.1f} s",
          flush=True)
    return TrainOutcome(run_dir, history, model, model_path, wall)
