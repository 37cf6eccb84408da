"""CPU training beside Ray Data's split coordinator: the coordinator yields the cores to training.

Ray Train feeds each worker from a SplitCoordinator actor that runs Ray Data's streaming executor.
When training is the slower side (always, on CPUs), the executor is backpressured, and its
scheduling loop then polls without sleeping: on a 2-core box it took 60 % of a core for the whole
epoch, and the training step's OpenMP threads, each waiting at every operator's barrier for
whichever was descheduled, lost almost half their speed (docs/performance.md). At the lowest
priority it still runs whenever training waits for data, since training then leaves a CPU idle.
"""

from __future__ import annotations

import os
import threading
import time

COORDINATOR_CLASS = "SplitCoordinator"
LOWEST_PRIORITY = 19


def lower_thread_priorities(pid: int, niceness: int = LOWEST_PRIORITY) -> int:
    """Set every thread of process pid to niceness (Linux nice is per thread; threads made later
    inherit it from their creator). Never raises a priority. Returns how many threads it set."""
    done = 0
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return 0
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
                done += 1
        except OSError:  # the thread ended, or it is not ours
            pass
    return done


def lower_split_coordinator_priority(wait_s: float = 60.0) -> None:
    """In the background: once this node's split coordinators are up, lower their priority.
    Through Ray's state API (the dashboard); where it cannot answer, nothing changes."""

    def run() -> None:
        import ray
        from ray.util.state import list_actors

        node = ray.get_runtime_context().get_node_id()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                actors = list_actors(filters=[("class_name", "=", COORDINATOR_CLASS), ("state", "=", "ALIVE"),
                                              ("node_id", "=", node)], raise_on_missing_output=False)
            except Exception:  # noqa: BLE001 - no state API here: the coordinator keeps its priority
                return
            if actors:
                for actor in actors:
                    lower_thread_priorities(actor.pid)
                return
            time.sleep(1.0)

    if os.path.isdir("/proc/self/task"):
        threading.Thread(target=run, name="lower-coordinator-priority", daemon=True).start()
