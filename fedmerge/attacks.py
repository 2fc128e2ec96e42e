"""Byzantine clients: which ones attack, and what they do to their task vector before replying.

Pure functions, no Flower. An attack maps an honest task vector τ to the one a byzantine client sends:

=============  ==========================================================================
``sign-flip``  −τ
``scale``      ``scale`` · τ (a large factor blows up linear rules such as FedAvg)
``gaussian``   τ + ε with ε_j ~ N(0, ``std``²) i.i.d. per entry
``random``     a random direction with the same norm as τ (over all entries): pure garbage
=============  ==========================================================================

``byzantine_clients(n, fraction, seed)`` picks the first ⌈fraction·n⌉ clients of a permutation
drawn from ``seed``; ``attack(mode, τ, ...)`` returns a new task vector and never mutates ``τ``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Annotated

import torch
from torch import Tensor

from fedmerge.errors import ConfigError
from fedmerge.spec import Factor, Float, Noise, Spec, Str, check, one_of
from fedmerge.task_vector import l2_norm

MODES = ("sign-flip", "scale", "gaussian", "random")


class AttackSpec(Spec):
    """Which clients attack and how: ⌈``fraction``·N⌉ seed-drawn clients reply ``attack(mode, τ)``."""

    fraction: Annotated[Float, check(lambda v: 0 <= v < 1, "must lie in [0, 1)")] = 0.0
    mode: Annotated[Str, one_of(MODES)] = "sign-flip"
    scale: Factor = 10.0
    std: Noise = 0.1

    @classmethod
    def key_name(cls, location: tuple[str, ...]) -> str:
        return "byzantine-" + ".".join(location)

    def clients(self, num_clients: int, seed: int) -> list[int]:
        """The attackers' partition ids: see :func:`byzantine_clients`."""
        return byzantine_clients(num_clients, self.fraction, seed)


def byzantine_clients(num_clients: int, fraction: float, seed: int) -> list[int]:
    """The partition ids of the byzantine clients, sorted: ⌈fraction·n⌉ of a seed-drawn permutation."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num-clients must be a positive integer, got {num_clients!r}")
    count = byzantine_count(num_clients, fraction)
    order = list(range(num_clients))
    random.Random(f"{seed}:byzantine").shuffle(order)
    return sorted(order[:count])


def byzantine_count(num_clients: int, fraction: float) -> int:
    """How many of ``num_clients`` clients attack: ⌈fraction·n⌉ (a hair below, so that 0.3·10 is 3)."""
    fraction = AttackSpec(fraction=fraction).fraction
    return math.ceil(fraction * num_clients - 1e-9)


def attack(mode: str, task_vector: Mapping[str, Tensor], *, scale: float = -1.0, std: float = 1.0,
           seed: int = 0) -> dict[str, Tensor]:
    """The task vector a byzantine client sends instead of ``task_vector`` (see the module table).

    ``seed`` drives the noise of ``gaussian`` and ``random``, so an attack is reproducible.
    """
    AttackSpec(mode=mode, scale=scale, std=std)  # one place checks mode and parameters
    if mode == "sign-flip":
        return {k: -v for k, v in task_vector.items()}
    if mode == "scale":
        return {k: v * scale for k, v in task_vector.items()}
    gen = torch.Generator().manual_seed(int(seed))
    noise = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in task_vector.items()}
    if mode == "gaussian":
        return {k: (v.double() + std * noise[k]).to(v.dtype) for k, v in task_vector.items()}
    # random: a uniformly random direction, rescaled to the honest vector's norm
    norm = l2_norm(task_vector)
    noise_norm = math.sqrt(sum(float(n.pow(2).sum()) for n in noise.values())) or 1.0
    return {k: (noise[k] * (norm / noise_norm)).to(v.dtype) for k, v in task_vector.items()}
