"""Small models for 8×8 digits, behind a registry so that larger ones can join."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedmerge.errors import ConfigError


def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two hidden layers of 64: every weight is a matrix, the natural setting for TSV-Merge."""
    n_in = 1
    for d in input_shape:
        n_in *= d
    return nn.Sequential(
        nn.Flatten(), nn.Linear(n_in, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, num_classes)
    )


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3×3 convolutions, a pooling step and a linear head; conv kernels are 4-D tensors."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (height // 2) * (width // 2), 64), nn.ReLU(), nn.Linear(64, num_classes),
    )


MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {"mlp": mlp, "cnn": cnn}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    """A freshly initialised model; the same seed gives the same weights."""
    if name not in MODELS:
        raise ConfigError(f"model={name!r} is not known; known: {', '.join(sorted(MODELS))}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](input_shape, num_classes)
