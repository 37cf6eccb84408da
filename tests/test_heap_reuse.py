"""scaling.heap_reuse: the training workers' malloc settings really stop the per-step page faults."""

import os
import subprocess
import sys

from pipeline.config import Config
from pipeline.resources import worker_malloc_env

# Like a Ray Train worker: the loop runs in a thread, and every step allocates and frees
# activations far above glibc's 32 MB mmap ceiling. Prints the page faults of steps 6-8
# (the heap's layout settles over the first steps, as in training).
STEPS = """
import resource, threading, torch
faults = []
def loop():
    for step in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        acts = [torch.ones(8, 1024, 1024) for _ in range(8)]  # 8 x 32 MiB, every page written
        del acts
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=loop)
t.start()
t.join()
print(sum(faults[5:]))
"""


def _steady_step_faults(env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True, timeout=120)
    return int(out.stdout.split()[-1])


def test_heap_reuse_is_opt_in_and_off_means_glibc_defaults():
    assert not Config().scaling.heap_reuse
    assert worker_malloc_env(False) == {}
    env = worker_malloc_env(True)
    assert env["MALLOC_ARENA_MAX"] == "1" and env["MALLOC_MMAP_MAX_"] == "0"
    assert int(env["MALLOC_TRIM_THRESHOLD_"]) >= 2**32


def test_heap_reuse_keeps_a_threads_freed_activations_mapped():
    plain = _steady_step_faults({})
    reused = _steady_step_faults(worker_malloc_env(True))
    # 256 MiB is 65,536 pages: glibc's defaults fault every one of them again at each step.
    assert plain > 3 * 60_000, plain
    assert reused < plain / 20, (reused, plain)
