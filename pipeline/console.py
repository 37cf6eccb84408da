"""What a user sees while a run goes: the project's own lines, with Ray's logs kept off the console
unless asked for (`--verbose` or RAY_FINETUNE_LOG=debug), and the training progress drawn by the
driver from what rank 0 posts to a ProgressBoard actor.

Ray's logs are quieted through logging levels (Ray Data's RAY_DATA_LOG_LEVEL, a
worker_process_setup_hook, the training workers' root logger), not by filtering text. Warnings from
an unhealthy run and errors still reach the console."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

VERBOSE_ENV = "RAY_FINETUNE_LOG"
# The logger of Ray Train's placement-group cleaner, by name (nothing of it is imported), and its
# warning at the normal end of every search trial.
PLACEMENT_GROUP_CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
TRIAL_END_WARNING = "is dead. Cleaning up placement group"


def _not_a_trial_end(record: logging.LogRecord) -> bool:
    return TRIAL_END_WARNING not in record.getMessage()


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() == "debug"


def quiet_tune() -> None:
    """Before a Tuner runs in this process: Tune's default output engine prints its configuration
    box and a TensorBoard hint even at verbose=0 (its experiment_started ignores the verbosity); the
    legacy engine, at verbose=0, prints nothing. The TrialTable shows the search instead."""
    if not verbose():
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def set_verbose(on: bool) -> None:
    """--verbose: set before Ray starts, so that every process of the run sees it."""
    if on:
        os.environ[VERBOSE_ENV] = "debug"


def quiet_ray_worker() -> None:
    """Every Ray worker process of a quiet run runs this first (runtime_env worker_process_setup_hook)."""
    if verbose():
        return
    # The project turns Ray Data's progress bars off on purpose (the driver draws the run's progress),
    # and Ray Data says so with a warning from every process that iterates a dataset.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Tune ends a search trial's actor once its TorchTrainer returns, and Ray Train's placement-group
    # cleaner then removes that trainer's placement group and warns that the controller is dead: the
    # normal end of every trial. Only that message goes; a failed cleanup still warns.
    # (One function, so that a process that runs this twice still holds one filter.)
    logging.getLogger(PLACEMENT_GROUP_CLEANER).addFilter(_not_a_trial_end)


def ray_init_options() -> dict:
    """ray.init's options for a quiet run: Ray Data's loggers follow RAY_DATA_LOG_LEVEL, which every
    process of the job inherits, and every worker runs quiet_ray_worker first."""
    if verbose():
        return {}
    env = {} if "RAY_DATA_LOG_LEVEL" in os.environ else {"RAY_DATA_LOG_LEVEL": "WARNING"}
    os.environ.update(env)  # Ray Data reads it whenever it configures its loggers
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # this process configured them on import
    quiet_ray_worker()
    return {"runtime_env": {"env_vars": env, "worker_process_setup_hook": "pipeline.console.quiet_ray_worker"}}


@contextlib.contextmanager
def quiet_ray_start():
    """Around ray.init: a local Ray has token authentication on, and says so with a warning at every
    start that asks nothing of the user. Errors still show."""
    logger = logging.getLogger("ray")
    level = logger.level
    if not verbose():
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quiet_train_worker() -> None:
    """In a training worker, after Ray Train has set up its logging: Ray Train logs every report
    ("Reporting training result ...") at INFO through a logger of its own outside `ray.train`, which
    only the worker's root level holds back."""
    if not verbose():
        logging.getLogger().setLevel(logging.WARNING)


class ProgressBoard:
    """Where rank 0 posts its progress and lines; the driver takes them twice a second. An actor
    (new_board()), so that the workers of any node reach it."""

    def __init__(self):
        self.events: list = []

    def post(self, event: dict) -> None:
        self.events.append(event)

    def take(self) -> list:
        events, self.events = self.events, []
        return events


_boards: dict = {}


def new_board():
    """This driver's board, one per Ray job: the runs of one process (an experiment's rows) share it,
    and none waits for an actor process to start but the first."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    job = ray.get_runtime_context().get_job_id()
    if job in _boards:
        ray.get(_boards[job].take.remote())  # what an earlier run left unread is not this run's
    else:
        # On the driver's own node: a lost worker node must not take the run's lines with it (the
        # driver's node going is the end of the run anyway).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        _boards[job] = ray.remote(num_cpus=0, scheduling_strategy=here)(ProgressBoard).remote()
    return _boards[job]


class Poster:
    """A worker's side of the board: at most one progress event per `every_s` seconds, and never a
    wait (the posts are fire-and-forget; a board that is gone loses them, the run goes on)."""

    def __init__(self, board, every_s: float = 1.0):
        self.board, self.every_s = board, every_s
        self._last = 0.0
        self._sent = None

    def flush(self, timeout_s: float = 10) -> None:
        """Wait until the board holds every post: a worker's pending calls die with its process."""
        if self._sent is not None:
            import ray

            try:
                ray.get(self._sent, timeout=timeout_s)
            except Exception:  # noqa: BLE001 - a board that is gone loses the lines, not the run
                pass

    def say(self, line: str) -> None:
        self._post({"kind": "line", "text": line})

    def tracker(self, phase: str, epoch: int, epochs: int, total: int):
        """progress(done, final=False) for one phase of an epoch ('train', 'val', 'test'), its clock
        started now."""
        started = time.perf_counter()

        def progress(done: int, final: bool = False) -> None:
            now = time.monotonic()
            if self.board is None or not (final or now - self._last >= self.every_s):
                return
            self._last = now
            self._post({"kind": "progress", "phase": phase, "epoch": epoch, "epochs": epochs, "done": done,
                        "total": total, "elapsed": time.perf_counter() - started, "final": final})
        return progress

    def _post(self, event: dict) -> None:
        if self.board is not None:
            self._sent = self.board.post.remote(event)
        elif event["kind"] == "line" and verbose():  # no board (a search trial, shown by its table)
            sys.stdout.write(event["text"] + "\n")
            sys.stdout.flush()


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class ProgressView:
    """The driver's view of a training run: a live bar per epoch phase (train, then evaluation),
    redrawn in place on a terminal; off a terminal (a job's logs, CI) only the lines, one per epoch."""

    def __init__(self, board, stream=None, poll_s: float = 0.5):
        self.board, self.poll_s = board, poll_s
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._bar = ""

    def __enter__(self) -> ProgressView:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()
        self._clear_bar()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._drain()

    def _drain(self) -> None:
        import ray

        try:
            events = ray.get(self.board.take.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the board's node is gone: the run's own errors say why
            return
        for event in events:
            if event["kind"] == "line":
                self._clear_bar()
                self.stream.write(event["text"] + "\n")
            elif self.live:
                self._draw(event)
        self.stream.flush()

    def _draw(self, e: dict) -> None:
        rate = e["done"] / e["elapsed"] if e["elapsed"] > 0 else 0.0
        eta = format_eta((e["total"] - e["done"]) / rate) if rate > 0 else "-:--"
        width = 24
        filled = int(width * e["done"] / e["total"]) if e["total"] else width
        bar = (f"epoch {e['epoch']}/{e['epochs']} {e['phase']:<5} [{'#' * filled}{'.' * (width - filled)}] "
               f"{e['done']}/{e['total']} images  {rate:.1f} img/s  ETA {eta}")
        self.stream.write("\r" + bar.ljust(len(self._bar)))
        self._bar = bar

    def _clear_bar(self) -> None:
        if self._bar:
            self.stream.write("\r" + " " * len(self._bar) + "\r")
            self._bar = ""
