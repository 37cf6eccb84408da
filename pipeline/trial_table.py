"""The trial tables of `finetune tune`. The live one: one row per trial (its sampled values, the epoch it
reached, its latest validation scores, its state), redrawn in place on a terminal; off a terminal,
one line per trial report. Tune's controller runs in the driver, so this callback draws there."""

from __future__ import annotations

import sys
import time

from ray import tune


class TrialTable(tune.Callback):
    def __init__(self, epochs: int, paths: list[str], every_s: float = 0.5):
        """paths: the searched config paths (tune.space), a column each, headed by the field's name."""
        # No stream held: Tune pickles its callbacks into tuner.pkl.
        self.epochs, self.paths, self.every_s = epochs, paths, every_s
        self.widths = [max(9, len(p.rsplit(".", 1)[-1])) for p in paths]
        self.rows: dict[str, dict] = {}
        self._drawn_lines, self._last_draw = 0, 0.0

    @property
    def stream(self):
        return sys.stdout

    @property
    def live(self) -> bool:
        return self.stream.isatty()

    def _row(self, trial) -> dict:
        return self.rows.setdefault(trial.trial_id, {"sample": [trial.config.get(p) for p in self.paths],
                                                      "epoch": 0, "val_loss": None, "val_acc": None,
                                                      "state": "pending"})

    @property
    def header(self) -> str:
        return (f"{'trial':<18} " + "".join(f"{p.rsplit('.', 1)[-1]:>{w}} " for p, w in zip(self.paths, self.widths,
                                                                                          strict=True))
                + f"{'epoch':>7} {'val loss':>8} {'val acc':>7}  state")

    def format_row(self, trial_id: str) -> str:
        r = self.rows[trial_id]
        sample = "".join(f"{'-' if v is None else f'{v:.3g}' if isinstance(v, float) else v!s:>{w}} "
                         for v, w in zip(r["sample"], self.widths, strict=True))
        loss = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "-"
        acc = f"{r['val_acc']:.3f}" if r["val_acc"] is not None else "-"
        epoch = f"{r['epoch']}/{self.epochs}"
        return f"{trial_id:<18} {sample}{epoch:>7} {loss:>8} {acc:>7}  {r['state']}"

    def _changed(self, trial, force: bool = False) -> None:
        if not self.live:
            self.stream.write(self.format_row(trial.trial_id) + "\n")
            self.stream.flush()
            return
        if force or time.monotonic() - self._last_draw >= self.every_s:
            self._draw()

    def _draw(self) -> None:
        lines = [self.header, *(self.format_row(t) for t in self.rows)]
        # Back to the table's first line, then each line rewritten and the rest of it cleared.
        up = f"\x1b[{self._drawn_lines}F" if self._drawn_lines else ""
        self.stream.write(up + "".join(line + "\x1b[K\n" for line in lines))
        self.stream.flush()
        self._drawn_lines, self._last_draw = len(lines), time.monotonic()

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._row(trial)["state"] = "running"
        self._changed(trial, force=True)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        row = self._row(trial)
        row.update(epoch=result.get("epoch", row["epoch"]), val_loss=result.get("val_loss", row["val_loss"]),
                   val_acc=result.get("val_acc", row["val_acc"]), state="running")
        self._changed(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        row = self._row(trial)
        row["state"] = "done" if row["epoch"] >= self.epochs else "stopped early (ASHA)"
        self._changed(trial, force=True)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._row(trial)["state"] = "error"
        self._changed(trial, force=True)

    def on_experiment_end(self, trials: list, **info) -> None:
        if self.live:
            self._draw()


def format_value(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_overrides(overrides: dict) -> str:
    """{"optim.lr": 0.00028, "model.freeze_depth": 2} -> "optim.lr=0.00028, model.freeze_depth=2"."""
    return ", ".join(f"{k}={format_value(v)}" for k, v in overrides.items())


def format_trials(trials: list[dict]) -> str:
    """The trial table: a column per searched config path (headed by its field name), then the
    scores; val acc / val loss / moved (weight distance from the start) are at the epoch the search
    judged a trial by. best.json is storage content (`finetune report` formats it): a field may be missing."""
    paths = list(dict.fromkeys(p for t in trials for p in t.get("overrides", {})))
    widths = [max(9, len(p.rsplit(".", 1)[-1])) for p in paths]
    lines = [f"{'trial':<34} " + "".join(f"{p.rsplit('.', 1)[-1]:>{w}} " for p, w in zip(paths, widths, strict=True))
             + f"{'epochs':>6} {'best acc':>8} {'val acc':>7} {'loss':>6} {'alpha':>5} {'moved':>6}  status"]
    for t in trials:
        sample = t.get("overrides", {})
        best = f"{t['best_val_acc']:.3f}" if t["best_val_acc"] is not None else "-"
        acc = t.get("val_acc", t["best_val_acc"])
        acc = f"{acc:.3f}" if acc is not None else "-"
        loss = f"{t['val_loss']:.3f}" if t.get("val_loss") is not None else "-"
        alpha = t.get("wise_alpha", 1.0)
        moved = f"{t['weight_distance']:.3f}" if t.get("weight_distance") is not None else "-"
        status = "error" if t["error"] else ("stopped by ASHA" if t["stopped_early"] else "completed")
        lines.append(f"{t['trial'][:34]:<34} " + "".join(f"{format_value(sample.get(p, '-')):>{w}} "
                                                           for p, w in zip(paths, widths, strict=True))
                     + f"{t['epochs']:>6} {best:>8} {acc:>7} {loss:>6} {alpha:>5g} {moved:>6}  {status}")
    return "\n".join(lines)
