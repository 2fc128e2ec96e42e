"""What a federation's data is made of: splits of examples, one client's partition, the whole federation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor


MIN_CLIENT_EXAMPLES = 10  # a client needs enough data for a train and a local test split


class Examples(Protocol):
    """What training and evaluation read: a :class:`Split` in memory, or lazily decoded images
    (:class:`fedmerge.data.image_tasks.ImageSplit`)."""

    @property
    def y(self) -> Tensor: ...

    def __len__(self) -> int: ...

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]: ...

    def label_counts(self, num_classes: int) -> list[int]: ...


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` (N × C × H × W, float32) and integer labels ``y`` (N)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray | Tensor) -> Split:
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(self.x[index], self.y[index])

    def label_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.y, minlength=num_classes).tolist()

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]


def iterate_batches(data, index_batches: list[Tensor]):
    """``(x, y)`` for each index batch of ``data``: a :class:`Split` (tensors in memory) or any split with
    ``batch(index)``, e.g. :class:`fedmerge.data.image_tasks.ImageSplit`, decoded by ``data.workers`` processes."""
    if isinstance(data, Split) or not getattr(data, "workers", 0):
        for index in index_batches:
            yield data.batch(index)
        return
    loader = torch.utils.data.DataLoader(data, batch_sampler=[i.tolist() for i in index_batches],
                                         num_workers=data.workers, persistent_workers=False)
    yield from loader


@dataclass(frozen=True)
class ClientData:
    """One client's partition: ``train`` for fine-tuning, ``val`` for choosing λ, ``test`` for scores."""

    partition_id: int
    train: Examples
    val: Examples
    test: Examples
    task: str = "digits"  # under partition="transforms": the client's input transform, e.g. "rotation-180"
