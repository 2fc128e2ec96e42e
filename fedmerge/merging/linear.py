"""Rules that are weighted sums of the task vectors: Task Arithmetic, FedAvg, FedNova, FedGMA, CCLIP."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedmerge.merging.registry import Option, WholeVectorStatistics, rule, uniform_if_none
from fedmerge.merging.validation import TaskVectors, all_finite
from fedmerge.numerics import scaled_to_unit, times_power_of_two, unit_exponent
from fedmerge.task_vector import compute_dtype, l2_norm

FEDGMA_RHO_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 10))
CCLIP_RHO_POINTS = 5


def linear_combination(
    task_vectors: TaskVectors, coefficients: Sequence[float], keys: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """Σ_i c_i τ_i over ``keys`` (all by default), one task vector at a time (no n × model stack).

    Accumulated in the compute dtype. Entries whose partial sums leave its range (or all of them,
    where a coefficient is beyond it) are summed again in float64, with both the coefficients and
    the tensors scaled by powers of two where float64's range does not suffice either: an entry is
    non-finite only where the exact Σ_i c_i τ_i does not fit the tensor's own dtype.
    """
    out: dict[str, Tensor] = {}
    for key in task_vectors[0] if keys is None else keys:
        ref = task_vectors[0][key]
        dt = compute_dtype(ref.dtype)
        if all(abs(c) <= torch.finfo(dt).max for c in coefficients):
            acc = _accumulate(task_vectors, coefficients, key, dt)
            if not all_finite(acc):
                acc = torch.where(acc.isfinite(), acc, _accumulate_wide(task_vectors, coefficients, key).to(dt))
        else:
            acc = _accumulate_wide(task_vectors, coefficients, key)
        out[key] = acc.to(ref.dtype)
    return out


def _accumulate(task_vectors: TaskVectors, coefficients: Sequence[float], key: str, dtype: torch.dtype) -> Tensor:
    """Σ_i c_i τ_i[key] in ``dtype``."""
    ref = task_vectors[0][key]
    acc = torch.zeros(ref.shape, dtype=dtype, device=ref.device)
    for c, tv in zip(coefficients, task_vectors):
        acc.add_(tv[key].to(dtype), alpha=c)
    return acc


def _accumulate_wide(task_vectors: TaskVectors, coefficients: Sequence[float], key: str) -> Tensor:
    """Σ_i c_i τ_i[key] in float64; where that overflows, as 2^(a+b) Σ_i (c_i 2^-a)(τ_i 2^-b), with
    2^a and 2^b the powers of two just above the largest |c_i| and |τ_i| (every term at most 1)."""
    acc = _accumulate(task_vectors, coefficients, key, torch.float64)
    if all_finite(acc):
        return acc
    a, b = unit_exponent(coefficients), unit_exponent(tv[key] for tv in task_vectors)
    scaled = torch.zeros_like(acc)
    for c, tv in zip(coefficients, task_vectors):
        scaled.add_(times_power_of_two(tv[key].double(), -b), alpha=math.ldexp(c, -a))
    return times_power_of_two(scaled, a + b)


@rule("task_arithmetic", elementwise=True, natural_scale="sum", uses_weights=False,
      citation="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
      formula="Σ_i τ_i")
def task_arithmetic(task_vectors: TaskVectors, p: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Task Arithmetic: the plain sum Σ_i τ_i (weights ignored; λ = η/N makes it one-shot FedAvg)."""
    return linear_combination(task_vectors, [1.0] * len(task_vectors))


@rule("fedavg", elementwise=True, natural_scale="mean",
      citation="McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data, "
               "AISTATS 2017",
      formula="Σ_i p_i τ_i")
def fedavg(task_vectors: TaskVectors, p: Sequence[float] | None = None) -> dict[str, Tensor]:
    """FedAvg: the weighted mean Σ_i p_i τ_i."""
    return linear_combination(task_vectors, uniform_if_none(p, len(task_vectors)))


@rule("fednova", elementwise=True, natural_scale="mean",
      options=[Option("local_steps", required=True, per_client=True,
                      help="K_i, each client's number of local steps (from its reply)")],
      citation="Wang et al., Tackling the Objective Inconsistency Problem in Heterogeneous Federated "
               "Optimization, NeurIPS 2020",
      formula="(Σ_j p_j K_j) · Σ_i p_i τ_i / K_i")
def fednova(task_vectors: TaskVectors, p: Sequence[float] | None = None, *,
            local_steps: Sequence[float]) -> dict[str, Tensor]:
    """FedNova: (Σ_j p_j K_j) · Σ_i p_i τ_i / K_i, removing the bias towards long-trained clients.

    K_i stands for FedNova's normaliser a_i, which equals the step count only for plain SGD with one
    constant learning rate shared by all clients (Wang et al., 2020). With momentum, per-client
    learning rates, schedules or Adam, a_i differs and this is the step-count approximation that the
    one-shot FL paper uses."""
    p = uniform_if_none(p, len(task_vectors))
    # The coefficients do not change when every K_j is scaled: by a power of two (exact), so that
    # step counts near the top of the float range do not overflow τ_eff. Where a scaled K_i then
    # underflows, as p_i Σ_j p_j (K_j / K_i) instead: infinite only if the coefficient is.
    scaled = scaled_to_unit(local_steps)
    if min(scaled) > 0:
        tau_eff = sum(pj * kj for pj, kj in zip(p, scaled))
        coefficients = [tau_eff * pi / ki for pi, ki in zip(p, scaled)]
    else:
        coefficients = [pi * sum(pj * (kj / ki) for pj, kj in zip(p, local_steps))
                        for pi, ki in zip(p, local_steps)]
    return linear_combination(task_vectors, coefficients)


@rule("fedgma", elementwise=True, natural_scale="mean",
      options=[Option("rho", default=0.5, low=0.0, high=1.0, grid=FEDGMA_RHO_GRID,
                      help="sign-agreement threshold above which the mask is 1")],
      citation="Tenison et al., Gradient Masked Averaging for Federated Learning, TMLR 2023",
      formula="m ⊙ Σ_i p_i τ_i, A = |Σ_i sign τ_i| / n, m = 1 where A ≥ rho else A")
def fedgma(task_vectors: TaskVectors, p: Sequence[float] | None = None, *, rho: float = 0.5) -> dict[str, Tensor]:
    """FedGMA: the weighted mean masked by sign agreement A = |Σ sign τ_i| / n (soft below rho)."""
    n = len(task_vectors)
    mean = linear_combination(task_vectors, uniform_if_none(p, n))
    out: dict[str, Tensor] = {}
    for key, m in mean.items():
        dt = compute_dtype(m.dtype)
        agreement = sum((torch.sign(tv[key].to(dt)) for tv in task_vectors), torch.zeros_like(m, dtype=dt)).abs() / n
        mask = torch.where(agreement >= rho, torch.ones_like(agreement), agreement)
        out[key] = (mask * m.to(dt)).to(m.dtype)
    return out


def cclip_rho_grid(task_vectors: TaskVectors) -> list[float]:
    """CCLIP's tuning values: evenly spaced from the smallest client norm up to (excluding) the largest,
    as in the authors' code."""
    norms = [l2_norm(tv) for tv in task_vectors]
    lo, hi = min(norms), max(norms)
    return sorted({lo + (hi - lo) * i / CCLIP_RHO_POINTS for i in range(CCLIP_RHO_POINTS)})


def cclip_factors(task_vectors: TaskVectors, p: Sequence[float] | None = None, *,
                  rho: float | None = None) -> dict[str, list[float]]:
    """CCLIP's whole-vector statistics: each client's factor min(1, rho / ‖τ_i‖₂)."""
    norms = [l2_norm(tv) for tv in task_vectors]
    if any(math.isinf(nrm) for nrm in norms):  # norms beyond float64's range: compare 2^-e τ_i and 2^-e rho
        e = unit_exponent(t for tv in task_vectors for t in tv.values())
        norms = [l2_norm({k: times_power_of_two(t.double(), -e) for k, t in tv.items()}) for tv in task_vectors]
        rho = None if rho is None else math.ldexp(rho, -e)
    if rho is None:
        rho = float(torch.tensor(norms, dtype=torch.float64, device="cpu").quantile(0.5))  # Python floats
    return {"factors": [1.0 if nrm == 0 else min(1.0, rho / nrm) for nrm in norms]}


@rule("cclip", elementwise=True, natural_scale="mean",
      options=[Option("rho", default=None, low=0.0, high=math.inf, grid=cclip_rho_grid,
                      help="clipping radius (default: the median client norm)")],
      citation="Karimireddy et al., Learning from History for Byzantine Robust Optimization, ICML 2021",
      formula="Σ_i p_i τ_i · min(1, rho / ‖τ_i‖₂)",
      statistics=WholeVectorStatistics(("factors",), cclip_factors))
def cclip(task_vectors: TaskVectors, p: Sequence[float] | None = None, *,
          rho: float | None = None, factors: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Centred clipping at θ0: Σ_i p_i τ_i · min(1, rho / ‖τ_i‖₂); rho defaults to the median norm.
    ``factors``: the clients' min(1, rho / ‖τ_i‖₂), when computed beforehand (:func:`merge_each`)."""
    if factors is None:
        factors = cclip_factors(task_vectors, p, rho=rho)["factors"]
    return linear_combination(task_vectors, [pi * f for pi, f in zip(uniform_if_none(p, len(task_vectors)), factors)])
