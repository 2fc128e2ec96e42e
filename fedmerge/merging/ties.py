"""TIES-Merging: trim, elect sign, disjoint mean (Yadav et al., NeurIPS 2023)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedmerge.errors import MergeError
from fedmerge.merging.registry import Option, WholeVectorStatistics, rule, uniform_if_none
from fedmerge.merging.validation import TaskVectors
from fedmerge.task_vector import compute_dtype


def ties_thresholds(task_vectors: TaskVectors, k: float) -> list[float]:
    """Per task vector, the magnitude of its ⌈k·d⌉-th largest entry over all d entries (TIES trim step)."""
    return [_magnitude_threshold(tv, k) for tv in task_vectors]


def _magnitude_threshold(tv: Mapping[str, Tensor], k: float) -> float:
    """The ⌈k·d⌉-th largest |entry| of ``tv`` (d entries in all), exactly, one tensor at a time.

    Radix selection: a histogram of the top 16 bits of every |entry| finds the bucket holding the
    rank, then ``kthvalue`` runs on that bucket only, much faster than on all entries (``docs/performance.md``).
    """
    def magnitudes(t: Tensor) -> tuple[Tensor, Tensor]:
        """|entries| in the compute dtype, and their buckets: the top 16 bits of their float32 value
        (rounding to float32 never reverses an order, so float64 entries bucket consistently)."""
        mag = t.detach().reshape(-1).to(compute_dtype(t.dtype)).abs()
        return mag, mag.float().view(torch.int32) >> 15

    hist: Tensor | None = None
    for t in tv.values():
        counts = torch.bincount(magnitudes(t)[1], minlength=1 << 16)
        hist = counts if hist is None else hist + counts
    if hist is None:
        raise MergeError("ties: a task vector has no tensors")
    cum = hist.cumsum(0)
    d = int(cum[-1])
    if d == 0:
        return 0.0
    rank = d - max(1, math.ceil(k * d))  # 0-based, ascending
    bucket = int(torch.searchsorted(cum, torch.tensor(rank, device=cum.device), right=True))
    below = int(cum[bucket - 1]) if bucket else 0
    members = torch.cat([mag[top == bucket] for mag, top in map(magnitudes, tv.values())])
    return float(members.kthvalue(rank - below + 1).values)


@rule("ties", elementwise=True, natural_scale="mean",
      options=[Option("k", default=0.2, low=0.0, high=1.0, low_open=True,
                      help="fraction of each task vector's largest magnitudes kept")],
      citation="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023",
      formula="trim each τ_i to its top-k magnitudes, elect signs, disjoint weighted mean",
      statistics=WholeVectorStatistics(("thresholds",), lambda task_vectors, p, k=0.2: {
          "thresholds": ties_thresholds(task_vectors, k)}))  # over all tensors together, as in the paper
def ties(task_vectors: TaskVectors, p: Sequence[float] | None = None, *, k: float = 0.2,
         thresholds: Sequence[float] | None = None) -> dict[str, Tensor]:
    """TIES-Merging: trim each τ_i to its top-k magnitudes, elect signs, disjoint (weighted) mean.

    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
    1. Trim: τ̂_i keeps the entries of τ_i whose magnitude is at least its ⌈k·d⌉-th largest over the
       whole task vector (all tensors together, as in the paper; ties at the threshold are kept).
    2. Elect: s = sign(Σ_i p_i τ̂_i) per coordinate (p uniform: the sign of the summed mass, Σ_i τ̂_i).
    3. Disjoint mean: Σ_{i: sign τ̂_i = s} p_i τ̂_i / Σ_{i: sign τ̂_i = s} p_i, 0 where no client agrees.
    A coordinate whose summed mass is 0 has no elected sign and merges to 0 (the reference code
    breaks such ties by the model-wide majority sign). The mass is summed in float64 from the
    values as stored (in their own dtype), with the weights divided by the largest so that equal
    weights add the values themselves; it counts as 0 when no larger than the bound on its rounding,
    (n + 1) · eps(float64) · Σ_i p_i |τ̂_i| (see :func:`_elected_signs`). So stored values that cancel
    merge to 0 in every dtype, and the rounding of the weights p_i never elects a sign. ``k`` in
    (0, 1] (default 0.2, the paper's); k = 1 with agreeing signs is the weighted mean. Natural
    scale: "mean" (λ = 1 in the paper).
    """
    p = uniform_if_none(p, len(task_vectors))
    if thresholds is None:  # else computed beforehand over the whole task vectors (merge_each)
        thresholds = ties_thresholds(task_vectors, k)
    out: dict[str, Tensor] = {}
    for key, ref in task_vectors[0].items():  # client by client: no n-deep stacks of temporaries
        dt = compute_dtype(ref.dtype)
        trimmed = []
        for tv, th in zip(task_vectors, thresholds):
            x = tv[key].to(dt)
            trimmed.append(torch.where(x.abs() >= th, x, 0.0))
        elected = _elected_signs(trimmed, p).to(dt)
        mass, total = torch.zeros_like(elected), torch.zeros_like(elected)
        for c, t in zip(p, trimmed):
            agree = (t * elected) > 0  # a kept entry of the elected sign (none where no sign was elected)
            mass.add_(agree, alpha=c)
            total.add_(torch.where(agree, t, 0.0), alpha=c)
        out[key] = torch.where(mass > 0, total / mass.clamp_min(torch.finfo(dt).tiny), 0.0).to(ref.dtype)
    return out


def _elected_signs(trimmed: Sequence[Tensor], p: Sequence[float]) -> Tensor:
    """sign(Σ_i p_i τ̂_i) per coordinate, 0 where the sum is 0 to within its rounding, in float64.

    The terms are scaled by 1 / max_j p_j, so that equal weights add the τ̂_i themselves (no
    product rounds, and sums of a few float32 or lower values are exact in float64). A sum no larger
    than its rounding bound, (n + 1)·eps·Σ_i p_i |τ̂_i| (n roundings of the sum and the products,
    three of each p_i / max_j p_j), has no determined sign and elects none, so masses that cancel
    merge to 0 in every dtype instead of taking the sign of a rounding residue.
    """
    largest = max(p)
    mass = torch.zeros(trimmed[0].shape, dtype=torch.float64, device=trimmed[0].device)
    spread = torch.zeros_like(mass)
    for c, t in zip(p, trimmed):
        t64 = t.double()
        mass.add_(t64, alpha=c / largest)
        spread.add_(t64.abs(), alpha=c / largest)
    determined = mass.abs() > spread.mul_((len(trimmed) + 1) * torch.finfo(torch.float64).eps)
    return torch.where(determined, mass.sign(), 0.0)
