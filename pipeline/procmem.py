"""A command run the way a user runs it, timed from its start, with the peak memory of its whole
process tree (the driver, Ray's services, data and training workers) sampled from /proc."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time

THROUGHPUT_SAMPLE_S = 5.0  # memory sampling period while throughput is measured (see run_command)
MEMORY_SAMPLE_S = 0.5  # ... and in the runs that measure memory


def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(p))
        except (OSError, IndexError, ValueError):
            pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def proc_kb(path: str, key: str) -> int:
    """A kB field of a /proc file (status, smaps_rollup): 0 where the file or the field is missing."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Peak over time of the process tree's summed PSS (shared pages counted once) and of the
    largest shared-memory mapping (Ray's object store lives in shared memory)."""

    def __init__(self, pid: int, every: float = MEMORY_SAMPLE_S, spill_dir: str = ""):
        super().__init__(daemon=True)
        self.pid, self.every, self.stop_flag = pid, every, threading.Event()
        self.spill_dir = spill_dir
        self.peak_pss_mb = self.peak_shm_mb = self.peak_spilled_mb = 0.0

    def run(self):
        while not self.stop_flag.is_set():
            pids = process_tree(self.pid)
            pss = sum(proc_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids) / 1024
            shm = max((proc_kb(f"/proc/{p}/status", "RssShmem:") for p in pids), default=0) / 1024
            self.peak_pss_mb, self.peak_shm_mb = max(self.peak_pss_mb, pss), max(self.peak_shm_mb, shm)
            if self.spill_dir:
                self.peak_spilled_mb = max(self.peak_spilled_mb, spilled_bytes(self.spill_dir) / 2**20)
            self.stop_flag.wait(self.every)


def spilled_bytes(ray_tmpdir: str) -> int:
    """Bytes of the object-store copies Ray has spilled to disk under its temp folder (files it
    writes in a folder whose name holds "spill")."""
    total = 0
    for root, _, files in os.walk(ray_tmpdir):
        if "spill" in root:
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
    return total


def run_command(cmd: list[str], marker: str = r"epoch 1/", sample_every: float = THROUGHPUT_SAMPLE_S,
                env: dict | None = None, spill_dir: str = "") -> dict:
    """Run a command, timing it from its start; the time the marker line first appears; peak memory
    (and, given the command's Ray temp folder, the peak of what Ray spilled to disk there).

    sample_every: one PSS sample of a Ray process tree costs ~85 ms of CPU here (the kernel walks
    every mapped page, object store included): every 0.5 s that is ~8 % of a 2-core box, so only
    the runs that measure memory sample often."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sampler = MemorySampler(proc.pid, every=sample_every, spill_dir=spill_dir)
    sampler.start()
    marker_s, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if marker_s is None and re.search(marker, line):
            marker_s = time.time() - t0
    rc = proc.wait()
    sampler.stop_flag.set()
    sampler.join()
    if rc:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{''.join(lines[-40:])}")
    return {"t0": t0, "wall_s": time.time() - t0, "marker_s": marker_s, "output": "".join(lines),
            "peak_pss_mb": sampler.peak_pss_mb, "peak_shm_mb": sampler.peak_shm_mb,
            "peak_spilled_mb": sampler.peak_spilled_mb}
