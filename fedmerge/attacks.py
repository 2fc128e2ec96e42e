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

import torch
from torch import Tensor

from fedmerge.errors import ConfigError
from fedmerge.task_vector import l2_norm

MODES = ("sign-flip", "scale", "gaussian", "random")


def byzantine_clients(num_clients: int, fraction: float, seed: int) -> list[int]:
    """The partition ids of the byzantine clients, sorted: ⌈fraction·n⌉ of a seed-drawn permutation."""
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num-clients must be a positive integer, got {num_clients!r}")
    check_fraction(fraction)
    count = math.ceil(fraction * num_clients - 1e-9)
    order = list(range(num_clients))
    random.Random(f"{seed}:byzantine").shuffle(order)
    return sorted(order[:count])


def check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ConfigError(f"byzantine-fraction must lie in [0, 1), got {fraction!r}")
    return float(fraction)


def check_attack(mode: str, scale: float = -1.0, std: float = 1.0) -> None:
    """``ConfigError`` naming the setting when ``mode`` or its parameter is unusable."""
    if mode not in MODES:
        raise ConfigError(f"byzantine-mode={mode!r} is not known; choose from {', '.join(MODES)}")
    for key, value in (("byzantine-scale", scale), ("byzantine-std", std)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if std < 0:
        raise ConfigError(f"byzantine-std must be >= 0, got {std!r}")


def attack(mode: str, task_vector: Mapping[str, Tensor], *, scale: float = -1.0, std: float = 1.0,
           seed: int = 0) -> dict[str, Tensor]:
    """The task vector a byzantine client sends instead of ``task_vector`` (see the module table).

    ``seed`` drives the noise of ``gaussian`` and ``random``, so an attack is reproducible.
    """
    check_attack(mode, scale, std)
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
