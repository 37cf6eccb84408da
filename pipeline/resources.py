"""How a run maps onto the cluster: workers, CPUs and threads per worker, the data tasks' share."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import Config


@dataclass
class Resources:
    """How the run maps onto the cluster, decided once and printed."""

    use_gpu: bool
    cpus_per_worker: float
    torch_threads: int
    data_task_cpus: float

    def __str__(self) -> str:
        return (f"use_gpu={self.use_gpu} cpus_per_worker={self.cpus_per_worker:g} "
                f"torch_threads={self.torch_threads} data_task_cpus={self.data_task_cpus:g}")


def plan_resources(cfg: Config, cluster: dict) -> Resources:
    """GPUs when present (unless told otherwise); on CPU clusters share the CPUs left after Ray Data."""
    s = cfg.scaling
    gpus, cpus = cluster.get("GPU", 0), cluster.get("CPU", 1)
    use_gpu = gpus > 0 if s.use_gpu == "auto" else s.use_gpu == "true"
    if s.cpus_per_worker is not None:
        per_worker = s.cpus_per_worker
    elif use_gpu:
        per_worker = 1.0
    else:
        # Leave data_cpus for the augmentation stage, or training workers would
        # hold every CPU and the data pipeline could never be scheduled.
        per_worker = max(0.25, math.floor((cpus - s.data_cpus) / s.workers * 4) / 4)
    threads = max(1, round(per_worker)) if not use_gpu else max(1, int(per_worker))
    # Two augmentation tasks can run in the CPUs kept for data, so one never waits on the other.
    data_task_cpus = 1.0 if use_gpu else min(1.0, max(0.05, s.data_cpus / 2))
    return Resources(use_gpu, per_worker, threads, data_task_cpus)


def auto_workers(cfg: Config, cluster: dict) -> int:
    """scaling.workers = 0: one worker per GPU share the cluster has now, else 1 (a CPU box trains
    fastest as one process using every core); reduced until it divides the global batch."""
    s = cfg.scaling
    gpus = cluster.get("GPU", 0)
    use_gpu = gpus > 0 if s.use_gpu == "auto" else s.use_gpu == "true"
    n = max(1, int(gpus // s.gpus_per_worker)) if use_gpu and gpus else 1
    while cfg.data.batch_size % n:
        n -= 1
    return n


def worker_count(cfg: Config) -> int | tuple[int, int]:
    """Ray Train's num_workers: fixed, or (min, max) for an elastic group (scaling.min_workers) that
    goes on with as few as min_workers when nodes are lost and grows back when they return."""
    s = cfg.scaling
    return (s.min_workers, s.workers) if 0 < s.min_workers < s.workers else s.workers
