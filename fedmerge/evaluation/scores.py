"""Accuracy and loss of a model on a split, and the normalized accuracy of merged models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedmerge.data.splits import Examples, Split, iterate_batches
from fedmerge.models.registry import forward


@dataclass(frozen=True)
class Scores:
    loss: float
    accuracy: float  # fraction in [0, 1]


@torch.no_grad()
def score(model: nn.Module, data: Examples, batch_size: int = 1024) -> Scores:
    """Mean loss and accuracy on ``data`` (a :class:`Split` or any split with ``batch``: CLIP tasks, or
    text whose accuracy is exact match and whose loss is summed over each example's scored tokens)."""
    model.eval()
    total_loss, correct = 0.0, 0
    device = next(model.parameters()).device
    if isinstance(data, Split):
        chunks = ((data.x[s:s + batch_size], data.y[s:s + batch_size]) for s in range(0, len(data), batch_size))
    else:
        chunks = iterate_batches(data, list(torch.arange(len(data)).split(batch_size)))
    for x, y in chunks:
        x, y = x.to(device), y.to(device)
        logits = forward(model, x, data)
        total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int(_correct(logits, y).sum())
    n = max(1, len(data))
    return Scores(total_loss / n, correct / n)


def _correct(logits: Tensor, y: Tensor) -> Tensor:
    """Per example: the top class is the label; for sequences (logits N × V × L, targets N × L with
    ignored positions < 0), every scored position's top token is its target: exact match."""
    hits = logits.argmax(dim=1) == y
    return hits if y.dim() == 1 else (hits | (y < 0)).all(dim=1)


class Evaluator:
    """Scores many state dicts of one architecture on fixed splits, reusing one model object."""

    def __init__(self, model: nn.Module):
        self.model = model

    def accuracy(self, state: Mapping[str, Tensor], data: Examples) -> float:
        self.model.load_state_dict(state)
        return score(self.model, data).accuracy

    def accuracies(self, state: Mapping[str, Tensor], splits: Sequence[Examples]) -> list[float]:
        self.model.load_state_dict(state)
        return [score(self.model, s).accuracy for s in splits]


def normalized_accuracy(merged: Sequence[float], own: Sequence[float], chance: float = 0.0) -> float:
    """Mean over clients of acc(merged, split_i) / acc(θ_i, split_i) (TSV paper, Eq. 9).

    The ratio means "how much of what client i learned survives merging" only when θ_i learned
    something: a client whose own model scores at or below ``chance`` (pass 1 / number of classes;
    0 by default, so that an accuracy of 0 is always left out) is left out, and with no client left
    the result is NaN (reported as missing), never a ratio over a near-zero denominator."""
    ratios = [m / o for m, o in zip(merged, own) if o > chance and o > 0]
    return sum(ratios) / len(ratios) if ratios else float("nan")
