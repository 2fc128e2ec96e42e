"""Order statistics over the clients: coordinate-wise median and trimmed mean.

Both come from a sorting network of elementwise min/max (Batcher's odd-even merge sort), pruned to
the output positions a rule needs, because it beats ``torch.sort`` and ``kthvalue`` over the clients;
tensors smaller than the network are sorted instead (timings: ``docs/performance.md``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedmerge.merging.linear import linear_combination
from fedmerge.merging.registry import Option, rule
from fedmerge.merging.validation import TaskVectors, all_finite
from fedmerge.task_vector import compute_dtype


@functools.lru_cache(maxsize=64)
def _sorting_network(n: int, wanted: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Comparators (i, j), i < j, of Batcher's odd-even merge sort on n wires, in order, keeping only
    those that decide the outputs at positions ``wanted`` of the ascending order.

    Built for the next power of two: wires ≥ n hold +∞ and never move, so their comparators drop out.
    """
    size = 1 << max(0, (n - 1).bit_length())
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k - 1, size - j - k - 1) + 1):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    needed, kept = set(wanted), []
    for a, b in reversed([(a, b) for a, b in pairs if b < n]):  # backwards: what feeds a wanted output
        if a in needed or b in needed:
            kept.append((a, b))
            needed |= {a, b}
    return tuple(reversed(kept))


def _order_statistics(task_vectors: TaskVectors, key: str, positions: Sequence[int]) -> list[Tensor]:
    """For each coordinate of tensor ``key``, its values at ``positions`` of the ascending order over
    the clients, in the compute dtype. The clients' tensors are read, never written."""
    dt = compute_dtype(task_vectors[0][key].dtype)
    rows = [tv[key].to(dt) for tv in task_vectors]
    network = _sorting_network(len(rows), tuple(positions))
    if rows[0].numel() < len(network):
        ordered = torch.stack(rows).sort(dim=0).values
        return [ordered[i].clone() for i in positions]  # copies: views would keep the whole stack alive
    for a, b in network:
        rows[a], rows[b] = torch.minimum(rows[a], rows[b]), torch.maximum(rows[a], rows[b])
    return [rows[i] for i in positions]


def _mean(values: Sequence[Tensor]) -> Tensor:
    """The elementwise mean of ``values`` as a new tensor: Σ v / m, and Σ (v / m) for the entries
    whose sum leaves the range (their mean cannot: no term exceeds the largest |v| / m)."""
    m = len(values)
    mean = sum(values[1:], values[0]) / m
    if not all_finite(mean):
        mean = torch.where(mean.isfinite(), mean, sum((v / m for v in values[1:]), values[0] / m))
    return mean


@rule("median", elementwise=True, natural_scale="mean", uses_weights=False,
      citation="Yin et al., Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates, ICML 2018",
      formula="coordinate-wise median over clients (mean of the two middle values when n is even)")
def median(task_vectors: TaskVectors, p: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Coordinate-wise median over clients (mean of the two middle values when n is even)."""
    n = len(task_vectors)
    middle = (n // 2,) if n % 2 else (n // 2 - 1, n // 2)
    out: dict[str, Tensor] = {}
    for key, ref in task_vectors[0].items():
        values = _order_statistics(task_vectors, key, middle)
        mid = values[0] if n % 2 else _mean(values)
        out[key] = mid.to(ref.dtype, copy=n == 1)  # one client: its own tensor, not to be shared
    return out



@rule("trimmed_mean", elementwise=True, natural_scale="mean", uses_weights=False,
      options=[Option("beta", default=0.1, low=0.0, high=0.5, high_open=True,
                      help="fraction trimmed at each end")],
      citation="Yin et al., Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates, ICML 2018",
      formula="coordinate-wise mean after dropping the ⌊beta·n⌋ lowest and highest values")
def trimmed_mean(task_vectors: TaskVectors, p: Sequence[float] | None = None, *,
                 beta: float = 0.1) -> dict[str, Tensor]:
    """Coordinate-wise trimmed mean: drop the ⌊beta·n⌋ lowest and highest values, average the rest.

    Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.
    ``beta`` in [0, 0.5) (default 0.1); weights are ignored (as for ``median``), so beta = 0 is the
    uniform mean. Natural scale: one task vector ("mean").
    """
    n = len(task_vectors)
    cut = math.floor(beta * n)
    if cut == 0:  # nothing trimmed: the uniform mean, streamed, with no order to find
        return linear_combination(task_vectors, [1.0 / n] * n)
    out: dict[str, Tensor] = {}
    for key, ref in task_vectors[0].items():
        kept = _order_statistics(task_vectors, key, range(cut, n - cut))
        out[key] = _mean(kept).to(ref.dtype)
    return out
