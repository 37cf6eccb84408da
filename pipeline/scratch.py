"""Local scratch folders that do not outlive their process, even one that is killed."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile


@contextlib.contextmanager
def scratch_folder(prefix: str):
    """A fresh private folder (mode 0700) in the temp dir, removed on the way out.

    A process that is killed (a lost node, a killed driver) cannot remove its own: the folder's name
    carries its pid, and the next one made with the same prefix first removes those whose process
    is gone. What they hold (checkpoints of hundreds of MB, credentials) must not pile up."""
    for stale in glob.glob(os.path.join(tempfile.gettempdir(), f"{prefix}*")):
        pid = os.path.basename(stale)[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to remove
        return True
    return True
