"""Every supported architecture in one place: how to build it, where its head is, its stages (what
model.freeze_depth counts) and its ImageNet weights. Adding an architecture is one entry here.

Imported by the config (to validate model.arch and model.freeze_depth) and by the model code;
it imports neither, and torchvision only when a network is built."""

from __future__ import annotations

from dataclasses import dataclass

_RESNET_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


@dataclass(frozen=True)
class Arch:
    name: str  # torchvision's model name
    head: str  # the final Linear layer, the head to replace
    # Freeze depth k freezes the first k stages, bottom up: 1 = the stem, then one stage per step;
    # freezing every stage leaves only the head training (a linear probe).
    stages: tuple[tuple[str, ...], ...]
    imagenet: str  # the member of torchvision's weights enum that model.weights 'imagenet' loads

    def build(self):
        """The network with random weights (the caller loads its own)."""
        import torchvision

        return torchvision.models.get_model(self.name, weights=None)

    def imagenet_weights(self):
        """torchvision's weights entry: url, transforms (normalization), category names."""
        import torchvision

        return torchvision.models.get_model_weights(self.name)[self.imagenet]


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("resnet18", "fc", _RESNET_STAGES, "IMAGENET1K_V1"),
    Arch("resnet34", "fc", _RESNET_STAGES, "IMAGENET1K_V1"),
    Arch("resnet50", "fc", _RESNET_STAGES, "IMAGENET1K_V2"),
    # MobileNetV2's feature blocks grouped by output resolution and width, as its paper's table does.
    Arch("mobilenet_v2", "classifier.1", (("features.0",), ("features.1",), ("features.2", "features.3"),
                                          ("features.4", "features.5", "features.6"),
                                          ("features.7", "features.8", "features.9", "features.10"),
                                          ("features.11", "features.12", "features.13"),
                                          ("features.14", "features.15", "features.16"),
                                          ("features.17", "features.18")), "IMAGENET1K_V2"),
)}
