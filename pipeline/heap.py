"""Training workers' glibc heap: keep each step's freed activations mapped, with a bounded footprint.

glibc hands every block above 32 MB back to the kernel when freed (mmap/munmap, whatever
mmap_threshold says), and Ray Train runs the loop in a thread whose malloc arena is a chain of
64 MB heaps, trimmed with madvise: either way each step's activations are page-faulted and
zero-filled anew, and a third of a CPU worker's time went to the kernel. One arena (the main,
brk heap), no mmap and no trimming keep them. (glibc's MALLOC_*_ variables: a GLIBC_TUNABLES
value set the same way reached the worker with only its first tunable.)

The price of keeping: glibc's aligned allocation (torch's) asks for slightly more than a freed
block of the same size, so a block that is the only one of its size is not reused and the heap
can grow by it every step. HeapTrimmer bounds that: when the worker's anonymous memory passes
its settled size by a margin, malloc_trim gives the free pages back (one slower step after it).
"""

from __future__ import annotations

import ctypes
import os

from pipeline.procmem import proc_kb

HEAP_REUSE_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**36)}

# The footprint a worker may grow to past its settled size before free pages are given back: a
# trim costs one step's page faults, so it should come rarely (every few hundred steps at the
# growth measured in the pipeline, 1-40 MB a step), yet memory stays within a quarter of the peak.
GROWTH_MARGIN = 0.25
SETTLE_STEPS = 3  # the heap's layout settles over the first steps (the optimizer's state appears at step 1)


def worker_malloc_env(heap_reuse: bool) -> dict:
    """The training workers' glibc malloc settings: read when a process starts, so they go in
    the workers' runtime env. Nothing when heap_reuse is off (glibc's defaults)."""
    return dict(HEAP_REUSE_ENV) if heap_reuse else {}


def anonymous_rss_bytes() -> int:
    """This process's resident anonymous memory (the heap, not the object store's shared pages)."""
    return proc_kb("/proc/self/status", "RssAnon:") * 1024


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (AttributeError, OSError):
        return None


class HeapTrimmer:
    """Call after_step() after each optimizer step. Active only where the heap keeps what it frees
    (the process started with HEAP_REUSE_ENV, on glibc with /proc); a no-op elsewhere."""

    def __init__(self, margin: float = GROWTH_MARGIN, settle_steps: int = SETTLE_STEPS):
        self.margin, self.settle_steps = margin, settle_steps
        self._trim = _malloc_trim() if os.environ.get("MALLOC_MMAP_MAX_") == "0" else None
        self.active = self._trim is not None and os.path.exists("/proc/self/status")
        self.steps = 0
        self.settled_bytes = 0
        self.trims = 0

    @property
    def ceiling_bytes(self) -> int:
        return int(self.settled_bytes * (1 + self.margin))

    def after_step(self) -> None:
        if not self.active:
            return
        self.steps += 1
        if self.steps < self.settle_steps:
            return
        rss = anonymous_rss_bytes()
        if self.steps == self.settle_steps:
            self.settled_bytes = rss
        elif rss > self.ceiling_bytes:
            self._trim(0)
            self.trims += 1
            # What survives a trim is in use: a footprint that really grew raises the bar rather
            # than trimming at every step.
            self.settled_bytes = max(self.settled_bytes, anonymous_rss_bytes())
