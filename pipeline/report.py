"""`finetune report EXPERIMENT`: a self-contained HTML page reviewing a Tune search."""

from __future__ import annotations

import base64
import html

from pipeline import plots, storage
from pipeline.trial_table import format_trials


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _text(value) -> str:
    """A value read from best.json, as HTML text: whoever can write the storage writes this file."""
    return html.escape(str(value))


def _num(value, spec: str) -> str:
    """A number from best.json formatted, or, when the file holds something else there, its escaped text."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return format(value, spec) if ok else _text(value)


def _pick(best: dict) -> str:
    """The pick as the overrides that reproduce it, one `path = value` each."""
    return ", ".join(f"<code>{_text(k)}</code> = {_num(v, '.3g') if isinstance(v, float) else _text(v)}"
                     for k, v in best["overrides"].items())


CAPTIONS = {
    "curves": "Each line is one trial, epoch by epoch. Look for the thick line (the pick) among the best at the "
              "last epoch, and for trials that ASHA stopped (x) because they trailed.",
    "scatter": "Each disc is one trial at the first two values it sampled, coloured by its last score. Look for "
               "where the good colours cluster: that is the region worth searching more finely.",
}


def _figures(trials: list, metric: str, pick: str) -> list[str]:
    """The curves and the lr x depth map of the metric that picks, then the curves of the other one."""
    name = {"val_loss": "validation loss", "val_acc": "validation accuracy"}
    metric = metric if metric in name else "val_acc"  # best.json is storage content, not trusted to be ours
    other = "val_acc" if metric == "val_loss" else "val_loss"
    drawn = [m for m in (metric, other) if any(t.get(f"{m}_curve") for t in trials)]
    if metric not in drawn:
        return []
    paths = list(dict.fromkeys(p for t in trials for p in t.get("overrides", {})))
    scatter = ([f"<h2>Last {name[metric]} over {_text(paths[0])} and {_text(paths[1])}</h2>",
                f"<p>{CAPTIONS['scatter']}</p>",
                _img(plots.sample_scatter(trials, paths[0], paths[1], metric, pick), "samples")]
               if len(paths) >= 2 else [])
    return [f"<h2>{name[metric].capitalize()} of every trial (what the search picks on)</h2>",
            f"<p>{CAPTIONS['curves']}</p>", _img(plots.trial_curves(trials, metric, pick), "trial curves"),
            *scatter,
            *([f"<h2>{name[other].capitalize()} of every trial</h2>",
               "<p>The same trials on the other score: a pick that also leads here is a pick both scores agree on.</p>",
               _img(plots.trial_curves(trials, other, pick), "trial curves, other score")] if other in drawn else [])]


def build_report(experiment: str) -> str:
    """Write <experiment>/report.html (plots inlined, no external files) and return its location."""
    summary = storage.read_json(storage.join(experiment, "best.json"))
    trials, best, classes = summary["trials"], summary["best"], summary["classes"]
    try:
        wrong = storage.read_bytes(storage.join(experiment, "misclassified.png"))
    except (FileNotFoundError, OSError):
        wrong = b""
    tested = best.get("test_acc") is not None
    top = best.get("best_scoring_trial", best["trial"])
    sections = [
        f"<h1>Search {_text(summary['experiment'])}</h1>",
        f"<p>{len(trials)} trials selected on {_text(summary['metric'])} (stratified validation split); "
        f"wall time {_num(summary['wall_time_s'], '.0f')} s.</p>",
        f"<h2>Best trial</h2><p><b>{_text(best['trial'])}</b>: {_pick(best)}; "
        f"val acc {_num(best['val_acc'], '.3f')} (epoch {_text(best['epoch'])}); "
        + (f"<b>test acc {_num(best['test_acc'], '.3f')}</b> on {_text(best['test_images'])} images, "
           "evaluated once after the search." if tested else
           "test set not read (a search inside <code>finetune experiment</code>, whose rows report test).")
        + f"<br>checkpoint: <code>{_text(best['checkpoint'])}</code></p>",
        (f"<p>Picked over the best-scoring trial {_text(top)}: within "
         f"{_num(best['trial_margin'], '.3f')} (tune.select_tolerance standard errors) of its score, with "
         "weights nearer the pretrained network.</p>" if top != best["trial"] else ""),
        (f"<p>Final model, the best config retrained on train + validation "
         f"({_text(summary['final']['train_images'])} images): test acc "
         f"{_num(summary['final']['test_acc'], '.3f')}.</p>" if "final" in summary else ""),
        *_figures(trials, summary["metric"], best["trial"]),
        "<h2>Trials, best first</h2>",
        "<p>Every trial's sampled settings and scores, in the order the search ranks them.</p>",
        f"<pre>{html.escape(format_trials(trials))}</pre>",
    ]
    if tested:
        sections += ["<h2>Best trial on test: confusion matrix</h2>",
                     "<p>Rows are the true classes, columns the predicted ones: the off-diagonal cells are the "
                     "errors, and a lopsided pair shows which class the model gives away.</p>",
                     _img(plots.confusion(best["test_confusion"], classes, "test set"), "confusion matrix"),
                     "<h2>Misclassified test images (true -> predicted)</h2>",
                     "<p>What the errors look like: small, cluttered or ambiguous photos point at the data, "
                     "clear ones at the model.</p>",
                     _img(wrong, "misclassified") if wrong
                     else "<p>None: every test image was classified correctly.</p>"]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>ray-finetune search report</title>"
            "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}img{max-width:100%}</style>"
            "</head><body>" + "\n".join(sections) + "</body></html>")
    out = storage.join(experiment, "report.html")
    storage.write_bytes(out, page.encode())
    return out
