"""The function Ray Train runs on every training worker, apart from the loop's imports: Ray Train's
controller unpickles it (by module and name), and importing torch and torchvision there would put
seconds on the path to the first step."""

from __future__ import annotations

from pipeline.exit_gate import held


def train_loop_per_worker(loop_config: dict) -> list:
    """Entry point on every worker: loop_config {"spec": WorkerSpec}. Returns the epoch history (rank
    0's is the run's)."""
    from pipeline.train_loop import run_worker

    with held():
        return run_worker(loop_config)
