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
from fedmerge.data.text_tasks import TASKS, TextExamples, TokenSplit, text_task_examples, text_task_texts
from fedmerge.errors import PluginError
from fedmerge.registry import Registry


@dataclass(frozen=True)
class Dataset:
    """A labelled dataset in memory: ``data.x`` (N × …: float32 images, or tokens) and ``data.y``
    (N, integer labels: classes, or the text tasks). ``chance``: the accuracy of guessing, below which
    a client's own model learned nothing (default 1 / ``num_classes``; 0 for exact-match text).
    A text dataset keeps its ``texts`` too: a model with a tokenizer of its own (``causal-lm:...``)
    reads them tokenized by it, ``tiny-lm`` reads ``data`` (the character vocabulary)."""

    name: str
    data: Split | TokenSplit
    num_classes: int
    chance: float | None = None
    label_names: tuple[str, ...] = ()  # labels that are tasks (text): a client is named by its tasks
    texts: TextExamples | None = None  # text: the examples as text, for a model with its own tokenizer

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data.x.shape[1:])

    @property
    def chance_level(self) -> float:
        return 1 / self.num_classes if self.chance is None else self.chance


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


def text_tasks() -> Dataset:
    """Five synthetic text tasks (addition, reversal, sorting, copying, counting), 600 examples each,
    for language models (``tiny-lm``): the task is the label, scored by exact match."""
    return Dataset("text-tasks", text_task_examples(), len(TASKS), chance=0.0, label_names=tuple(TASKS),
                   texts=text_task_texts())


DATASETS.add("digits", digits)
DATASETS.add("text-tasks", text_tasks)


@functools.lru_cache(maxsize=4)
def load_dataset(name: str) -> Dataset:
    """The dataset ``name``, loaded once per process; a loader must return a :class:`Dataset`."""
    loaded = DATASETS[name]()
    if not isinstance(loaded, Dataset) or len(loaded.data) == 0:
        raise PluginError(f"dataset {name!r}: its loader must return a non-empty fedmerge.data.Dataset")
    return loaded
