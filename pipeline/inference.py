"""Load a trained checkpoint back into a model and run it on images."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.checkpoint_file import load_checkpoint
from pipeline.model import build_model, class_probabilities, evaluated_weights, interpolate_weights
from pipeline.normalize import Normalizer
from pipeline.train_loop import use_bf16
from pipeline.transforms import ImagePreset


class Classifier:
    """A checkpoint's model with its own preprocessing (classes, mean/std, crop sizes, precision)."""

    def __init__(self, checkpoint_dir: str, device: str = "cpu", wise_alpha: float | None = None):
        """wise_alpha: the WiSE-FT interpolation to use instead of the run's model.wise_alpha."""
        state = load_checkpoint(checkpoint_dir)
        self.classes: list[str] = state["classes"]
        self.config: dict = state["config"]
        self.epoch: int = state["epoch"]
        self.device = torch.device(device)
        self.model = build_model(state["arch"], len(self.classes))
        self.wise_alpha = self.config["model"]["wise_alpha"] if wise_alpha is None else wise_alpha
        weights = evaluated_weights(state)
        if self.wise_alpha != 1:
            if "start_weights" not in state:
                raise ValueError(f"wise_alpha {self.wise_alpha}: checkpoint {checkpoint_dir} holds no start weights "
                                 "(saved by runs with model.wise_alpha < 1 or tune.wise_alphas set); valid here: 1")
            weights = interpolate_weights(state["start_weights"], weights, self.wise_alpha)
        self.model.load_state_dict(weights)
        self.model.eval().to(self.device)
        data, scaling = self.config["data"], self.config["scaling"]
        self.preset = ImagePreset.from_data_config(data)
        self.normalize = Normalizer(state["mean"], state["std"], scaling["channels_last"]).to(self.device)
        self.bf16 = use_bf16(scaling["precision"], self.device)
        self.mirror = bool(data["eval_flip"])  # as the run evaluated
        if scaling["channels_last"]:
            self.model.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC eval-cropped images -> class probabilities (N, C)."""
        x = self.normalize(torch.as_tensor(images, device=self.device))
        return class_probabilities(self.model, x, mirror=self.mirror, bf16=self.bf16).cpu().numpy()

    def prepare(self, encoded: bytes) -> np.ndarray:
        return self.preset.eval(self.preset.decode(encoded))


class Confusion:
    """A confusion matrix (rows: true class, columns: predicted) summed batch by batch."""

    def __init__(self, num_classes: int):
        self.counts = np.zeros((num_classes, num_classes), dtype=int)

    def add(self, labels: np.ndarray, predicted: np.ndarray) -> None:
        np.add.at(self.counts, (labels, predicted), 1)

    @property
    def images(self) -> int:
        return int(self.counts.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.counts) / max(self.images, 1))

    def per_class_accuracy(self, classes: list[str]) -> dict:
        """Each class's recall; None for a class with no images."""
        return {c: float(self.counts[i, i] / self.counts[i].sum()) if self.counts[i].sum() else None
                for i, c in enumerate(classes)}
