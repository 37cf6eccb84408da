"""`finetune experiment`: the seed's claims measured on one dataset, in one table.

Every trained row (experiment_rows.ROWS) runs once per seed, and a model's test accuracy is read
at its LAST epoch, so nothing is selected on test. The tuned row's search reads validation only.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from pipeline import plots, storage
from pipeline.config import Config, with_changes, with_overrides
from pipeline.experiment_rows import ROWS
from pipeline.redact import redact_tree
from pipeline.runner import Prepared, fit_in_view, prepare, with_light_cpu_claim, with_probe_head
from pipeline.search import run_search
from pipeline.selection import accuracy_standard_error
from pipeline.start import EXPERIMENT_SECTIONS, begin, run_name
from pipeline.trial_table import format_overrides
from pipeline.zeroshot import zero_shot_accuracy


def row_overrides(cfg: Config, row: str, seed: int, pick: dict | None = None) -> dict:
    """What a row's run changes in the base config: the row's overrides, then the search's pick (a
    searched row), then the seed."""
    return {**ROWS[row].overrides(cfg), **(pick or {}), "optim.seed": seed, "run.name": ""}


def _mean_by_class(scores: list[dict]) -> dict:
    return {c: (float(np.mean([s[c] for s in scores])) if scores[0][c] is not None else None) for c in scores[0]}


def _summarize(runs: list[dict]) -> dict:
    finals = np.array([r["test_acc"] for r in runs])
    first = np.array([r["curve"][0] for r in runs])
    small = {f"{k}_mean": _mean_by_class([r[k] for r in runs])
             for k in ("test_acc_by_class", "test_small_acc_by_class") if k in runs[0]}
    if "test_small_acc" in runs[0]:
        small["test_small_acc_mean"] = float(np.mean([r["test_small_acc"] for r in runs]))
    # Every seed is scored on the same test images, so averaging seeds does not shrink the test
    # set's standard error: the std over seeds is training noise only.
    return {**small, "test_acc_mean": float(finals.mean()), "test_acc_std": float(finals.std()),
            "test_acc_se": accuracy_standard_error(float(finals.mean()), runs[0]["test_images"]),
            "epoch1_acc_mean": float(first.mean()), "epoch1_acc_std": float(first.std()),
            "wall_s_mean": float(np.mean([r["wall_s"] for r in runs]))}


def _train_row(cfg: Config, prep: Prepared, name: str, exp_path: str, fs) -> dict:
    t0 = time.perf_counter()
    result = fit_in_view(cfg, prep, name=name, storage_path=exp_path, fs=fs)
    history = result.return_value
    curve = [h["test_acc"] for h in history]
    # the last epoch's per-class accuracy and small-photo scores (data.small_eval_side), where scored
    last = {k: history[-1][k] for k in ("test_acc_by_class", "test_small_acc", "test_small_acc_by_class")
            if k in history[-1]}
    return {"seed": cfg.optim.seed, "test_acc": curve[-1], "curve": curve, **last,
            "test_images": history[-1]["test_images"], "wall_s": time.perf_counter() - t0, "lr": cfg.lr,
            "head_lr_mult": cfg.head_lr_mult, "freeze_depth": cfg.model.freeze_depth,
            "checkpoint": storage.s3_uri(cfg.run.storage, result.checkpoint.path) if result.checkpoint else None}


def _row_search(cfg: Config, row: str, seed: int, exp_dir: str) -> tuple[dict, dict]:
    """The searched row's search (test unread), in <experiment>/tune: (its pick as overrides, the
    row's extra fields)."""
    search_cfg = with_changes(with_overrides(cfg, row_overrides(cfg, row, seed)),
                              {"run": {"storage": exp_dir, "name": "tune"}, "tune": {"retrain": False}})
    summary = run_search(search_cfg, test_once=False)
    best = summary["best"]
    # The pick's validation scores (the loss and accuracy it was chosen on), each as search_<name>.
    extra = {"tuned": best["overrides"], "recipe": cfg.experiment.tuned_recipe, "search_metric": summary["metric"],
             "search_wall_s": summary["wall_time_s"], "search_wise_alpha_margin": best["wise_alpha_margin"],
             **{f"search_{k}": best[k] for k in ("trial", "best_scoring_trial", "trial_margin",
                                                  "weight_distance")},
             **{f"search_{m}{by}": best[f"{m}{by}"] for m in ("val_acc", "val_loss")
                for by in ("", "_by_eval_crop", "_by_wise_alpha")}}
    print(f"{row}: Tune selected {format_overrides(best['overrides'])} (val acc {best['val_acc']:.3f}, loss "
          f"{best['val_loss']:.3f}, epoch {best['epoch']}); training it on the full train split", flush=True)
    return best["overrides"], extra


def _zero_shot(prep: Prepared, cfg: Config, wanted: bool) -> dict | None:
    """The source classifier's test scores (and its small-photo copy's, if prepared); None without a rule."""
    zero = zero_shot_accuracy(prep, cfg.model.arch, mirror=cfg.data.eval_flip)
    if zero:
        print(f"zero-shot baseline (source classifier, no training): test acc {zero['test_acc']:.3f} "
              f"on {zero['test_images']} images", flush=True)
        if "test_small" in prep.splits:
            small = zero_shot_accuracy(prep, cfg.model.arch, split="test_small", mirror=cfg.data.eval_flip)
            zero.update({f"test_small_{k.removeprefix('test_')}": v for k, v in small.items()})
    elif wanted:
        print("zero-shot: not available (needs pretrained weights whose categories match all classes "
              "but at most one)", flush=True)
    return zero


def run_experiment(cfg: Config) -> dict:
    t_start = time.perf_counter()
    name = cfg.run.name or run_name(cfg).replace(cfg.model.arch, f"experiment-{cfg.model.arch}", 1)
    exp_dir = storage.join(cfg.run.storage, name)
    rows = [r.strip() for r in cfg.experiment.rows.split(",")]
    seeds = list(range(cfg.experiment.seeds))
    cfg = begin(with_changes(cfg, {"data": {"small_eval_side": cfg.experiment.small_photo_side}}), EXPERIMENT_SECTIONS)
    print(f"experiment: {exp_dir}\nrows: {', '.join(rows)} | seeds {seeds}", flush=True)
    prep = with_light_cpu_claim(prepare(cfg), cfg)  # rows and the search's trials run back to back
    fs, path = storage.resolve(cfg.run.storage)
    exp_path = f"{path}/{name}"
    results: dict = {"experiment": exp_dir, "dataset": cfg.data.path, "arch": cfg.model.arch,
                     "weights": cfg.model.weights, "seeds": seeds, "classes": prep.classes,
                     "reuse_rows": {prep.classes[t]: s for t, s in prep.reuse_rows.items()},
                     "config": cfg.to_dict(), "rows": {}}
    zero = _zero_shot(prep, cfg, "zero_shot" in rows)
    for row in rows:
        t_row = time.perf_counter()
        if row == "zero_shot":
            if zero:
                results["rows"][row] = {"runs": [], "test_acc_mean": zero["test_acc"], "test_acc_std": 0.0,
                                        **{f"{k}_mean": v for k, v in zero.items() if k.endswith("by_class")
                                           or k == "test_small_acc"},
                                        "test_acc_se": accuracy_standard_error(zero["test_acc"], zero["test_images"]),
                                        "wall_s_mean": 0.0, "note": "deterministic: one evaluation"}
            continue
        pick, extra = _row_search(cfg, row, seeds[0], exp_dir) if ROWS[row].searched else (None, {})
        # A searched row may change anything (its recipe, its pick): it prepares its own data.
        row_prep = (with_light_cpu_claim(prepare(with_overrides(cfg, row_overrides(cfg, row, seeds[0], pick))), cfg)
                    if pick else prep)
        runs = []
        for seed in seeds:
            c = with_overrides(cfg, row_overrides(cfg, row, seed, pick))
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
    table = "\n\n".join(t for t in (format_table(results), format_small_photo_table(results)) if t)
    storage.write_bytes(storage.join(exp_dir, "results.json"), json.dumps(redact_tree(results), indent=1).encode())
    storage.write_bytes(storage.join(exp_dir, "results.md"), (table + "\n").encode())
    storage.write_bytes(storage.join(exp_dir, "curves.png"), plots.experiment_curves(
        {ROWS[k].title: [r["curve"] for r in v["runs"]] for k, v in results["rows"].items() if v["runs"]},
        zero["test_acc"] if zero else None, title=f"{cfg.model.arch} on {os.path.basename(cfg.data.path.rstrip('/'))}"))
    print(table, flush=True)
    print(f"results: {storage.join(exp_dir, 'results.md')} (+ results.json, curves.png)\n"
          f"wall time {results['wall_time_s']:.0f} s", flush=True)
    return results


def format_table(results: dict) -> str:
    """The markdown table: final-epoch test accuracy, mean +- std over seeds, and the test set's
    standard error (results without one, saved before it was reported, show "-")."""
    zero = (results.get("zero_shot") or {}).get("test_acc")
    lines = ["| row | test acc (last epoch), mean ± std | test-set SE | per seed | acc after epoch 1 "
             "| wall time per run | beats zero-shot |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in results["rows"].items():
        title = ROWS[key].title
        se = f"{r['test_acc_se']:.3f}" if "test_acc_se" in r else "-"
        if not r["runs"]:
            lines.append(f"| {title} | {r['test_acc_mean']:.3f} | {se} | - | - | - | (baseline) |")
            continue
        seeds = ", ".join(f"{x['test_acc']:.3f}" for x in r["runs"])
        beats = f"{sum(x['test_acc'] > zero for x in r['runs'])}/{len(r['runs'])}" if zero is not None else "-"
        wall = f"{r['wall_s_mean']:.0f} s" + (f" (+ {r['search_wall_s']:.0f} s search)" if "search_wall_s" in r else "")
        if "tuned" in r:
            title += f" ({format_overrides(r['tuned'])})"
            if r.get("recipe"):
                title += f"; recipe {format_overrides(r['recipe'])}"
        lines.append(f"| {title} | {r['test_acc_mean']:.3f} ± {r['test_acc_std']:.3f} | {se} | {seeds} | "
                     f"{r['epoch1_acc_mean']:.3f} ± {r['epoch1_acc_std']:.3f} | {wall} | {beats} |")
    return "\n".join(lines)


def _by_class(scores: dict | None) -> str:
    return ", ".join(f"{c} {v:.3f}" if v is not None else f"{c} -" for c, v in (scores or {}).items()) or "-"


def format_small_photo_table(results: dict) -> str:
    """Every row's test accuracy on full-size photos and on their small-photo copies
    (experiment.small_photo_side), mean over seeds, with per-class accuracy on both; "" when the
    experiment scored no small photos."""
    rows = {k: r for k, r in results["rows"].items() if "test_small_acc_mean" in r}
    if not rows:
        return ""
    side = results["config"]["data"]["small_eval_side"]
    lines = [f"Small photos: each test image shrunk to a longest side of at most {side} px and saved as JPEG "
             "(quality 75). Per-class accuracy is the recall of each true class.", "",
             "| row | test acc | small-photo test acc | drop | per class, full size | per class, small photos |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, r in rows.items():
        full, small = r["test_acc_mean"], r["test_small_acc_mean"]
        per_class = [_by_class(r.get(f"test{s}_acc_by_class_mean")) for s in ("", "_small")]
        lines.append(f"| {ROWS[key].title} | {full:.3f} | {small:.3f} | {full - small:+.3f} | "
                     f"{per_class[0]} | {per_class[1]} |")
    return "\n".join(lines)
