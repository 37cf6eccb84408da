"""cluster.yaml is a real Ray cluster-launcher config: valid against the autoscaler's own schema."""

import json
import os

import jsonschema
import ray
import yaml

from pipeline.config import Config, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    with open(os.path.join(REPO, "cluster.yaml")) as fh:
        return yaml.safe_load(fh)


def test_validates_against_the_installed_autoscaler_schema():
    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as fh:
        jsonschema.validate(load(), json.load(fh))


def test_node_types_autoscale_from_zero_with_an_instance_role_and_no_keys():
    cfg = load()
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert {v["node_config"]["InstanceType"] for v in workers.values()} == {"g5.2xlarge", "g5.12xlarge"}
    assert all(v["min_workers"] == 0 for v in workers.values())
    assert all("IamInstanceProfile" in v["node_config"] for v in cfg["available_node_types"].values())
    text = open(os.path.join(REPO, "cluster.yaml")).read()
    assert "aws_secret_access_key" not in text.lower() and "AKIA" not in text
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts)
    assert "/home/ubuntu/.ray/auth_token" in cfg["file_mounts"]


def test_default_scaling_fits_the_gpu_node_types(tmp_path):
    """Default workers (0 = from the cluster) give one DDP worker per GPU of either node type, and
    the global batch splits evenly; a Tune trial fits one 1-GPU node."""
    from pipeline.resources import auto_workers

    gpus = {"g5.2xlarge": 1, "g5.12xlarge": 4}
    cfg = Config()
    cfg.data.path = str(tmp_path)
    validate(cfg)
    assert cfg.scaling.workers == 0
    for node, n in gpus.items():
        assert auto_workers(cfg, {"CPU": 8 * n, "GPU": n}) == n, node
        assert cfg.data.batch_size % n == 0
    assert auto_workers(cfg, {"CPU": 8}) == 1  # CPU-only: one process using every core
    assert cfg.tune.workers_per_trial * cfg.scaling.gpus_per_worker <= gpus["g5.2xlarge"]
