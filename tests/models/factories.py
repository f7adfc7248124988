"""Factories for `architecture.factory`: functions that return an nn.Module, as torchvision.models.resnet18 does."""

from torch import nn


def make_mlp(n_in: int = 4, hidden: int = 8, n_out: int = 2) -> nn.Module:
    import yaml  # noqa: F401  a third-party import made while building: the eager archive must list PyYAML

    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


def not_a_module(n: int = 3) -> int:
    return n
