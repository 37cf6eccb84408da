"""scaling.heap_reuse: the training workers' malloc settings really stop the per-step page faults,
and the heap they keep stays bounded."""

import os
import subprocess
import sys

from pipeline.config import Config
from pipeline.heap import worker_malloc_env

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


def _last_line(script: str, env: dict, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", script, *args], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True, timeout=120)
    return out.stdout.split("\n")[-2]


def _steady_step_faults(env: dict) -> int:
    return int(_last_line(STEPS, env))


def test_heap_reuse_is_the_default_and_off_means_glibc_defaults():
    assert Config().scaling.heap_reuse
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


# A heap that has kept 256 MiB more than it settled at: the next step's check gives it back.
# Prints the anonymous RSS (MiB) settled, held after the free, after the check; then the trims.
KEPT_THEN_TRIMMED = """
import torch
from pipeline.heap import HeapTrimmer, anonymous_rss_bytes
trimmer = HeapTrimmer(settle_steps=1)
trimmer.after_step()
settled = anonymous_rss_bytes()
blocks = [torch.ones(8, 1024, 1024) for _ in range(8)]
del blocks
held = anonymous_rss_bytes()
trimmer.after_step()
print(settled >> 20, held >> 20, anonymous_rss_bytes() >> 20, trimmer.trims)
"""


def test_heap_trimmer_gives_back_what_the_heap_kept_past_its_margin():
    env = {**worker_malloc_env(True), "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    settled, held, after, trims = map(int, _last_line(KEPT_THEN_TRIMMED, env).split())
    assert held - settled > 250, (settled, held)  # kept: the point of heap_reuse
    assert trims == 1 and after < settled + 32, (settled, held, after)
    # Without the heap settings (glibc's defaults) there is nothing to keep, and nothing to trim.
    assert _last_line(KEPT_THEN_TRIMMED, {}).split()[-1] == "0"
