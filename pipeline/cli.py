"""`finetune` command line: one subcommand per job; jobs/*.py call the same functions."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, add_config_args, config_from_args


def _train(args) -> int:
    from pipeline.data import DatasetError
    from pipeline.runner import run_training

    cfg = config_from_args(args)  # validated before any Ray work
    try:
        run_training(cfg)
    except DatasetError as e:
        print(f"dataset error: {e}", file=sys.stderr)
        return 1
    return 0


def _data_synth(args) -> int:
    from pipeline.synthetic import make_image_folder

    make_image_folder(args.dest, args.train_per_class, args.test_per_class, args.size)
    print(f"wrote a generated 2-class ImageFolder dataset to {args.dest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a torchvision classifier on an ImageFolder dataset")
    add_config_args(train)
    train.set_defaults(func=_train)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write a small generated ImageFolder dataset (offline demos, tests)")
    synth.add_argument("dest")
    synth.add_argument("--train-per-class", type=int, default=100)
    synth.add_argument("--test-per-class", type=int, default=40)
    synth.add_argument("--size", type=int, default=128, help="image side in pixels")
    synth.set_defaults(func=_data_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
