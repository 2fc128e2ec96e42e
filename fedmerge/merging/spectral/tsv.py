"""TSV-Merge, TSV-Compress and the Singular Task Interference (Gargiulo et al., CVPR 2025).

TSV-Merge: for each 2-D tensor keep every task's top k = max(1, ⌊min(m,n)/T⌋) singular triplets,
concatenate them, replace the stacked left and right bases by their orthogonal polar factors and
rebuild U⊥ diag(σ) V⊥ᵀ. Other tensors (biases, norms, conv kernels) get the weighted mean.

It is computed two ways. ``method="exact"`` (the reference) takes a full SVD of every task matrix
and SVDs of the concatenated bases, as the published implementations do. ``method="fast"`` (the
default) needs only each task's top k triplets, from a checked block Krylov method
(:func:`~fedmerge.merging.spectral.linalg.top_singular_triplets`), and whitens the stacked bases from
Gram eigendecompositions (Prop. 4.1 of the TSV paper). Layers whose stacked bases come out nearly
singular (tasks sharing their top directions) are merged again from float64 triplets of AᵀA; layers
of alike tasks take that path at once. Both paths drop triplets whose σ is numerically zero
(σ ≤ max(m, n) · eps(float32) · σ_1 of their task, for every input dtype), so zero matrices, tasks of
rank < k and duplicated tasks give well-defined results, the same for float32 and float64 copies. Measurements behind
these choices and the constants below: ``docs/performance.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedmerge.merging.linear import linear_combination
from fedmerge.merging.registry import rule, uniform_if_none
from fedmerge.merging.spectral.linalg import (
    polar_by_whitening, polar_factor, rank_tolerance, top_singular_triplets,
)
from fedmerge.merging.spectral.streamed import tsv_compress_streamed, tsv_streamed
from fedmerge.merging.validation import TaskVectors, validate_task_vectors
from fedmerge.numerics import balancing_exponent, times_power_of_two

_REFINE_BELOW = 1e-4  # stacked bases with σ_min below this get float64 triplets (see _tsv_merge_batch)
_ALIKE_TASKS = 0.3  # layers whose tasks' mean pairwise cosine exceeds this get float64 triplets at once


def to_unit_scale(tensor: Tensor, e: int) -> Tensor:
    """``tensor`` · 2^-e (in float64 when e ≠ 0: exact), the input of a homogeneous rule."""
    return times_power_of_two(tensor.double(), -e) if e else tensor


def from_unit_scale(tensor: Tensor, e: int, dtype: torch.dtype) -> Tensor:
    """A result merged at unit scale, · 2^e, in ``dtype``."""
    return times_power_of_two(tensor.double(), e).to(dtype) if e else tensor.to(dtype)


def _tsv_merge_batch(mats: Tensor, *, method: str = "fast") -> Tensor:
    """TSV-M for a batch of layers of one shape: ``mats`` (L, T, m, n) → merged (L, m, n).

    float64 for ``method="exact"`` and float64 input, float32 otherwise (``mats`` is float32 or
    float64). In the fast path, layers whose stacked bases turn out nearly singular (σ_min <
    ``_REFINE_BELOW``: tasks sharing most of their top directions) have their Krylov triplets
    recomputed from AᵀA in float64 and are merged again; layers whose tasks are alike (mean cosine >
    ``_ALIKE_TASKS``) take that path from the start. Krylov triplets are only accurate to their
    residual tolerance, in float64 as in float32, so both need this.
    """
    num_layers, t, m, n = mats.shape
    k = max(1, min(m, n) // t)
    if method == "exact":
        u, s, vh = top_singular_triplets(mats, k, method="exact")
        return _merge_triplets(mats.dtype, u, s, vh, exact=True)[0]
    # Layers whose tasks are alike (IID clients) would be refined anyway: straight to AᵀA for them.
    alike = _mean_task_cosine(mats) > _ALIKE_TASKS
    merged = mats.new_empty(num_layers, m, n)
    for subset, method_ in ((~alike, "auto"), (alike, "gram")):
        if not bool(subset.any()):
            continue
        part = mats if bool(subset.all()) else mats[subset]
        out, sigma_min = _merge_triplets(mats.dtype, *top_singular_triplets(part, k, method=method_),
                                         float32_gram=method_ == "auto")
        refine = (sigma_min < _REFINE_BELOW).nonzero().squeeze(-1)
        if method_ == "auto" and len(refine):
            out[refine] = _merge_triplets(mats.dtype, *top_singular_triplets(part[refine], k, method="gram"),
                                          float32_gram=False)[0]
        merged[subset] = out
    return merged


def _mean_task_cosine(mats: Tensor) -> Tensor:
    """Mean cosine similarity ⟨Δ_s, Δ_t⟩ / (‖Δ_s‖ ‖Δ_t‖) over task pairs s ≠ t of every layer (L, T, m, n)."""
    num_layers, t = mats.shape[:2]
    if t < 2:
        return mats.new_zeros(num_layers)
    flat = mats.reshape(num_layers, t, -1)
    gram = (flat @ flat.mT).double()
    if not bool(torch.isfinite(gram).all()) or bool((gram.diagonal(dim1=-2, dim2=-1) < 1e-30).any()):
        flat = flat.double()  # squares left float32's range (|entries| beyond ~1e18 or below ~1e-15)
        gram = flat @ flat.mT
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    cosine = gram / (norms.unsqueeze(-1) * norms.unsqueeze(-2))
    return (cosine.sum(dim=(-2, -1)) - cosine.diagonal(dim1=-2, dim2=-1).sum(-1)) / (t * (t - 1))


def _merge_triplets(dtype: torch.dtype, u: Tensor, s: Tensor, vh: Tensor, *, exact: bool = False,
                    float32_gram: bool = True) -> tuple[Tensor, Tensor]:
    """U⊥ diag(σ) V⊥ᵀ from every task's top-k triplets (L, T, …), and the stacked bases' smallest σ.

    Triplets with σ ≤ max(m, n) · eps(float32) · σ_1 of their task are dropped, whatever ``dtype``
    (see :func:`~fedmerge.merging.spectral.linalg.rank_tolerance`). ``exact``: polar
    factors by SVD, float64; otherwise by whitening, in float32 unless ``dtype`` is float64.
    ``float32_gram=False`` skips the float32 Gram eigendecomposition where the stacked bases are known
    to be ill conditioned (alike tasks), as it would be wasted.
    """
    num_layers, t, m, k = u.shape
    n = vh.shape[-1]
    keep = s > rank_tolerance((m, n)) * s[..., :1]  # numerically zero triplets carry nothing of their task
    s_cat = (s * keep).reshape(num_layers, t * k)
    u_cat = (u * keep.unsqueeze(-2)).permute(0, 2, 1, 3).reshape(num_layers, m, t * k)
    v_cat = (vh * keep.unsqueeze(-1)).permute(0, 3, 1, 2).reshape(num_layers, n, t * k)
    if exact:
        pu, pv, sigma_min = polar_factor(u_cat), polar_factor(v_cat), s_cat.new_zeros(num_layers)
    else:
        work = torch.float64 if dtype == torch.float64 else torch.float32
        live = keep.reshape(num_layers, t * k).sum(dim=-1)
        (pu, su), (pv, sv) = (polar_by_whitening(x, live, work, float32_gram=float32_gram) for x in (u_cat, v_cat))
        s_cat, sigma_min = s_cat.to(work), torch.minimum(su, sv)
    return (pu * s_cat.unsqueeze(-2)) @ pv.mT, sigma_min


def tsv_merge_matrix(matrices: Sequence[Tensor], *, method: str = "fast") -> Tensor:
    """TSV-M for one layer: top k = max(1, ⌊min(m,n)/T⌋) triplets per task, orthogonalised bases.

    ``method="fast"`` (default) or ``"exact"`` (full SVDs, the reference); see the notes above.
    Returns the merged matrix in float64 ("exact") or float32 ("fast", float64 for float64 input).
    """
    if method not in ("fast", "exact"):
        raise ValueError(f"method must be 'fast' or 'exact', got {method!r}")
    mats = torch.stack(list(matrices))
    return _tsv_merge_batch(mats.to(torch.float64 if mats.dtype == torch.float64 else torch.float32)[None],
                            method=method)[0]


def tsv_merge_matrix_reference(matrices: Sequence[Tensor]) -> Tensor:
    """TSV-M with full SVDs everywhere (the published algorithm): the reference for tests."""
    return tsv_merge_matrix(matrices, method="exact")


_TSV_BATCH_BYTES = 256 * 2**20  # layers of one shape are merged together up to this much input


@rule("tsv", natural_scale="sum", streamed=tsv_streamed,
      citation="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025",
      formula="per 2-D tensor: top k = max(1, ⌊min(m,n)/T⌋) singular triplets of each τ_i, concatenated, "
              "U and V replaced by their polar factors, U⊥ diag(σ) V⊥ᵀ; every other tensor: Σ_i p_i τ_i")
def tsv(task_vectors: TaskVectors, p: Sequence[float] | None = None) -> dict[str, Tensor]:
    """TSV-Merge: per 2-D tensor U⊥ diag(σ) V⊥ᵀ of the tasks' top singular triplets; other tensors Σ p_i τ_i."""
    first = task_vectors[0]
    p = uniform_if_none(p, len(task_vectors))
    out = linear_combination(task_vectors, p, keys=[k for k, v in first.items() if v.dim() != 2])
    groups: dict[tuple, list[str]] = {}
    for key, ref in first.items():
        if ref.dim() == 2:
            groups.setdefault((tuple(ref.shape), ref.dtype), []).append(key)
    for (shape, dtype), keys in groups.items():
        per_layer = len(task_vectors) * shape[0] * shape[1] * (8 if dtype == torch.float64 else 4)
        step = max(1, _TSV_BATCH_BYTES // per_layer)
        for i in range(0, len(keys), step):
            chunk = keys[i:i + step]
            mats = torch.empty(len(chunk), len(task_vectors), *shape, device=first[chunk[0]].device,
                               dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            exponents = []
            for i_layer, key in enumerate(chunk):  # one copy of the inputs, converted on the way
                tensors = [tv[key] for tv in task_vectors]
                # scaled before the conversion: a client's float64 values may lie beyond float32's range
                e = balancing_exponent(tensors)
                for i_task, t in enumerate(tensors):
                    mats[i_layer, i_task] = to_unit_scale(t, e)
                exponents.append(e)
            merged = _tsv_merge_batch(mats)
            for key, mat, e in zip(chunk, merged, exponents):
                out[key] = from_unit_scale(mat, e, dtype)
    return {key: out[key] for key in first}


# ------------------------------------------------------------------------------------------------
# TSV-Compress, Singular Task Interference, Iso-C and Iso-CTS
# ------------------------------------------------------------------------------------------------


MatrixMerge = Callable[[Sequence[Tensor], Sequence[float]], Tensor]


def task_rank(shape: Sequence[int], num_tasks: int) -> int:
    """Triplets kept per task in a ``shape`` matrix: k = max(1, ⌊min(m, n)/T⌋) (TSV paper, Alg. 1)."""
    return max(1, min(shape) // num_tasks)


def task_singular_vectors(matrices: Sequence[Tensor], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each task's exact top-k singular triplets in float64: U (T×m×k), σ (T×k), Vᵀ (T×k×n)."""
    return top_singular_triplets(torch.stack(list(matrices)), k, method="exact")


def per_matrix(task_vectors: TaskVectors, p: Sequence[float] | None, merge_matrix: MatrixMerge) -> dict[str, Tensor]:
    """``merge_matrix(matrices, p)`` on every 2-D tensor, the weighted mean Σ p_i τ_i on the others.

    ``merge_matrix`` must be homogeneous of degree 1: layers of very large or very small entries are
    merged at unit scale (see :func:`balancing_exponent`)."""
    first = task_vectors[0]
    p = uniform_if_none(p, len(task_vectors))
    out = linear_combination(task_vectors, p, keys=[k for k, v in first.items() if v.dim() != 2])
    for key, ref in first.items():
        if ref.dim() == 2:
            matrices = [tv[key] for tv in task_vectors]
            e = balancing_exponent(matrices)  # every matrix rule here is homogeneous: merged at unit scale
            out[key] = from_unit_scale(merge_matrix([to_unit_scale(m, e) for m in matrices], p), e, ref.dtype)
    return {key: out[key] for key in first}


def tsv_compress_matrix(matrices: Sequence[Tensor], p: Sequence[float] = ()) -> Tensor:
    """Σ_t of each task's rank-k approximation U_t[:, :k] diag(σ_t[:k]) V_t[:, :k]ᵀ, k = task_rank."""
    u, s, vh = task_singular_vectors(matrices, task_rank(matrices[0].shape, len(matrices)))
    return torch.einsum("tmk,tk,tkn->mn", u, s, vh)


@rule("tsv_compress", natural_scale="sum", streamed=tsv_compress_streamed,
      citation="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025",
      formula="Σ_i of each τ_i's rank-⌊r/T⌋ approximation on 2-D tensors (TSV-C), Σ_i p_i τ_i elsewhere")
def tsv_compress(task_vectors: TaskVectors, p: Sequence[float] | None = None) -> dict[str, Tensor]:
    """TSV-C as a merge: Σ_i of every τ_i's top-⌊r/T⌋ singular triplets per matrix; Σ p_i τ_i elsewhere.

    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025,
    Sec. 4.1. The paper stores each task's truncated SVD and applies the one of the task at hand;
    merged, those compressed tasks add up to this sum (the paper's "low-rank only" ablation). Weights
    are ignored on matrices (as for ``tsv``). Natural scale: "sum". See :func:`tsv_compress_storage`.
    """
    return per_matrix(task_vectors, p, tsv_compress_matrix)


@dataclass(frozen=True)
class CompressionReport:
    """Storage of TSV-C: values per task compressed vs dense (k(m+n+1) per matrix, dense elsewhere)."""

    num_tasks: int
    dense_values: int  # entries of one task vector
    compressed_values: int  # entries TSV-C stores for one task

    @property
    def ratio(self) -> float:
        """Storage of one compressed task relative to its dense task vector."""
        return self.compressed_values / self.dense_values

    @property
    def total_ratio(self) -> float:
        """Storage of all T compressed tasks relative to one dense task vector (≈ one model)."""
        return self.num_tasks * self.ratio


def tsv_compress_storage(task_vectors: TaskVectors) -> CompressionReport:
    """How much TSV-C stores per task: U (m×k), σ (k), V (n×k) per 2-D tensor, other tensors dense."""
    validate_task_vectors(task_vectors)
    t = len(task_vectors)
    dense = compressed = 0
    for ref in task_vectors[0].values():
        dense += ref.numel()
        if ref.dim() == 2:
            compressed += task_rank(ref.shape, t) * (ref.shape[0] + ref.shape[1] + 1)
        else:
            compressed += ref.numel()
    return CompressionReport(num_tasks=t, dense_values=dense, compressed_values=compressed)


def singular_task_interference(matrices: Sequence[Tensor]) -> float:
    """STI of one layer (TSV paper, Eq. 6): ‖(UᵀU − I) Σ (VᵀV − I)‖₁, summed over |entries|.

    U = [U_1 … U_T] and V = [V_1 … V_T] concatenate every task's top k = ⌊r/T⌋ singular vectors
    (columns), Σ = diag(σ_1 … σ_T). Triplets beyond a task's numerical rank are left out, with the
    same per-task cut-off as TSV-Merge: they carry nothing of the task and their vectors are
    arbitrary, so keeping them would make orthogonal tasks interfere.
    """
    shape = matrices[0].shape
    u, s, vh = task_singular_vectors(matrices, task_rank(shape, len(matrices)))
    keep = s > rank_tolerance(shape) * s[:, :1]
    if not bool(keep.any()):
        return 0.0
    u_cat = torch.cat([u[t][:, keep[t]] for t in range(len(matrices))], dim=1)
    v_cat = torch.cat([vh[t][keep[t]].T for t in range(len(matrices))], dim=1)
    eye = torch.eye(u_cat.shape[1], dtype=torch.float64, device=u_cat.device)
    return float((((u_cat.T @ u_cat - eye) * s[keep]) @ (v_cat.T @ v_cat - eye)).abs().sum())


def interference(task_vectors: TaskVectors) -> tuple[dict[str, float], float]:
    """Singular Task Interference of any list of task vectors: STI per 2-D tensor and their total.

    Gargiulo et al., CVPR 2025, Eq. 6 (see :func:`singular_task_interference`). Zero for task
    matrices whose row and column spaces are mutually orthogonal; grows with shared directions.
    """
    validate_task_vectors(task_vectors)
    per_layer = {key: singular_task_interference([tv[key] for tv in task_vectors])
                 for key, ref in task_vectors[0].items() if ref.dim() == 2}
    return per_layer, sum(per_layer.values())
