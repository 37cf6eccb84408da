"""Tune job: `python jobs/tune.py --config configs/tune.yaml [overrides]`, locally or via `ray job submit`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working_dir root

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
