"""Experiment job: `python jobs/experiment.py --config configs/experiment_seefood.yaml [overrides]`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working_dir root

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]]))
