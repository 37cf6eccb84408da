"""Cluster operation against a real Ray head: `ray start --head` with token authentication on free
ports and its own temp dir, jobs submitted with the `ray job submit` CLI (the README's commands),
results in SeaweedFS; the head is stopped through the PIDs this test started, nothing machine-wide."""

import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import boto3
import pandas as pd
import pytest

from tests.conftest import REPO

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _keys(prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _object(key: str) -> bytes:
    return boto3.client("s3").get_object(Bucket="runs", Key=key)["Body"].read()


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pids_of(marker: str) -> list[int]:
    """Processes whose command line names this head's own temp dir (its raylet, GCS, workers...)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return [p for p in pids if p != os.getpid()]


@pytest.fixture(scope="module")
def ray_head(s3, tmp_path_factory):
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths have a length cap
    token = tmp_path_factory.mktemp("auth") / "auth_token"
    token.write_text(secrets.token_hex(32))
    # What a cluster node has in its environment: token auth and S3 credentials (as an instance role would).
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           # The job's `python` is the node's: here, this virtualenv's (activated or not).
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, nm, om, client, agent, agent_grpc, metrics, renv, wmin = _free_ports(10)
    log = open(tmp_path_factory.mktemp("head") / "ray_start.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}", f"--temp-dir={temp_dir}",
         "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            listed = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True)
            if listed.returncode == 0:
                break
            assert head.poll() is None and time.time() < deadline, open(log.name).read()[-3000:]
            time.sleep(2)
        yield {"address": address, "env": env, "token": token}
    finally:
        # Stop only what we started: the `ray start` process group, then anything still naming our temp dir.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                pass
            for pid in _pids_of(temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3)
        head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(head, job: str, *args: str) -> tuple[str, str, str]:
    """The README's command: ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/..."""
    sid = f"{job}-{uuid.uuid4().hex[:8]}"
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", head["address"], "--submission-id", sid, "--working-dir", ".",
         "--runtime-env", "jobs/runtime_env.yaml", "--", "python", f"jobs/{job}.py", *args],
        cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=900)
    status = subprocess.run([RAY, "job", "status", sid, "--address", head["address"]], env=head["env"],
                            capture_output=True, text=True).stdout
    logs = subprocess.run([RAY, "job", "logs", sid, "--address", head["address"]], env=head["env"],
                          capture_output=True, text=True).stdout
    return status, logs, submit.stdout + submit.stderr


def test_bad_config_job_fails_with_the_config_error(ray_head, tiny_dataset):
    status, logs, _ = _submit(ray_head, "train", "--config", "configs/smoke_cpu.yaml", "--data", tiny_dataset,
                              "--epochs", "0")
    assert "failed" in status.lower()
    assert "config error: optim.epochs = 0: must be in 1..10000" in logs


def test_evaluate_and_predict_on_the_trained_checkpoint(ray_local, tiny_dataset, s3, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["train", "--config", "configs/smoke_cpu.yaml", "--data", tiny_dataset, "--epochs", "1",
                 "--storage", "s3://runs/jobs", "--name", "job-eval"]) == 0
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["evaluate", "s3://runs/jobs/job-eval", "--data", tiny_dataset, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["images"] == 24 and sum(map(sum, result["confusion"])) == 24
    assert f"test accuracy {result['accuracy']:.4f} on 24 images" in printed
    history = json.loads(_object("jobs/job-eval/metrics.json"))
    assert result["accuracy"] == pytest.approx(history[-1]["test_acc"])  # same model, same test images

    images = os.path.join(tiny_dataset, "test")
    assert main(["predict", "s3://runs/jobs/job-eval", images, "--output", "s3://runs/jobs/job-eval/predictions"]) == 0
    keys = [k for k in _keys("jobs/job-eval/predictions/") if k.endswith(".csv")]
    frames = [pd.read_csv(io.BytesIO(_object(k))) for k in keys]
    pred = pd.concat(frames)
    assert len(pred) == 24 and set(pred.columns) >= {"path", "label", "probability"}
    truth = pred["path"].str.split("/").str[-2]
    assert (pred["label"] == truth).mean() == pytest.approx(result["accuracy"])
    assert pred["probability"].between(0.5, 1.0).all()
