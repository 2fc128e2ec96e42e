"""Checks of what a merging rule receives: task vectors, per-client numbers and weights."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fedmerge.errors import MergeError
from fedmerge.io.state import all_finite
from fedmerge.numerics import scaled_to_unit

TaskVectors = Sequence[Mapping[str, Tensor]]


def validate_task_vector(tv: Mapping[str, Tensor], reference: Mapping[str, Tensor], who: str) -> None:
    """Check one task vector against a reference (same names, shapes, floating and finite values)."""
    _check_names(tv, reference, who)
    for key, ref in reference.items():
        _check_tensor(tv[key], ref, who, key)


def _check_names(tv: Mapping[str, Tensor], reference: Mapping[str, Tensor], who: str) -> None:
    if not isinstance(tv, Mapping):
        raise MergeError(f"{who}: task vector must be a mapping of name to tensor, got {type(tv).__name__}")
    missing, extra = sorted(set(reference) - set(tv)), sorted(set(tv) - set(reference))
    if missing:
        raise MergeError(f"{who}: tensor {missing[0]!r} is missing")
    if extra:
        raise MergeError(f"{who}: unexpected tensor {extra[0]!r}")


def _check_tensor(t: Any, ref: Tensor, who: str, key: str) -> None:
    if not torch.is_tensor(t):
        raise MergeError(f"{who}, tensor {key!r}: not a tensor ({type(t).__name__})")
    if not t.is_floating_point():
        raise MergeError(f"{who}, tensor {key!r}: dtype {t.dtype} is not floating point")
    if t.shape != ref.shape:
        raise MergeError(f"{who}, tensor {key!r}: shape {tuple(t.shape)} != {tuple(ref.shape)}")
    if not all_finite(t):
        raise MergeError(f"{who}, tensor {key!r}: contains NaN or Inf")


def validate_task_vectors(task_vectors: TaskVectors) -> dict[str, torch.Size]:
    """Check that there is at least one task vector and that all agree with the first; returns the
    tensors' shapes (read once here, so that a rule's output can be checked without reading again)."""
    if isinstance(task_vectors, Mapping) or not isinstance(task_vectors, Sequence):
        raise MergeError("task_vectors must be a sequence of task vectors (one mapping per client)")
    if len(task_vectors) == 0:
        raise MergeError("no task vectors to merge")
    first = task_vectors[0]
    if not isinstance(first, Mapping) or len(first) == 0:
        raise MergeError("client 0: task vector is empty or not a mapping")
    for i, tv in enumerate(task_vectors):
        _check_names(tv, first, f"client {i}")
    shapes = {}
    for key in first:  # key by key, as the rules read them: lazy task vectors share the base's read
        ref = first[key]
        for i, tv in enumerate(task_vectors):
            _check_tensor(ref if i == 0 else tv[key], ref, f"client {i}", key)
        shapes[key] = ref.shape
    return shapes


def per_client_values(name: str, values: Any, n: int, *, positive: bool) -> list[float]:
    """One finite non-negative (or positive) number per client, else a ``MergeError`` naming it."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | Tensor):
        raise MergeError(f"{name} must be a sequence with one number per client, got {values!r}")
    kind = "positive" if positive else "non-negative"
    vals = []
    for i, value in enumerate(values):
        if isinstance(value, (bool, str, bytes)):  # float() would take True and "1"; options do not
            raise MergeError(f"{name}[{i}] (client {i}) must be a number, got {value!r}")
        try:
            vals.append(float(value))
        except OverflowError:  # a Python int beyond float64's range
            raise MergeError(f"{name}[{i}] (client {i}) must be a finite {kind} number, got one beyond "
                             f"float64's range (±{sys.float_info.max:.4g})") from None
        except (TypeError, ValueError):
            raise MergeError(f"{name} must hold numbers, got {list(values)!r}") from None
    if len(vals) != n:
        raise MergeError(f"{name} has {len(vals)} entries for {n} clients")
    for i, v in enumerate(vals):
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise MergeError(f"{name}[{i}] (client {i}) must be a finite {kind} number, got {v}")
    return vals


def normalised_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """p_i = w_i / Σ_j w_j; uniform when ``weights`` is None.

    The weights are first scaled by the power of two that brings the largest to [0.5, 1): exact, so
    ordinary weights give the same p_i as the plain formula, and weights near either end of the
    float range neither overflow the sum nor underflow it.
    """
    if weights is None:
        return [1.0 / n] * n
    w = per_client_values("weights", weights, n, positive=False)
    if max(w) == 0:
        raise MergeError("weights sum to zero")
    scaled = scaled_to_unit(w)
    total = sum(scaled)
    return [x / total for x in scaled]
