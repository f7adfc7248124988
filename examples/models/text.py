"""A small text classifier over int64 token ids with a dynamic sequence length."""

import torch
from torch import nn


class TextClassifier(nn.Module):
    def __init__(self, vocab_size: int = 1000, dim: int = 32, max_len: int = 64, num_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_len, dim)
        self.mix = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = self.mix(self.embed(ids) + self.position(positions))
        return self.head(hidden.mean(dim=1))
