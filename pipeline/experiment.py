"""`finetune experiment`: the seed's claims measured on one dataset, in one table.

Rows (every trained row once per seed; a model's test accuracy is read at its LAST epoch,
so nothing is selected on test):
  zero_shot       the source classifier itself, through the matched categories; no training
  linear_probe    every backbone stage frozen, only the new head trains
  finetune        the recipe: backbone at lr, new Xavier head at lr x head_lr_mult
  finetune_reuse  the same, with matched classes' head rows starting from the source classifier
  finetune_tuned  finetune_reuse with experiment.tuned_recipe applied, and lr, freeze depth (and the
                  crop scale, WiSE-FT alpha and eval crop, when tune.crop_min_scales / tune.wise_alphas /
                  tune.eval_crop_sizes list some) from a Tune search on a validation split
  scratch         the same network from random init, one parameter group, the scratch lr
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from pipeline import plots, storage
from pipeline.archs import ARCHS
from pipeline.config import Config, with_changes
from pipeline.redact import redact_tree
from pipeline.runner import (
    Prepared,
    begin,
    fit_in_view,
    prepare,
    run_name,
    with_eval_crop,
    with_light_cpu_claim,
    with_probe_head,
)
from pipeline.selection import accuracy_standard_error
from pipeline.zeroshot import zero_shot_accuracy

ROW_TITLES = {
    "zero_shot": "zero-shot (source classifier)",
    "linear_probe": "linear probe (backbone frozen)",
    "finetune": "fine-tune, seed recipe",
    "finetune_reuse": "fine-tune + classifier reuse",
    "finetune_tuned": "fine-tune, Tune-selected lr + freeze depth",
    "scratch": "from scratch, seed recipe",
}


# ---------------------------------------------------------------- rows

def row_config(cfg: Config, row: str, seed: int, tuned: dict | None = None) -> Config:
    """The base config changed only where the row says so."""
    c = Config.from_dict(cfg.to_dict())
    c.optim.seed = seed
    c.run.name = ""
    c.model.reuse_classifier = row in ("finetune_reuse", "finetune_tuned")
    c.model.probe_init = c.model.probe_init and row == "finetune_tuned"
    if row == "linear_probe":
        c.model.freeze_depth = len(ARCHS[c.model.arch].stages)
    elif row == "finetune_tuned":
        c = with_changes(c, cfg.experiment.tuned_recipe)
        if tuned is not None:  # None: the config its search starts from
            c.optim.lr, c.model.freeze_depth = tuned["lr"], tuned["freeze_depth"]
            c.optim.head_lr_mult, c.data.crop_min_scale = tuned["head_lr_mult"], tuned["crop_min_scale"]
            c.data.eval_crop_size, c.model.wise_alpha = tuned["eval_crop_size"], tuned["wise_alpha"]
    elif row == "scratch":
        c.model.weights, c.model.freeze_bn, c.model.freeze_depth = "none", False, 0
        c.optim.lr = c.optim.head_lr_mult = None  # the scratch defaults: one group at the scratch lr
    return c


def _summarize(runs: list[dict]) -> dict:
    finals = np.array([r["test_acc"] for r in runs])
    first = np.array([r["curve"][0] for r in runs])
    # Every seed is scored on the same test images, so averaging seeds does not shrink the test
    # set's standard error: the std over seeds is training noise only.
    return {"test_acc_mean": float(finals.mean()), "test_acc_std": float(finals.std()),
            "test_acc_se": accuracy_standard_error(float(finals.mean()), runs[0]["test_images"]),
            "epoch1_acc_mean": float(first.mean()), "epoch1_acc_std": float(first.std()),
            "wall_s_mean": float(np.mean([r["wall_s"] for r in runs]))}


def _train_row(cfg: Config, prep: Prepared, name: str, exp_path: str, fs) -> dict:
    t0 = time.perf_counter()
    result = fit_in_view(cfg, prep, name=name, storage_path=exp_path, fs=fs)
    history = result.return_value
    curve = [h["test_acc"] for h in history]
    return {"seed": cfg.optim.seed, "test_acc": curve[-1], "curve": curve,
            "test_images": history[-1]["test_images"], "wall_s": time.perf_counter() - t0, "lr": cfg.lr,
            "head_lr_mult": cfg.head_lr_mult, "freeze_depth": cfg.model.freeze_depth,
            "checkpoint": storage.s3_uri(cfg.run.storage, result.checkpoint.path) if result.checkpoint else None}


def _tuned_search(cfg: Config, seed: int, exp_dir: str) -> tuple[dict, dict, Config]:
    """The tuned row's search (test unread), in <experiment>/tune: (what it picked, the row's extra
    fields, the search's config)."""
    from pipeline.search import run_search

    search_cfg = with_changes(row_config(cfg, "finetune_tuned", seed),
                              {"run": {"storage": exp_dir, "name": "tune"}, "tune": {"retrain": False}})
    summary = run_search(search_cfg, test_once=False)
    best = summary["best"]
    tuned = {k: best[k] for k in ("lr", "freeze_depth", "head_lr_mult", "crop_min_scale", "eval_crop_size",
                                  "wise_alpha")}
    # The pick's validation scores (the loss and accuracy it was chosen on), each as search_<name>.
    extra = {"tuned": tuned, "recipe": cfg.experiment.tuned_recipe, "search_metric": summary["metric"],
             "search_wall_s": summary["wall_time_s"], "search_wise_alpha_margin": best["wise_alpha_margin"],
             **{f"search_{k}": best[k] for k in ("trial", "best_scoring_trial", "trial_margin",
                                                  "weight_distance")},
             **{f"search_{m}{by}": best[f"{m}{by}"] for m in ("val_acc", "val_loss")
                for by in ("", "_by_eval_crop", "_by_wise_alpha")}}
    eval_crop = tuned["eval_crop_size"] or search_cfg.data.image_size
    print(f"finetune_tuned: Tune selected lr {tuned['lr']:.3g}, freeze depth {tuned['freeze_depth']}, "
          f"crop scale {tuned['crop_min_scale']:g}-1, eval crop {eval_crop}, "
          f"WiSE alpha {tuned['wise_alpha']:g} "
          f"(val acc {best['val_acc']:.3f}, loss {best['val_loss']:.3f}, epoch "
          f"{best['epoch']}); training it on the full train split", flush=True)
    return tuned, extra, search_cfg


def run_experiment(cfg: Config) -> dict:
    t_start = time.perf_counter()
    name = cfg.run.name or run_name(cfg).replace(cfg.model.arch, f"experiment-{cfg.model.arch}", 1)
    exp_dir = storage.join(cfg.run.storage, name)
    rows = [r.strip() for r in cfg.experiment.rows.split(",")]
    seeds = list(range(cfg.experiment.seeds))
    cfg = begin(cfg, ())
    print(f"experiment: {exp_dir}\nrows: {', '.join(rows)} | seeds {seeds}", flush=True)
    prep = with_light_cpu_claim(prepare(cfg), cfg)  # rows and the search's trials run back to back
    fs, path = storage.resolve(cfg.run.storage)
    exp_path = f"{path}/{name}"
    results: dict = {"experiment": exp_dir, "dataset": cfg.data.path, "arch": cfg.model.arch,
                     "weights": cfg.model.weights, "seeds": seeds, "classes": prep.classes,
                     "reuse_rows": {prep.classes[t]: s for t, s in prep.reuse_rows.items()},
                     "config": cfg.to_dict(), "rows": {}}
    zero = zero_shot_accuracy(prep, cfg.model.arch, mirror=cfg.data.eval_flip)
    if zero:
        print(f"zero-shot baseline (source classifier, no training): test acc {zero['test_acc']:.3f} "
              f"on {zero['test_images']} images", flush=True)
    elif "zero_shot" in rows:
        print("zero-shot: not available (needs pretrained weights whose categories match all classes "
              "but at most one)", flush=True)
    for row in rows:
        t_row = time.perf_counter()
        if row == "zero_shot":
            if zero:
                results["rows"][row] = {"runs": [], "test_acc_mean": zero["test_acc"], "test_acc_std": 0.0,
                                        "test_acc_se": accuracy_standard_error(zero["test_acc"], zero["test_images"]),
                                        "wall_s_mean": 0.0, "note": "deterministic: one evaluation"}
            continue
        tuned, extra, search_cfg = (_tuned_search(cfg, seeds[0], exp_dir) if row == "finetune_tuned"
                                    else (None, {}, None))
        row_prep = dataclasses.replace(prep, source_ref=None) if row == "scratch" else prep
        if tuned:
            row_prep = with_eval_crop(prep, search_cfg, tuned["eval_crop_size"], splits=("test",))
        runs = []
        for seed in seeds:
            c = row_config(cfg, row, seed, tuned)
            row_prep = with_probe_head(row_prep, c)  # fitted for the first seed, shared by the others
            if c.model.probe_init:
                extra["probe_head"] = {k: row_prep.probe_head[k] for k in ("penalty", "cv_loss")}
            r = _train_row(c, row_prep, f"{row}-seed{seed}", exp_path, fs)
            runs.append(r)
            print(f"[{row} seed {seed}] test acc {r['test_acc']:.3f} (epoch 1: {r['curve'][0]:.3f}) "
                  f"in {r['wall_s']:.0f} s", flush=True)
        results["rows"][row] = {"runs": runs, **_summarize(runs), **extra, "row_wall_s": time.perf_counter() - t_row}
    results["zero_shot"] = zero
    results["wall_time_s"] = time.perf_counter() - t_start
    table = format_table(results)
    storage.write_bytes(storage.join(exp_dir, "results.json"), json.dumps(redact_tree(results), indent=1).encode())
    storage.write_bytes(storage.join(exp_dir, "results.md"), (table + "\n").encode())
    storage.write_bytes(storage.join(exp_dir, "curves.png"), plots.experiment_curves(
        {ROW_TITLES[k]: [r["curve"] for r in v["runs"]] for k, v in results["rows"].items() if v["runs"]},
        zero["test_acc"] if zero else None, title=f"{cfg.model.arch} on {os.path.basename(cfg.data.path.rstrip('/'))}"))
    print(table, flush=True)
    print(f"results: {storage.join(exp_dir, 'results.md')} (+ results.json, curves.png)\n"
          f"wall time {results['wall_time_s']:.0f} s", flush=True)
    return results


def _flat(changes: dict, prefix: str = "") -> list[tuple[str, object]]:
    """{optim: {epochs: 15}} -> [("optim.epochs", 15)]."""
    out = []
    for k, v in changes.items():
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return out


def format_table(results: dict) -> str:
    """The markdown table: final-epoch test accuracy, mean +- std over seeds, and the test set's
    standard error (results without one, saved before it was reported, show "-")."""
    zero = (results.get("zero_shot") or {}).get("test_acc")
    lines = ["| row | test acc (last epoch), mean ± std | test-set SE | per seed | acc after epoch 1 "
             "| wall time per run | beats zero-shot |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in results["rows"].items():
        title = ROW_TITLES[key]
        se = f"{r['test_acc_se']:.3f}" if "test_acc_se" in r else "-"
        if not r["runs"]:
            lines.append(f"| {title} | {r['test_acc_mean']:.3f} | {se} | - | - | - | (baseline) |")
            continue
        seeds = ", ".join(f"{x['test_acc']:.3f}" for x in r["runs"])
        beats = f"{sum(x['test_acc'] > zero for x in r['runs'])}/{len(r['runs'])}" if zero is not None else "-"
        wall = f"{r['wall_s_mean']:.0f} s" + (f" (+ {r['search_wall_s']:.0f} s search)" if "search_wall_s" in r else "")
        if "tuned" in r:
            t = r["tuned"]
            title += f" (lr {t['lr']:.2g}, freeze {t['freeze_depth']}" + (
                f", crop scale {t['crop_min_scale']:g}" if "crop_min_scale" in t else "") + (
                f", eval crop {t['eval_crop_size']}" if t.get("eval_crop_size") else "") + (
                f", WiSE alpha {t['wise_alpha']:g}" if t.get("wise_alpha", 1) != 1 else "") + ")"
            if r.get("recipe"):
                title += "; recipe " + ", ".join(f"{k}={v}" for k, v in _flat(r["recipe"]))
        lines.append(f"| {title} | {r['test_acc_mean']:.3f} ± {r['test_acc_std']:.3f} | {se} | {seeds} | "
                     f"{r['epoch1_acc_mean']:.3f} ± {r['epoch1_acc_std']:.3f} | {wall} | {beats} |")
    return "\n".join(lines)

