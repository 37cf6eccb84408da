"""Inputs an attacker or an unlucky user sends: each is refused with one clear line naming it, no
traceback, the documented exit code, and nothing that already exists is touched."""

import hashlib
import json
import os
import re

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


# Ray's own processes, as Ray prefixes their forwarded lines: "(RayTrainWorker pid=1, ip=...)", "(pid=1)", "(raylet)".
RAY_WORKER_LINE = re.compile(r"(\x1b\[[\d;]*m)*\((raylet|\w+ pid=\d+[^)]*|pid=\d+[^)]*)\)")


def refused(capsys, argv: list[str], code: int) -> str:
    """Run the CLI; assert the exit code, no traceback and exactly one error line; return that line
    (a refusal after Ray has started comes after Ray's own start-up lines)."""
    assert main(argv) == code
    # Not ours: a Ray logging handler left bound to an earlier test's captured stream reports its own
    # "--- Logging error ---" (with a traceback) when it writes.
    err = re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", "", capsys.readouterr().err, flags=re.S)
    # What Ray forwards from its worker processes' own logs, "(RayTrainWorker pid=...) ...", is theirs too.
    err = "\n".join(line for line in err.splitlines() if not RAY_WORKER_LINE.match(line))
    errors = [line for line in err.splitlines() if line.startswith(("error: ", "config error: "))]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


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


def test_local_writes_are_atomic(tmp_path):
    """A reader polling a file that is rewritten again and again only ever sees a whole version."""
    import threading

    from pipeline import storage

    path = tmp_path / "metrics.json"
    versions = [bytes([65 + i]) * (8 << 20) for i in range(6)]
    storage.write_bytes(str(path), versions[0])
    seen, done = set(), threading.Event()

    def read():
        while not done.is_set():
            seen.add(os.path.getsize(path))

    reader = threading.Thread(target=read)
    reader.start()
    for data in versions[1:] * 3:
        storage.write_bytes(str(path), data)
    done.set()
    reader.join()
    assert seen == {8 << 20} and sorted(os.listdir(tmp_path)) == ["metrics.json"]


def test_a_truncated_metrics_file_is_reported_and_other_runs_still_listed(capsys, tmp_path, existing_run):
    broken = existing_run.parent / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text('[{"epoch": 1, "test_a')
    assert main(["runs", "list", str(existing_run.parent)]) == 0
    out = capsys.readouterr().out
    assert "kept" in out and re.search(r"broken .* unreadable: .*metrics.json is not valid JSON", out), out


def hostile_summary(tmp_path) -> str:
    """A search folder whose best.json was written by someone else: markup and mathtext in every string."""
    trial = {"trial": "<script>alert(1)</script>", "overrides": {"optim.lr": 1e-3, "<i>model</i>.$\\foo$": "<b>2</b>"},
             "epochs": 2, "best_val_acc": 0.8, "val_acc_curve": [0.7, 0.8], "stopped_early": False, "error": False}
    best = {**trial, "val_acc": 0.8, "epoch": 2, "test_acc": 0.75, "test_images": 8,
            "checkpoint": "<img src=x onerror=alert(2)>", "test_confusion": [[3, 1], [1, 3]]}
    summary = {"experiment": "<h1>owned</h1>", "metric": "val_acc<i>", "wall_time_s": 12.0, "trials": [trial],
               "best": best, "classes": ["a$\\foo$b", "<b>dog</b>"]}
    folder = tmp_path / "search"
    folder.mkdir()
    (folder / "best.json").write_text(json.dumps(summary))
    return str(folder)


def test_report_escapes_every_value_from_the_summary_and_draws_mathtext_names(capsys, tmp_path):
    folder = hostile_summary(tmp_path)
    assert main(["report", folder]) == 0
    page = open(os.path.join(folder, "report.html")).read()
    for raw in ("<script>", "<img src=x", "<h1>owned", "val_acc<i>", "<i>model", "<b>2"):
        assert raw not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_truncated_summary_is_one_clear_error(capsys, tmp_path):
    folder = hostile_summary(tmp_path)
    with open(os.path.join(folder, "best.json"), "r+") as fh:
        fh.truncate(100)
    err = refused(capsys, ["report", folder], 1)
    assert "best.json is not valid JSON" in err


def test_runs_download_never_copies_what_a_tampered_snapshot_points_at(capsys, tmp_path):
    """Ray Train's checkpoint_manager_snapshot.json names each checkpoint folder; one that points out of
    the run (here at another folder of the storage machine) is refused, and nothing is written."""
    import ray

    run = tmp_path / "runs" / "r"
    (run / "checkpoint_000001").mkdir(parents=True)
    (run / "checkpoint_000001" / "checkpoint.pt").write_bytes(b"weights")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "passwd").write_text("secret")
    state = {"checkpoint_dir_name": "../../private", "metrics": {"epoch": 1, "test_acc": 0.5}}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({
        "ray_version": ray.__version__, "checkpoint_results": [state], "checkpoint_report_indices": [0],
        "latest_checkpoint_result": state, "pending_training_results": [], "pending_validation_specs": [],
        "current_report_index": 1, "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}))
    dest = tmp_path / "download"
    err = refused(capsys, ["runs", "download", str(run), str(dest)], 1)
    assert "not a checkpoint folder of this run" in err and not dest.exists()


class Planted:
    """Unpickling this runs a shell command: what a hostile weights file carries."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def served_weights(tmp_path, monkeypatch):
    """An empty torch hub cache and a local HTTP mirror serving resnet18's file name with a planted pickle."""
    import functools
    import http.server
    import threading

    import torch
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    served = tmp_path / "served"
    served.mkdir()
    marker = tmp_path / "code-ran"
    name = torchvision.models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[1]
    torch.save({"conv1.weight": Planted(str(marker))}, served / name)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served / name, f"http://127.0.0.1:{server.server_address[1]}", marker
    server.shutdown()


@pytest.mark.parametrize("where", ["mirror", "cache"])
def test_imagenet_weights_never_run_code(capsys, served_weights, tiny_dataset, tmp_path, where):
    """Even a file that matches its pinned sha256, downloaded or already in torch hub's cache."""
    path, url, marker = served_weights
    pinned = hashlib.sha256(path.read_bytes()).hexdigest()
    args = ["train", "--data", tiny_dataset, "--storage", str(tmp_path / "runs"), "--weights", "imagenet",
            "--model.weights_sha256", pinned]
    if where == "cache":
        cache = tmp_path / "torch_home" / "hub" / "checkpoints"
        cache.mkdir(parents=True)
        (cache / path.name).write_bytes(path.read_bytes())
    err = refused(capsys, [*args, *(["--model.weights_mirror", url] if where == "mirror" else [])], 1)
    assert "not a loadable state_dict (unsupported GLOBAL posix.system" in err and not marker.exists()


def test_a_plain_http_mirror_needs_a_pinned_sha256(capsys, served_weights, tiny_dataset, tmp_path):
    _, url, _ = served_weights
    err = refused(capsys, ["train", "--data", tiny_dataset, "--storage", str(tmp_path / "runs"), "--weights",
                           "imagenet", "--model.weights_mirror", url], 2)
    assert err.startswith("config error: model.weights_mirror") and "https://" in err


def test_local_weights_are_checked_against_their_pin_and_their_sidecar_must_load(capsys, tmp_path, tiny_dataset):
    import torch
    import torchvision

    path = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    args = ["train", "--data", tiny_dataset, "--storage", str(tmp_path / "runs"), "--weights", str(path)]
    err = refused(capsys, [*args, "--model.weights_sha256", "0" * 64], 1)
    assert f"{path}: sha256 " in err and "does not match model.weights_sha256" in err
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "w.json").write_text('{"mean": [0.5, 0.5, 0.5], "std": ')  # truncated
    err = refused(capsys, [*args, "--model.weights_sha256", digest], 1)
    assert "w.json: the weights' sidecar cannot be read" in err
    (tmp_path / "w.json").write_text('{"mean": "0.5", "std": [0.5, 0.5, 0.5]}')
    assert "w.json: the weights' sidecar has bad mean" in refused(capsys, args, 1)
    (tmp_path / "w.json").write_text('{"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}')
    err = refused(capsys, [*args, "--model.sidecar_sha256", "1" * 64], 1)
    assert "w.json: sha256 " in err and "does not match" in err


SECRET = "tok3n-9f8e7d"
MIRROR = f"https://reader:{SECRET}@mirror.example/models?X-Amz-Signature={SECRET}sig&X-Amz-Credential={SECRET}cred"


def test_url_credentials_are_redacted_wherever_printed_or_saved(ray_local, capsys, tiny_dataset, source_weights,
                                                                 tmp_path):
    """A mirror URL with a user:token part and a presigned query: not in the banner, the checkpoint
    (checkpoint.pt and config.yaml), metrics, or an error message."""
    store = tmp_path / "runs"
    assert main(["train", "--data", tiny_dataset, "--weights", source_weights, "--freeze-bn", "--epochs", "1",
                 "--storage", str(store), "--name", "r", "--model.weights_mirror", MIRROR,
                 "--data.image_size", "48", "--data.resize_size", "56", "--batch-size", "16",
                 "--data.preview_images", "0"]) == 0
    out = capsys.readouterr()
    assert "mirror.example" in out.out and "reader:" not in out.out and SECRET not in out.out + out.err
    files = [os.path.join(r, f) for r, _, fs in os.walk(store) for f in fs]
    assert any(f.endswith("config.yaml") for f in files) and any(f.endswith("checkpoint.pt") for f in files)
    assert [f for f in files if SECRET.encode() in open(f, "rb").read()] == []
    err = refused(capsys, ["data", "fetch", f"http://u:{SECRET}@127.0.0.1:9/x.zip?token={SECRET}",
                           "--dest", str(tmp_path / "dl"), "--sha1", "0" * 40], 1)
    assert "127.0.0.1:9" in err and SECRET not in err
    err = refused(capsys, ["train", "--data", tiny_dataset, "--storage", str(store),
                           "--model.weights_mirror", f"ftp://u:{SECRET}@host/"], 2)
    assert "model.weights_mirror" in err and SECRET not in err


@pytest.fixture
def list_only_s3(tmp_path, tiny_dataset, monkeypatch):
    """A second SeaweedFS whose identity may list the dataset but not read it: what an expired or
    narrowed policy looks like from inside a run (every listing works, every read is refused)."""
    import secrets

    from pipeline.devs3 import Identity, LocalS3
    from pipeline.stage import stage

    admin = Identity("a-" + secrets.token_hex(4), secrets.token_hex(16), ["Admin", "Read", "Write", "List"])
    lister = Identity("l-" + secrets.token_hex(4), secrets.token_hex(16), ["List"])
    server = LocalS3(str(tmp_path / "s3"), {"admin": admin, "lister": lister}).start()
    server.create_bucket("data")
    for k, v in server.env("admin").items():
        monkeypatch.setenv(k, v)
    stage(tiny_dataset, "s3://data/tiny")
    for k, v in server.env("lister").items():
        monkeypatch.setenv(k, v)
    yield server
    server.stop()


def test_a_refused_listing_is_a_storage_error(capsys, list_only_s3):
    err = refused(capsys, ["data", "check", "s3://data/tiny"], 1)
    assert err.startswith("error: cannot list s3://data/tiny: ") and "ACCESS_DENIED" in err


def test_a_failed_read_is_a_storage_error_not_a_bad_image(list_only_s3, monkeypatch):
    """The dataset was listed; then the storage goes away. Training's decode and `data check` read
    through data.read_file: the storage's error, never 'undecodable'."""
    from pipeline import data, storage
    from pipeline.transforms import ImagePreset

    for k, v in list_only_s3.env("admin").items():
        monkeypatch.setenv(k, v)
    index = data.scan_image_folder("s3://data/tiny")
    fs, _ = storage.resolve("s3://data/tiny")
    first = index.files["test"][0][0]
    assert data.decode_or_reason(data.read_file(fs, first), ImagePreset(), False)[1] == ""
    list_only_s3.stop()
    with pytest.raises(storage.StorageError, match=f"cannot read {first}: "):
        data.read_file(fs, first)
    assert data.decode_or_reason(b"not an image", ImagePreset(), False)[1].startswith("UnidentifiedImageError")


def test_links_and_undecodable_names_in_a_dataset_are_skipped_and_reported(capsys, tmp_path):
    """A link out of the dataset, a link loop and a file name that is not UTF-8: none is followed or
    read, `data check` names what it skipped, and nothing raises."""
    from pipeline.synthetic import make_image_folder

    root = make_image_folder(str(tmp_path / "ds"), train_per_class=3, test_per_class=2, size=32)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private.jpg").write_bytes((tmp_path / "ds" / "train" / "hotdog" / "00000.jpg").read_bytes())
    cls = os.path.join(root, "train", "hotdog")
    os.symlink(str(outside), os.path.join(cls, "escape"))
    os.symlink(str(outside / "private.jpg"), os.path.join(cls, "linked.jpg"))
    os.symlink("..", os.path.join(cls, "loop"))
    with open(os.path.join(os.fsencode(cls), b"bad\xffname.jpg"), "wb") as fh:
        fh.write(b"not read")
    assert main(["data", "check", root]) == 0
    out = capsys.readouterr().out
    assert "3 symbolic links skipped" in out and "1 names that are not UTF-8 skipped" in out
    assert "private" not in out and re.search(r"hotdog\s+3\s+2", out), out


def test_a_rerun_resumes_only_the_same_run_and_never_beside_a_live_one(ray_local, capsys, tiny_dataset,
                                                                       source_weights, tmp_path):
    import shutil

    data = str(tmp_path / "data")
    shutil.copytree(tiny_dataset, data)
    store = tmp_path / "runs"
    args = ["train", "--data", data, "--weights", source_weights, "--freeze-bn", "--epochs", "1", "--storage",
            str(store), "--name", "r", "--data.image_size", "48", "--data.resize_size", "56", "--batch-size", "16",
            "--data.preview_images", "0"]
    assert main(args) == 0
    run = store / "r"
    assert json.loads((run / "run.json").read_text())["dataset"]["files"] == 88 and not (run / "lease.json").exists()
    before = snapshot(str(run))
    capsys.readouterr()

    err = refused(capsys, [*args, "--data.resize_size", "64"], 1)
    assert "holds a different run (data.resize_size differ)" in err and "--name" in err
    err = refused(capsys, [*args, "--run.resume", "never"], 1)
    assert "already holds a run and --run.resume is never" in err
    shutil.copy(os.path.join(data, "train", "hotdog", "00000.jpg"), os.path.join(data, "train", "hotdog", "new.jpg"))
    assert "(dataset differ)" in refused(capsys, args, 1)
    os.remove(os.path.join(data, "train", "hotdog", "new.jpg"))
    assert snapshot(str(run)) == before  # every refusal left the run as it was

    import time

    (run / "lease.json").write_text(json.dumps({"host": "elsewhere", "pid": 1, "id": "x", "heartbeat": time.time()}))
    err = refused(capsys, [*args, "--epochs", "2"], 1)
    assert "is being written by another run (host elsewhere, pid 1" in err
    err = refused(capsys, [*args, "--name", "fresh", "--run.resume", "must"], 1)
    assert "holds no run to resume" in err and not (store / "fresh").exists()


def test_a_planted_search_state_is_never_unpickled(ray_local, capsys, tiny_dataset, source_weights, tmp_path):
    """Whoever can write the runs prefix plants a tuner.pkl; a plain rerun of that search name must not
    unpickle it (auto verifies what this project recorded), and neither may an altered recorded one."""
    import pickle

    from pipeline import runstate

    store = tmp_path / "runs"
    exp = store / "s"
    exp.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    (exp / "tuner.pkl").write_bytes(pickle.dumps(Planted(str(marker))))
    args = ["tune", "--data", tiny_dataset, "--weights", source_weights, "--freeze-bn", "--storage", str(store),
            "--name", "s", "--data.image_size", "48", "--data.resize_size", "56", "--batch-size", "16",
            "--num-samples", "2", "--epochs", "1", "--data.preview_images", "0"]
    err = refused(capsys, args, 1)
    assert "holds a search whose state this project did not record" in err and not marker.exists()
    # A recorded state, then one file altered behind the project's back.
    (exp / runstate.TUNE_STATE).write_text(json.dumps({"files": {"tuner.pkl": "0" * 64}}))
    err = refused(capsys, args, 1)
    assert "tuner.pkl changed since this project recorded the search state" in err and not marker.exists()
    assert "--run.resume is never" in refused(capsys, [*args, "--run.resume", "never"], 1)


def test_storage_lost_mid_run_fails_it_with_the_storage_error_and_keeps_its_checkpoint(ray_local, capsys,
                                                                                       list_only_s3, monkeypatch,
                                                                                       tmp_path):
    """A streamed run reads the bucket every epoch. The server goes away after the first
    checkpoint: the worker group's restart finds it gone as well, and the run fails with the
    storage's error, never as a run that trained on fewer ("undecodable") images."""
    import glob
    import threading
    import time

    for k, v in list_only_s3.env("admin").items():
        monkeypatch.setenv(k, v)
    run = tmp_path / "runs" / "lost"

    def stop_after_the_first_checkpoint():
        deadline = time.monotonic() + 300
        while not glob.glob(str(run / "checkpoint_*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        list_only_s3.stop()

    stopper = threading.Thread(target=stop_after_the_first_checkpoint, daemon=True)
    stopper.start()
    err = refused(capsys, ["train", "--data", "s3://data/tiny", "--weights", "none", "--epochs", "8",
                           "--batch-size", "16", "--data.image_size", "48", "--data.resize_size", "56",
                           "--data.preview_images", "0", "--data.cache_decoded", "never", "--run.max_failures", "1",
                           "--storage", str(run.parent), "--name", "lost"], 1)
    stopper.join()
    assert re.match(r"error: cannot read \S*tiny/(train|test)/\S+\.jpg: ", err), err
    assert "undecodable" not in capsys.readouterr().out
    kept = glob.glob(str(run / "checkpoint_*" / "checkpoint.pt"))
    assert kept and not os.path.exists(run / "metrics.json")
