"""Stage-data job: `python jobs/stage_data.py SRC s3://bucket/prefix`, locally or via `ray job submit`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working_dir root

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["data", "stage", *sys.argv[1:]]))
