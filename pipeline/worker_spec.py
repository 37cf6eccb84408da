"""The contract between the driver and its training workers: one frozen WorkerSpec, built once on
the driver (runner.make_trainer) and read by attribute on every worker (train_loop)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WorkerSpec:
    config: dict  # the validated config tree (Config.to_dict()), saved in every checkpoint
    classes: tuple[str, ...]  # the dataset's class names, in label order
    mean: tuple[float, ...]  # the pretrained weights' normalization
    std: tuple[float, ...]
    train_images: int  # the decodable training images (the epoch's length)
    eval_images: dict[str, int]  # per evaluation split ('val' chooses, 'test' is reported)
    # Per evaluation split and worker-group size, each rank's exact shard: cut on the driver for every
    # size an elastic group may take, since a split needs a CPU the workers may all hold.
    eval_shards: dict[str, dict[int, list]]
    skipped_images: int  # undecodable files dropped on the driver (splits decoded once)
    # Streamed splits find their undecodable files as they go: the loop counts them each epoch
    # against these file counts and stops over max_bad_fraction.
    streamed_files: dict[str, int]
    max_bad_fraction: float
    torch_threads: int
    source: Any = None  # ObjectRef of the model.SourceWeights (None: random init)
    reuse_rows: dict[int, int] | None = None  # target class -> source category whose head row it starts from
    rest_bias: dict[int, float] | None = None  # an unmatched class's starting bias (zeroshot.rest_threshold)
    probe_head: dict | None = None  # a fitted start head (probe.fit_probe_head)
    # A search trial's WiSE-FT alphas and the rule that chooses among them each epoch (selection.AlphaRule).
    alpha_rule: Any = None
    # Keep a copy of the start weights: to evaluate WiSE-FT alphas, or to measure how far training moved.
    keep_start_weights: bool = False
    board: Any = None  # console.ProgressBoard actor that rank 0 posts its progress to (None: no view)
