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
- A trial whose model leaves its dtype's range (a ``MergeOverflowError`` from the merge or from
  θ0 + λ·τ in the score) is unusable: it is recorded with score -inf and never chosen; only when
  every trial overflows does tuning fail, with one ``MergeOverflowError``.

This module is Flower-free; the caller supplies ``score(merged, scale) -> float`` (higher is better).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedmerge.errors import MergeError, MergeOverflowError
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
    """Best (options, λ) by ``score``: one ``merge_fn(options)`` per option set, one score per λ.

    A merge or a λ whose model overflows its dtype is unusable (see the module); a
    ``MergeOverflowError`` when all are."""
    scales = [float(s) for s in scales]
    if not scales or not option_sets:
        raise MergeError("tuning needs at least one scale and one option set")
    seen: dict[tuple[float, ...], list[float | None]] = {}
    table: list[list[float]] = []
    best: tuple[float, int, float, dict[str, Tensor]] | None = None  # score, option index, λ, merged
    for j, options in enumerate(option_sets):
        try:
            merged = merge_fn(dict(options))
        except MergeOverflowError:
            table.append([-math.inf] * len(scales))
            continue
        key = _fingerprint(merged)
        if key not in seen:
            seen[key] = [_trial(score, merged, s) for s in scales]
        trials = seen[key]
        table.append([-math.inf if v is None else v for v in trials])
        usable = [(s, v) for s, v in zip(scales, trials) if v is not None]
        if not usable:
            continue
        top = max(v for _, v in usable)
        if best is None or top > best[0]:
            ties = [s for s, v in usable if v == top]
            best = (top, j, ties[len(ties) // 2], merged)
    if best is None:
        raise MergeOverflowError(f"tuning: every λ in [{min(scales):g}, {max(scales):g}] with every option set gives "
                                 "a model whose values exceed the range of its dtype; use smaller scales")
    top, j, scale, merged = best
    return TuningResult(scale=scale, options=dict(option_sets[j]), score=top, merged=merged, scales=scales,
                        option_sets=[dict(o) for o in option_sets], scores=table)


def _trial(score: Score, merged: Mapping[str, Tensor], scale: float) -> float | None:
    """``score(merged, scale)`` with NaN and ±inf as -inf; None where the model overflows (unusable)."""
    try:
        return _finite_score(score(merged, scale))
    except MergeOverflowError:
        return None


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
    device: str | torch.device | None = None,
) -> TuningResult:
    """Tune λ (and rho where the method has one and ``options`` does not fix it) for one method.

    ``merged``, when given, is the method's merged vector with ``options`` alone (already computed by
    the round), reused instead of merging again. ``device``: where the merges run (see :func:`merge`)."""
    entry = METHODS[method]
    fixed = dict(options or {})
    grid = scales if scales is not None else scale_grid(entry.natural_scale, len(task_vectors))
    with torch.no_grad():
        return tune(lambda extra: merged if merged is not None and not extra
                    else merge(method, task_vectors, weights, device=device, **fixed, **extra),
                    score, grid, entry.tuning_grid(task_vectors, fixed))
