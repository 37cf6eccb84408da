"""Object storage on a real SeaweedFS S3 server: staging, training from and to s3://, resume,
worker failure, and clear errors for every way the storage can be wrong."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import boto3
import pytest

from pipeline import storage
from pipeline.cli import build_parser
from pipeline.config import config_from_args
from pipeline.devs3 import free_port
from pipeline.runner import run_training
from pipeline.stage import stage

SMALL = ["--data.image_size", "48", "--data.resize_size", "56", "--batch-size", "16", "--data.preview_images", "2"]


def objects(bucket: str, prefix: str) -> dict:
    client = boto3.client("s3")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


@pytest.fixture(scope="module")
def staged(s3, tiny_dataset):
    first = stage(tiny_dataset, "s3://datasets/tiny")
    return first


def test_stage_is_idempotent_and_verified(staged, tiny_dataset):
    n_files = sum(len(f) for _, _, f in os.walk(tiny_dataset))
    assert staged.uploaded == n_files and staged.skipped == 0
    again = stage(tiny_dataset, "s3://datasets/tiny")
    assert again.uploaded == 0 and again.skipped == n_files
    manifest = json.loads(boto3.client("s3").get_object(Bucket="datasets", Key="tiny/MANIFEST.json")["Body"].read())
    assert len(manifest["files"]) == n_files
    entry = next(e for e in manifest["files"] if e["key"] == "train/hotdog/00000.jpg")
    local = os.path.join(tiny_dataset, "train", "hotdog", "00000.jpg")
    assert entry["size"] == os.path.getsize(local) and len(entry["sha256"]) == 64


@pytest.fixture(scope="module")
def s3_run(ray_local, staged, source_weights):
    cfg = config_from_args(build_parser().parse_args(
        ["train", "--data", "s3://datasets/tiny", "--weights", source_weights, "--freeze-bn", "--epochs", "2",
         "--storage", "s3://runs/exp", "--name", "s3run", *SMALL]))
    return run_training(cfg)


def test_train_reads_s3_data_and_writes_s3_storage(s3_run):
    out = s3_run
    assert [h["epoch"] for h in out.history] == [1, 2] and out.history[0]["test_images"] == 24
    keys = objects("runs", "exp/s3run/")
    for name in ("metrics.json", "metrics.csv", "curves.png", "preview.png"):
        assert f"exp/s3run/{name}" in keys
    ckpts = [k for k in keys if k.endswith("/checkpoint.pt")]
    assert len(ckpts) == 2 and out.model_checkpoint.startswith("s3://runs/exp/s3run/checkpoint_")


def test_runs_list_show_download(s3_run, tmp_path):
    from pipeline import runs

    rows = {r["name"]: r for r in runs.list_runs("s3://runs/exp")}
    assert rows["s3run"]["epochs"] == 2 and rows["s3run"]["state"] == "finished"
    text = runs.show_run("s3://runs/exp/s3run")
    assert "    1 " in text and "    2 " in text and "s3://runs/exp/s3run/checkpoint_" in text
    target = runs.download_run("s3://runs/exp/s3run", str(tmp_path / "dl"), best=True)
    assert os.path.exists(os.path.join(target, "checkpoint.pt"))
    assert os.path.exists(tmp_path / "dl" / "metrics.json")


def test_worker_failure_recovers_from_latest_checkpoint(ray_local, tiny_dataset, source_weights, tmp_path):
    """A training worker killed (SIGKILL, as the OOM killer would) once the first checkpoint is
    committed: the group restarts from it and every epoch is reported once."""
    import threading

    from ray.util.state import list_actors

    cfg = config_from_args(build_parser().parse_args(
        ["train", "--data", tiny_dataset, "--weights", source_weights, "--freeze-bn", "--epochs", "4",
         "--workers", "2", "--storage", str(tmp_path), "--name", "crash", *SMALL]))
    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(out=run_training(cfg)))
    run.start()
    deadline = time.monotonic() + 300
    while not (tmp_path / "crash" / "checkpoint_manager_snapshot.json").exists():
        assert run.is_alive() and time.monotonic() < deadline, "no committed checkpoint"
        time.sleep(0.2)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    os.kill(max(w.pid for w in workers), signal.SIGKILL)
    run.join(timeout=600)
    history = outcome["out"].history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[0]["attempt"] == 0 and history[-1]["attempt"] == 1  # one restart, and it went on from there


def _finetune(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def test_killed_driver_resumes_where_it_stopped(s3, staged, source_weights):
    epochs = 4  # enough that the kill lands mid-run however fast the tiny epochs go
    args = ["train", "--data", "s3://datasets/tiny", "--weights", source_weights, "--freeze-bn", "--epochs",
            str(epochs), "--storage", "s3://runs/resume", "--name", "r1", *SMALL]
    first = _finetune(args)
    seen = []
    for line in first.stdout:
        seen.append(line)
        if f"epoch 1/{epochs}" in line:
            # Kill as soon as the epoch-1 checkpoint is committed, not after a fixed sleep (later
            # epochs may land too by then: the resume point is read from the output). Committed
            # means recorded by Ray Train's controller in the run's checkpoint snapshot, which it
            # writes after the worker's upload: a checkpoint.pt alone in the bucket is not yet a
            # checkpoint a rerun will find (killing in between made this test flaky).
            deadline = time.monotonic() + 60
            while "resume/r1/checkpoint_manager_snapshot.json" not in objects("runs", "resume/r1/"):
                assert time.monotonic() < deadline, "no committed epoch-1 checkpoint after 60 s"
                time.sleep(0.2)
            os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
            break
    first.wait()
    assert any(f"epoch 1/{epochs}" in line for line in seen), "".join(seen[-30:])
    second = _finetune(args)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-3000:]
    resumed = re.search(r"resuming from epoch (\d+) checkpoint", out)
    assert resumed, out[-3000:]
    done = int(resumed.group(1))
    assert 1 <= done < epochs, f"killed after the run ended (resumed at epoch {done})"
    assert all(f"epoch {e}/{epochs}" in out for e in range(done + 1, epochs + 1)), out[-3000:]
    assert not any(f"epoch {e}/{epochs} " in out for e in range(1, done + 1)), out[-3000:]
    history = json.loads(boto3.client("s3").get_object(Bucket="runs", Key="resume/r1/metrics.json")["Body"].read())
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    # Credentials never appear in the run's output or anything it saved.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in out and secret not in "".join(seen)
    client = boto3.client("s3")
    for key in objects("runs", "resume/r1/"):
        assert secret.encode() not in client.get_object(Bucket="runs", Key=key)["Body"].read(), key


def _preflight_error(env: dict, uri: str) -> tuple[str, float]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--data", ".", "--storage", uri],
                       capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    return p.stderr.strip().splitlines()[-1], time.monotonic() - t0


def test_unreachable_endpoint_is_a_clear_error_within_30s(s3):
    dead = f"http://127.0.0.1:{free_port()}"
    msg, took = _preflight_error({"AWS_ENDPOINT_URL": dead}, "s3://runs/x")
    assert took < 30 and "cannot reach" in msg and dead in msg and "bucket 'runs'" in msg


def test_bad_credentials_missing_bucket_and_no_permission(s3):
    msg, took = _preflight_error({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "s3://runs/x")
    assert took < 30 and "credentials rejected" in msg and s3.endpoint in msg and "'runs'" in msg
    assert "not-the-secret" not in msg
    msg, _ = _preflight_error({}, "s3://no-such-bucket/x")
    assert "bucket 'no-such-bucket' does not exist" in msg and s3.endpoint in msg
    ro = s3.identities["readonly"]
    msg, _ = _preflight_error({"AWS_ACCESS_KEY_ID": ro.access_key, "AWS_SECRET_ACCESS_KEY": ro.secret_key},
                              "s3://runs/x")
    assert "no permission to write" in msg and "'runs'" in msg


def test_weights_from_s3_are_verified_and_cached(s3, source_weights, tmp_path):
    import hashlib

    from pipeline.config import ModelConfig
    from pipeline.model import load_source_weights

    client = boto3.client("s3")
    client.upload_file(source_weights, "datasets", "weights/w.pth")
    client.upload_file(source_weights.replace(".pth", ".json"), "datasets", "weights/w.json")
    digest = hashlib.sha256(open(source_weights, "rb").read()).hexdigest()
    cfg = ModelConfig(arch="resnet18", weights="s3://datasets/weights/w.pth", weights_sha256=digest)
    src = load_source_weights(cfg)
    assert src.mean == (0.5, 0.5, 0.5)  # the sidecar came along
    client.delete_object(Bucket="datasets", Key="weights/w.pth")
    assert load_source_weights(cfg).state_dict.keys() == src.state_dict.keys()  # served from the cache
    with pytest.raises(storage.StorageError, match="does not match"):
        client.upload_file(source_weights, "datasets", "weights/other.pth")
        load_source_weights(ModelConfig(arch="resnet18", weights="s3://datasets/weights/other.pth",
                                        weights_sha256="0" * 64))


def test_keys_leave_the_environment_but_the_storage_still_works(s3):
    """Around a search the keys move out of os.environ (Ray Tune would copy them into every trial's
    runtime_env); pyarrow and boto3 in this process still reach the bucket through the profile file."""
    before = {k: os.environ.get(k) for k in storage.KEY_VARIABLES + ("AWS_SHARED_CREDENTIALS_FILE",)}
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    with storage.keys_held_in_a_private_file():
        assert not any(k in os.environ for k in storage.KEY_VARIABLES)
        assert secret not in "".join(os.environ.values())
        held = os.environ["AWS_SHARED_CREDENTIALS_FILE"]
        assert os.stat(held).st_mode & 0o077 == 0
        storage.write_bytes("s3://runs/keys/probe.txt", b"held")
        assert storage.read_bytes("s3://runs/keys/probe.txt") == b"held"
        storage.preflight("s3://runs/keys", write=True)  # boto3
    assert {k: os.environ.get(k) for k in before} == before and not os.path.exists(held)
