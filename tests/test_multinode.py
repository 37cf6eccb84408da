"""The pipeline on a real 3-node Ray cluster on this machine (ray.cluster_utils.Cluster: one raylet,
object store and set of resources per node), with SeaweedFS as the only storage every node shares.

- the head has no CPU: the driver (`finetune ...`, run as a user runs it, with RAY_ADDRESS) lives there,
  and every data task, training worker and trial lands on a worker node;
- each worker node has 2 CPUs and training workers ask for 1.5: two workers never share a node;
- each node resolves S3 credentials from its own environment: the driver's node one identity, the
  worker nodes another, so a key that travels from the driver shows up where it must not;
- nodes are removed by killing their processes (a crashed host) and replaced by new ones.
Everything started here is stopped through its own handle; nothing machine-wide.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import boto3
import numpy as np
import pytest

from pipeline.config.sections import DEFAULT_SCRATCH_LR
from pipeline.devs3 import Identity, LocalS3, free_port
from pipeline.synthetic import make_image_folder
from tests.conftest import REPO

WORKER_NODE = {"num_cpus": 2, "object_store_memory": 300 * 2**20}
# Two workers of 1.5 CPUs cannot share a 2-CPU node: DDP is forced across nodes, and 0.5 CPU per node
# stays free for the data tasks.
TWO_NODE_RUN = ["--config", "configs/smoke_cpu.yaml", "--workers", "2", "--scaling.cpus_per_worker", "1.5",
                "--run.keep_checkpoints", "10", "--data.preview_images", "0"]


class LocalCluster:
    """A head without CPUs plus worker nodes, each node with its own S3 identity in its environment."""

    def __init__(self, s3: LocalS3, temp_dir: str, worker_cpus: tuple[int, ...] = (2, 2)):
        from ray.cluster_utils import Cluster

        self.s3 = s3
        self.temp_dir = temp_dir
        self.dashboard_port = free_port()
        # Lost nodes are noticed within seconds (Ray's default health check takes about half a minute).
        # The head's environment is the driver's: a job submitted to it runs this virtualenv's python.
        head_env = {**s3.env("driver"), "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
        self.cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": 0, "object_store_memory": 200 * 2**20, "include_dashboard": True,
            "dashboard_port": self.dashboard_port, "temp_dir": temp_dir, "env_vars": head_env,
            # Ray's default agent port (52365) may already be taken by another Ray on this machine (the
            # test session's own); a job is submitted through the head's agent, so it gets a port of its own.
            "dashboard_agent_listen_port": free_port(),
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
        # What `ray start --head --temp-dir` writes: a job's supervisor finds its own cluster's address in the
        # head's temp dir (without it, "auto" may find another Ray on this machine, such as the session's).
        with open(os.path.join(temp_dir, "ray_current_cluster"), "w") as fh:
            fh.write(self.cluster.address)
        self.workers = [self.add_worker(cpus) for cpus in worker_cpus]

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self, cpus: int = 2):
        # A temp dir per node, as on separate machines: Ray unpacks a job's working_dir into each node's
        # session folder, and a node that shared the head's would replace the one the job's driver runs in.
        # So each node also needs its own log monitor to stream its workers' output to the driver.
        temp_dir = tempfile.mkdtemp(prefix="w", dir=self.temp_dir)
        return self.cluster.add_node(**{**WORKER_NODE, "num_cpus": cpus}, env_vars=self.s3.env("node"),
                                     temp_dir=temp_dir, include_log_monitor=True)

    def remove_worker(self, node) -> float:
        """Kill a worker node's processes at once, as a crashed host; returns the time of the kill."""
        t = time.time()
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)
        return t

    def replace_worker(self, node) -> None:
        self.remove_worker(node)
        self.workers.append(self.add_worker())

    def driver_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(self.s3.env("driver"), RAY_ADDRESS=self.address, PYTHONUNBUFFERED="1")
        return env

    def shutdown(self) -> None:
        self.cluster.shutdown()  # every worker node, then the head


@pytest.fixture(scope="module")
def mn_s3(tmp_path_factory):
    admin = ["Admin", "Read", "Write", "List", "Tagging"]
    server = LocalS3(str(tmp_path_factory.mktemp("mn-seaweedfs")), {
        name: Identity(f"{name}-{secrets.token_hex(4)}", secrets.token_hex(16), admin)
        for name in ("admin", "driver", "node")}).start()
    for bucket in ("runs", "datasets"):
        server.create_bucket(bucket)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(mn_s3):
    temp_dir = tempfile.mkdtemp(prefix="raymn-", dir="/tmp")  # short: Ray's socket paths have a length cap
    c = LocalCluster(mn_s3, temp_dir)
    yield c
    c.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def s3_client(s3: LocalS3, identity: str = "admin"):
    env = s3.env(identity)
    return boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def keys(s3: LocalS3, bucket: str, prefix: str = "") -> list[str]:
    pages = s3_client(s3).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def read_object(s3: LocalS3, bucket: str, key: str) -> bytes:
    return s3_client(s3).get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def mn_data(cluster, tmp_path_factory):
    """A generated 2-class set staged to s3://datasets/mn by the driver (`finetune data stage`): 320 train
    images, so that an epoch lasts long enough to lose a node in the middle of it."""
    local = make_image_folder(str(tmp_path_factory.mktemp("mn-data")), train_per_class=160, test_per_class=20, size=64)
    finetune(cluster, "data", "stage", local, "s3://datasets/mn")
    return {"local": local, "s3": "s3://datasets/mn"}


def finetune(cluster: LocalCluster, *args: str, timeout: float = 600, check: bool = True):
    """`finetune ARGS` on the head node, as a user runs it there (RAY_ADDRESS set)."""
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=cluster.driver_env(),
                         capture_output=True, text=True, timeout=timeout)
    if check:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def start_finetune(cluster: LocalCluster, log_path: str, *args: str) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=cluster.driver_env(),
                            stdout=log, stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: str = ""):
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}:\n{open(log).read()[-4000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def checkpoints(s3: LocalS3, prefix: str) -> list[str]:
    """The checkpoint folders (keys) of a run, oldest first."""
    return sorted({k.rsplit("/", 1)[0] for k in keys(s3, "runs", prefix) if k.endswith("/checkpoint.pt")})


def load_state(s3: LocalS3, checkpoint_key: str, dest: str) -> tuple[str, dict]:
    from pipeline.checkpoint_file import load_checkpoint

    os.makedirs(dest, exist_ok=True)
    for key in (k for k in keys(s3, "runs", checkpoint_key + "/") if not k.endswith("/")):
        with open(os.path.join(dest, key.rsplit("/", 1)[1]), "wb") as fh:
            fh.write(read_object(s3, "runs", key))
    return dest, load_checkpoint(dest)


def accuracy_through_classifier(checkpoint_dir: str, data_root: str) -> tuple[float, int]:
    from pipeline.data import scan_image_folder
    from pipeline.inference import Classifier

    clf = Classifier(checkpoint_dir)
    files = scan_image_folder(data_root).files["test"]
    images = []
    for path, _ in files:
        with open(path, "rb") as fh:
            images.append(clf.prepare(fh.read()))
    labels = np.array([label for _, label in files])
    return float((clf.probabilities(np.stack(images)).argmax(1) == labels).mean()), len(files)


def worker_node_ids(cluster: LocalCluster) -> set[str]:
    return {n.node_id for n in cluster.workers}


# ------------------------------------------------------------------------------------------------ tests


def lose_a_node_mid_epoch(cluster: LocalCluster, s3: LocalS3, prefix: str, ended, replace_after_s: float) -> float:
    """Once the run's first checkpoint is in storage (epoch 1 done), let epoch 2 get going, kill a worker
    node, and start a replacement replace_after_s later. Returns the time of the kill. ended() says why
    the run ended, or None while it runs."""
    deadline = time.time() + 300
    while not checkpoints(s3, prefix):
        why = ended()
        assert why is None, f"the run ended before its first checkpoint:\n{why}"
        assert time.time() < deadline, "timed out waiting for the first checkpoint"
        time.sleep(0.5)
    time.sleep(2)  # into epoch 2 (an epoch here lasts about ten seconds)
    killed = cluster.remove_worker(cluster.workers[-1])
    time.sleep(replace_after_s)
    cluster.workers.append(cluster.add_worker())
    return killed


# Enough epochs after the node comes back for the group to grow again: an epoch on one node can take
# under 3 s, and growing (a resize check, a new worker process, the resume) takes longer than one.
ELASTIC_EPOCHS = 10


def test_multinode_elastic_run_goes_on_with_one_node_and_grows_back(cluster, mn_data, mn_s3, tmp_path):
    log = str(tmp_path / "driver.log")
    proc = start_finetune(cluster, log, "train", *TWO_NODE_RUN, "--data", mn_data["s3"], "--storage",
                          "s3://runs/mn", "--name", "elastic", "--epochs", str(ELASTIC_EPOCHS),
                          "--scaling.min_workers", "1", "--scaling.resize_interval_s", "2", "--run.max_failures", "3")
    wait_for(lambda: checkpoints(mn_s3, "mn/elastic/"), 300, "the first checkpoint", proc, log)
    time.sleep(2)
    killed = cluster.remove_worker(cluster.workers[-1])
    # No replacement until the group has finished an epoch on the one node left: it must not wait for one.
    wait_for(lambda: len(checkpoints(mn_s3, "mn/elastic/")) >= 2, 300, "an epoch on one node", proc, log)
    cluster.workers.append(cluster.add_worker())
    assert proc.wait(timeout=600) == 0, open(log).read()[-5000:]
    history = json.loads(read_object(mn_s3, "runs", "mn/elastic/metrics.json"))
    assert [h["epoch"] for h in history] == list(range(1, ELASTIC_EPOCHS + 1))
    _, state = load_state(mn_s3, checkpoints(mn_s3, "mn/elastic/")[-1], str(tmp_path / "final"))
    starts = [(s["epoch"], s["world_size"]) for s in state["starts"]]
    # Shrunk to one worker into epoch 2; grown back to two (from the latest checkpoint, at the first resize
    # check after the new node was up) before the last epoch.
    assert len(starts) == 3 and starts[:2] == [(1, 2), (2, 1)] and starts[2][1] == 2, starts
    grown = starts[2][0]
    assert [h["world_size"] for h in history] == [2] + [1] * (grown - 2) + [2] * (ELASTIC_EPOCHS + 1 - grown)
    assert set(history[-1]["worker_nodes"]) == worker_node_ids(cluster)
    # The global batch, the steps per epoch and the learning rate are the config's at every size.
    for h in history:
        assert h["per_worker_batch"] * h["world_size"] == 32 and h["train_images"] == 320, h
    # The learning rate follows the default cosine decay by epoch, as on one size: after epoch e of E,
    # lr x (1 + cos(pi e / E)) / 2, whatever the group's size was.
    expected = [DEFAULT_SCRATCH_LR * (1 + math.cos(math.pi * h["epoch"] / ELASTIC_EPOCHS)) / 2 for h in history]
    assert [h["lr"] for h in history] == pytest.approx(expected, abs=1e-9)
    print(f"\nelastic: on 1 worker {history[1]['first_step_unix'] - killed:.1f} s after the kill, grown back to 2 at "
          f"epoch {grown}")


BOARD_PLACES = """
import ray
from pipeline import console
ray.init()
here = ray.get_runtime_context().get_node_id()
places = []
for _ in range(6):  # six boards, as six drivers would make them
    console._boards.clear()
    board = console.new_board()
    places.append(ray.get(board.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())))
print("BOARDS", sum(p == here for p in places), len(places))
"""


def test_multinode_the_progress_board_lives_on_the_drivers_node(cluster):
    """Rank 0 posts the epoch lines to a board actor: one on a worker node would take the lines after a
    lost node with it (the job's log would end at epoch 1 while the run goes on)."""
    run = subprocess.run([sys.executable, "-c", BOARD_PLACES], cwd=REPO, env=cluster.driver_env(),
                         capture_output=True, text=True, timeout=120)
    assert "BOARDS 6 6" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


def test_multinode_local_paths_the_nodes_cannot_see_are_refused_before_training(cluster, mn_data, tmp_path):
    """The driver runs in a mount namespace of its own with a private folder (tmpfs) that no node's
    processes see, not even the head's: on a real cluster, a disk of the machine the driver runs on."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -m (root) to give the driver a folder the nodes cannot see")
    private = tmp_path / "driver-only"
    private.mkdir()
    shared_runs = tmp_path / "shared-runs"

    def run_privately(data: str, storage: str):
        script = (f"mount -t tmpfs none {private} && cp -r {mn_data['local']} {private}/data && "
                  f"exec {sys.executable} -m pipeline.cli train {' '.join(TWO_NODE_RUN)} --data {data} "
                  f"--storage {storage} --name private --epochs 1")
        return subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, env=cluster.driver_env(),
                              capture_output=True, text=True, timeout=300)

    for data, storage, flag in ((f"{private}/data", str(shared_runs), "--data"),
                                (mn_data["local"], f"{private}/runs", "--storage")):
        t0 = time.time()
        run = run_privately(data, storage)
        assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
        err = run.stderr.strip().splitlines()[-1]
        assert err.startswith("error: the ")
        # No node sees the driver's private folder, not even the head's.
        assert re.search(rf"\({flag}\) is a local path, and (\d+) of the cluster's \1 nodes do not see it as the "
                         "driver does", err), err
        assert ("finetune data stage" in err and "s3://" in err) if flag == "--data" else "--storage s3://" in err
        assert "Traceback" not in run.stderr and "epoch 1" not in run.stdout and "resources:" not in run.stdout
        print(f"\n{flag} refused in {time.time() - t0:.1f} s: {err}")


SEARCH = ["--config", "configs/smoke_cpu.yaml", "--scaling.cpus_per_worker", "1.5", "--tune.workers_per_trial", "1",
          "--num-samples", "2", "--tune.max_concurrent_trials", "2", "--epochs", "2", "--data.preview_images", "0",
          "--run.max_failures", "3"]
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def submit(cluster: LocalCluster, job: str, *args: str) -> tuple[str, str]:
    """The README's walkthrough: `ray job submit` to the cluster's dashboard, then `ray job logs`."""
    address = f"http://127.0.0.1:{cluster.dashboard_port}"
    sid = f"{job}-{secrets.token_hex(4)}"
    env = {k: v for k, v in cluster.driver_env().items() if k != "RAY_ADDRESS"}
    # A head whose dashboard agent has not registered yet refuses jobs ("No available agent"): wait for it
    # with an empty job, so that the real one and its working_dir package are submitted exactly once.
    for _ in range(60):
        probe = subprocess.run([RAY, "job", "submit", "--address", address, "--", "true"], env=env,
                               capture_output=True, text=True, timeout=120)
        if "No available agent" not in probe.stderr:
            break
        time.sleep(2)
    submitted = subprocess.run([RAY, "job", "submit", "--address", address, "--submission-id", sid,
                                "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--", "python",
                                f"jobs/{job}.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=900)
    status = subprocess.run([RAY, "job", "status", sid, "--address", address], env=env, capture_output=True,
                            text=True)
    # `ray job submit` streams the job's logs as it runs; `ray job logs` is asked too, and again when it comes
    # back empty (a dashboard that has just lost a node can answer its first request with nothing).
    logs = ""
    for _ in range(5):
        asked = subprocess.run([RAY, "job", "logs", sid, "--address", address], env=env, capture_output=True,
                               text=True)
        logs = asked.stdout
        if asked.returncode == 0 and logs.strip():
            break
        time.sleep(2)
    # A job that never started has no logs: what `ray job submit` itself said is the explanation.
    said = f"submit exit {submitted.returncode}:\n{submitted.stdout}\n{submitted.stderr[-3000:]}\n"
    return status.stdout + status.stderr, said + logs


@pytest.fixture(scope="module")
def clean_search(cluster, mn_data, mn_s3):
    """A small search submitted as a job, with no node lost: the reference for an interrupted one."""
    status, logs = submit(cluster, "tune", *SEARCH, "--data", mn_data["s3"], "--storage", "s3://runs/mn",
                          "--name", "job-search")
    assert "succeeded" in status.lower(), logs[-4000:]
    return logs, json.loads(read_object(mn_s3, "runs", "mn/job-search/best.json"))


def test_multinode_job_ddp_ranks_on_two_nodes_survive_a_lost_node_and_count_every_image_once(
        cluster, mn_data, mn_s3, clean_search, tmp_path):
    """A training job submitted as the README says: its two DDP ranks run on the two worker nodes (none
    on the head, which has no CPU), every image is counted once across them, and when a node is lost in
    epoch 2 the run resumes from the latest checkpoint on the replacement, not from scratch. The search
    job (clean_search) picked its trial."""
    job: dict = {}

    def run_job() -> None:
        job["status"], job["logs"] = submit(cluster, "train", *TWO_NODE_RUN, "--data", mn_data["s3"], "--storage",
                                            "s3://runs/mn", "--name", "job-train", "--epochs", "3",
                                            "--run.max_failures", "3")

    thread = threading.Thread(target=run_job)
    thread.start()
    killed = lose_a_node_mid_epoch(cluster, mn_s3, "mn/job-train/", lambda: None if thread.is_alive() else job,
                                   replace_after_s=3)
    thread.join(timeout=900)
    assert "succeeded" in job["status"].lower(), job["logs"][-4000:]
    assert "cluster: 4 CPUs, 0 GPUs | workers=2" in job["logs"] and "epoch 3/3" in job["logs"]
    history = json.loads(read_object(mn_s3, "runs", "mn/job-train/metrics.json"))
    assert [h["epoch"] for h in history] == [1, 2, 3]  # every epoch exactly once
    # One restart, into epoch 2: the first group trained epoch 1 (and part of 2), the second the rest. A
    # run that started over from epoch 1 would have a second start at epoch 1.
    _, state = load_state(mn_s3, checkpoints(mn_s3, "mn/job-train/")[-1], str(tmp_path / "final"))
    assert [s["epoch"] for s in state["starts"]] == [1, 2], state["starts"]
    assert [h["attempt"] for h in history] == [0, 1, 1]
    for h in history:
        nodes = h["worker_nodes"]
        assert h["world_size"] == 2 and len(nodes) == 2 and nodes[0] != nodes[1], nodes
        assert h["test_images"] == 40  # every test image counted once across the two nodes
        assert h["train_images"] == 320
    # The head has no CPU: no rank there; the replacement node took one.
    assert set(history[-1]["worker_nodes"]) == worker_node_ids(cluster)
    recovery = history[1]["first_step_unix"] - killed
    print(f"\nnode loss: recovered in {recovery:.1f} s (kill -> first step after resume), 1 epoch recomputed")
    acc, n = accuracy_through_classifier(str(tmp_path / "final"), mn_data["local"])
    assert n == history[-1]["test_images"] and acc == pytest.approx(history[-1]["test_acc"], abs=1e-9)
    search_logs, best = clean_search
    assert "best trial" in search_logs and len(best["trials"]) == 2


def kind(value):
    """The shape of a JSON value: keys and types all the way down, not the numbers."""
    if isinstance(value, dict):
        return {k: kind(v) for k, v in value.items()}
    if isinstance(value, list):
        return ["list"] if value else []
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__


def test_multinode_search_survives_a_lost_node(cluster, mn_data, mn_s3, clean_search, tmp_path):
    log = str(tmp_path / "driver.log")
    # No early stopping here (grace period = epochs): the trial whose node is killed is surely still
    # running, in its epoch 2, instead of stopped by ASHA at its first report.
    proc = start_finetune(cluster, log, "tune", *SEARCH, "--tune.grace_period", "2", "--data", mn_data["s3"],
                          "--storage", "s3://runs/mn", "--name", "search-loss")
    wait_for(lambda: checkpoints(mn_s3, "mn/search-loss/trials/"), 400, "a trial's first checkpoint", proc, log)
    first = checkpoints(mn_s3, "mn/search-loss/trials/")[0]
    _, state = load_state(mn_s3, first, str(tmp_path / "first"))
    victim_id = state["history"][-1]["worker_nodes"][0]
    time.sleep(2)  # into that trial's epoch 2
    killed = cluster.remove_worker(next(n for n in cluster.workers if n.node_id == victim_id))
    time.sleep(3)
    cluster.workers.append(cluster.add_worker())
    assert proc.wait(timeout=900) == 0, open(log).read()[-5000:]

    best = json.loads(read_object(mn_s3, "runs", "mn/search-loss/best.json"))
    assert len(best["trials"]) == 2 and not any(t["error"] for t in best["trials"])
    assert kind(best["best"]) == kind(clean_search[1]["best"])  # an interrupted search's pick reads as a clean one's
    assert [kind(t) for t in best["trials"]] == [kind(t) for t in clean_search[1]["trials"]]
    states = {}
    for ckpt in checkpoints(mn_s3, "mn/search-loss/trials/"):
        states[ckpt.split("/")[3]] = ckpt  # the latest checkpoint of each trial (sorted, oldest first)
    trial_states = {t: load_state(mn_s3, c, str(tmp_path / t))[1] for t, c in states.items()}
    # Two at a time on two nodes: the trials ran on both worker nodes.
    assert len({h["worker_nodes"][0] for s in trial_states.values() for h in s["history"]}) >= 2
    interrupted = {t: s for t, s in trial_states.items() if len(s["starts"]) > 1}
    trial = first.split("/")[3]
    assert trial in interrupted, {t: s["starts"] for t, s in trial_states.items()}
    # It went on from its epoch-1 checkpoint (not from scratch), and reported every epoch once.
    assert [s["epoch"] for s in interrupted[trial]["starts"]] == [1, 2]
    assert [h["epoch"] for h in interrupted[trial]["history"]] == list(range(1, len(interrupted[trial]["history"]) + 1))
    summary = next(t for t in best["trials"] if t["trial"] == trial)
    assert summary["epochs"] == len(interrupted[trial]["history"])
    recovery = interrupted[trial]["history"][1]["first_step_unix"] - killed
    print(f"\nsearch: trial {trial} lost its node, resumed at epoch 2, first step {recovery:.1f} s after the kill")


def test_multinode_no_credentials_travel_or_land_anywhere(cluster, mn_s3, clean_search, monkeypatch):
    """Runs of every kind went through this cluster above (train, node loss, elastic, jobs, searches):
    no key of any identity is in any object they wrote (tuner.pkl, the experiment state, checkpoints,
    metrics...) or in any file of Ray's session folders; and the filesystem the trainer and the Tuner
    pickle carries none of the driver's keys."""
    from ray import cloudpickle

    from pipeline import storage

    wanted = {f"{name} {part}": value.encode() for name, ident in mn_s3.identities.items()
              for part, value in (("access key", ident.access_key), ("secret key", ident.secret_key))}
    hits, scanned = [], 0
    for bucket in ("runs", "datasets"):
        for key in keys(mn_s3, bucket):
            if not key.endswith("/"):
                body = read_object(mn_s3, bucket, key)
                scanned += 1
                hits += [f"s3://{bucket}/{key}: {what}" for what, v in wanted.items() if v in body]
    assert scanned > 50 and any(k.endswith("tuner.pkl") for k in keys(mn_s3, "runs", "mn/"))
    for root, _, files in os.walk(cluster.temp_dir):  # every node's session folder: logs, job working dirs
        for name in files:
            try:
                with open(os.path.join(root, name), "rb") as fh:
                    body = fh.read()
            except OSError:  # sockets
                continue
            # Including each node's runtime env agent log: Ray Tune copies the driver's AWS_* variables into
            # every trial's runtime_env, and that agent logs it; the search keeps them out of its environment.
            hits += [f"{root}/{name}: {what}" for what, v in wanted.items() if v in body]
    assert not hits, hits

    for k, v in mn_s3.env("driver").items():
        monkeypatch.setenv(k, v)
    fs, _ = storage.resolve("s3://runs/mn")
    blob = cloudpickle.dumps(fs)
    assert wanted["driver access key"] not in blob and wanted["driver secret key"] not in blob
    assert cloudpickle.loads(blob).get_file_info("runs/mn/job-search/best.json").size > 0  # resolved here again
