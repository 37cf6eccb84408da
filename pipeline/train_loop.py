"""The per-worker training loop run by Ray Train's TorchTrainer (DDP)."""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from pipeline import data
from pipeline.checkpoint_file import load_checkpoint, save_checkpoint, staging_directory
from pipeline.config import Config
from pipeline.console import Poster, quiet_train_worker
from pipeline.data_priority import lower_split_coordinator_priority
from pipeline.exit_gate import parked_at_exit
from pipeline.heap import HeapTrimmer
from pipeline.model import (
    SourceWeights,
    WeightAverage,
    build_for_config,
    class_probabilities,
    interpolate_weights,
    make_optimizer,
    make_scheduler,
    set_train_mode,
    trainable_weights,
)
from pipeline.normalize import Normalizer
from pipeline.selection import accuracy_standard_error, standard_error
from pipeline.worker_spec import WorkerSpec


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # Without native bf16 instructions autocast is slower than fp32 on a CPU.
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def training_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str, world_size: int) -> tuple:
    """(loss to backpropagate, summed loss for metrics) for the chosen convention.

    mean: DDP averages the ranks' gradients of equal local-batch means -> the global-batch mean.
    sum (d2l's loss.sum()): DDP still averages over ranks, so scale by world_size to get the
    gradient of the sum over the global batch, identical to a single process's."""
    loss_sum = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
    loss = loss_sum / labels.numel() if reduction == "mean" else loss_sum * world_size
    return loss, loss_sum.detach()


class EpochPrefetcher:
    """One epoch of batches pulled by a background thread into a short queue."""

    _END = object()

    def __init__(self, batches, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._pull, args=(batches,), daemon=True)
        self._thread.start()

    def _pull(self, batches) -> None:
        try:
            for batch in batches:
                self._queue.put(batch)
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
            self._queue.put(e)
        self._queue.put(self._END)

    def __iter__(self):
        while (item := self._queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item


class EpochRunner:
    """One worker's model, optimizer and loops; state_dict() is what a checkpoint holds."""

    def __init__(self, cfg: Config, spec: WorkerSpec, source: SourceWeights | None, started_unix: float = 0.0):
        self.cfg = cfg
        self.classes = spec.classes
        self.device = ray.train.torch.get_device()
        # The global batch is the config's whatever the world size (an elastic group shrinks and
        # grows): each rank takes its share, so the gradient, the learning rates and the steps per
        # epoch are those of the config at every size.
        self.world = ray.train.get_context().get_world_size()
        self.local_batch = cfg.data.batch_size // self.world
        self.rows_per_rank = spec.train_images // self.world  # Ray Train's equal split: floor(n / world)
        self.steps_per_epoch = math.ceil(self.rows_per_rank / self.local_batch)
        self.bf16 = use_bf16(cfg.scaling.precision, self.device)
        model = build_for_config(cfg, len(spec.classes), source, spec.reuse_rows, spec.rest_bias, spec.probe_head)
        fmt = torch.channels_last if cfg.scaling.channels_last else torch.contiguous_format
        self.raw_model = model.to(self.device, memory_format=fmt)
        self.model = ray.train.torch.prepare_model(self.raw_model)
        self.optimizer = make_optimizer(self.raw_model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.normalize = Normalizer(spec.mean, spec.std, cfg.scaling.channels_last).to(self.device)
        # WiSE-FT needs the start weights: to evaluate the interpolation, and in each checkpoint for
        # whoever loads it (the driver decides: runner.worker_spec).
        self.alpha_rule = spec.alpha_rule
        self.offered_alphas = list(spec.alpha_rule.alphas) if spec.alpha_rule else []
        self.start_weights = trainable_weights(self.raw_model) if spec.keep_start_weights else None
        half_life_steps = cfg.optim.ema_half_life * self.steps_per_epoch
        self.average = WeightAverage(self.raw_model, half_life_steps) if half_life_steps else None
        # Wall-clock start-up marks (runner.WORKER_STAGES): the worker's start, its model built, the
        # first batch in hand (training begins) and the first optimizer step done.
        self.startup = {"worker_start_unix": started_unix, "model_ready_unix": time.time(),
                        "first_batch_unix": 0.0, "first_step_unix": 0.0}
        self.heap = HeapTrimmer()  # scaling.heap_reuse: the kept heap's footprint stays bounded
        if self.device.type == "cpu":  # training, the slower side, gets the cores first
            lower_split_coordinator_priority()

    def _batches(self, shard, shuffle_seed: int | None = None):
        # The buffer mixes rows across several blocks: SGD needs class-mixed batches. It fills
        # before the first batch comes out, so it is capped at half this rank's epoch.
        buffer = min(4 * self.local_batch, max(self.local_batch, self.rows_per_rank // 2))
        shuffle = shuffle_seed is not None
        return shard.iter_torch_batches(batch_size=self.local_batch, device=self.device, prefetch_batches=2,
                                        local_shuffle_buffer_size=buffer if shuffle else None,
                                        local_shuffle_seed=shuffle_seed,
                                        dtypes={"image": torch.uint8, "label": torch.int64})

    def prefetch_epoch(self, shard, epoch: int) -> EpochPrefetcher:
        """Start the next training epoch's data now (augmentation, shuffle buffer, transfer), so it
        is ready while this epoch is still being evaluated and checkpointed."""
        rank = ray.train.get_context().get_world_rank()
        seed = int(np.random.SeedSequence([self.cfg.optim.seed, epoch, rank]).generate_state(1)[0])
        return EpochPrefetcher(self._batches(shard, shuffle_seed=seed))

    def train_epoch(self, batches, progress=lambda done, final=False: None) -> dict:
        """One epoch over batches; progress(images done, all ranks) as it goes."""
        set_train_mode(self.model, self.cfg.model.freeze_bn, self.cfg.model.arch, self.cfg.model.freeze_depth)
        # Sums kept on the device: no host sync per batch, one all-reduce per epoch.
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        seen = 0
        for batch in parked_at_exit(batches):
            self.startup["first_batch_unix"] = self.startup["first_batch_unix"] or time.time()
            x, y = self.normalize(batch["image"]), batch["label"]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(x)
            loss, loss_sum = training_loss(logits, y, self.cfg.optim.loss_reduction, self.world)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            if self.average is not None:
                self.average.update(self.raw_model)
            self.heap.after_step()
            self.startup["first_step_unix"] = self.startup["first_step_unix"] or time.time()
            stats += torch.stack([loss_sum.double(), (logits.argmax(1) == y).sum().double(),
                                  torch.tensor(y.numel(), dtype=torch.float64, device=self.device)])
            seen += y.numel()
            progress(seen * self.world)
        loss_sum, correct, count = _all_reduce(stats).tolist()
        progress(int(count), final=True)
        return {"train_loss": loss_sum / max(count, 1), "train_acc": correct / max(count, 1),
                "train_images": int(count)}

    @contextlib.contextmanager
    def evaluated_model(self):
        """Yields set_alpha(alpha), which puts into the model WiSE-FT's start + alpha x (final - start),
        final being the weight average (optim.ema_half_life) or else the trained weights. The trained
        weights are copied once and put back after. Runs with neither an average nor start weights
        (no alpha used or offered) evaluate the trained weights as they are: nothing is copied."""
        if self.start_weights is None and self.average is None:
            yield lambda alpha: None
            return
        params = dict(self.raw_model.named_parameters())
        names = list(self.average.weights if self.average is not None else self.start_weights)
        trained = {n: params[n].detach().clone() for n in names}
        final = self.average.weights if self.average is not None else trained

        def set_alpha(alpha: float) -> None:
            weights = final if alpha == 1 else interpolate_weights(self.start_weights, final, alpha)
            for n in names:
                params[n].copy_(weights[n])

        try:
            yield set_alpha
        finally:
            for n in names:
                params[n].copy_(trained[n])

    @torch.no_grad()
    def distance_from_start(self) -> float:
        """L2 norm of (evaluated - start) over the trainable weights, at alpha 1: how far training
        moved the model from the pretrained network (WiSE-FT's alpha scales it)."""
        final = self.average.weights if self.average is not None else dict(self.raw_model.named_parameters())
        return float(sum((final[n].double() - w.double()).square().sum() for n, w in self.start_weights.items()) ** 0.5)

    @torch.no_grad()
    def evaluate(self, shard, split: str = "test", progress=lambda done, final=False: None) -> dict:
        """Accuracy and cross-entropy of the evaluated model (the weight average, if kept) at
        model.wise_alpha; or, offering alphas (search trials), those of the alpha chosen by
        the driver's selection.AlphaRule (tune.select_metric, tune.select_tolerance), with the alpha, the
        margin it was chosen within and every alpha's scores. With the start weights kept, also the
        scores' standard errors and the evaluated model's distance from the start. One pass over the
        data: each batch is scored at every alpha."""
        alphas = self.offered_alphas or [self.cfg.model.wise_alpha]
        self.model.eval()
        # per alpha: correct, count, and the sum and sum of squares of the per-image cross-entropy
        # of the (mirror-averaged) probabilities: the squares give the loss's standard error
        stats = torch.zeros(len(alphas), 4, dtype=torch.float64, device=self.device)
        n_classes = len(self.classes)
        by_class = torch.zeros(len(alphas), 2, n_classes, dtype=torch.float64, device=self.device)  # correct, count
        with self.evaluated_model() as set_alpha:
            current, seen = None, 0
            for batch in parked_at_exit(self._batches(shard) if shard is not None else ()):
                x, y = self.normalize(batch["image"]), batch["label"]
                for i, alpha in enumerate(alphas):
                    if alpha != current:
                        set_alpha(alpha)
                        current = alpha
                    probs = class_probabilities(self.model, x, mirror=self.cfg.data.eval_flip, bf16=self.bf16)
                    nll = -probs.gather(1, y[:, None]).clamp_min(1e-12).log().double()
                    hit = (probs.argmax(1) == y).double()
                    count = torch.tensor(y.numel(), dtype=torch.float64, device=self.device)
                    stats[i] += torch.stack([hit.sum(), count, nll.sum(), nll.square().sum()])
                    by_class[i, 0] += torch.bincount(y, weights=hit, minlength=n_classes)
                    by_class[i, 1] += torch.bincount(y, minlength=n_classes).double()
                seen += y.numel()
                progress(seen * self.world)
        rows = _all_reduce(stats).tolist()
        class_rows = _all_reduce(by_class).tolist()  # per alpha: [hits per class, images per class]
        progress(int(rows[0][1]), final=True)
        accs = [correct / max(count, 1) for correct, count, _, _ in rows]
        losses = [loss / max(count, 1) for _, count, loss, _ in rows]
        n = max(rows[0][1], 1)
        loss_errors = [standard_error(loss, sq / n, n) for (_, _, _, sq), loss in zip(rows, losses, strict=True)]
        acc_errors = [accuracy_standard_error(acc, n) for acc in accs]
        chosen, margin = 0, 0.0
        if self.alpha_rule is not None:
            chosen, margin = self.alpha_rule.choose(accs, losses, acc_errors, loss_errors)
        class_hits, class_counts = class_rows[chosen]
        metrics = {f"{split}_acc": accs[chosen], f"{split}_loss": losses[chosen], f"{split}_images": int(rows[0][1]),
                   # recall per true class; None for a class the split lacks
                   f"{split}_acc_by_class": {c: (h / n if n else None) for c, h, n in
                                             zip(self.classes, class_hits, class_counts, strict=True)}}
        if self.start_weights is not None:
            metrics.update({f"{split}_acc_se": acc_errors[chosen], f"{split}_loss_se": loss_errors[chosen],
                            "weight_distance": float(alphas[chosen]) * self.distance_from_start()})
        if self.offered_alphas:
            metrics.update({"wise_alpha": float(alphas[chosen]), "wise_alpha_margin": margin,
                            f"{split}_acc_by_wise_alpha": {f"{a:g}": v for a, v in zip(alphas, accs, strict=True)},
                            f"{split}_loss_by_wise_alpha": {f"{a:g}": v for a, v in zip(alphas, losses, strict=True)}})
        return metrics

    def state_dict(self) -> dict:
        state = {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        if self.start_weights is not None:
            state["start_weights"] = self.start_weights
        if self.average is not None:
            state["ema"] = self.average.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "start_weights" in state:
            self.start_weights = {n: w.to(self.device) for n, w in state["start_weights"].items()}
        if self.average is not None:
            self.average.load_state_dict(state["ema"])


def worker_nodes() -> list[str]:
    """The Ray node ID of every rank, in rank order (one all-gather at the start of a worker group)."""
    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [node]
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def epoch_line(epoch: int, epochs: int, metrics: dict, splits) -> str:
    """The seed's per-epoch line, with the evaluation splits and what else the epoch did."""
    return (f"epoch {epoch}/{epochs}  loss {metrics['train_loss']:.3f}  train acc {metrics['train_acc']:.3f}"
            + "".join(f"  {split} acc {metrics[split + '_acc']:.3f}" for split in splits if split + "_acc" in metrics)
            + (f" (WiSE alpha {metrics['wise_alpha']:g})" if "wise_alpha" in metrics else "")
            + f"  {metrics['examples_per_sec']:.1f} examples/sec  ({metrics['epoch_time_s']:.1f} s)"
            + (f"  [{metrics['skipped_images']} undecodable images skipped]" if metrics["skipped_images"] else ""))


def as_reported(metrics: dict) -> dict:
    """An epoch's metrics as reported to Ray: worker_nodes joined into one string, because Tune's
    TensorBoard logger warns at a list and skips a string."""
    return {**metrics, "worker_nodes": ",".join(metrics["worker_nodes"])}


def resume_point(runner: EpochRunner, say) -> tuple[list, int, list]:
    """(history, first epoch to run, starts) from Ray Train's latest checkpoint, loaded into runner;
    a fresh run's without one. Reports the last epoch again when there is none left to run. starts:
    one entry per worker group that ran this run (where it began, and how wide), this one's included."""
    world = ray.train.get_context().get_world_size()
    history, start_epoch, starts = [], 1, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d)
        runner.load_state_dict(state)
        torch.set_rng_state(state["rng"])
        history, start_epoch, starts = state["history"], state["epoch"] + 1, state.get("starts", [])
        say(f"resuming from epoch {state['epoch']} checkpoint with {world} worker(s)")
        if start_epoch > runner.cfg.optim.epochs:
            # A run that had already finished (its driver died before hearing so): its final epoch
            # again, so that whoever drives this run (a Tune trial) gets a result.
            ray.train.report(as_reported(history[-1]))
    return history, start_epoch, [*starts, {"epoch": start_epoch, "world_size": world, "unix": time.time()}]


def run_worker(loop_config: dict) -> list:
    """A training worker's run (worker_main.train_loop_per_worker): loop_config {"spec": WorkerSpec}.
    Returns the epoch history (rank 0's is the run's)."""
    started_unix = time.time()
    quiet_train_worker()
    spec: WorkerSpec = loop_config["spec"]
    cfg = Config.from_dict(spec.config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    torch.manual_seed(cfg.optim.seed)  # same head init on every rank (DDP also broadcasts it)
    runner = EpochRunner(cfg, spec, ray.get(spec.source) if spec.source is not None else None, started_unix)
    poster = Poster(spec.board if rank == 0 else None)
    say = poster.say if rank == 0 else (lambda line: None)
    if runner.average is not None:
        say(f"weight average: half-life {cfg.optim.ema_half_life:g} epochs = "
            f"{cfg.optim.ema_half_life * runner.steps_per_epoch:g} steps, decay {runner.average.decay:.5f} per step")
    history, start_epoch, starts = resume_point(runner, say)
    nodes = worker_nodes()
    train_shard = ray.train.get_dataset_shard("train")
    # Cut on the driver for every size the group may have: an elastic run's is known only here.
    eval_shards = {split: shards[world][rank] for split, shards in spec.eval_shards.items()}
    epochs = cfg.optim.epochs
    batches = runner.prefetch_epoch(train_shard, start_epoch) if start_epoch <= epochs else None
    for epoch in range(start_epoch, epochs + 1):
        t0 = time.perf_counter()
        metrics = runner.train_epoch(batches, poster.tracker("train", epoch, epochs, spec.train_images))
        train_s = time.perf_counter() - t0
        batches = runner.prefetch_epoch(train_shard, epoch + 1) if epoch < epochs else None
        # 'val' chooses (if carved), 'test' is reported; their small-photo copies are scored once, at the end
        scored = {s: shard for s, shard in eval_shards.items() if epoch == epochs or not s.endswith(data.SMALL_COPY)}
        for split, shard in scored.items():
            metrics.update(runner.evaluate(shard, split, poster.tracker(split, epoch, epochs, spec.eval_images[split])))
        streamed_bad = data.undecodable_this_epoch(spec.streamed_files, metrics, world)
        metrics.update(epoch=epoch, examples_per_sec=metrics["train_images"] / train_s,
                       **runner.startup, epoch_time_s=time.perf_counter() - t0,
                       skipped_images=sum(streamed_bad.values()) if streamed_bad else spec.skipped_images,
                       world_size=world, per_worker_batch=runner.local_batch,
                       lr=runner.optimizer.param_groups[0]["lr"], worker_nodes=nodes, attempt=len(starts) - 1)
        history.append(metrics)
        reported = as_reported(metrics)
        problem = data.too_many_undecodable(streamed_bad, spec.streamed_files, spec.max_bad_fraction, epoch)
        if problem:
            # Every rank holds the same all-reduced counts, so all stop here together; the driver
            # raises it (a worker error would only be retried from the checkpoint, and fail again).
            metrics["data_error"] = problem  # in the history too: the driver reads it from the returned history
            ray.train.report({**reported, "data_error": problem})
            break
        if rank != 0:
            ray.train.report(reported)
            continue
        say(epoch_line(epoch, epochs, metrics, eval_shards))
        with staging_directory() as tmp:
            save_checkpoint(tmp, {**runner.state_dict(), "epoch": epoch, "config": spec.config, "history": history,
                                  "starts": starts, "rng": torch.get_rng_state(), "classes": list(spec.classes),
                                  "mean": list(spec.mean), "std": list(spec.std), "arch": cfg.model.arch})
            ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    poster.flush()
    return history
