"""Shared fixtures: one real in-process Ray for the session, generated image datasets."""

import json
import os

import numpy as np
import pytest
import ray
import torch
import torchvision
from PIL import Image

from pipeline.synthetic import make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory):
    """The caches the pipeline fills (fetched S3 objects, torch hub downloads) in this session's
    folder, never the user's home: each session's S3 server is a new endpoint, a new cache key."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XDG_CACHE_HOME", str(cache))
        env.setenv("TORCH_HOME", str(cache / "torch"))
        yield


@pytest.fixture(scope="session")
def ray_local(s3):
    """A real local Ray (the same in-process start a user's `finetune train` does), with the
    dashboard as a user's has it: Ray Train's PlacementGroupCleaner asks its state API whether a
    run's controller is gone, and without it the placement groups of runs that Tune ends early
    stay, holding CPUs that later Ray Data tasks then wait for.

    Started after the S3 server, with its credentials in the environment: Ray's worker processes
    inherit the environment of the ray.init that started them, and resolve S3 credentials from it
    (no key travels in what Ray pickles). Its value: the Ray session's folder (logs and all)."""
    from pipeline.devs3 import free_port

    ray.shutdown()  # whatever an earlier test left running: this session's Ray is this one
    context = ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=True, dashboard_port=free_port(),
                       configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    yield context.address_info["session_dir"]
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Two visually distinct classes, 64 px JPEGs: 32 train + 12 test images per class."""
    return make_image_folder(str(tmp_path_factory.mktemp("tiny")), train_per_class=32, test_per_class=12, size=64)


@pytest.fixture(scope="session")
def source_weights(tiny_dataset, tmp_path_factory):
    """A stand-in for pretrained weights: a random-init ResNet-18 whose BatchNorm statistics are
    calibrated on the training images, saved as a state_dict with a sidecar (mean/std/categories).

    Fine-tuned with frozen BN it behaves like real pretrained weights (consistent train and eval
    statistics), which a from-scratch BN network cannot after a dozen steps."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(tiny_dataset, "train")) for f in fs]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((48, 48)))).permute(2, 0, 1)
                     for f in sorted(files)]).float().div(255).sub(0.5).div(0.5)
    model.train()
    with torch.no_grad():
        for chunk in x.split(16):
            model(chunk)
    path = tmp_path_factory.mktemp("weights") / "calibrated_resnet18.pth"
    torch.save(model.state_dict(), path)
    categories = [f"class{i}" for i in range(1000)]
    path.with_suffix(".json").write_text(json.dumps({"mean": [0.5] * 3, "std": [0.5] * 3, "categories": categories}))
    return str(path)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback for the session (buckets 'runs' and 'datasets'),
    with its admin credentials in this process's environment; stopped by its own PID."""
    from pipeline.devs3 import LocalS3

    server = LocalS3.with_default_identities(str(tmp_path_factory.mktemp("seaweedfs"))).start()
    for bucket in ("runs", "datasets"):
        server.create_bucket(bucket)
    with pytest.MonkeyPatch.context() as env:
        for k, v in server.env().items():
            env.setenv(k, v)
        env.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        yield server
    server.stop()
