"""Shared fixtures: one real in-process Ray for the session, generated image datasets."""

import os

import pytest
import ray

from pipeline.synthetic import make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (the same in-process start a user's `finetune train` does)."""
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Two visually distinct classes, 64 px JPEGs: 32 train + 12 test images per class."""
    return make_image_folder(str(tmp_path_factory.mktemp("tiny")), train_per_class=32, test_per_class=12, size=64)
