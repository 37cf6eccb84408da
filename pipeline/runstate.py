"""What a run folder holds about the run that owns it: who it is (so a rerun resumes only the same
run) and who is writing it now (so two runs never write one folder).

- `run.json`: the fields that decide the model and the data, the classes, and the dataset's
  fingerprint (file count, sha256 of the sorted paths and sizes), written when a run starts.
- `lease.json`: the writer (host, pid, a random id) and a heartbeat it renews while it runs; a
  lease whose heartbeat is older than LEASE_TTL_S belongs to a run that died and may be taken.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time

from pipeline import storage
from pipeline.redact import redact_tree

IDENTITY = "run.json"
LEASE = "lease.json"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's: this folder holds a run to resume
LEASE_TTL_S = 90.0
HEARTBEAT_S = 20.0
RESUME_MODES = ("auto", "never", "must")
# Fields that change neither the model nor the data a run trains on: free to differ on resume.
NEUTRAL_FIELDS = {"data": {"preview_images", "cache_decoded", "max_bad_fraction"}, "model": set()}


class RunStateError(RuntimeError):
    """A run folder that this command must not write: another run's, or one in use."""


def identity(cfg_dict: dict, classes: list[str], fingerprint: dict) -> dict:
    """What run.json records; URL credentials in it are redacted (and compared redacted)."""
    fields = {f"{sec}.{k}": redact_tree(v) for sec in ("data", "model") for k, v in cfg_dict[sec].items()
              if k not in NEUTRAL_FIELDS[sec]}
    return {"fields": fields, "classes": list(classes), "dataset": fingerprint}


def differences(stored: dict, current: dict) -> list[str]:
    """The keys whose values differ: dotted config fields, 'classes', 'dataset'."""
    old, new = stored.get("fields", {}), current["fields"]
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    keys += [k for k in ("classes", "dataset") if stored.get(k) != current[k]]
    return keys


def check_resume(run_dir: str, mode: str, current: dict) -> bool:
    """Whether this command resumes the run in run_dir (True) or starts it (False); RunStateError
    when it may do neither. Reads only: a refused command leaves the folder as it was."""
    try:
        has_run = storage.exists(storage.join(run_dir, SNAPSHOT))
        stored = storage.read_json(storage.join(run_dir, IDENTITY)) if storage.exists(
            storage.join(run_dir, IDENTITY)) else None
    except storage.StorageError as e:  # a damaged run.json: not this project's to trust
        raise RunStateError(f"{e}; use a new --name") from None
    if not has_run:
        if mode == "must":
            raise RunStateError(f"{run_dir} holds no run to resume (--run.resume must)")
        return False
    if mode == "never":
        raise RunStateError(f"{run_dir} already holds a run and --run.resume is never: use a new --name "
                            "(nothing was changed there)")
    if mode == "must":
        return True
    if stored is None:
        raise RunStateError(f"{run_dir} holds checkpoints but no {IDENTITY}, so it cannot be checked to be this "
                            "run: use a new --name, or --run.resume must to resume it anyway")
    diff = differences(stored, current)
    if diff:
        raise RunStateError(f"{run_dir} holds a different run ({', '.join(diff[:8])}"
                            f"{' ...' if len(diff) > 8 else ''} differ): resuming would mix the two. Use a new "
                            "--name, or --run.resume must to resume it regardless")
    return True


class Lease:
    """Exclusive use of a run folder while this process runs it, renewed by a daemon thread."""

    def __init__(self, run_dir: str):
        self.uri = storage.join(run_dir, LEASE)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": secrets.token_hex(8)}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        storage.write_bytes(self.uri, json.dumps({**self.owner, "heartbeat": time.time()}).encode())

    def _live(self, held: dict | None) -> bool:
        """Whether a lease found in the folder still belongs to a running writer."""
        if not held or held.get("id") == self.owner["id"]:
            return False
        if held.get("host") == self.owner["host"]:  # on this machine the process itself can be asked
            try:
                os.kill(int(held.get("pid", 0)), 0)
            except (ProcessLookupError, ValueError):
                return False
            except PermissionError:  # alive, another user's
                pass
        return time.time() - float(held.get("heartbeat", 0)) < LEASE_TTL_S

    def acquire(self) -> Lease:
        held = storage.read_json(self.uri) if storage.exists(self.uri) else None
        if self._live(held):
            raise RunStateError(f"{self.uri.rsplit('/', 1)[0]} is being written by another run (host "
                                f"{held.get('host')}, pid {held.get('pid')}, heartbeat "
                                f"{time.time() - held['heartbeat']:.0f} s ago): wait for it, or use a new --name")
        self._write()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="run-lease")
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except (OSError, storage.StorageError):  # a missed heartbeat; the next one may succeed
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        storage.delete(self.uri)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------- searches

TUNE_STATE = "ray-finetune-state.json"
# What this project writes beside Ray Tune's state, which Tune itself never unpickles.
OWN_FILES = {TUNE_STATE, "best.json", "report.html", "misclassified.png"}


def tune_state_digests(fs, exp_path: str) -> dict[str, str]:
    """sha256 of every file Ray Tune keeps at the top of an experiment (tuner.pkl, the experiment
    and searcher state: pickles, or JSON that holds pickles), which a restore unpickles."""
    import hashlib

    import pyarrow.fs as pafs

    out = {}
    for info in fs.get_file_info(pafs.FileSelector(exp_path, allow_not_found=True)):
        name = info.path.rsplit("/", 1)[-1]
        if info.type == pafs.FileType.File and name not in OWN_FILES:
            with fs.open_input_stream(info.path) as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def record_tune_state(fs, exp_path: str) -> None:
    digests = tune_state_digests(fs, exp_path)
    with fs.open_output_stream(f"{exp_path}/{TUNE_STATE}") as out:
        out.write(json.dumps({"files": digests}, indent=1).encode())


def check_tune_resume(fs, exp_path: str, exp_dir: str, mode: str) -> None:
    """Before Ray Tune unpickles a stored search: 'auto' only when every state file is the one this
    project recorded (a planted or altered file could run code on this driver); RunStateError else."""
    if mode == "never":
        raise RunStateError(f"{exp_dir} already holds a search and --run.resume is never: use a new --name")
    if mode == "must":
        return
    try:
        with fs.open_input_stream(f"{exp_path}/{TUNE_STATE}") as f:
            recorded = json.loads(f.read())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded is None:
        raise RunStateError(f"{exp_dir} holds a search whose state this project did not record, so resuming it "
                            "would unpickle files nobody vouched for: use a new --name, or --run.resume must if "
                            "you trust everyone who can write there")
    now = tune_state_digests(fs, exp_path)
    changed = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
    if changed:
        raise RunStateError(f"{exp_dir}: {', '.join(changed[:5])} changed since this project recorded the search "
                            "state (a search that died just after Tune saved it, or a file someone else wrote): "
                            "use a new --name, or --run.resume must if you trust the storage")
