"""Evaluate job, locally or via `ray job submit`:
`python jobs/evaluate.py CHECKPOINT --data DATASET [--split test] [--output result.json]`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working_dir root

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
