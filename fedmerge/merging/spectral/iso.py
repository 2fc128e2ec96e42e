"""Iso-C and Iso-CTS: isotropic merging (Marczak et al., "No Task Left Behind", ICML 2025)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from fedmerge.merging.registry import Option, rule
from fedmerge.merging.spectral.linalg import polar_factor
from fedmerge.merging.spectral.streamed import iso_c_streamed, iso_cts_streamed
from fedmerge.merging.spectral.tsv import per_matrix, task_singular_vectors
from fedmerge.merging.validation import TaskVectors


def _weighted_sum_matrix(matrices: Sequence[Tensor], p: Sequence[float]) -> Tensor:
    """N Σ_i p_i Δ_i in float64: the summed task matrix Σ_i Δ_i when weights are uniform."""
    n = len(matrices)
    return cast(Tensor, sum(n * pi * m.double() for pi, m in zip(p, matrices)))


def iso_c_matrix(matrices: Sequence[Tensor], p: Sequence[float]) -> Tensor:
    """Iso-C for one layer: σ̄ U Vᵀ where U diag(σ) Vᵀ is the SVD of the summed task matrix."""
    u, s, vh = torch.linalg.svd(_weighted_sum_matrix(matrices, p), full_matrices=False)
    return s.mean() * (u @ vh)


@rule("iso_c", natural_scale="sum", streamed=iso_c_streamed,
      citation="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
               "Subspaces, ICML 2025",
      formula="σ̄ U Vᵀ of the summed task matrix per 2-D tensor, Σ_i p_i τ_i elsewhere")
def iso_c(task_vectors: TaskVectors, p: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Iso-C: per matrix, the summed task matrix with every singular value replaced by their mean.

    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
    Subspaces", ICML 2025. With weights the sum is N Σ_i p_i Δ_i (the plain sum when uniform); the
    mean σ̄ runs over all min(m, n) singular values. Other tensors get Σ_i p_i τ_i. Natural scale:
    "sum" (the paper tunes α on validation data; its optima lie between 0.8 and 1.9).
    """
    return per_matrix(task_vectors, p, iso_c_matrix)


def iso_cts_matrix(matrices: Sequence[Tensor], p: Sequence[float], common_space_fraction: float = 0.8) -> Tensor:
    """Iso-CTS for one layer: common plus task-specific singular directions, orthogonalised, isotropic.

    With r = min(m, n) and T tasks: s = min(round((r − ⌊f·r⌋)/T), ⌊r/T⌋) directions per task and a
    common space of c = r − sT directions, the top ones of the summed task matrix. Each task's
    directions are the top s of Δ_t − U_c U_cᵀ Δ_t (its part outside the common space). The
    concatenated bases are replaced by their polar factors and every singular value by the mean σ̄.
    """
    r, t = min(matrices[0].shape), len(matrices)
    per_task = min(round((r - math.floor(common_space_fraction * r)) / t), r // t)
    common = r - per_task * t
    u, s, vh = torch.linalg.svd(_weighted_sum_matrix(matrices, p), full_matrices=False)
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common].T]
    if per_task:
        u_c = us[0]
        residual = [m.double() - u_c @ (u_c.T @ m.double()) for m in matrices]
        ut, st, vht = task_singular_vectors(residual, per_task)
        us += list(ut)
        ss += list(st)
        vs += [v.T for v in vht]
    sigma = torch.cat(ss).mean()
    return sigma * (polar_factor(torch.cat(us, dim=1)) @ polar_factor(torch.cat(vs, dim=1)).T)


@rule("iso_cts", natural_scale="sum", streamed=iso_cts_streamed,
      options=[Option("common_space_fraction", default=0.8, low=0.0, high=1.0,
                      help="share of the rank given to the summed task matrix's top directions")],
      citation="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
               "Subspaces, ICML 2025",
      formula="common plus task-specific subspaces, orthogonalised, isotropic spectrum")
def iso_cts(task_vectors: TaskVectors, p: Sequence[float] | None = None, *,
            common_space_fraction: float = 0.8) -> dict[str, Tensor]:
    """Iso-CTS: Iso-C's common subspace completed by task-specific directions, isotropic spectrum.

    Marczak et al., ICML 2025 (see :func:`iso_cts_matrix`). ``common_space_fraction`` in [0, 1]
    (default 0.8, the paper's) is the share of the rank given to the summed task matrix's top
    directions; 1 gives Iso-C. Other tensors get Σ_i p_i τ_i. Natural scale: "sum".
    """
    return per_matrix(task_vectors, p, lambda mats, w: iso_cts_matrix(mats, w, common_space_fraction))
