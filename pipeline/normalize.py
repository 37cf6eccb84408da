"""The tensor half of the preset: uint8 NHWC batches -> normalized float NCHW on the training device."""

from __future__ import annotations

import torch


class Normalizer(torch.nn.Module):
    """uint8 NHWC batch -> normalized float NCHW (channels_last strides), on the batch's device."""

    def __init__(self, mean, std, channels_last: bool = True):
        super().__init__()
        self.channels_last = channels_last
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", -torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC permuted to NCHW *is* channels_last in memory: no copy needed.
        x = x.permute(0, 3, 1, 2).float()
        x = torch.addcmul(self.shift, x, self.scale)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
