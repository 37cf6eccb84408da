"""`finetune report EXPERIMENT`: a self-contained HTML page reviewing a Tune search."""

from __future__ import annotations

import base64
import html

from pipeline import plots, storage
from pipeline.search import format_trials


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _text(value) -> str:
    """A value read from best.json, as HTML text: whoever can write the storage writes this file."""
    return html.escape(str(value))


def _num(value, spec: str) -> str:
    """A number from best.json formatted, or, when the file holds something else there, its escaped text."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return format(value, spec) if ok else _text(value)


def _pick_details(best: dict) -> str:
    """The pick's crop scale, eval crop and WiSE-FT alpha."""
    image_size = best.get("config", {}).get("data", {}).get("image_size", "")
    parts = [f"crop scale {_num(best['crop_min_scale'], 'g')}" if "crop_min_scale" in best else "",
             f"eval crop {_text(best['eval_crop_size'] or image_size)}" if "eval_crop_size" in best else "",
             f"WiSE-FT alpha {_num(best['wise_alpha'], 'g')}" if "wise_alpha" in best else ""]
    return "".join(f", {p}" for p in parts if p)


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
        f"<h2>Best trial</h2><p><b>{_text(best['trial'])}</b>: lr {_num(best['lr'], '.3g')}, freeze depth "
        f"{_text(best['freeze_depth'])}, head x{_num(best['head_lr_mult'], 'g')}{_pick_details(best)}; "
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
        "<h2>Validation accuracy of every trial</h2>", _img(plots.trial_curves(trials), "trial curves"),
        "<h2>Final validation accuracy over learning rate and freeze depth</h2>",
        _img(plots.lr_depth_scatter(trials), "lr x freeze depth"),
        "<h2>Trials, best first</h2>", f"<pre>{html.escape(format_trials(trials))}</pre>",
    ]
    if tested:
        sections += ["<h2>Best trial on test: confusion matrix</h2>",
                     _img(plots.confusion(best["test_confusion"], classes, "test set"), "confusion matrix"),
                     "<h2>Misclassified test images (true -> predicted)</h2>",
                     _img(wrong, "misclassified") if wrong
                     else "<p>None: every test image was classified correctly.</p>"]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>ray-finetune search report</title>"
            "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}img{max-width:100%}</style>"
            "</head><body>" + "\n".join(sections) + "</body></html>")
    out = storage.join(experiment, "report.html")
    storage.write_bytes(out, page.encode())
    return out
