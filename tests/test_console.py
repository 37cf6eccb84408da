"""What a user sees: `finetune train` on a terminal (a real pseudo-terminal) shows the start-up block,
a live progress bar per epoch phase with images/s and ETA, one line per epoch and the summary, and
none of Ray's own log lines; off a terminal, the same lines without the bars."""

import os
import pty
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time

from pipeline.bench import startup_stages
from tests.conftest import REPO

# What Ray prints in a healthy run when its logs reach the console.
RAY_NOISE = ("Reporting training result", "will hang", "Progress bars disabled", "registers for logging",
             "execution finished", "Token authentication", "pid=")


def run_on_terminal(args: list[str], env: dict, timeout: float = 600) -> str:
    """args run with stdout and stderr on a pseudo-terminal; everything it wrote. Read until the
    process exits (the processes it started, Ray's, may hold the terminal open after it)."""
    main, child = pty.openpty()
    proc = subprocess.Popen(args, stdin=child, stdout=child, stderr=child, cwd=REPO, env=env)
    os.close(child)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = proc.poll() is not None
        ready, _, _ = select.select([main], [], [], 0.2)
        try:
            chunk = os.read(main, 65536) if ready else b""
        except OSError:  # the terminal closed
            break
        chunks.append(chunk)
        if exited and not chunk:
            break
    else:
        proc.kill()
    proc.wait(timeout=60)
    os.close(main)
    out = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    return out


def test_train_on_a_terminal_shows_progress_and_no_ray_logs(tiny_dataset, source_weights, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_FINETUNE_LOG")}
    # A local Ray of its own, as the quick start has (short: Ray's socket paths must fit 107 bytes).
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    out = run_on_terminal([sys.executable, "-m", "pipeline.cli", "train", "--data", tiny_dataset, "--weights",
                           source_weights, "--freeze-bn", "--epochs", "2", "--batch-size", "16", "--data.image_size",
                           "48", "--data.resize_size", "56", "--storage", str(tmp_path / "runs"), "--name", "tty"],
                          env)
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    # The test session's own Ray runs beside this one. With two Rays on a machine, Ray Train's
    # placement-group cleaner cannot tell which is its own (it scans the machine's processes) and
    # prints a traceback: an artifact of the test machine, not of a user's.
    out = "\n".join(line for line in out.split("\n") if "(PlacementGroupCleaner pid=" not in line)
    lines = [line.rsplit("\r", 1)[-1] for line in out.replace("\r\n", "\n").split("\n")]  # as the terminal shows
    assert not [n for n in RAY_NOISE if n in out], out[-4000:]
    assert "cluster: " in out and "data: 2 classes" in out and "run folder: " in out
    # Where the start-up went, every stage of it (the command line began Ray while importing the job).
    assert list(startup_stages(out)) == ["Ray + imports", "data decoded", "trainer started", "worker up", "model built",
                                         "first batch", "first step"], out[-3000:]
    # One line per epoch, from the driver (not one per rank, no Ray prefix).
    assert [sum(line.startswith(f"epoch {e}/2  loss") for line in lines) for e in (1, 2)] == [1, 1], out[-3000:]
    # The live bars: redrawn in place (carriage returns), train and test phases, rate and time left.
    bars = re.findall(r"\repoch (\d)/2 (train|test) +\[[#.]+\] +\d+/\d+ images +[\d.]+ img/s +ETA \d+:\d\d", out)
    assert {phase for _, phase in bars} == {"train", "test"}, out[-3000:]
