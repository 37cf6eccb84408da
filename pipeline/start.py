"""The start of every job that trains: print the config, check its storage, start Ray, and time it.

Starting Ray (its processes) and importing torch, torchvision and Ray Train (about 4 s each on a
2-core box) do not depend on each other: begin() does both at once when a caller names the heavy
modules it will need. The clock marks each start-up stage in seconds after the command started,
so that a slow start says where its time went.
"""

from __future__ import annotations

import importlib
import os
import threading
import time

import ray
import ray.data

from pipeline import console, storage
from pipeline.cluster import check_local_paths
from pipeline.config import Config, describe, with_changes
from pipeline.resources import auto_workers

# The config sections each job prints at its start: what a plain run reads (its checkpoints hold the
# whole tree), what a search reads, and an experiment's (its rows and searches print their own).
RUN_SECTIONS = ("data", "model", "optim", "scaling", "run")
SEARCH_SECTIONS = (*RUN_SECTIONS, "tune")
EXPERIMENT_SECTIONS = ()


def _process_start_unix() -> float:
    """When this process started (Linux: /proc), else when this module was imported."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/stat") as fh:
            boot = next(int(ln.split()[1]) for ln in fh if ln.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


STARTUP_LINE = "start-up (s after the command started): "


class StartupClock:
    """Wall-clock marks (unix seconds) of one run's start-up stages, in the order they happened."""

    def __init__(self, origin: float):
        self.origin = origin
        self.marks: dict[str, float] = {}

    def mark(self, stage: str, unix: float | None = None) -> None:
        self.marks[stage] = time.time() if unix is None else unix

    def line(self) -> str:
        stages = sorted(self.marks.items(), key=lambda kv: kv[1])
        return (STARTUP_LINE
                + ", ".join(f"{stage} {unix - self.origin:.1f}" for stage, unix in stages if unix >= self.origin))


COMMAND_START_UNIX = _process_start_unix()
RAY_READY_UNIX = 0.0  # when begin() had Ray started (and the heavy modules imported)


def init_ray(address: str = "") -> None:
    """Join the cluster at address, or the one of a `ray job submit` (RAY_ADDRESS), or start a local
    Ray; every command that needs Ray starts it here (a Ray already started in this process is kept)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        if address is None:
            # A local in-process Ray is never drained or preempted: Ray Train's preemption watcher
            # would be one more actor process to start (seconds of CPU) before the first step.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            # Ray ends a task worker idle for 1 s when more processes than CPUs are up (a run's
            # actors count): the data tasks, which run in bursts as training takes batches, then
            # start a fresh process (2 s of CPU) every few seconds. A minute keeps one between bursts.
            os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "60000")
        with console.quiet_ray_start():
            ray.init(address=address, log_to_driver=True, configure_logging=False, **console.ray_init_options())
    ctx = ray.data.DataContext.get_current()
    # The driver draws the run's progress (console.ProgressView); Ray Data's bars would draw beside it.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


_begun: list[Config] = []  # the config begin() returned last: begun once, whoever calls again


def begin(cfg: Config, sections: tuple[str, ...] = RUN_SECTIONS, preload: tuple[str, ...] = ()) -> Config:
    """What every job does first: print the resolved config (the sections it reads), check its
    storage, start Ray while the modules in preload import. Returns the config with the
    cluster-dependent defaults settled (a new one: cfg is never changed). A config that begin()
    returned is returned as it is (the command line begins a job before importing it)."""
    global RAY_READY_UNIX
    if _begun and cfg is _begun[-1]:
        return cfg
    print(describe(cfg, sections), flush=True)
    # Object storage problems surface here in seconds, before Ray or any data work.
    storage.preflight(cfg.run.storage, write=True)
    storage.preflight(cfg.data.path, write=False)
    # Importing runs beside Ray's start: Ray's processes start on the other cores while this one
    # imports, and a module's import error is raised below, by the import itself.
    importer = threading.Thread(target=_import_quietly, args=(preload,), daemon=True)
    importer.start()
    init_ray(cfg.run.ray_address)
    importer.join()
    for module in preload:
        importlib.import_module(module)
    RAY_READY_UNIX = time.time()
    check_local_paths(cfg.data.path, cfg.run.storage)
    cluster = ray.cluster_resources()
    if cfg.scaling.workers == 0:
        cfg = with_changes(cfg, {"scaling": {"workers": auto_workers(cfg, cluster)}})
    print(f"cluster: {cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs | workers={cfg.scaling.workers} "
          f"(per-worker batch {cfg.data.batch_size // cfg.scaling.workers})", flush=True)
    _begun[:] = [cfg]
    return cfg


def _import_quietly(modules: tuple[str, ...]) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - raised again by begin's own import, in the main thread
            return


def run_name(cfg: Config) -> str:
    return cfg.run.name or f"{cfg.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
