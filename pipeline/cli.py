"""`finetune` command line: one subcommand per job; jobs/*.py call the same functions."""

from __future__ import annotations

import argparse
import sys
import traceback

from pipeline.config import ConfigError, add_config_args, config_from_args, with_changes


def _job_config(args):
    """The validated config of a train/tune job (before any Ray work), with its data resolved."""
    from pipeline import storage
    from pipeline.fetch import fetch

    cfg = config_from_args(args)
    storage.configure_endpoint(cfg.run.s3_endpoint)
    if not cfg.data.path:  # a first run with no --data: the d2l hot dog set
        cfg = with_changes(cfg, {"data": {"path": fetch("hotdog")}})
    return cfg


def _begun(args, sections: tuple[str, ...], module: str):
    """The job's config, begun (start.begin) while its module imports: the job's own begin() then
    finds it begun."""
    from pipeline import start

    return start.begin(_job_config(args), sections, preload=(module,))


def _train(args) -> int:
    from pipeline import start

    cfg = _begun(args, start.RUN_SECTIONS, "pipeline.runner")
    from pipeline.runner import run_training

    run_training(cfg)
    return 0


def _tune(args) -> int:
    from pipeline import start

    cfg = _begun(args, start.SEARCH_SECTIONS, "pipeline.search")
    from pipeline.search import run_search

    run_search(cfg)
    return 0


def _experiment(args) -> int:
    from pipeline import start

    cfg = _begun(args, start.EXPERIMENT_SECTIONS, "pipeline.experiment")
    from pipeline.experiment import run_experiment

    run_experiment(cfg)
    return 0


def _evaluate(args) -> int:
    from pipeline.predict import evaluate

    evaluate(args.checkpoint, args.data, split=args.split, output=args.output, batch_size=args.batch_size,
             actors=args.actors, small_side=args.small_side)
    return 0


def _predict(args) -> int:
    from pipeline.predict import predict

    predict(args.checkpoint, args.images, args.output, fmt=args.format, batch_size=args.batch_size,
            actors=args.actors)
    return 0


def _report(args) -> int:
    from pipeline.report import build_report

    print(f"wrote {build_report(args.experiment)}")
    return 0


def _data_fetch(args) -> int:
    from pipeline.fetch import fetch

    fetch(args.source, dest=args.dest, sha1=args.sha1, root=args.root)
    return 0


def _data_check(args) -> int:
    from pipeline.check import check_dataset, format_report

    report = check_dataset(args.path, allow_overlap=args.allow_overlap)
    print(format_report(report))
    return 0 if report.ok else 1


def _data_synth(args) -> int:
    from pipeline.synthetic import make_image_folder

    make_image_folder(args.dest, args.train_per_class, args.test_per_class, args.size)
    print(f"wrote a generated 2-class ImageFolder dataset to {args.dest}")
    return 0


def _data_shrink(args) -> int:
    from pipeline.small_photos import shrink_folder

    shrink_folder(args.src, args.dest, args.max_side, args.quality, tuple(args.splits.split(",")))
    return 0


def _data_stage(args) -> int:
    from pipeline.stage import stage

    stage(args.src, args.dest)
    return 0


def _runs(args) -> int:
    from pipeline import runs

    if args.runs_command == "list":
        # The run's model: the lowest val loss with a validation split, else the last epoch (selection.chosen_metrics).
        print(f"{'run':<32} {'epochs':>6} {'model epoch':>11} {'val loss':>8} {'test acc':>8}  state")
        for r in runs.list_runs(args.storage):
            cells = [("-" if r[k] is None else f"{r[k]:{f}}") for k, f in (("epochs", ""), ("model_epoch", ""),
                                                                          ("val_loss", ".3f"), ("test_acc", ".3f"))]
            print(f"{r['name']:<32} {cells[0]:>6} {cells[1]:>11} {cells[2]:>8} {cells[3]:>8}  {r['state']}")
    elif args.runs_command == "show":
        print(runs.show_run(args.run))
    else:
        print(f"checkpoint: {runs.download_run(args.run, args.dest, best=args.best)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a torchvision classifier on an ImageFolder dataset")
    add_config_args(train)
    train.set_defaults(func=_train)
    tune = sub.add_parser("tune", help="Ray Tune search over learning rate and freeze depth (ASHA)")
    add_config_args(tune)
    tune.set_defaults(func=_tune)
    experiment = sub.add_parser("experiment", help="the seed's comparison table: zero-shot, linear probe, "
                                "fine-tune (+ classifier reuse, + Tune), scratch; several seeds each")
    add_config_args(experiment)
    experiment.set_defaults(func=_experiment)
    for name, helptext in (("evaluate", "accuracy and confusion matrix of a checkpoint on a labelled split"),
                           ("predict", "batch inference (Ray Data) over a folder or s3:// prefix of images")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("checkpoint", help="checkpoint folder, or a run folder (the run's model); local or s3://")
        if name == "evaluate":
            p.add_argument("--data", required=True, help="ImageFolder root (local or s3://) holding SPLIT/<class>/*")
            p.add_argument("--split", default="test", help="split folder to evaluate (default: test)")
            p.add_argument("--output", default="", help="also write the result as JSON here (local or s3://)")
            p.add_argument("--small-side", type=int, default=0, metavar="PX",
                           help="also score the split's small-photo copy: each image shrunk to a longest side of "
                                "at most PX and saved as JPEG, quality 75 (e.g. 224; default: off)")
        else:
            p.add_argument("images", help="folder or s3:// prefix; every image below it is predicted")
            p.add_argument("--output", required=True, help="output folder (local or s3://) for the part files")
            p.add_argument("--format", default="", choices=["", "csv", "parquet"],
                           help="csv or parquet (default: parquet when --output ends in .parquet, else csv)")
        p.add_argument("--batch-size", type=int, default=64, help="images per inference batch (default: 64)")
        p.add_argument("--actors", type=int, default=0, help="model replicas (default: one per GPU, else 1)")
        p.add_argument("--s3-endpoint", default="", help="S3 endpoint URL (default: AWS_ENDPOINT_URL[_S3])")
        p.set_defaults(func=_evaluate if name == "evaluate" else _predict)
    for command in (train, tune, experiment, *(sub.choices[n] for n in ("evaluate", "predict"))):
        command.add_argument("--verbose", action="store_true",
                             help="Ray's own logs on the console too (also: RAY_FINETUNE_LOG=debug)")
    _add_report_commands(sub)
    _add_data_commands(sub)
    _add_runs_commands(sub)
    return parser


def _add_report_commands(sub) -> None:
    sub.add_parser("bench", add_help=False, help="measure the pipeline against a bare loop and the seed's "
                   "DataLoader in one run (`finetune bench --help`)")
    report = sub.add_parser("report", help="HTML review of a Tune search (plots, trial table, confusion, errors)")
    report.add_argument("experiment", help="the search's folder: local or s3://bucket/prefix/name")
    report.add_argument("--s3-endpoint", default="", help="S3 endpoint URL (default: AWS_ENDPOINT_URL[_S3])")
    report.set_defaults(func=_report)


def _add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write a small generated ImageFolder dataset (offline demos, tests)")
    synth.add_argument("dest")
    synth.add_argument("--train-per-class", type=int, default=100)
    synth.add_argument("--test-per-class", type=int, default=40)
    synth.add_argument("--size", type=int, default=128, help="image side in pixels")
    synth.set_defaults(func=_data_synth)
    fetch = data.add_parser("fetch", help="download and unpack a dataset archive (resumable, sha1-verified)")
    fetch.add_argument("source", help="'hotdog' (d2l's set) or an archive URL (with --sha1)")
    fetch.add_argument("--dest", default="data", help="download folder (default: data)")
    fetch.add_argument("--sha1", help="expected sha1 of the archive (required for a URL)")
    fetch.add_argument("--root", help="folder inside the archive holding train/ and test/ (default: its stem)")
    fetch.set_defaults(func=_data_fetch)
    check = data.add_parser("check", help="counts, sizes, modes, undecodable files and duplicates of a dataset")
    check.add_argument("path", help="ImageFolder root: a local folder or s3://bucket/prefix")
    check.add_argument("--allow-overlap", action="store_true", help="train/test duplicates are a warning only")
    check.set_defaults(func=_data_check)
    shrink = data.add_parser("shrink", help="write the small-photo copy of a dataset's splits (longest side at most "
                             "--max-side, JPEG): the photos `finetune evaluate --small-side` scores")
    shrink.add_argument("src", help="ImageFolder root: a local folder or s3://bucket/prefix")
    shrink.add_argument("dest", help="where the copy goes: <dest>/<split>/<class>/<name>.jpg")
    shrink.add_argument("--max-side", type=int, default=224, help="longest side in pixels (default: 224)")
    shrink.add_argument("--quality", type=int, default=75, help="JPEG quality (default: 75)")
    shrink.add_argument("--splits", default="test", help="comma-separated splits to copy (default: test)")
    shrink.set_defaults(func=_data_shrink)
    stage = data.add_parser("stage", help="upload a local ImageFolder dataset to s3:// (idempotent, verified)")
    stage.add_argument("src")
    stage.add_argument("dest", help="s3://bucket/prefix")
    stage.add_argument("--s3-endpoint", default="", help="S3 endpoint URL (default: AWS_ENDPOINT_URL[_S3])")
    stage.set_defaults(func=_data_stage)


def _add_runs_commands(sub) -> None:
    runs = sub.add_parser("runs", help="runs in a storage location").add_subparsers(dest="runs_command",
                                                                                    required=True)
    for name, helptext in (("list", "runs under STORAGE"), ("show", "per-epoch metrics and checkpoints of RUN"),
                           ("download", "copy RUN's latest (or --best) checkpoint and artifacts to DEST")):
        p = runs.add_parser(name, help=helptext)
        p.add_argument("storage" if name == "list" else "run", help="local folder or s3://bucket/prefix")
        if name == "download":
            p.add_argument("dest")
            p.add_argument("--best", action="store_true",
                           help="the run's model: lowest val loss with data.val_fraction, else the last epoch")
        p.add_argument("--s3-endpoint", default="", help="S3 endpoint URL (default: AWS_ENDPOINT_URL[_S3])")
        p.set_defaults(func=_runs)


def main(argv: list[str] | None = None) -> int:
    from pipeline import console, storage
    from pipeline.data import DatasetError
    from pipeline.fetch import FetchError
    from pipeline.redact import redact
    from pipeline.runstate import RunStateError
    from pipeline.weights import WeightsError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: argparse would not pass `--flags` through REMAINDER
        from pipeline.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    console.set_verbose(getattr(args, "verbose", False))
    try:
        if getattr(args, "s3_endpoint", ""):
            storage.configure_endpoint(args.s3_endpoint)
        return args.func(args)
    except ConfigError as e:
        print(redact(str(e)), file=sys.stderr)
        return 2
    except DatasetError as e:  # what the user can fix: one clear line, no traceback
        print(redact(f"PROBLEM: {e}" if args.func is _data_check else f"error: {e}"), file=sys.stderr)
        return 1
    except (FetchError, storage.StorageError, WeightsError, RunStateError, FileNotFoundError) as e:
        if console.verbose():
            traceback.print_exc()
        print(redact(f"error: {e}"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
