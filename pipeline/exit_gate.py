"""A training worker's clean exit when Ray ends its process mid-step.

Ray ends the workers of a trial that Tune stops (ASHA) by exiting their processes. The
interpreter's finalization then stops the training thread wherever it is; inside a torch kernel
that unwinds C++ frames that may not unwind, and the process aborts with a stack dump on the
console. Held: at exit, the interpreter waits (briefly) until the training thread reaches its next
batch and parks there, outside any kernel."""

from __future__ import annotations

import atexit
import contextlib
import threading

_exiting = threading.Event()
_parked = threading.Event()


@contextlib.contextmanager
def held(patience_s: float = 10.0):
    """Around a training function: an exit while it runs waits up to patience_s (about one step on
    a CPU) for the training thread to park."""
    def hold() -> None:
        _exiting.set()
        _parked.wait(patience_s)

    atexit.register(hold)
    try:
        yield
    finally:
        atexit.unregister(hold)


def parked_at_exit(batches):
    """batches, until the process exits: then the consuming thread parks for good (a lock wait,
    which finalization leaves alone) instead of starting another step."""
    for batch in batches:
        if _exiting.is_set():
            _parked.set()
            threading.Event().wait()
        yield batch
