"""The config sections: every field with its default and documentation, and each section's
own checks (Config.validate adds the checks that span sections)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from pipeline.archs import ARCHS
from pipeline.config.fields import check, setting
from pipeline.experiment_rows import ROWS
from pipeline.transforms import AUTO_AUGMENTS

PRECISIONS = ("auto", "bf16", "fp32")
LOSS_REDUCTIONS = ("mean", "sum")
SCHEDULES = ("cosine", "constant")
CACHE_MODES = ("auto", "always", "never")
USE_GPU = ("auto", "true", "false")
RESUME_MODES = ("auto", "never", "must")

# The seed recipe's learning rates are for a per-batch SUMMED loss (d2l's
# train_batch_ch13 calls loss.sum().backward()). Our defaults are for a mean loss
# with momentum, which is stable across backbones (seed-as-written collapses
# MobileNetV2 to chance); configs/seed_finetune.yaml reproduces the seed exactly.
DEFAULT_FINETUNE_LR = 3e-4
DEFAULT_SCRATCH_LR = 3e-3
# The experiment's scratch_recipe row: the defaults from random init at this lr, chosen on a
# validation quarter of seefood's train split (MobileNetV2; docs/results.md).
SCRATCH_RECIPE_LR = 1e-2


SELECT_EPOCHS = ("last", "best")
SELECT_METRICS = ("loss", "accuracy")

EXPERIMENT_ROWS = tuple(ROWS)


@dataclass
class DataConfig:
    path: str = setting("", "ImageFolder root (local folder or s3://bucket/prefix) with train/<class>/* "
                      "and test/<class>/*. Empty: d2l's hot dog set, fetched into data/hotdog.", flag="--data")
    batch_size: int = setting(32, "Global batch size, split evenly across workers (the seed's is 128; 32 did better on "
                            "small photos in validation, docs/results.md).", flag="--batch-size")
    image_size: int = setting(224, "Crop size fed to the network (RandomResizedCrop / CenterCrop).")
    resize_size: int = setting(256, "Eval resize of the shorter side before CenterCrop; also the shorter side "
                             "of the decoded copy kept for training crops.")
    eval_crop_size: int = setting(0, "CenterCrop size for evaluation and prediction (0 = image_size, the seed's). Up "
                                "to resize_size: a larger test crop shows more of each photo, and a network trained on "
                                "RandomResizedCrop often scores higher on it (FixRes, Touvron et al. 2019).")
    val_fraction: float = setting(0.0, "`finetune train`: a stratified validation split carved from train (fixed by "
                                "optim.seed). The run's model is then its epoch with the lowest val_loss, and "
                                "checkpoints are kept by it. 0: no validation split; every train image trains and the "
                                "run's model is its last epoch. Test is only reported, never used to choose.")
    max_bad_fraction: float = setting(0.05, "Stop before training when more than this fraction of images "
                                    "cannot be decoded (fewer are skipped and counted).")
    cache_decoded: str = setting("auto", "Keep the decoded uint8 copy of each split in Ray's object store "
                               "('always'; later epochs skip reading and decoding), stream read + decode every "
                               "epoch ('never'; memory stays flat whatever the dataset size), or 'auto': cache "
                               "while the copies fit half the object store.")
    crop_min_scale: float = setting(0.08, "Smallest area RandomResizedCrop draws, as a fraction of the image (the "
                                  "seed's and torchvision's 0.08). Larger keeps more of the object in every crop: "
                                  "on small datasets of whole objects (a hot dog filling the photo) it helps.")
    eval_flip: bool = setting(True, "Test-time augmentation: score each eval image by the mean of its own and its "
                            "mirror image's class probabilities (training flips, so both views are in-distribution; "
                            "one more forward pass per eval image). Off: the seed's single center crop.")
    auto_augment: str = setting("none", "Extra training augmentation after the crop and flip: 'none' (the seed's) or "
                              "'ta_wide' (TrivialAugmentWide, Muller & Hutter 2021, as torchvision references' "
                              "--auto-augment ta_wide: one random photometric or geometric operation per image at a "
                              "random strength; no parameters to tune).")
    low_res_prob: float = setting(0.5, "Training augmentation for small photos: the share of training images first "
                                "shrunk to a random longest side between image_size / 2 and image_size and saved as "
                                "JPEG (quality 75), then cropped as usual, so that the network also sees the blur and "
                                "artifacts of an upsampled small photo. 0: off (the seed's); 0.5 did better than 0 "
                                "and 1 in validation, on full-size and small photos (docs/results.md).")
    small_eval_side: int = setting(0, "Also score each evaluation split's small-photo copy after the last epoch: "
                                   "every image shrunk so its longest side is at most this many pixels, saved as "
                                   "JPEG (quality 75), then evaluated as usual; reported as <split>_small_acc, with "
                                   "per-class accuracy. 0: off. `finetune experiment` sets it from "
                                   "experiment.small_photo_side.")
    max_image_pixels: int = setting(100_000_000, "Images with more pixels are refused before decoding and counted as "
                                  "bad (a decompression bomb costs far more memory than its file).")
    max_aspect_ratio: float = setting(20.0, "Images whose long side exceeds this many times the short side are refused "
                                    "the same way (resizing a 100000x1 strip's short side would ask for gigabytes).")
    preview_images: int = setting(8, "Augmented training images drawn into preview.png (0 = none).")

    def validate(self) -> None:
        d = self
        if d.path and not d.path.startswith("s3://"):
            check(os.path.isdir(d.path), "data.path", d.path, "no such folder")
        check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
        check(16 <= d.image_size <= 1024, "data.image_size", d.image_size, "must be in 16..1024")
        check(d.image_size <= d.resize_size <= 2048, "data.resize_size", d.resize_size,
              f"must be in data.image_size ({d.image_size})..2048")
        check(d.eval_crop_size == 0 or 16 <= d.eval_crop_size <= d.resize_size, "data.eval_crop_size",
              d.eval_crop_size, f"must be 0 (= image_size) or in 16..data.resize_size ({d.resize_size})")
        check(0 <= d.val_fraction < 0.9, "data.val_fraction", d.val_fraction, "must be in [0, 0.9)")
        check(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", d.max_bad_fraction, "must be in [0, 1]")
        check(d.cache_decoded in CACHE_MODES, "data.cache_decoded", d.cache_decoded, f"valid: {', '.join(CACHE_MODES)}")
        check(0 < d.crop_min_scale <= 1, "data.crop_min_scale", d.crop_min_scale, "must be in (0, 1]")
        check(d.auto_augment in AUTO_AUGMENTS, "data.auto_augment", d.auto_augment,
              f"valid: {', '.join(AUTO_AUGMENTS)}")
        check(0 <= d.low_res_prob <= 1, "data.low_res_prob", d.low_res_prob, "must be in [0, 1]")
        check(d.small_eval_side == 0 or 32 <= d.small_eval_side <= 4096, "data.small_eval_side", d.small_eval_side,
              "must be 0 (off) or in 32..4096")
        check(1_000_000 <= d.max_image_pixels <= 1_000_000_000, "data.max_image_pixels", d.max_image_pixels,
              "must be in 1e6..1e9")
        check(1 <= d.max_aspect_ratio <= 1000, "data.max_aspect_ratio", d.max_aspect_ratio, "must be in 1..1000")
        check(0 <= d.preview_images <= 64, "data.preview_images", d.preview_images, "must be in 0..64")


@dataclass
class ModelConfig:
    arch: str = setting("resnet18", f"torchvision classifier: one of {', '.join(ARCHS)}.", flag="--arch")
    weights: str = setting("imagenet", "'imagenet' (torchvision's weights enum, downloaded to its cache), "
                         "'none' (from scratch) or a path to a state_dict file.", flag="--weights")
    mean: list | None = setting(None, "Normalization mean (3 floats). Default: the weights' own "
                                 "(enum or sidecar <weights>.json), else ImageNet's.", flag="--mean")
    std: list | None = setting(None, "Normalization std (3 floats), as for mean.", flag="--std")
    freeze_bn: bool = setting(False, "Keep BatchNorm layers in eval mode with frozen affine parameters "
                            "(required for BN-folded weights).", flag="--freeze-bn")
    freeze_depth: int = setting(0, "Freeze the bottom stages: 0 = none, 1 = stem, then one more stage per step "
                              "(resnet: 5 = all, a linear probe; mobilenet_v2: 8).", flag="--freeze-depth")
    weights_sha256: str = setting("", "Expected sha256 of the weights file, checked in full before every load "
                                "(ImageNet, mirror, s3:// or local file). Unset: torchvision's files are checked "
                                "against the prefix in their names, any other file's sha256 is printed to pin.")
    sidecar_sha256: str = setting("", "Expected sha256 of the weights' sidecar <weights>.json (mean, std, "
                                "categories), checked before it is read.")
    weights_mirror: str = setting("", "Base URL to fetch torchvision weight files from instead of "
                                "download.pytorch.org (air-gapped mirrors).")
    reuse_classifier: bool = setting(True, "Start the head row of every target class whose name matches a source "
                                   "category (e.g. hot_dog -> ImageNet 'hotdog', 934) from that category's "
                                   "classifier row; the other rows start from Xavier.", flag="--reuse-classifier")
    probe_init: bool = setting(False, "LP-FT (Kumar et al. 2022): start the head from a logistic regression fitted on "
                             "the pretrained network's features of the training images (center crops and their "
                             "mirrors, on the driver), its L2 penalty pulling toward the reused rows (toward 0 for "
                             "the others) and its strength chosen by 5-fold cross-validation on those images. "
                             "Fine-tuning then starts from a head that already fits the data, and WiSE-FT "
                             "(model.wise_alpha) interpolates toward a start that does. Needs pretrained weights.")
    categories: str = setting("", "Source category names, for classifier reuse and zero-shot: '' (the weights "
                            "enum's or the sidecar's), 'imagenet' (torchvision's ImageNet-1k list, for "
                            "ImageNet state_dict files) or a text file with one name per line.")
    wise_alpha: float = setting(1.0, "Weight-space ensemble (WiSE-FT, Wortsman et al. 2022): evaluate, export and "
                              "predict with start + wise_alpha x (trained - start), the start being the pretrained "
                              "network with its reused (or linear-probe: model.probe_init) head. 1 = the trained "
                              "weights (the seed's). Below 1 keeps part of the source model's knowledge, which on a "
                              "small dataset often scores higher; meant for a start that is itself a classifier (the "
                              "zero-shot one, or the linear probe).")

    def validate(self) -> None:
        m = self
        check(m.arch in ARCHS, "model.arch", m.arch, f"valid: {', '.join(ARCHS)}")
        if m.weights not in ("imagenet", "none") and not m.weights.startswith("s3://"):
            check(os.path.isfile(m.weights), "model.weights", m.weights,
                  "must be 'imagenet', 'none' or an existing state_dict file")
        if m.arch in ARCHS:
            depth = len(ARCHS[m.arch].stages)
            check(0 <= m.freeze_depth <= depth, "model.freeze_depth", m.freeze_depth,
                  f"must be in 0..{depth} for {m.arch}")
        check(not (m.probe_init and m.weights == "none"), "model.probe_init", m.probe_init,
              "needs pretrained weights (model.weights is 'none')")
        check(0 <= m.wise_alpha <= 1, "model.wise_alpha", m.wise_alpha, "must be in [0, 1] (1 = the trained weights)")
        for name, v in (("model.mean", m.mean), ("model.std", m.std)):
            check(v is None or len(v) == 3, name, v, "must be 3 comma-separated floats (R,G,B)")
        check(m.std is None or all(x > 0 for x in m.std), "model.std", m.std, "must be > 0")
        # Over plain http anyone on the path can swap the file; a pinned sha256 makes that harmless.
        check(not m.weights_mirror or re.match(r"^(https|file)://", m.weights_mirror) is not None
              or (m.weights_sha256 and m.weights_mirror.startswith("http://")), "model.weights_mirror",
              m.weights_mirror, "must be an https:// or file:// URL (http:// only with model.weights_sha256 set)")
        for name, digest in (("model.weights_sha256", m.weights_sha256), ("model.sidecar_sha256", m.sidecar_sha256)):
            check(not digest or re.fullmatch(r"[0-9a-f]{64}", digest) is not None, name, digest,
                  "must be 64 lowercase hex digits")
        check(m.categories in ("", "imagenet") or os.path.isfile(m.categories), "model.categories", m.categories,
              "must be '', 'imagenet' or an existing text file with one category name per line")


@dataclass
class OptimConfig:
    epochs: int = setting(5, "Training epochs (the seed's 5: 15 did no better in validation, at 3x the time).",
                          flag="--epochs")
    lr: float | None = setting(None, f"Backbone learning rate for the loss_reduction convention. Default: "
                                f"{DEFAULT_FINETUNE_LR} with pretrained weights, {DEFAULT_SCRATCH_LR} from scratch.",
                                flag="--lr")
    head_lr_mult: float | None = setting(None, "Head LR = lr x this. Default 10 when fine-tuning, "
                                          "1 (a single group) from scratch.", flag="--head-lr-mult")
    momentum: float = setting(0.9, "SGD momentum (the seed uses 0).", flag="--momentum")
    weight_decay: float = setting(1e-3, "SGD weight decay.", flag="--weight-decay")
    schedule: str = setting("cosine", "LR schedule per step: 'constant' (the seed) or 'cosine' (decay to 0 over "
                          "the run; steadier last epochs on long runs).")
    warmup_epochs: float = setting(0.0, "Linear LR warmup from 0 over this many epochs (0 = none, the seed); helps "
                                 "large learning rates (Tune's upper range) past the fresh head's first steps.")
    ema_half_life: float = setting(3.0, "Evaluate, export and predict with an exponential moving average of the "
                                 "weights (Polyak averaging, torchvision references' --model-ema), updated every "
                                 "step, with this half-life in epochs (0 = off: the trained weights, the seed's). On "
                                 "a small dataset the last epochs' test accuracy swings by points from one epoch to "
                                 "the next; the average sits in the middle of that noise.")
    loss_reduction: str = setting("mean", "'mean': loss averaged over the global batch; 'sum': summed over the "
                                "global batch as d2l does (lr then means the seed's lr).")
    seed: int = setting(0, "Random seed for the head init, the data order and every crop and flip (redrawn each "
                      "epoch). With one worker a rerun repeats exactly; with several, rows reach ranks in arrival "
                      "order.",
                      flag="--seed")

    def validate(self) -> None:
        o = self
        check(1 <= o.epochs <= 10_000, "optim.epochs", o.epochs, "must be in 1..10000")
        check(o.lr is None or 0 < o.lr < 10, "optim.lr", o.lr, "must be in (0, 10)")
        check(o.head_lr_mult is None or o.head_lr_mult > 0, "optim.head_lr_mult", o.head_lr_mult, "must be > 0")
        check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
        check(0 <= o.weight_decay < 1, "optim.weight_decay", o.weight_decay, "must be in [0, 1)")
        check(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"valid: {', '.join(SCHEDULES)}")
        check(0 <= o.warmup_epochs <= o.epochs, "optim.warmup_epochs", o.warmup_epochs,
              f"must be in 0..optim.epochs ({o.epochs})")
        check(0 <= o.ema_half_life <= 1000, "optim.ema_half_life", o.ema_half_life,
              "must be in [0, 1000] epochs (0 = off)")
        check(o.loss_reduction in LOSS_REDUCTIONS, "optim.loss_reduction", o.loss_reduction,
              f"valid: {', '.join(LOSS_REDUCTIONS)}")
        check(o.seed >= 0, "optim.seed", o.seed, "must be >= 0")


@dataclass
class ScalingConfig:
    workers: int = setting(0, "Data-parallel training workers (DDP ranks). 0: decided at start from the cluster: "
                         "one per gpus_per_worker GPUs (at most what divides the batch), 1 on CPU-only clusters. "
                         "Autoscaling clusters that start without GPU nodes need it set.", flag="--workers")
    min_workers: int = setting(0, "Elastic training: the fewest workers the run goes on with (0 = not elastic: exactly "
                             "scaling.workers). A worker group that loses a node restarts from the latest checkpoint "
                             "with the workers the cluster can still place (down to this many) instead of waiting, and "
                             "grows back to scaling.workers when nodes return. The global batch and the learning rates "
                             "stay the config's at every size: each worker takes batch_size / (its group's size).")
    resize_interval_s: float = setting(60.0, "Elastic training: how often a running group checks whether the cluster "
                                     "could now hold more workers (a resize restarts it from the latest checkpoint).")
    use_gpu: str = setting("auto", "'auto' (GPUs when the cluster has them at start), 'true' (also makes an "
                         "autoscaling cluster add GPU nodes) or 'false'.")
    gpus_per_worker: float = setting(1.0, "GPUs per training worker when training on GPUs (below 1 shares a GPU).")
    cpus_per_worker: float | None = setting(None, "CPUs reserved per worker. Default: 1 with GPUs; on CPU "
                                             "clusters the CPUs left after the data pipeline, shared evenly.")
    data_cpus: float = setting(0.5, "CPUs kept free for Ray Data's augmentation tasks on CPU-only clusters.")
    precision: str = setting("auto", "'auto' (bf16 autocast on GPUs and CPUs that support it), 'bf16' or 'fp32'.",
                           flag="--precision")
    channels_last: bool = setting(True, "Use the channels_last memory format (faster convolutions).")
    def group_sizes(self) -> range:
        """Every worker-group size the run may have: scaling.workers, or min_workers..workers when elastic."""
        return range(self.min_workers or self.workers, self.workers + 1)

    heap_reuse: bool = setting(True, "Training workers keep freed memory in glibc's heap (one arena, no mmap, no "
                             "trim) instead of unmapping every large block: a step's activations (hundreds of MB) "
                             "reuse pages rather than being mapped and zero-filled by the kernel again each step. "
                             "Measured on a 2-core CPU (MobileNetV2, batch 128): 20 -> 32 img/s in the pipeline, the "
                             "worker's system time 60 -> 9 s over 3 epochs. A worker's memory stays near its peak: "
                             "free pages go back to the kernel only when it grows a quarter past the size it "
                             "settled at (a block that is the only one of its size may not be reused). "
                             "glibc only (ignored elsewhere).")

    def validate(self) -> None:
        s = self
        check(0 <= s.workers <= 4096, "scaling.workers", s.workers, "must be in 0..4096 (0 = from the cluster)")
        check(s.min_workers == 0 or 1 <= s.min_workers <= s.workers, "scaling.min_workers", s.min_workers,
              f"must be 0 (not elastic) or in 1..scaling.workers ({s.workers}; set scaling.workers too)")
        check(s.resize_interval_s >= 0, "scaling.resize_interval_s", s.resize_interval_s, "must be >= 0")
        check(0 < s.gpus_per_worker <= 64, "scaling.gpus_per_worker", s.gpus_per_worker, "must be in (0, 64]")
        check(s.use_gpu in USE_GPU, "scaling.use_gpu", s.use_gpu, f"valid: {', '.join(USE_GPU)}")
        check(s.cpus_per_worker is None or s.cpus_per_worker > 0, "scaling.cpus_per_worker",
              s.cpus_per_worker, "must be > 0")
        check(s.data_cpus >= 0, "scaling.data_cpus", s.data_cpus, "must be >= 0")
        check(s.precision in PRECISIONS, "scaling.precision", s.precision, f"valid: {', '.join(PRECISIONS)}")


@dataclass
class RunConfig:
    name: str = setting("", "Run name (folder under storage). Default: <arch>-<timestamp>.", flag="--name")
    storage: str = setting("runs", "Where results and checkpoints go: a local folder or s3://bucket/prefix.",
                         flag="--storage")
    keep_checkpoints: int = setting(2, "Checkpoints kept: with a validation split (data.val_fraction) the lowest "
                                       "val_loss ones, among them the run's model, plus the latest; without one the "
                                       "newest. Never chosen by test.")
    s3_endpoint: str = setting("", "S3 endpoint URL (MinIO, SeaweedFS, Ceph...). Default: AWS_ENDPOINT_URL_S3, "
                             "AWS_ENDPOINT_URL, else AWS. Credentials come from the AWS chain, never from here.")
    max_failures: int = setting(2, "Worker-group failures tolerated; each restarts from the latest checkpoint.")
    resume: str = setting("auto", "A run folder that already holds a run: 'auto' resumes it when its run.json shows "
                        "the same model and data fields, classes and dataset (else refuses), 'must' resumes "
                        "whatever is there, 'never' refuses to touch it.")
    ray_address: str = setting("", "Ray cluster to join ('auto', ray://...). Empty: in-process local Ray, "
                             "or the cluster of a `ray job submit`.")

    def validate(self) -> None:
        r = self
        # The name is a folder and an object prefix: no separators, no '.' or '..', nothing hidden.
        check(r.name == "" or re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", r.name) is not None, "run.name", r.name,
              "only letters, digits, '.', '_' and '-', not starting with '.' ('' = a name from the config)")
        check(bool(r.storage), "run.storage", r.storage, "required: a local folder or s3://bucket/prefix")
        check(r.resume in RESUME_MODES, "run.resume", r.resume, f"valid: {', '.join(RESUME_MODES)}")
        check(r.max_failures >= -1, "run.max_failures", r.max_failures, "must be >= 0, or -1 for unlimited")
        check(not r.s3_endpoint or re.match(r"^https?://", r.s3_endpoint) is not None, "run.s3_endpoint",
              r.s3_endpoint, "must be an http:// or https:// URL")
        check(r.keep_checkpoints >= 1, "run.keep_checkpoints", r.keep_checkpoints, "must be >= 1")


@dataclass
class SearchConfig:
    num_samples: int = setting(8, "Tune trials to run.", flag="--num-samples")
    space: dict = setting(
        {"optim.lr": {"loguniform": [1e-5, 1e-1]}, "model.freeze_depth": {"randint": [0, 6]}},
        "What the trials sample: dotted config paths (any field of data, model, optim, scaling) mapped to a "
        "distribution, read as Ray Tune's function of that name ({loguniform: [lower, upper]}, {uniform: [lower, "
        "upper]}, {randint: [lower, upper]}, upper excluded, or {choice: [values]}), or to a fixed value. Each "
        "distribution's ends (each choice) must make a valid config. The default searches lr (mean-loss units) and "
        "freeze depths 0..5 (resnet's stages, up to a linear probe; mobilenet_v2 has 8).")
    eval_crop_sizes: list[int] = setting([], "data.eval_crop_size values to choose from after the search, by the "
                                  "search's pick's tune.select_metric on the validation split (ties: the first "
                                  "listed). The eval crop does not change training, so it costs evaluations, not "
                                  "trials. Empty: not searched.")
    wise_alphas: list = setting([], "model.wise_alpha values to choose from: every trial scores each on the validation "
                              "split every epoch and reports the one tune.select_tolerance chooses, "
                              "so ASHA, the pick and its alpha are chosen on the model as it would be used. "
                              "Evaluations only, no extra trials. Empty: not searched.")
    select_tolerance: float = setting(1.0, "The one-standard-error rule, in standard errors of the best validation "
                                    "score: of the models scoring within that many of the best, the search takes the "
                                    "one nearest the pretrained network. Within a trial's epoch: the smallest of "
                                    "tune.wise_alphas; among the trials: the one whose evaluated weights moved least "
                                    "from the start (weight_distance). On a hundred validation images such "
                                    "differences are noise, and the model nearer the source is the more regularized. "
                                    "0: the best score (ties: the smaller alpha, the first-ranked trial).")
    select_metric: str = setting("loss", "What trials are scored by on the validation split (ASHA, the pick, its "
                               "WiSE-FT alpha and eval crop). 'loss': the mean cross-entropy, lower is better; on a "
                               "split of a few dozen images accuracy moves in steps of one image and ties, where the "
                               "loss still tells models apart. 'accuracy': val_acc, higher is better.")
    select_epoch: str = setting("last", "The epoch a trial is judged by. 'last': a retrain and an experiment row use a "
                              "model's last epoch, so trials that ran every epoch rank first, by their last score, "
                              "and the pick is that last checkpoint and its alpha. 'best': each trial's best epoch "
                              "and best checkpoint (on a small validation split, the luckiest epoch).")
    val_fraction: float = setting(0.15, "Stratified validation split carved from train; trials report and are "
                                "selected on it, the test set is used once for the best trial.")
    grace_period: int = setting(1, "ASHA: epochs every trial runs before it can be stopped.")
    reduction_factor: int = setting(2, "ASHA: keep 1/reduction_factor of the trials at each rung.")
    workers_per_trial: int = setting(1, "Data-parallel workers of each trial.")
    max_concurrent_trials: int = setting(0, "Trials at once; 0 = as many as the cluster's CPUs/GPUs fit.")
    retrain: bool = setting(False, "After the search, train the best config once more on train + validation "
                          "(the final model; its last epoch's test accuracy is reported).")

    def objective(self) -> tuple[str, str]:
        """(metric, mode) trials are scored by on the validation split: select_metric as Tune names it."""
        return ("val_loss", "min") if self.select_metric == "loss" else ("val_acc", "max")

    def goodness(self, score: float) -> float:
        """A score of the objective's metric turned higher-is-better (a loss negated), so that every
        choice the search makes (epoch, trial, checkpoint, alpha, eval crop) is one max()."""
        return -score if self.select_metric == "loss" else score

    def validate(self) -> None:
        t = self
        check(t.num_samples >= 1, "tune.num_samples", t.num_samples, "must be >= 1")
        check(all(0 <= x <= 1 for x in t.wise_alphas), "tune.wise_alphas", t.wise_alphas,
              "every value must be in [0, 1]")
        check(0 <= t.select_tolerance <= 5, "tune.select_tolerance", t.select_tolerance,
              "must be in [0, 5] standard errors")
        check(t.select_metric in SELECT_METRICS, "tune.select_metric", t.select_metric,
              f"valid choices: {', '.join(SELECT_METRICS)}")
        check(t.select_epoch in SELECT_EPOCHS, "tune.select_epoch", t.select_epoch,
              f"valid choices: {', '.join(SELECT_EPOCHS)}")
        check(0 < t.val_fraction < 0.9, "tune.val_fraction", t.val_fraction, "must be in (0, 0.9)")
        check(t.grace_period >= 1, "tune.grace_period", t.grace_period, "must be >= 1")
        check(t.reduction_factor >= 2, "tune.reduction_factor", t.reduction_factor, "must be >= 2")
        check(t.workers_per_trial >= 1, "tune.workers_per_trial", t.workers_per_trial, "must be >= 1")
        check(t.max_concurrent_trials >= 0, "tune.max_concurrent_trials", t.max_concurrent_trials, "must be >= 0")


@dataclass
class ExperimentConfig:
    seeds: int = setting(3, "Seeds per row (0..seeds-1): each trained row runs once per seed.", flag="--seeds")
    rows: str = setting(",".join(EXPERIMENT_ROWS), f"Comma-separated rows of the table, from: "
                      f"{', '.join(EXPERIMENT_ROWS)}.", flag="--rows")
    tuned_recipe: dict = setting({}, "Overrides for the Tune-selected row only, its search and its training: dotted "
                               "config paths of data, model, optim or scaling mapped to values, e.g. {optim.epochs: "
                               "15, optim.schedule: cosine}. Tune picks what tune.space searches for this recipe. "
                               "Empty: the defaults (the finetune_defaults row's recipe).")
    scratch_recipe: dict = setting({"optim.lr": SCRATCH_RECIPE_LR, "optim.epochs": 15, "data.batch_size": 32,
                                    "optim.schedule": "cosine", "optim.ema_half_life": 0.0, "data.low_res_prob": 0.0,
                                    "data.eval_flip": False},
                                   "Overrides for the scratch_recipe row (random init, one parameter group), as "
                                   "tuned_recipe: this project's recipe from scratch beside the book's (the scratch "
                                   "row), 15 epochs of batch 32 with cosine decay; its lr was chosen so, on a "
                                   "validation quarter of seefood's train split (docs/results.md).")
    small_photo_side: int = setting(224, "Every row is also scored on small-photo copies of test (and the search on "
                                    "validation's): data.small_eval_side for each run. 0: full-size photos only.")

    def validate(self) -> None:
        e = self
        check(1 <= e.seeds <= 100, "experiment.seeds", e.seeds, "must be in 1..100")
        check(e.small_photo_side == 0 or 32 <= e.small_photo_side <= 4096, "experiment.small_photo_side",
              e.small_photo_side, "must be 0 (off) or in 32..4096")
        bad_rows = [x for x in e.rows.split(",") if x.strip() not in EXPERIMENT_ROWS]
        check(bool(e.rows.strip()) and not bad_rows, "experiment.rows", e.rows,
              f"valid rows: {', '.join(EXPERIMENT_ROWS)}")
