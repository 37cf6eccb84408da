"""`finetune report EXPERIMENT`: a self-contained HTML page reviewing a Tune search."""

from __future__ import annotations

import base64
import html
import json

from pipeline import plots, storage
from pipeline.search import format_trials


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def build_report(experiment: str) -> str:
    """Write <experiment>/report.html (plots inlined, no external files) and return its location."""
    summary = json.loads(storage.read_bytes(storage.join(experiment, "best.json")))
    trials, best, classes = summary["trials"], summary["best"], summary["classes"]
    try:
        wrong = storage.read_bytes(storage.join(experiment, "misclassified.png"))
    except (FileNotFoundError, OSError):
        wrong = b""
    sections = [
        f"<h1>Search {html.escape(summary['experiment'])}</h1>",
        f"<p>{len(trials)} trials selected on {summary['metric']} (stratified validation split); "
        f"wall time {summary['wall_time_s']:.0f} s.</p>",
        f"<h2>Best trial</h2><p><b>{html.escape(best['trial'])}</b>: lr {best['lr']:.3g}, freeze depth "
        f"{best['freeze_depth']}, head x{best['head_lr_mult']:g}; val acc {best['val_acc']:.3f} (epoch "
        f"{best['epoch']}); <b>test acc {best['test_acc']:.3f}</b> on {best['test_images']} images, "
        f"evaluated once after the search.<br>checkpoint: <code>{html.escape(best['checkpoint'])}</code></p>",
        (f"<p>Final model, the best config retrained on train + validation ({summary['final']['train_images']} "
         f"images): test acc {summary['final']['test_acc']:.3f}.</p>" if "final" in summary else ""),
        "<h2>Validation accuracy of every trial</h2>", _img(plots.trial_curves(trials), "trial curves"),
        "<h2>Final validation accuracy over learning rate and freeze depth</h2>",
        _img(plots.lr_depth_scatter(trials), "lr x freeze depth"),
        "<h2>Trials, best first</h2>", f"<pre>{html.escape(format_trials(trials))}</pre>",
        "<h2>Best trial on test: confusion matrix</h2>",
        _img(plots.confusion(best["test_confusion"], classes, "test set"), "confusion matrix"),
    ]
    sections.append("<h2>Misclassified test images (true -> predicted)</h2>")
    sections.append(_img(wrong, "misclassified") if wrong
                    else "<p>None: every test image was classified correctly.</p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>ray-finetune search report</title>"
            "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}img{max-width:100%}</style>"
            "</head><body>" + "\n".join(sections) + "</body></html>")
    out = storage.join(experiment, "report.html")
    storage.write_bytes(out, page.encode())
    return out
