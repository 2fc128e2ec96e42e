"""Choosing λ (and a method's extra hyper-parameter) on validation data, without retraining.

The papers tune λ in θ0 + λ·τ_merged on held-out validation data: the one-shot FL paper searches
0.05, 0.10, …, 2.00 (40 values) and picks the λ with the best mean normalized accuracy; FedGMA and
CCLIP search (rho, λ) jointly. Here:

- ``scale_grid``: methods whose natural scale is "mean" search ``LAMBDA_GRID``. Methods whose merged
  vector grows like a sum of N task vectors ("sum") search ``LAMBDA_GRID`` together with the same grid
  divided by N, so that both the paper's absolute range and the mean-equivalent range (λ·N ∈ [0.05, 2])
  are covered (N = 8: 0.00625 … 2.0, 80 values).
- option sets: every combination of the values of each option that its registry entry gives a tuning
  grid (:meth:`fedmerge.merging.MergeMethod.tuning_grid`: FedGMA's rho over 0.1 … 0.9, CCLIP's rho
  between the smallest and largest client norm, as the authors' code). An option the user fixed is
  not tuned.
- ``tune``: merges once per option set (never retrains, never re-merges per λ: λ only rescales) and
  calls the evaluation callback once per (option set, λ); option sets that give the same merged vector
  reuse its scores. The best score wins; among equal scores the first option set, and within it the
  middle of the λ values that reach the best score (tiny validation splits give plateaus).

This module is Flower-free; the caller supplies ``score(merged, scale) -> float`` (higher is better).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedmerge.errors import MergeError
from fedmerge.merging import METHODS, TaskVectors, merge

LAMBDA_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 41))

Score = Callable[[Mapping[str, Tensor], float], float]


def scale_grid(natural_scale: str, num_clients: int) -> list[float]:
    """The λ values to try for a method of this natural scale merging ``num_clients`` task vectors."""
    if natural_scale == "mean":
        return list(LAMBDA_GRID)
    if natural_scale == "sum":
        return sorted(set(LAMBDA_GRID) | {g / num_clients for g in LAMBDA_GRID})
    raise MergeError(f"unknown natural scale {natural_scale!r}")


@dataclass
class TuningResult:
    """The chosen λ and options, their validation score, the merged vector they use, and every trial."""

    scale: float
    options: dict[str, Any]
    score: float
    merged: dict[str, Tensor] = field(repr=False)
    scales: list[float]
    option_sets: list[dict[str, Any]]
    scores: list[list[float]]  # scores[j][i]: option_sets[j] at scales[i]

    def report(self) -> dict[str, Any]:
        """A JSON-ready summary: the grid and the validation score of every trial."""
        return {"criterion": "mean normalized accuracy on the clients' validation splits",
                "scale": self.scale, "options": self.options, "score": self.score,
                "grid": {"scale": self.scales, "options": self.option_sets}, "scores": self.scores}


def _fingerprint(merged: Mapping[str, Tensor]) -> tuple[float, ...]:
    """A cheap identity of a merged vector (sum and sum of squares per tensor, in float64)."""
    return tuple(x for t in merged.values() for x in (float(t.double().sum()), float(t.double().pow(2).sum())))


def tune(
    merge_fn: Callable[[dict[str, Any]], dict[str, Tensor]],
    score: Score,
    scales: Sequence[float],
    option_sets: Sequence[Mapping[str, Any]] = ({},),
) -> TuningResult:
    """Best (options, λ) by ``score``: one ``merge_fn(options)`` per option set, one score per λ."""
    scales = [float(s) for s in scales]
    if not scales or not option_sets:
        raise MergeError("tuning needs at least one scale and one option set")
    seen: dict[tuple[float, ...], list[float]] = {}
    table: list[list[float]] = []
    best: tuple[float, int, float, dict[str, Tensor]] | None = None  # score, option index, λ, merged
    for j, options in enumerate(option_sets):
        merged = merge_fn(dict(options))
        key = _fingerprint(merged)
        if key not in seen:
            seen[key] = [_finite_score(score(merged, s)) for s in scales]
        row = seen[key]
        table.append(row)
        top = max(row)
        if best is None or top > best[0]:
            ties = [s for s, v in zip(scales, row) if v == top]
            best = (top, j, ties[len(ties) // 2], merged)
    assert best is not None  # option_sets is not empty
    top, j, scale, merged = best
    return TuningResult(scale=scale, options=dict(option_sets[j]), score=top, merged=merged, scales=scales,
                        option_sets=[dict(o) for o in option_sets], scores=table)


def _finite_score(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else -math.inf


def tune_method(
    method: str,
    task_vectors: TaskVectors,
    score: Score,
    *,
    weights: Sequence[float] | None = None,
    options: Mapping[str, Any] | None = None,
    scales: Sequence[float] | None = None,
    merged: dict[str, Tensor] | None = None,
) -> TuningResult:
    """Tune λ (and rho where the method has one and ``options`` does not fix it) for one method.

    ``merged``, when given, is the method's merged vector with ``options`` alone (already computed by
    the round), reused instead of merging again."""
    entry = METHODS[method]
    fixed = dict(options or {})
    grid = scales if scales is not None else scale_grid(entry.natural_scale, len(task_vectors))
    with torch.no_grad():
        return tune(lambda extra: merged if merged is not None and not extra
                    else merge(method, task_vectors, weights, **fixed, **extra),
                    score, grid, entry.tuning_grid(task_vectors, fixed))
