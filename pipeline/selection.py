"""Every rule that chooses: a run's model among its epochs, a search's pick among its trials, a
trial's WiSE-FT alpha among those it scored. Test never chooses; the scores here are validation's."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.config import Config

# A run's model, when it has a validation split (data.val_fraction): its epoch with the lowest val_loss.
SELECT_ON = ("val_loss", "min")


def chosen_metrics(rows: list[dict]) -> dict:
    """The run's model among its epochs' (or its kept checkpoints') metrics: with a validation split,
    the lowest val_loss (the later epoch on a tie); without, the last epoch. Test never chooses: it is
    the number reported for whichever model this picks."""
    with_val = [r for r in rows if r.get("val_loss") is not None]
    if with_val:
        return min(with_val, key=lambda r: (r["val_loss"], -r["epoch"]))
    return max(rows, key=lambda r: r["epoch"])


def chosen_checkpoint(result):
    """The checkpoint of the run's model (chosen_metrics over the kept ones), or None."""
    pairs = result.best_checkpoints or []
    if not pairs:
        return result.checkpoint
    pick = chosen_metrics([m for _, m in pairs])
    return next(c for c, m in pairs if m is pick)


def standard_error(mean: float, mean_of_squares: float, n: float) -> float:
    """The standard error of a mean of n per-image values, from their mean and mean square."""
    return float(np.sqrt(max(mean_of_squares - mean * mean, 0.0) / max(n, 1)))


def accuracy_standard_error(acc: float, images: float) -> float:
    """The standard error of an accuracy measured on `images` images: sqrt(p(1 - p)/n), the
    per-image score being 0 or 1 (so its mean square is its mean)."""
    return standard_error(acc, acc, images)


def chosen_wise_alpha(alphas: list, scores: list, errors: list, goodness, tolerance: float) -> tuple[int, float]:
    """(index, margin): the smallest alpha, the one nearest the start weights, whose score is within
    margin = tolerance x the best score's standard error of the best.
    The one-standard-error rule: on a validation split of a hundred images, alphas that close are
    not told apart, and the model nearer the pretrained one is the more regularized choice."""
    best = int(np.argmax([goodness(s) for s in scores]))
    margin = tolerance * errors[best]
    close = [i for i, s in enumerate(scores) if goodness(s) >= goodness(scores[best]) - margin]
    return min(close, key=lambda i: (alphas[i], i)), float(margin)


@dataclass(frozen=True)
class AlphaRule:
    """How a search trial's workers choose its WiSE-FT alpha each epoch: built by the driver from
    tune.wise_alphas, tune.select_metric and tune.select_tolerance; the workers only apply it."""

    alphas: tuple[float, ...]
    metric: str  # 'loss' or 'accuracy'
    tolerance: float

    def choose(self, accs: list, losses: list, acc_errors: list, loss_errors: list) -> tuple[int, float]:
        """(index, margin) by chosen_wise_alpha on this rule's metric."""
        if self.metric == "loss":
            return chosen_wise_alpha(self.alphas, losses, loss_errors, lambda s: -s, self.tolerance)
        return chosen_wise_alpha(self.alphas, accs, acc_errors, lambda s: s, self.tolerance)


def alpha_rule(cfg: Config) -> AlphaRule | None:
    """The rule a search trial of cfg applies, or None when the search offers no alphas."""
    t = cfg.tune
    return AlphaRule(tuple(t.wise_alphas), t.select_metric, t.select_tolerance) if t.wise_alphas else None


def rank_key(trial: dict, cfg: Config) -> tuple:
    """Higher is better. Judged by its last epoch, a trial that ASHA stopped early is no rival to one
    that ran every epoch: its last score is of a model trained for fewer epochs than the pick will be."""
    ran_every_epoch = trial["epochs"] == cfg.optim.epochs or cfg.tune.select_epoch == "best"
    score = trial[cfg.tune.objective()[0]]
    return ran_every_epoch, -math.inf if score is None else cfg.tune.goodness(score)


def pick_trial(trials: list[dict], cfg: Config) -> tuple[dict, float]:
    """(the pick, margin) from trials ranked best first: of the trials that rank like the best
    (ran every epoch, when judged by the last) and score within margin = tune.select_tolerance x the
    best score's standard error of it, the one whose evaluated weights moved least from the start.
    The best-ranked trial where it reported no standard error or distance, or the tolerance is 0."""
    best = trials[0]
    metric = cfg.tune.objective()[0]
    error = best.get(f"{metric}_se")
    if not cfg.tune.select_tolerance or error is None or best.get("weight_distance") is None:
        return best, 0.0
    margin = cfg.tune.select_tolerance * error
    floor = cfg.tune.goodness(best[metric]) - margin
    peers = [t for t in trials if rank_key(t, cfg)[0] == rank_key(best, cfg)[0] and t[metric] is not None
             and cfg.tune.goodness(t[metric]) >= floor and t.get("weight_distance") is not None]
    return min(peers, key=lambda t: t["weight_distance"]), margin  # min keeps the first-ranked among ties
