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


def clip(input_shape: tuple[int, ...], num_classes: int, source: str = "") -> nn.Module:
    """A CLIP image encoder (``clip:HUB_ID_OR_DIR``) whose heads come with each task's data (fedmerge.clip)."""
    from fedmerge.clip import build_classifier

    return build_classifier(source)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "clip": clip}
# Families named FAMILY:SOURCE, whose weights are published (θ0 is loaded, not pre-trained here).
PRETRAINED = ("clip",)


def split_name(name: str) -> tuple[str, str]:
    """``"clip:openai/clip-vit-base-patch32"`` → ``("clip", "openai/clip-vit-base-patch32")``."""
    family, _, source = name.partition(":")
    return family, source


def check_model_name(name: str) -> None:
    family, source = split_name(name)
    if family not in MODELS:
        raise ConfigError(f"model={name!r} is not known; choose from {', '.join(sorted(MODELS))} "
                          "(clip as clip:HUB_ID_OR_DIR)")
    if (family in PRETRAINED) != bool(source):
        raise ConfigError(f"model={name!r}: " + (f"{family} needs its checkpoint, {family}:HUB_ID_OR_DIR "
                                                 f"(e.g. clip:openai/clip-vit-base-patch32)"
                                                 if family in PRETRAINED else f"{family} takes no checkpoint"))


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    """A freshly initialised model; the same seed gives the same weights."""
    check_model_name(name)
    family, source = split_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[family](input_shape, num_classes, source) if source else MODELS[family](input_shape, num_classes)


def pretrained_state(name: str) -> dict | None:
    """θ0 of a model with published weights (``clip:...``: its image encoder); None for mlp/cnn."""
    family, source = split_name(name)
    if family != "clip":
        return None
    from fedmerge.clip import encoder_state

    return encoder_state(source)


def device_for(name: str) -> torch.device:
    """Where a model trains and is scored: CLIP on the GPU when there is one, the small models on CPU."""
    if split_name(name)[0] == "clip" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
