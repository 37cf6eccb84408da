import os
import subprocess
import tempfile

from pipeline.checkpoint_file import load_checkpoint, save_checkpoint, staging_directory
from pipeline.scratch import scratch_folder


def test_scratch_folder_goes_on_exit_and_a_dead_process_folder_on_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process now
    stale = tmp_path / f"keys-{gone.pid}-abc"
    stale.mkdir()
    (stale / "credentials").write_text("[default]\n")
    live = tmp_path / f"keys-{os.getppid()}-def"  # a live process's folder is its own to remove
    live.mkdir()
    other = tmp_path / f"other-{gone.pid}-ghi"  # another prefix: not this kind's to judge
    other.mkdir()

    with scratch_folder("keys-") as folder:
        assert os.stat(folder).st_mode & 0o777 == 0o700
        assert not stale.exists() and live.exists() and other.exists()
    assert not os.path.exists(folder)


def test_checkpoint_round_trips_through_a_staging_folder_that_is_then_removed():
    with staging_directory() as folder:
        save_checkpoint(folder, {"config": {"data": {"path": "s3://k:secret@b/x"}}, "epoch": 3})
        state = load_checkpoint(folder)
        assert state["epoch"] == 3 and "secret" not in str(state["config"])
    assert not os.path.exists(folder)
