"""Predict job, locally or via `ray job submit`:
`python jobs/predict.py CHECKPOINT IMAGES --output OUT [--format csv|parquet]`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working_dir root

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
