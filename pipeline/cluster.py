"""What a multi-node cluster asks of a run: every node must see the data and the run storage.

The nodes of a real cluster do not share a disk. A local `--data` or `--storage` path is then seen
by the driver's node only, and a run that used it would fail mid-epoch on another node (a decode
task that finds no file, a checkpoint written where nobody reads it). So before any training, every
alive node is asked what it sees at those paths, and a path that is not the same everywhere stops
the run with one paragraph that says what to do.
"""

from __future__ import annotations

import hashlib
import os
import secrets

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.storage import StorageError, resolve

PROBE_TIMEOUT_S = 60.0
MARKER = ".ray-finetune-visible"


def alive_nodes() -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]


def folder_fingerprint(path: str) -> str:
    """sha256 of the sorted relative paths and sizes below path ('' when it is not a folder here)."""
    if not os.path.isdir(path):
        return ""
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in files:
            full = os.path.join(root, name)
            try:
                entries.append(f"{os.path.relpath(full, path)}\0{os.path.getsize(full)}")
            except OSError:
                entries.append(f"{os.path.relpath(full, path)}\0?")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()


def read_marker(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


@ray.remote(num_cpus=0, max_retries=0)
def _probe(kind: str, path: str) -> str:
    return folder_fingerprint(path) if kind == "data" else read_marker(path)


def nodes_missing(kind: str, path: str, expected: str, nodes: list[str]) -> list[str]:
    """The nodes whose view of path differs from expected (or that did not answer in time)."""
    refs = {node: _probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(kind, path) for node in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    answers = {}
    for node, ref in refs.items():
        try:
            answers[node] = ray.get(ref) if ref in ready else None
        except ray.exceptions.RayError:
            answers[node] = None
    return [node for node, got in answers.items() if got != expected]


def _refusal(what: str, flag: str, path: str, missing: list[str], total: int, fix: str) -> StorageError:
    return StorageError(
        f"{what} {path} ({flag}) is a local path, and {len(missing)} of the cluster's {total} nodes do not see it "
        f"as the driver does (node {', '.join(n[:12] for n in missing)}): the nodes of a cluster do not share a disk, "
        f"and the run would fail on them mid-epoch. {fix}")


def check_local_paths(data_path: str, storage_path: str) -> None:
    """Refuse local data or storage paths that some alive node of a multi-node cluster cannot see."""
    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    if data_path and not data_path.startswith("s3://"):
        path = resolve(data_path)[1]
        missing = nodes_missing("data", path, folder_fingerprint(path), nodes)
        if missing:
            raise _refusal("the dataset", "--data", path, missing, len(nodes),
                           f"Put it in object storage every node can read: `finetune data stage {data_path} "
                           "s3://BUCKET/PREFIX`, then train with --data s3://BUCKET/PREFIX (or copy it to the "
                           "same path on every node).")
    if not storage_path.startswith("s3://"):
        path = resolve(storage_path)[1]
        token = secrets.token_hex(16)
        marker = os.path.join(path, f"{MARKER}-{token}")
        os.makedirs(path, exist_ok=True)
        with open(marker, "w") as fh:
            fh.write(token)
        try:
            missing = nodes_missing("storage", marker, token, nodes)
        finally:
            os.remove(marker)
        if missing:
            raise _refusal("the run storage", "--storage", path, missing, len(nodes),
                           "Write runs to object storage: --storage s3://BUCKET/PREFIX (or a network file "
                           "system mounted at the same path on every node).")
