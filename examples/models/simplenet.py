"""The article's SimpleNet: one linear layer."""

import torch
from torch import nn


class SimpleNet(nn.Module):
    def __init__(self, in_features: int = 10, out_features: int = 1) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)
