"""Models: the registry of architectures, small models for digits, CLIP image encoders."""

from fedmerge.models.registry import (
    MODELS, ModelFamily, build_model, device_for, family_of, forward, model, pretrained_state,
    split_name,
)

__all__ = [
    "MODELS", "ModelFamily", "build_model", "device_for", "family_of", "forward", "model",
    "pretrained_state", "split_name",
]
