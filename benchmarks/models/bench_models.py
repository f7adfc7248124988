"""Models for `make bench` only: an image CNN of realistic cost, and an identity model for the serving floor."""

import torch
from torch import nn


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ImageCNN(nn.Module):
    """A small ResNet-sized CNN for 3x224x224 images (about 1 GFLOP per image)."""

    def __init__(self, num_classes: int = 1000, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = _block(3, w, 2)
        self.body = nn.Sequential(
            _block(w, w, 1),
            _block(w, 2 * w, 2),
            _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2),
            _block(4 * w, 4 * w, 1),
            _block(4 * w, 8 * w, 2),
            _block(8 * w, 8 * w, 1),
        )
        self.head = nn.Linear(8 * w, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(image)).mean(dim=(2, 3)))


class Identity(nn.Module):
    """Returns its input scaled by a weight: what TorchServe and the handler cost without a model."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.flatten(1)[:, :10] * self.scale
