"""The spectral rules over matrices read in pieces of rows: memory bounded by pieces, not by matrices.

A model directory's matrices can be larger than a whole-matrix rule's working set (several float32
and float64 copies of a layer) allows. Every spectral rule here needs, besides pieces of rows, only
matrices of the smaller side's size r: each task's top singular triplets come from the float64
eigendecomposition of its r × r Gram matrix AᵀA, summed over pieces of rows; the left factors
U = A V diag(σ)⁻¹ are never stored but recomputed from the pieces when they are needed; and the polar
factor of the stacked left bases is U (UᵀU)^(-1/2), whose Gram matrix is again a sum over pieces
(Prop. 4.1 of the TSV paper). A rule reads its inputs in a few sweeps (TSV-M three, Iso-CTS up to
five) and gives the merged matrix as pieces of rows.

The matrices are seen tall (m ≥ n): a wide tensor is handed in transposed, its columns read as
rows. Every rule is homogeneous and computes in float64 from the pieces, so no rescaling is
needed (for float64 pieces, ``merge_rows`` scales extreme values first). Where the results differ
from the whole-matrix paths beyond rounding: directions of a Gram matrix with eigenvalue at or below
``WHITENING_CUTOFF`` · λ_max (σ below 1e-6 · σ_max) count as zero, on both sides of a merge, so
clients closer than about 1e-6 (relative) count as duplicates, where the whole-matrix paths resolve
them by an SVD (the published algorithm is discontinuous there: exact duplicates and clients 1e-7
apart give results 0.3-0.7 apart); and a zero singular value's vectors are left out, where the
whole-matrix paths keep the SVD's arbitrary completion (Iso-C of a rank-deficient sum, Iso-CTS with
a task whose residual is rank-deficient, as a client that sent back the base's weights). TSV-M's
own rank cut-off (:func:`~fedmerge.merging.spectral.linalg.rank_tolerance`) lies above 1e-6 once a
side has 9 entries."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from fedmerge.merging.spectral.linalg import rank_tolerance, top_from_gram
from fedmerge.merging.streaming import RowPieces, TaskMatrices

WHITENING_CUTOFF = 1e-12  # Gram eigenvalues at or below this · λ_max count as zero (σ below 1e-6 · σ_max)


def gram_matrices(matrices: TaskMatrices,
                  combine: Callable[[list[Tensor]], Iterable[Tensor]] | None = None) -> list[Tensor]:
    """Σ over pieces of XᵀX in float64 for each matrix X of ``combine(pieces)`` (default: the tasks'),
    which may give its matrices one at a time (a generator): one float64 piece is held at a time."""
    grams: list[Tensor] = []
    for _, pieces in matrices.sweep():
        for i, x in enumerate(combine(pieces) if combine else pieces):
            x = x.double()
            if i == len(grams):
                grams.append(x.new_zeros(x.shape[-1], x.shape[-1]))
            grams[i].addmm_(x.mT, x)
            del x
    return grams


def gram_matrix(matrices: TaskMatrices, rows: Callable[[list[Tensor]], Tensor]) -> Tensor:
    """Σ over pieces of XᵀX in float64 for the one matrix X whose rows ``rows(pieces)`` gives."""
    return gram_matrices(matrices, lambda pieces: [rows(pieces)])[0]


def _inverse(s: Tensor) -> Tensor:
    """1/σ where σ > 0, else 0: a dropped (or zero) triplet's left vector is zero."""
    return torch.where(s > 0, 1 / s.clamp_min(torch.finfo(s.dtype).tiny), 0.0)


def whitening(gram: Tensor) -> Tensor:
    """(XᵀX)^(-1/2) from XᵀX, eigenvalues at or below ``WHITENING_CUTOFF`` · λ_max taken as zero: X times
    it is X's polar factor, the partial isometry on X's numerically non-zero directions."""
    lam, q = torch.linalg.eigh(gram)
    live = lam > WHITENING_CUTOFF * lam[-1:].clamp_min(torch.finfo(lam.dtype).tiny)
    return (q * torch.where(live, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), 0.0)) @ q.mT


def small_polar_factor(x: Tensor) -> Tensor:
    """The polar factor x (xᵀx)^(-1/2) of a matrix held whole (the stacked right bases, n × T·k), with
    the cut-off :func:`whitening` gives the left ones: both sides of a merge drop the same nearly
    dependent directions (clients closer than about 1e-6 count as duplicates on both)."""
    return x @ whitening(x.mT @ x)


def _stacked(v: Tensor) -> Tensor:
    """Each task's columns side by side: (T, n, k) → (n, T·k)."""
    t, n, k = v.shape
    return v.permute(1, 0, 2).reshape(n, t * k)


def tsv_streamed(matrices: TaskMatrices, p: Sequence[float] | None = None) -> RowPieces:
    """TSV-M (see :func:`~fedmerge.merging.spectral.tsv.tsv`) in three sweeps: each task's top
    k = max(1, ⌊n/T⌋) triplets from its Gram matrix, then the stacked left bases' Gram matrix, then
    U⊥ diag(σ) V⊥ᵀ = U (UᵀU)^(-1/2) diag(σ) V⊥ᵀ row by row. Triplets below the rank cut-off are
    dropped, as in the whole-matrix paths. Weights are ignored, as there."""
    m, n = matrices.shape
    t = matrices.num_tasks
    k = max(1, n // t)
    s, v = top_from_gram(gram_matrices(matrices), k)
    keep = s > rank_tolerance((m, n)) * s[:, :1]
    s = s * keep
    to_u = v * _inverse(s).unsqueeze(-2)  # U_i = A_i V_i diag(σ_i)⁻¹, zero for dropped triplets

    def left(pieces: list[Tensor]) -> Tensor:
        return torch.cat([x.double() @ to_u[i] for i, x in enumerate(pieces)], dim=1)

    v_polar = small_polar_factor(_stacked(v * keep.unsqueeze(-2)))
    right = (whitening(gram_matrix(matrices, left)) * s.reshape(1, t * k)) @ v_polar.mT
    for start, pieces in matrices.sweep():
        yield start, left(pieces) @ right


def tsv_compress_streamed(matrices: TaskMatrices, p: Sequence[float] | None = None) -> RowPieces:
    """TSV-C as a merge in two sweeps: Σ_i A_i V_i V_iᵀ, each task's projection onto its top
    k = max(1, ⌊n/T⌋) right singular vectors (U_i diag(σ_i) = A_i V_i). Weights are ignored."""
    k = max(1, matrices.shape[1] // matrices.num_tasks)
    _, v = top_from_gram(gram_matrices(matrices), k)
    for start, pieces in matrices.sweep():
        yield start, sum((x.double() @ v[i]) @ v[i].mT for i, x in enumerate(pieces))  # type: ignore[misc]


def _summed(p: Sequence[float] | None, t: int) -> Callable[[list[Tensor]], Tensor]:
    """Pieces → the same rows of the summed task matrix N Σ_i p_i A_i (Σ_i A_i when uniform)."""
    weights = [1.0] * t if p is None else [t * pi for pi in p]

    def summed(pieces: list[Tensor]) -> Tensor:
        out = pieces[0].double() * weights[0]
        for w, x in zip(weights[1:], pieces[1:]):
            out.add_(x, alpha=w)  # in float64, a float32 piece at a time
        return out

    return summed


def iso_c_streamed(matrices: TaskMatrices, p: Sequence[float] | None = None) -> RowPieces:
    """Iso-C (see :func:`~fedmerge.merging.spectral.iso.iso_c`) in two sweeps: σ̄ S (SᵀS)^(-1/2) of the
    summed task matrix S, σ̄ the mean of all n of its singular values."""
    summed = _summed(p, matrices.num_tasks)
    gram = gram_matrix(matrices, summed)
    mean_sigma = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().mean()
    right = mean_sigma * whitening(gram)
    for start, pieces in matrices.sweep():
        yield start, summed(pieces) @ right


def iso_cts_streamed(matrices: TaskMatrices, p: Sequence[float] | None = None, *,
                     common_space_fraction: float = 0.8) -> RowPieces:
    """Iso-CTS (see :func:`~fedmerge.merging.spectral.iso.iso_cts_matrix`) in four or five sweeps: the
    summed matrix's Gram (its top c triplets span the common space); for a tall tensor each task's
    coefficients U_cᵀ A_i on the common left vectors U_c = S V_c diag(σ_c)⁻¹ (a wide one, seen
    transposed, projects on V_c instead); the residuals' Gram matrices (their top s triplets); the
    stacked left bases' Gram; then σ̄ U⊥ V⊥ᵀ row by row."""
    n = matrices.shape[1]
    t = matrices.num_tasks
    per_task = min(round((n - math.floor(common_space_fraction * n)) / t), n // t)
    common = n - per_task * t
    summed = _summed(p, t)
    s_common, v_common = (x[0] for x in top_from_gram([gram_matrix(matrices, summed)], common))
    to_common = v_common * _inverse(s_common)
    coefficients: Tensor | None = None  # U_cᵀ A_i, (T, c, n): the common part of a tall tensor's tasks
    if per_task and not matrices.transposed:
        coefficients = to_common.new_zeros(t, common, n)
        for _, pieces in matrices.sweep():
            u_common = summed(pieces) @ to_common
            for c, x in zip(coefficients, pieces):
                c.addmm_(u_common.mT, x.double())

    def residuals(pieces: list[Tensor], u_common: Tensor) -> Iterator[Tensor]:
        """Each task's rows less their part in the common space, one at a time (the reference
        projects out the left singular vectors U_c: for a wide tensor seen transposed, those are V_c)."""
        for i, x in enumerate(pieces):
            if coefficients is None:
                yield (x.double() @ v_common @ v_common.mT).neg_().add_(x)
            else:
                yield (u_common @ coefficients[i]).neg_().add_(x)

    sigmas, vs, to_tasks = [s_common], [v_common * (s_common > 0)], None  # a zero triplet's pair is dropped
    if per_task:
        s_tasks, v_tasks = top_from_gram(
            gram_matrices(matrices, lambda pieces: residuals(pieces, summed(pieces) @ to_common)), per_task)
        to_tasks = v_tasks * _inverse(s_tasks).unsqueeze(-2)
        sigmas += list(s_tasks)
        vs += list(v_tasks * (s_tasks > 0).unsqueeze(-2))

    def left(pieces: list[Tensor]) -> Tensor:
        u_common = summed(pieces) @ to_common
        if to_tasks is None:
            return u_common
        return torch.cat([u_common] + [r @ to for r, to in zip(residuals(pieces, u_common), to_tasks)], dim=1)

    mean_sigma = torch.cat(sigmas).mean()
    right = mean_sigma * whitening(gram_matrix(matrices, left)) @ small_polar_factor(torch.cat(vs, dim=1)).mT
    for start, pieces in matrices.sweep():
        yield start, left(pieces) @ right
