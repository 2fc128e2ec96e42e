"""Digit tasks: fixed input transforms that turn the digits into a different 10-class task per client
(pixel permutation, rotation, flip, inversion): the classic task-arithmetic setting, under the
``transforms`` partition."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fedmerge.errors import ConfigError

TRANSFORM_KINDS = ("permutation", "rotation", "flip", "inversion")

_DISTINCT_VARIANTS = {"rotation": 3, "flip": 2, "inversion": 1}  # permutations never repeat


def task_transform(kind: str, variant: int, seed: int) -> tuple[str, Callable[[Tensor], Tensor]]:
    """A fixed input transform that turns digits into another 10-class task, and its name.

    Kinds with few variants (three rotations, two flips, one inversion) are composed with a pixel
    permutation once they run out, so every client's task differs from every other's."""
    if kind not in TRANSFORM_KINDS:
        raise ConfigError(f"transforms: {kind!r} is not known; known: {', '.join(TRANSFORM_KINDS)}")

    def permutation(index: int) -> Callable[[Tensor], Tensor]:
        def permute(x: Tensor) -> Tensor:
            order = torch.as_tensor(np.random.default_rng([seed, index, 7]).permutation(x[0].numel()))
            return x.reshape(len(x), -1)[:, order].reshape(x.shape)
        return permute

    if kind == "permutation":
        return f"permutation-{variant}", permutation(variant)
    base_variant = variant % _DISTINCT_VARIANTS[kind]
    if kind == "rotation":
        quarter_turns = 1 + base_variant
        name, fn = f"rotation-{90 * quarter_turns}", lambda x: torch.rot90(x, quarter_turns, dims=(-2, -1))
    elif kind == "flip":
        axis = -1 if base_variant == 0 else -2
        name, fn = ("flip-horizontal" if axis == -1 else "flip-vertical"), lambda x: torch.flip(x, dims=(axis,))
    else:
        name, fn = "inversion", lambda x: 1.0 - x
    if variant < _DISTINCT_VARIANTS[kind]:
        return name, fn
    extra = permutation(10_000 + variant)  # disjoint from the plain permutation tasks' indices
    return f"{name}+permutation-{variant}", lambda x: extra(fn(x))
