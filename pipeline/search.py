"""`finetune tune`: a Ray Tune search over learning rate and freeze depth (Train V2 pattern).

Each trial is a function that builds its own TorchTrainer (data-parallel over its own workers)
and forwards the per-epoch reports to Tune through TuneReportCallback. Trials report validation
accuracy and loss on a stratified split carved from train (with tune.wise_alphas: at the WiSE-FT
alpha tune.select_tolerance chooses among them, scored every epoch); ASHA stops the weak ones on that
score; the pick (by default the last checkpoint of a trial that ran every epoch: what a retrain
reproduces; of those within tune.select_tolerance of the best, the one that moved least from the
pretrained weights) is evaluated once on the untouched test set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time

import numpy as np
import pyarrow.fs as pafs
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from pipeline import console, data, plots, runstate, storage
from pipeline.config import Config, with_changes, with_overrides
from pipeline.config.overrides import distribution, is_distribution
from pipeline.redact import redact_tree
from pipeline.runner import Prepared, fit, fit_in_view, make_trainer, prepare, with_eval_crop, with_light_cpu_claim
from pipeline.selection import pick_trial, rank_key
from pipeline.start import SEARCH_SECTIONS, begin, run_name
from pipeline.trial_table import TrialTable, format_overrides, format_trials


def search_space(cfg: Config) -> dict:
    """tune.space as Ray Tune's param_space: each trial's config is one sample of these overrides. Its
    order is the YAML's, and the seeded generator draws in that order."""
    def domain(value):
        if not is_distribution(value):
            return value
        kind, args = distribution(value)
        return tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)

    return {path: domain(value) for path, value in cfg.tune.space.items()}


def concurrency(cfg: Config, cluster: dict) -> int:
    """Trials that fit at once: whole workers per trial, never more than the cluster holds (no deadlock)."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    gpus = cluster.get("GPU", 0)
    slots = (gpus // cfg.scaling.gpus_per_worker if gpus and cfg.scaling.use_gpu != "false"
             else math.floor(cluster.get("CPU", 1) - cfg.scaling.data_cpus))
    return max(1, int(slots) // cfg.tune.workers_per_trial)


def trial_base(cfg: Config) -> Config:
    """What every trial's sample overrides: the search's config with a trial's worker count."""
    return with_changes(cfg, {"scaling": {"workers": cfg.tune.workers_per_trial}})


def _trial(params: dict, *, base: dict, prep: Prepared, fs, path: str) -> None:
    # fs comes from the driver, endpoint and keys inside: a trial may run on a node whose
    # environment knows neither. base already has the trial's worker count.
    cfg = with_overrides(Config.from_dict(base), params)
    trainer = make_trainer(cfg, prep, name=tune.get_context().get_trial_id(), storage_path=path, fs=fs,
                           in_search=True, callbacks=[TuneReportCallback()])
    fit(trainer)


def trial_summary(result: tune.Result, cfg: Config) -> dict:
    """One trial's config, its val_acc and val_loss curves, and the scores the search ranks it by:
    those at its tune.select_epoch epoch, with that epoch's WiSE-FT alpha (of tune.wise_alphas,
    the one tune.select_tolerance chose there), the score's standard error and how far the
    evaluated weights had moved from the start."""
    df = result.metrics_dataframe
    if df is not None and "epoch" in df:  # a retried trial may report an epoch its first try reported
        df = df.drop_duplicates("epoch", keep="last").sort_values("epoch")
    metric, _ = cfg.tune.objective()
    accs = df["val_acc"].tolist() if df is not None and "val_acc" in df else []
    losses = df["val_loss"].tolist() if accs else []
    alphas = df["wise_alpha"].tolist() if accs and "wise_alpha" in df else [1.0] * len(accs)
    # Trials report a standard error and a distance only when they keep their start weights (WiSE-FT
    # alphas offered, or tune.select_tolerance > 0); without them the pick is the best-ranked trial.
    errors = df[f"{metric}_se"].tolist() if accs and f"{metric}_se" in df else [None] * len(accs)
    distances = df["weight_distance"].tolist() if accs and "weight_distance" in df else [None] * len(accs)
    scores = accs if metric == "val_acc" else losses
    at = None
    if accs and cfg.tune.select_epoch == "last":
        at = len(accs) - 1
    elif accs:
        at = int(np.argmax([cfg.tune.goodness(s) for s in scores]))
    return {"trial": result.metrics.get("trial_id", result.path.rstrip("/").rsplit("/", 1)[-1]),
            "overrides": dict(result.config), "epochs": len(accs), "best_val_acc": max(accs) if accs else None,
            "selected_epoch": None if at is None else at + 1,
            "val_acc": None if at is None else accs[at], "val_loss": None if at is None else losses[at],
            "wise_alpha": 1.0 if at is None else float(alphas[at]),
            f"{metric}_se": None if at is None else errors[at],
            "weight_distance": None if at is None else distances[at],
            "val_acc_curve": accs, "val_loss_curve": losses, "stopped_early": 0 < len(accs) < cfg.optim.epochs,
            "worker_nodes": [n for n in result.metrics.get("worker_nodes", "").split(",") if n],
            "error": str(result.error) if result.error else ""}


def evaluate_checkpoint(checkpoint, dataset: ray.data.Dataset, classes: list[str], keep_wrong: int = 16,
                        wise_alpha: float | None = None) -> dict:
    """Accuracy, mean cross-entropy, confusion matrix and a few misclassified images of a checkpoint
    on a decoded split (wise_alpha: instead of the run's model.wise_alpha)."""
    from pipeline.inference import Classifier

    with checkpoint.as_directory() as d:
        return evaluate_classifier(Classifier(d, wise_alpha=wise_alpha), dataset, classes, keep_wrong)


def evaluate_classifier(clf, dataset: ray.data.Dataset, classes: list[str], keep_wrong: int = 16) -> dict:
    from pipeline.inference import Confusion

    wrong: list[tuple] = []
    conf = Confusion(len(classes))
    loss_sum = 0.0
    for batch in dataset.iter_batches(batch_size=64, batch_format="numpy"):
        probs = clf.probabilities(batch["image"])
        pred = probs.argmax(1)
        loss_sum -= float(np.log(np.maximum(probs[np.arange(len(pred)), batch["label"]], 1e-12)).sum())
        conf.add(batch["label"], pred)
        for i in np.flatnonzero(pred != batch["label"])[:max(0, keep_wrong - len(wrong))]:
            wrong.append((batch["image"][i], int(batch["label"][i]), int(pred[i])))
    return {"accuracy": conf.accuracy, "loss": loss_sum / max(conf.images, 1), "confusion": conf.counts.tolist(),
            "images": conf.images, "misclassified": wrong}


def select_eval_crop(cfg: Config, prep: Prepared, checkpoint) -> tuple[dict, int]:
    """Score a checkpoint on the validation split (at cfg's WiSE-FT alpha) at each of
    tune.eval_crop_sizes: ({"val_acc": {size: acc}, "val_loss": {size: loss}}, the best size by
    tune.select_metric, the first listed among ties). A network trained on RandomResizedCrop sees
    objects larger than a center crop shows them, and a larger test crop can make up for it (FixRes)."""
    from pipeline.inference import Classifier

    metric, _ = cfg.tune.objective()
    scores: dict = {"val_acc": {}, "val_loss": {}}
    with checkpoint.as_directory() as d:  # one download (from S3) for every size
        clf = Classifier(d, wise_alpha=cfg.model.wise_alpha)
        for size in cfg.tune.eval_crop_sizes:
            val = with_eval_crop(prep, cfg, size, splits=("val",)).splits["val"]
            r = evaluate_classifier(clf, val.dataset, prep.classes, keep_wrong=0)
            scores["val_acc"][size], scores["val_loss"][size] = r["accuracy"], r["loss"]
    by = scores[metric]
    best = max(by, key=lambda size: cfg.tune.goodness(by[size]))  # dicts keep insertion order: ties go to the first
    print(f"eval crop on val, {metric}: " + ", ".join(f"{k or cfg.data.image_size}: {v:.3f}" for k, v in by.items())
          + f" -> {best or cfg.data.image_size}", flush=True)
    return {m: {str(k): v for k, v in d.items()} for m, d in scores.items()}, best


def retrain_on_train_val(cfg: Config, prep: Prepared, exp_path: str, fs) -> dict:
    """The final model: the selected config trained on train + validation, in <experiment>/final.

    Nothing is selected on test here: the last epoch is the model, and its test accuracy is
    reported as is."""
    val_for_training = data.decode_split(prep.index, "val", prep.preset, center_crop=False,
                                         max_bad_fraction=cfg.data.max_bad_fraction, shuffle_seed=cfg.optim.seed)
    train = prep.splits["train"]
    merged = data.DecodedSplit(train.dataset.union(val_for_training.dataset).materialize(),
                               train.num_images + val_for_training.num_images, [])
    print(f"final model: the best config on train + val ({merged.num_images} images)", flush=True)
    # No validation split left: the final model is its last epoch.
    final = dataclasses.replace(prep, splits={"train": merged, "test": prep.splits["test"]})
    result = fit_in_view(cfg, final, name="final", storage_path=exp_path, fs=fs)
    last = result.return_value[-1]
    return {"train_images": merged.num_images, "epochs": last["epoch"], "test_acc": last["test_acc"],
            "test_images": last["test_images"], "checkpoint": result.checkpoint.path}


class TuneStateRecorder(tune.Callback):
    """Records the digests of Ray Tune's state files (runstate.record_tune_state) right after Tune
    saves them: Tune saves inside a controller step, before that step's callbacks run. It looks at
    the folder at most every period_s, and rehashes only when a file changed. Looking and hashing
    (on S3, a listing and a download) run on a thread of their own: Tune's controller waits for its
    callbacks, and warns of any that takes over half a second."""

    def __init__(self, fs, exp_path: str, period_s: float = 0.5):
        self.fs, self.exp_path, self.period_s = fs, exp_path, period_s
        self._last_look, self._seen, self._thread = 0.0, None, None

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with its state; a thread does not pickle
        return {**self.__dict__, "_thread": None}

    def _listing(self) -> list:
        return sorted((i.path, i.size, i.mtime_ns) for i in self.fs.get_file_info(
            pafs.FileSelector(self.exp_path, allow_not_found=True)) if i.type == pafs.FileType.File
            and i.path.rsplit("/", 1)[-1] not in runstate.OWN_FILES)

    def _record_if_changed(self) -> None:
        seen = self._listing()
        if seen != self._seen:
            runstate.record_tune_state(self.fs, self.exp_path)
            self._seen = seen

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        busy = self._thread is not None and self._thread.is_alive()
        if busy or time.monotonic() - self._last_look < self.period_s:
            return
        self._last_look = time.monotonic()
        self._thread = threading.Thread(target=self._record_if_changed, name="tune-state-recorder", daemon=True)
        self._thread.start()

    def on_experiment_end(self, trials: list, **info) -> None:
        if self._thread is not None:
            self._thread.join()
        runstate.record_tune_state(self.fs, self.exp_path)


def make_tuner(cfg: Config, prep: Prepared, name: str, n_parallel: int, fs, path: str) -> tune.Tuner:
    """The search's Tuner: restored when this experiment already has state in storage, else new."""
    metric, mode = cfg.tune.objective()
    exp_dir = storage.join(cfg.run.storage, name)
    trainable = tune.with_parameters(_trial, base=trial_base(cfg).to_dict(), prep=prep, fs=fs,
                                     path=f"{path}/{name}/trials")
    # The trial function only drives its TorchTrainer; the workers hold the CPUs (Tune refuses 0).
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    exp_path = f"{path}/{name}"
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        runstate.check_tune_resume(fs, exp_path, exp_dir, cfg.run.resume)  # before Tune unpickles anything
        print(f"resuming the search in {exp_dir}", flush=True)
        return tune.Tuner.restore(exp_path, trainable, param_space=search_space(cfg), resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=fs)
    if cfg.run.resume == "must":
        raise runstate.RunStateError(f"{exp_dir} holds no search to resume (--run.resume must)")
    tuner = tune.Tuner(
        trainable, param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, num_samples=cfg.tune.num_samples,
            # Given explicitly, the generator enforces the concurrency limit itself.
            search_alg=BasicVariantGenerator(random_state=cfg.optim.seed, max_concurrent=n_parallel),
            # Epochs, not Tune's iteration count: a retried trial's first report is a later epoch.
            scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.optim.epochs,
                                    grace_period=cfg.tune.grace_period,
                                    reduction_factor=cfg.tune.reduction_factor)),
        # A trial whose driver dies with its node is run again; its TorchTrainer, of the same name
        # and storage, resumes from that trial's latest checkpoint.
        run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
                                  callbacks=[TuneStateRecorder(fs, exp_path),
                                             TrialTable(cfg.optim.epochs, list(cfg.tune.space))]))
    runstate.record_tune_state(fs, exp_path)  # tuner.pkl is written by now
    return tuner


def say_pick(pick: dict, top: dict, metric: str, margin: float) -> None:
    print(f"pick: trial {pick['trial']} ({metric} {pick[metric]:.3f}, weights moved "
          f"{pick['weight_distance']:.3f}) over the best-scoring {top['trial']} ({top[metric]:.3f}, "
          f"moved {top['weight_distance']:.3f}): within {margin:.3f} of it, nearer the start", flush=True)


def say_wise_alpha(metrics: dict, metric: str, alpha: float) -> None:
    print(f"WiSE-FT alpha on val (the pick, epoch {metrics['epoch']}), {metric}: "
          + ", ".join(f"{k}: {v:.3f}" for k, v in metrics[f"{metric}_by_wise_alpha"].items())
          + f" -> {alpha:g} (the smallest within {metrics.get('wise_alpha_margin', 0):.3f} of the best)", flush=True)


def best_entry(best_trial: dict, pick: dict, best_cfg: Config, best_metrics: dict, top: dict,
               trial_margin: float, eval_crops: dict, test: dict, checkpoint: str) -> dict:
    """best.json's "best": the pick as the overrides that reproduce it from the search's config (the
    trial's sample, its WiSE-FT alpha and eval crop), the whole config, how it was chosen, its test score."""
    return {"trial": best_trial["trial"], "overrides": pick, "config": best_cfg.to_dict(),
            "best_scoring_trial": top["trial"], "trial_margin": trial_margin,
            "weight_distance": best_trial.get("weight_distance"),
            "val_acc_by_eval_crop": eval_crops.get("val_acc", {}),
            "val_loss_by_eval_crop": eval_crops.get("val_loss", {}),
            "val_acc_by_wise_alpha": best_metrics.get("val_acc_by_wise_alpha", {}),
            "val_loss_by_wise_alpha": best_metrics.get("val_loss_by_wise_alpha", {}),
            "wise_alpha_margin": best_metrics.get("wise_alpha_margin", 0.0),
            "val_acc": best_metrics["val_acc"], "val_loss": best_metrics.get("val_loss"),
            "epoch": best_metrics["epoch"], "test_acc": test["accuracy"], "test_images": test["images"],
            "test_confusion": test["confusion"], "checkpoint": checkpoint}


def run_search(cfg: Config, test_once: bool = True) -> dict:
    """The search; test_once=False leaves the test set unread (a caller that evaluates elsewhere)."""
    t_start = time.perf_counter()
    metric, mode = cfg.tune.objective()
    name = cfg.run.name or run_name(cfg).replace(cfg.model.arch, f"tune-{cfg.model.arch}", 1)
    exp_dir = storage.join(cfg.run.storage, name)
    cfg = begin(cfg, SEARCH_SECTIONS)
    cluster = ray.cluster_resources()
    n_parallel = concurrency(cfg, cluster)
    # Each trial gets its share of the CPUs: planning with the concurrent workers of all trials.
    sizing = with_changes(cfg, {"scaling": {"workers": cfg.tune.workers_per_trial * n_parallel}})
    prep = prepare(sizing, val_fraction=cfg.tune.val_fraction)
    prep = with_light_cpu_claim(prep, cfg)  # concurrency is capped above, by the real CPUs
    print(f"search: {name}  {cfg.tune.num_samples} trials, {n_parallel} at a time, "
          f"{cfg.tune.workers_per_trial} worker(s) each, ASHA on {metric} (grace {cfg.tune.grace_period}, "
          f"reduction {cfg.tune.reduction_factor})\nexperiment: {exp_dir}", flush=True)
    # Ray Tune copies AWS key variables into every trial's runtime env, so they leave the environment
    # for the search. The filesystem is built inside: pyarrow's AWS chain settles where it looks for
    # a key file when it is created.
    console.quiet_tune()
    with storage.keys_held_in_a_private_file():
        fs, path = storage.resolve(cfg.run.storage)
        grid = make_tuner(cfg, prep, name, n_parallel, fs, path).fit()
    exp_path = f"{path}/{name}"

    trials = sorted((trial_summary(r, cfg) for r in grid), key=lambda t: rank_key(t, cfg), reverse=True)
    best_trial, trial_margin = pick_trial(trials, cfg)
    if best_trial is not trials[0]:
        say_pick(best_trial, trials[0], metric, trial_margin)
    best_ckpt, best_metrics = picked_checkpoint(cfg, f"{exp_path}/trials/{best_trial['trial']}", fs)
    # The alpha was chosen with the checkpoint: the trial scored every alpha at every epoch.
    pick = {**best_trial["overrides"], "model.wise_alpha": float(best_metrics.get("wise_alpha", cfg.model.wise_alpha))}
    if best_metrics.get(f"{metric}_by_wise_alpha"):
        say_wise_alpha(best_metrics, metric, pick["model.wise_alpha"])
    eval_crops = {}
    if cfg.tune.eval_crop_sizes:
        eval_crops, pick["data.eval_crop_size"] = select_eval_crop(with_overrides(cfg, pick), prep, best_ckpt)
        if test_once or cfg.tune.retrain:  # test, decoded again at the chosen crop
            prep = with_eval_crop(prep, cfg, pick["data.eval_crop_size"], splits=("test",))
    best_cfg = with_overrides(trial_base(cfg), pick)
    test = (evaluate_checkpoint(best_ckpt, prep.splits["test"].dataset, prep.classes,  # the one use of test
                                wise_alpha=best_cfg.model.wise_alpha)
            if test_once else {"accuracy": None, "confusion": None, "images": 0, "misclassified": []})
    summary = {
        "experiment": exp_dir, "metric": metric, "classes": prep.classes,
        "best": best_entry(best_trial, pick, best_cfg, best_metrics, trials[0], trial_margin, eval_crops, test,
                           storage.s3_uri(cfg.run.storage, best_ckpt.path)),
        "trials": trials, "wall_time_s": time.perf_counter() - t_start,
    }
    if cfg.tune.retrain:
        summary["final"] = retrain_on_train_val(best_cfg, prep, exp_path, fs)
        summary["final"]["checkpoint"] = storage.s3_uri(cfg.run.storage, summary["final"]["checkpoint"])
        summary["wall_time_s"] = time.perf_counter() - t_start
    storage.write_bytes(storage.join(exp_dir, "best.json"), json.dumps(redact_tree(summary), indent=1).encode())
    if test["misclassified"]:
        storage.write_bytes(storage.join(exp_dir, "misclassified.png"), plots.image_grid(
            [img for img, _, _ in test["misclassified"]],
            [f"{prep.classes[y]} -> {prep.classes[p]}" for _, y, p in test["misclassified"]]))
    print_summary(summary, test_once)
    return summary


def picked_checkpoint(cfg: Config, trial_path: str, fs) -> tuple:
    """(checkpoint, its metrics) of the picked trial (its TorchTrainer run at trial_path) at the
    epoch tune.select_epoch judges it by."""
    train_run = ray.train.Result.from_path(trial_path, storage_filesystem=fs)
    if cfg.tune.select_epoch == "last":  # Ray Train keeps the latest checkpoint whatever num_to_keep says
        return train_run.checkpoint, train_run.metrics
    metric = cfg.tune.objective()[0]
    return max(train_run.best_checkpoints, key=lambda cm: cfg.tune.goodness(cm[1][metric]))


def print_summary(summary: dict, test_once: bool) -> None:
    print(format_trials(summary["trials"]), flush=True)
    b = summary["best"]
    if "final" in summary:
        f = summary["final"]
        print(f"final model (train + val, {f['train_images']} images, {f['epochs']} epochs): test acc "
              f"{f['test_acc']:.3f}\nfinal checkpoint: {f['checkpoint']}", flush=True)
    tested = (f"test acc of the picked checkpoint: {b['test_acc']:.3f} on {b['test_images']} images "
              f"(test used once, after the search)" if test_once else "test set not read")
    print(f"best trial {b['trial']}: {format_overrides(b['overrides'])}"
          f"  val acc {b['val_acc']:.3f}" + (f" loss {b['val_loss']:.3f}" if b["val_loss"] is not None else "")
          + f" (epoch {b['epoch']})\n{tested}\n"
          f"checkpoint: {b['checkpoint']}\nsummary: {storage.join(summary['experiment'], 'best.json')}\n"
          f"wall time {summary['wall_time_s']:.1f} s", flush=True)
