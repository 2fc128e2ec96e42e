"""The dataset registry: the pool that a federation's splits are cut from.

The embedded default is scikit-learn's bundled handwritten digits: real data, no network. A plugin
adds a dataset with a loader ``() -> Dataset`` through the ``fedmerge.datasets`` entry-point group or
:func:`dataset` in a plugin file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedmerge.data.splits import Split
from fedmerge.errors import PluginError
from fedmerge.registry import Registry


@dataclass(frozen=True)
class Dataset:
    """A labelled dataset in memory: ``data.x`` (N × …, float32) and ``data.y`` (N, integer labels)."""

    name: str
    data: Split
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data.x.shape[1:])


def digits() -> Dataset:
    """scikit-learn's bundled handwritten digits: 1,797 8×8 images, 10 classes, no download."""
    from sklearn.datasets import load_digits  # scikit-learn takes a second to import: only when used

    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)  # N × 1 × 8 × 8 in [0, 1]
    return Dataset("digits", Split(x, torch.tensor(bunch.target, dtype=torch.long)), 10)


def _adapt(name: str, obj: object) -> Callable[[], Dataset]:
    if not callable(obj):
        raise PluginError(f"dataset {name!r} must be a function returning a Dataset, got {type(obj).__name__}")
    return obj  # type: ignore[return-value]


DATASETS: Registry[Callable[[], Dataset]] = Registry("dataset", "fedmerge.datasets", adapt=_adapt)


def dataset(name: str | None = None) -> Callable[[Callable[[], Dataset]], Callable[[], Dataset]]:
    """Register a loader ``() -> Dataset`` under ``name`` (for plugin files)."""

    def deco(loader: Callable[[], Dataset]) -> Callable[[], Dataset]:
        DATASETS.add(name or loader.__name__, loader)
        return loader

    return deco


DATASETS.add("digits", digits)


@functools.lru_cache(maxsize=4)
def load_dataset(name: str) -> Dataset:
    """The dataset ``name``, loaded once per process; a loader must return a :class:`Dataset`."""
    loaded = DATASETS[name]()
    if not isinstance(loaded, Dataset) or len(loaded.data) == 0:
        raise PluginError(f"dataset {name!r}: its loader must return a non-empty fedmerge.data.Dataset")
    return loaded
