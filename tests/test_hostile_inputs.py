"""Inputs an attacker or an unlucky user sends: each is refused with one clear line naming it, no
traceback, the documented exit code, and nothing that already exists is touched."""

import hashlib
import os

import pytest

from pipeline.cli import main


def snapshot(folder: str) -> dict:
    """Every file under folder with its content hash: 'unchanged' means this dict is equal."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def existing_run(tmp_path):
    """A run folder with a checkpoint and metrics, as a finished run leaves it."""
    run = tmp_path / "runs" / "kept"
    (run / "checkpoint_000001").mkdir(parents=True)
    (run / "checkpoint_000001" / "checkpoint.pt").write_bytes(os.urandom(256))
    (run / "metrics.json").write_text('[{"epoch": 1, "test_acc": 0.5}]')
    return run


def refused(capsys, argv: list[str], code: int) -> str:
    """Run the CLI; assert the exit code and a single message line without a traceback; return it."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("flags, field", [
    (["--lr", "inf"], "optim.lr"),
    (["--lr", "nan"], "optim.lr"),
    (["--optim.momentum=-inf"], "optim.momentum"),
    (["--tune.wise_alphas", "0.5,nan"], "tune.wise_alphas"),
    (["--seed", "-1"], "optim.seed"),
    (["--data.resize_size", "100000"], "data.resize_size"),
    (["--data.image_size", "100000"], "data.image_size"),
    (["--name", "."], "run.name"),
    (["--name", ".."], "run.name"),
    (["--name", "../kept"], "run.name"),
    (["--name", "a/b"], "run.name"),
    (["--name", ".hidden"], "run.name"),
])
def test_bad_config_values_are_refused_before_any_work(capsys, tiny_dataset, existing_run, flags, field):
    store = str(existing_run.parent)
    before = snapshot(store)
    err = refused(capsys, ["train", "--data", tiny_dataset, "--storage", store, *flags], 2)
    assert err.startswith(f"config error: {field} = ")
    assert snapshot(store) == before


def test_yaml_booleans_are_accepted_for_boolean_like_fields(tmp_path, tiny_dataset):
    from pipeline.cli import build_parser
    from pipeline.config import config_from_args

    path = tmp_path / "c.yaml"
    path.write_text("scaling: {use_gpu: false}\nrun: {storage: /tmp/x}\n")
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(path), "--data", tiny_dataset]))
    assert cfg.scaling.use_gpu == "false"
    path.write_text("scaling: {use_gpu: true}\n")
    assert config_from_args(build_parser().parse_args(["train", "--config", str(path)])).scaling.use_gpu == "true"
