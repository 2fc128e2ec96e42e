"""One-shot merging rules: one verb, one registry.

``merge(method, task_vectors, weights=None, **options)`` returns the merged task vector τ_merged
(not yet scaled by λ, not yet added to θ0; use :func:`fedmerge.apply`). ``METHODS`` maps every
registered name to its :class:`MergeMethod`. With p_i the normalised ``weights`` (uniform when
omitted):

===================  ==================================================================================
``task_arithmetic``  Σ_i τ_i  (Ilharco et al., 2023; weights ignored by definition)
``fedavg``           Σ_i p_i τ_i  (McMahan et al., 2017, one round with server learning rate 1)
``fednova``          (Σ_j p_j K_j) · Σ_i p_i τ_i / K_i  (Wang et al., 2020), ``local_steps`` = [K_i]
``median``           coordinate-wise median (mean of the two middle values when n is even)
``fedgma``           m ⊙ Σ_i p_i τ_i, A = |Σ_i sign τ_i| / n, m = 1 where A ≥ rho else A
                     (Tenison et al., 2022)
``cclip``            Σ_i p_i τ_i · min(1, rho / ‖τ_i‖₂)  (Karimireddy et al., 2021, centre θ0)
``tsv``              TSV-Merge (Gargiulo et al., CVPR 2025) on 2-D tensors, Σ_i p_i τ_i elsewhere
``trimmed_mean``     coordinate-wise mean after dropping the ⌊beta·n⌋ lowest and highest values
``ties``             TIES-Merging: trim to top-k magnitudes, elect sign, disjoint mean (Yadav et al., 2023)
``tsv_compress``     Σ_i of each τ_i's rank-⌊r/T⌋ approximation on 2-D tensors (TSV-C), Σ_i p_i τ_i elsewhere
``iso_c``            σ̄ U Vᵀ of the summed task matrix (Marczak et al., ICML 2025), Σ_i p_i τ_i elsewhere
``iso_cts``          Iso-CTS: common plus task-specific subspaces, isotropic spectrum (same paper)
===================  ==================================================================================

Every method validates its inputs up front and raises :class:`~fedmerge.errors.MergeError` naming
the client and tensor at fault. Inputs are never mutated; each output tensor keeps its input dtype
(half precision is computed in float32, SVDs in float64).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedmerge.errors import MergeError
from fedmerge.task_vector import compute_dtype, l2_norm

TaskVectors = Sequence[Mapping[str, Tensor]]
Combine = Callable[..., dict[str, Tensor]]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merging rule.

    ``combine(task_vectors, p, **options)`` receives validated task vectors and normalised weights.
    ``options`` are its keyword-only parameters with their defaults (``None`` marks "derived from the
    inputs"); ``required`` must be given; ``per_client`` options hold one value per task vector.
    ``natural_scale`` says whether the merged vector has the size of one task vector ("mean") or of
    their sum ("sum"), which tells what λ to try first.
    """

    name: str
    combine: Combine
    summary: str
    natural_scale: str
    options: Mapping[str, Any] = field(default_factory=dict)
    required: frozenset[str] = frozenset()
    per_client: frozenset[str] = frozenset()


METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, natural_scale: str, per_client: Sequence[str] = ()) -> Callable[[Combine], Combine]:
    """Add a combine function to ``METHODS``; its keyword-only parameters become its options."""

    def deco(fn: Combine) -> Combine:
        params = inspect.signature(fn).parameters.values()
        kw = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        METHODS[name] = MergeMethod(
            name=name,
            combine=fn,
            summary=(fn.__doc__ or "").strip().splitlines()[0],
            natural_scale=natural_scale,
            options={p.name: (None if p.default is inspect.Parameter.empty else p.default) for p in kw},
            required=frozenset(p.name for p in kw if p.default is inspect.Parameter.empty),
            per_client=frozenset(per_client),
        )
        return fn

    return deco


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


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
    if not _all_finite(t):
        raise MergeError(f"{who}, tensor {key!r}: contains NaN or Inf")


def _all_finite(t: Tensor) -> bool:
    """Whether every entry is finite: the sum is (NaN and ±Inf propagate), or, if the sum of finite
    values overflowed, the elementwise check says so. One pass without a mask: ~20× faster."""
    total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all())


def validate_task_vectors(task_vectors: TaskVectors) -> None:
    """Check that there is at least one task vector and that all agree with the first."""
    if isinstance(task_vectors, Mapping) or not isinstance(task_vectors, Sequence):
        raise MergeError("task_vectors must be a sequence of task vectors (one mapping per client)")
    if len(task_vectors) == 0:
        raise MergeError("no task vectors to merge")
    first = task_vectors[0]
    if not isinstance(first, Mapping) or len(first) == 0:
        raise MergeError("client 0: task vector is empty or not a mapping")
    for i, tv in enumerate(task_vectors):
        _check_names(tv, first, f"client {i}")
    for key in first:  # key by key, as the rules read them: lazy task vectors share the base's read
        ref = first[key]
        for i, tv in enumerate(task_vectors):
            _check_tensor(ref if i == 0 else tv[key], ref, f"client {i}", key)


def _per_client_values(name: str, values: Any, n: int, *, positive: bool) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | Tensor):
        raise MergeError(f"{name} must be a sequence with one number per client, got {values!r}")
    vals = [float(v) for v in values]
    if len(vals) != n:
        raise MergeError(f"{name} has {len(vals)} entries for {n} clients")
    for i, v in enumerate(vals):
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            kind = "positive" if positive else "non-negative"
            raise MergeError(f"{name}[{i}] (client {i}) must be a finite {kind} number, got {v}")
    return vals


def normalised_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """p_i = w_i / Σ_j w_j; uniform when ``weights`` is None."""
    if weights is None:
        return [1.0 / n] * n
    w = _per_client_values("weights", weights, n, positive=False)
    total = sum(w)
    if total <= 0:
        raise MergeError("weights sum to zero")
    return [x / total for x in w]


# ------------------------------------------------------------------------------------------------
# The verb
# ------------------------------------------------------------------------------------------------


def merge(
    method: str,
    task_vectors: TaskVectors,
    weights: Sequence[float] | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """Merge task vectors with a registered method; see the module docstring for the formulas."""
    if method not in METHODS:
        raise MergeError(f"unknown merging method {method!r}; known: {', '.join(sorted(METHODS))}")
    spec = METHODS[method]
    validate_task_vectors(task_vectors)
    n = len(task_vectors)
    p = normalised_weights(weights, n)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        known = ", ".join(sorted(spec.options)) or "none"
        raise MergeError(f"{method}: unknown option {unknown[0]!r} (options: {known})")
    missing = sorted(spec.required - set(options))
    if missing:
        raise MergeError(f"{method}: required option {missing[0]!r} is missing")
    for name in spec.per_client & set(options):
        options[name] = _per_client_values(name, options[name], n, positive=True)
    return spec.combine(list(task_vectors), p, **options)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


def linear_combination(
    task_vectors: TaskVectors, coefficients: Sequence[float], keys: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """Σ_i c_i τ_i over ``keys`` (all by default), one task vector at a time (no n × model stack)."""
    out: dict[str, Tensor] = {}
    for key in task_vectors[0] if keys is None else keys:
        ref = task_vectors[0][key]
        dt = compute_dtype(ref.dtype)
        acc = torch.zeros(ref.shape, dtype=dt)
        for c, tv in zip(coefficients, task_vectors):
            acc.add_(tv[key].to(dt), alpha=c)
        out[key] = acc.to(ref.dtype)
    return out


def _check_range(
    method: str, name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> float:
    """``value`` as a float inside [lo, hi] (open ends where asked), else a ``MergeError`` naming it."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise MergeError(f"{method}: {name} must be a number, got {value!r}") from None
    inside = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    if not inside or not math.isfinite(value):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise MergeError(f"{method}: {name} must lie in {interval}, got {value}")
    return value


# Order statistics over the clients come from a sorting network of elementwise min/max: with 8
# clients a (8, 230k) tensor's median took 32 ms by kthvalue and 15 ms by torch.sort over dim 0,
# 4.8 ms by the network; at 128 and 256 clients the network is still 3-6× faster than sort on
# tensors of 4k entries or more. Its cost is ~1 µs per comparator on top of the arithmetic, so
# tensors with fewer entries than it has comparators (a bias over 128 clients) are sorted instead.


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


# ------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------


@register("task_arithmetic", natural_scale="sum")
def task_arithmetic(task_vectors: TaskVectors, p: Sequence[float]) -> dict[str, Tensor]:
    """Task Arithmetic: the plain sum Σ_i τ_i (weights ignored; λ = η/N makes it one-shot FedAvg)."""
    return linear_combination(task_vectors, [1.0] * len(task_vectors))


@register("fedavg", natural_scale="mean")
def fedavg(task_vectors: TaskVectors, p: Sequence[float]) -> dict[str, Tensor]:
    """FedAvg: the weighted mean Σ_i p_i τ_i."""
    return linear_combination(task_vectors, p)


@register("fednova", natural_scale="mean", per_client=("local_steps",))
def fednova(task_vectors: TaskVectors, p: Sequence[float], *, local_steps: Sequence[float]) -> dict[str, Tensor]:
    """FedNova: (Σ_j p_j K_j) · Σ_i p_i τ_i / K_i, removing the bias towards long-trained clients.

    K_i stands for FedNova's normaliser a_i, which equals the step count only for plain SGD with one
    constant learning rate shared by all clients (Wang et al., 2020). With momentum, per-client
    learning rates, schedules or Adam, a_i differs and this is the step-count approximation that the
    one-shot FL paper uses."""
    tau_eff = sum(pj * kj for pj, kj in zip(p, local_steps))
    return linear_combination(task_vectors, [tau_eff * pi / ki for pi, ki in zip(p, local_steps)])


@register("median", natural_scale="mean")
def median(task_vectors: TaskVectors, p: Sequence[float]) -> dict[str, Tensor]:
    """Coordinate-wise median over clients (mean of the two middle values when n is even)."""
    n = len(task_vectors)
    middle = (n // 2,) if n % 2 else (n // 2 - 1, n // 2)
    out: dict[str, Tensor] = {}
    for key, ref in task_vectors[0].items():
        values = _order_statistics(task_vectors, key, middle)
        mid = values[0] if n % 2 else (values[0] + values[1]) / 2
        out[key] = mid.to(ref.dtype, copy=n == 1)  # one client: its own tensor, not to be shared
    return out


@register("fedgma", natural_scale="mean")
def fedgma(task_vectors: TaskVectors, p: Sequence[float], *, rho: float = 0.5) -> dict[str, Tensor]:
    """FedGMA: the weighted mean masked by sign agreement A = |Σ sign τ_i| / n (soft below rho)."""
    rho = _check_range("fedgma", "rho", rho, 0.0, 1.0)
    n = len(task_vectors)
    mean = linear_combination(task_vectors, p)
    out: dict[str, Tensor] = {}
    for key, m in mean.items():
        dt = compute_dtype(m.dtype)
        agreement = sum(torch.sign(tv[key].to(dt)) for tv in task_vectors).abs() / n
        mask = torch.where(agreement >= rho, torch.ones_like(agreement), agreement)
        out[key] = (mask * m.to(dt)).to(m.dtype)
    return out


@register("cclip", natural_scale="mean")
def cclip(task_vectors: TaskVectors, p: Sequence[float], *, rho: float | None = None) -> dict[str, Tensor]:
    """Centred clipping at θ0: Σ_i p_i τ_i · min(1, rho / ‖τ_i‖₂); rho defaults to the median norm."""
    norms = [l2_norm(tv) for tv in task_vectors]
    if rho is None:
        rho = float(torch.tensor(norms, dtype=torch.float64).quantile(0.5))
    rho = _check_range("cclip", "rho", rho, 0.0, math.inf)
    factors = [1.0 if nrm == 0 else min(1.0, rho / nrm) for nrm in norms]
    return linear_combination(task_vectors, [pi * f for pi, f in zip(p, factors)])


@register("trimmed_mean", natural_scale="mean")
def trimmed_mean(task_vectors: TaskVectors, p: Sequence[float], *, beta: float = 0.1) -> dict[str, Tensor]:
    """Coordinate-wise trimmed mean: drop the ⌊beta·n⌋ lowest and highest values, average the rest.

    Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.
    ``beta`` in [0, 0.5) (default 0.1); weights are ignored (as for ``median``), so beta = 0 is the
    uniform mean. Natural scale: one task vector ("mean").
    """
    beta = _check_range("trimmed_mean", "beta", beta, 0.0, 0.5, hi_open=True)
    n = len(task_vectors)
    cut = math.floor(beta * n)
    if cut == 0:  # nothing trimmed: the uniform mean, streamed, with no order to find
        return linear_combination(task_vectors, [1.0 / n] * n)
    out: dict[str, Tensor] = {}
    for key, ref in task_vectors[0].items():
        kept = _order_statistics(task_vectors, key, range(cut, n - cut))
        out[key] = (sum(kept[1:], kept[0]) / len(kept)).to(ref.dtype)
    return out


def ties_thresholds(task_vectors: TaskVectors, k: float) -> list[float]:
    """Per task vector, the magnitude of its ⌈k·d⌉-th largest entry over all d entries (TIES trim step)."""
    return [_magnitude_threshold(tv, k) for tv in task_vectors]


def _magnitude_threshold(tv: Mapping[str, Tensor], k: float) -> float:
    """The ⌈k·d⌉-th largest |entry| of ``tv`` (d entries in all), exactly, one tensor at a time.

    Radix selection: non-negative floats order like their bit patterns, so a first pass histograms
    the top 16 bits of every |entry| to find the bucket holding the wanted rank, and a second pass
    keeps that bucket's entries for ``kthvalue``. On a ViT-sized task vector (23M entries) that took
    56 ms against 290 ms for ``kthvalue`` on all of them concatenated. (When nearly all entries
    share one bucket, as for magnitudes within ~1% of each other, it costs ~5× a plain kthvalue.)
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


@register("ties", natural_scale="mean")
def ties(task_vectors: TaskVectors, p: Sequence[float], *, k: float = 0.2) -> dict[str, Tensor]:
    """TIES-Merging: trim each τ_i to its top-k magnitudes, elect signs, disjoint (weighted) mean.

    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
    1. Trim: τ̂_i keeps the entries of τ_i whose magnitude is at least its ⌈k·d⌉-th largest over the
       whole task vector (all tensors together, as in the paper; ties at the threshold are kept).
    2. Elect: s = sign(Σ_i p_i τ̂_i) per coordinate (p uniform: the sign of the summed mass).
    3. Disjoint mean: Σ_{i: sign τ̂_i = s} p_i τ̂_i / Σ_{i: sign τ̂_i = s} p_i, 0 where no client agrees.
    A coordinate whose summed mass is exactly 0 has no elected sign and merges to 0 (the reference
    code breaks such ties by the model-wide majority sign). ``k`` in (0, 1] (default 0.2, the
    paper's); k = 1 with agreeing signs is the weighted mean. Natural scale: "mean" (λ = 1 in the paper).
    """
    k = _check_range("ties", "k", k, 0.0, 1.0, lo_open=True)
    thresholds = ties_thresholds(task_vectors, k)
    out: dict[str, Tensor] = {}
    for key, ref in task_vectors[0].items():  # client by client: no n-deep stacks of temporaries
        dt = compute_dtype(ref.dtype)
        trimmed = []
        for tv, th in zip(task_vectors, thresholds):
            x = tv[key].to(dt)
            trimmed.append(torch.where(x.abs() >= th, x, 0.0))
        elected = torch.zeros(ref.shape, dtype=dt)
        for c, t in zip(p, trimmed):
            elected.add_(t, alpha=c)
        elected.sign_()
        mass, total = torch.zeros_like(elected), torch.zeros_like(elected)
        for c, t in zip(p, trimmed):
            agree = (t * elected) > 0  # a kept entry of the elected sign (none where no sign was elected)
            mass.add_(agree, alpha=c)
            total.add_(torch.where(agree, t, 0.0), alpha=c)
        out[key] = torch.where(mass > 0, total / mass.clamp_min(torch.finfo(dt).tiny), 0.0).to(ref.dtype)
    return out


# Spectral methods (TSV-Merge, …) live in their own module and register themselves here.
from fedmerge import spectral  # noqa: E402,F401
