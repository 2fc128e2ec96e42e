"""The model registry: one :class:`ModelFamily` entry per architecture.

A model is named ``FAMILY`` (``mlp``, ``cnn``: initialised from the seed and pre-trained here) or
``FAMILY:SOURCE`` for families with published weights (``clip:openai/clip-vit-base-patch32``: θ0
is loaded, not trained). Plugins add families through the ``fedmerge.models`` entry-point group or
:func:`model` in a plugin file; a plain function ``build(input_shape, num_classes) -> nn.Module``
is enough.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fedmerge.errors import ConfigError, PluginError
from fedmerge.models import clip as clip_models
from fedmerge.models.language import causal_lm, causal_lm_state, tiny_lm
from fedmerge.models.small import cnn, mlp
from fedmerge.registry import Registry

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelFamily:
    """How to build one architecture and where its θ0 comes from.

    ``build(input_shape, num_classes)`` or, for a family with published weights,
    ``build(input_shape, num_classes, source)``; ``pretrained(source)`` returns the published θ0.
    ``accelerated``: trained and scored on the GPU when there is one (small models stay on the CPU).
    """

    name: str
    build: Builder
    pretrained: Callable[[str], dict[str, Tensor]] | None = None
    accelerated: bool = False
    example: str = ""

    @property
    def needs_source(self) -> bool:
        return self.pretrained is not None


def _adapt(name: str, obj: object) -> ModelFamily:
    if isinstance(obj, ModelFamily):
        return obj
    if callable(obj):
        return ModelFamily(name, obj)  # type: ignore[arg-type]
    raise PluginError(f"model {name!r} must be a function or a ModelFamily, got {type(obj).__name__}")


MODELS: Registry[ModelFamily] = Registry("model", "fedmerge.models", adapt=_adapt,
                                         hint=" (families with published weights as FAMILY:SOURCE)")


def model(name: str | None = None, **fields: Any) -> Callable[[Builder], Builder]:
    """Register a builder function as a model family (for plugin files)."""

    def deco(build: Builder) -> Builder:
        MODELS.add(name or build.__name__, ModelFamily(name or build.__name__, build, **fields))
        return build

    return deco


MODELS.add("mlp", ModelFamily("mlp", mlp))
MODELS.add("cnn", ModelFamily("cnn", cnn))
MODELS.add("clip", ModelFamily("clip", lambda input_shape, num_classes, source: clip_models.build_classifier(source),
                               pretrained=clip_models.encoder_state, accelerated=True,
                               example="clip:openai/clip-vit-base-patch32"))
MODELS.add("tiny-lm", ModelFamily("tiny-lm", tiny_lm))
MODELS.add("causal-lm", ModelFamily("causal-lm", causal_lm, pretrained=causal_lm_state, accelerated=True,
                                    example="causal-lm:TinyLlama/TinyLlama-1.1B-Chat-v1.0"))


def split_name(name: str) -> tuple[str, str]:
    """``"clip:openai/clip-vit-base-patch32"`` → ``("clip", "openai/clip-vit-base-patch32")``."""
    family, _, source = name.partition(":")
    return family, source


def family_of(name: str) -> ModelFamily:
    """The family of a model name, checked: known, and with a source exactly when it needs one."""
    family_name, source = split_name(name)
    if family_name not in MODELS:
        raise ConfigError(f"model={name!r} is not known; choose from {', '.join(MODELS.names())} "
                          "(families with published weights as FAMILY:SOURCE, e.g. clip:HUB_ID_OR_DIR)")
    family = MODELS[family_name]
    if family.needs_source != bool(source):
        raise ConfigError(f"model={name!r}: " + (
            f"{family_name} needs its checkpoint, {family_name}:HUB_ID_OR_DIR"
            + (f" (e.g. {family.example})" if family.example else "")
            if family.needs_source else f"{family_name} takes no checkpoint"))
    return family


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    """A freshly initialised model; the same seed gives the same weights."""
    family = family_of(name)
    source = split_name(name)[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family.needs_source:
            return family.build(input_shape, num_classes, source)
        return family.build(input_shape, num_classes)


def pretrained_state(name: str) -> dict[str, Tensor] | None:
    """θ0 of a model with published weights (``clip:...``: its image encoder); None for the others."""
    family = family_of(name)
    return None if family.pretrained is None else family.pretrained(split_name(name)[1])


def device_for(name: str) -> torch.device:
    """Where a model trains and is scored: accelerated families on the GPU when there is one."""
    if family_of(name).accelerated and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def forward(model: nn.Module, x: Tensor, data: Any = None) -> Tensor:
    """Logits of ``model`` on ``x``; a split with a task ``head`` (CLIP tasks) passes it along."""
    head = getattr(data, "head", None)
    return model(x) if head is None else model(x, head)
