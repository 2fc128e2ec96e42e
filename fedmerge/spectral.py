"""Spectral merging: methods that work on the singular vectors of per-layer task matrices.

Here: TSV-Merge (fast and reference paths), TSV-Compress and its storage ratio, the Singular Task
Interference measure, Iso-C and Iso-CTS, and ``top_singular_triplets`` (batched top-k SVD).

TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025): for each 2-D tensor keep every task's top k = max(1, ⌊min(m,n)/T⌋) singular triplets,
concatenate them, replace the stacked left and right bases by their orthogonal polar factors and
rebuild U⊥ diag(σ) V⊥ᵀ. Other tensors (biases, norms, conv kernels) get the weighted mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedmerge.merging import TaskVectors, _check_range, linear_combination, register, validate_task_vectors


def polar_factor(x: Tensor, rcond: float | None = None) -> Tensor:
    """The orthogonal polar factor P Qᵀ of x = P D Qᵀ: the nearest matrix with orthonormal columns.

    Singular values at or below ``rcond`` · σ_max (default max(m, n) · eps of x's dtype) count as zero,
    and their pairs are left out: a rank-deficient x gets the partial isometry P_r Q_rᵀ, not an
    arbitrary completion. Works on batches (…, m, n).
    """
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if rcond is None:
        rcond = max(x.shape[-2:]) * torch.finfo(x.dtype).eps
    keep = (s > rcond * s.amax(dim=-1, keepdim=True)).to(x.dtype)
    return (u * keep.unsqueeze(-2)) @ vh


# TSV-M is computed two ways. ``method="exact"`` (the reference, used by the tests) takes a full
# SVD of every task matrix and SVDs of the concatenated bases, as the published implementations do.
# ``method="fast"`` (the default) needs only the top k = ⌊r/T⌋ triplets of each task: a randomized
# range finder with power iterations in the input precision, batched over tasks and layers of one
# shape, then a Rayleigh-Ritz step and both polar factors from float64 eigendecompositions of the
# small Gram matrices (whitening X (XᵀX)^(-1/2), Prop. 4.1 of the TSV paper). Both drop triplets
# whose σ is numerically zero (≤ max(m, n) · eps · σ_1 of that task), so zero matrices, tasks of
# rank < k and duplicated tasks give well-defined results rather than arbitrary singular vectors.

_SKETCH_SEED = 0x75F  # fixed: the fast path is deterministic
_EXACT_BELOW = 64  # matrices whose smaller side is at most this get the full SVD
_SKETCH_ERROR = 1e-4  # aimed-for relative error of the randomized triplets' effect on TSV-M
_MAX_POWER_ITERS = 8


def _rank_tol(dtype: torch.dtype, shape: Sequence[int]) -> float:
    """Relative σ below which a triplet is numerical noise of a tensor stored in ``dtype``."""
    dt = torch.float64 if dtype == torch.float64 else torch.float32
    return max(shape) * torch.finfo(dt).eps


def _orthonormal(y: Tensor) -> Tensor:
    """An orthonormal basis of the columns of every matrix in a batch (Householder QR)."""
    return torch.linalg.qr(y).Q


def _well_conditioned_basis(y: Tensor) -> Tensor:
    """A well-conditioned basis of the same column space, for the power iterations: shifted
    Cholesky-QR (Fukaya et al. 2020), a few times cheaper than Householder QR. Exactly orthonormal
    only when y is well conditioned, which power iterations do not need."""
    gram = (y.mT @ y).double()
    shift = gram.diagonal(dim1=-2, dim2=-1).amax(dim=-1, keepdim=True) * 1e-6 + torch.finfo(torch.float64).tiny
    r, info = torch.linalg.cholesky_ex(gram + torch.diag_embed(shift.expand(gram.shape[:-1])), upper=True)
    if bool((info == 0).all()):
        q = torch.linalg.solve_triangular(r.to(y.dtype), y, upper=True, left=False)
        if bool(torch.isfinite(q).all()):
            return q
    return _orthonormal(y)  # zero or numerically rank-deficient blocks


def top_singular_triplets(
    a: Tensor, k: int, *, method: str = "auto", oversample: int | None = None, power_iters: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k singular triplets of every matrix in a batch ``a`` (…, m, n), in float64.

    Returns U (…, m, k), σ (…, k) in descending order and Vᵀ (…, k, n), like
    ``torch.linalg.svd(a)[:k]``. ``method="exact"`` takes the full SVD; ``"randomized"`` a range finder
    of l = k + ``oversample`` columns (default k, at least 16) with ``power_iters`` power iterations
    (default: as many as the spectrum needs, 2 to 8, estimated after the first from the Ritz values)
    (Halko, Martinsson & Tropp 2011, Alg. 4.4) in float32 (float64 for float64 input), then a
    float64 Rayleigh-Ritz step; ``"auto"`` picks the full SVD for small matrices or large k. The
    angle error of the randomized vectors shrinks like (σ_{l+1}/σ_k)^(2·power_iters).
    """
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    *batch, m, n = a.shape
    r = min(m, n)
    k = max(1, min(k, r))
    if m < n:  # work on the tall side: Aᵀ = V Σ Uᵀ
        v, s, uh = top_singular_triplets(a.mT, k, method=method, oversample=oversample, power_iters=power_iters)
        return uh.mT, s, v.mT
    l_cols = min(n, k + (max(k, 16) if oversample is None else oversample))
    if method == "exact" or (method == "auto" and (n <= _EXACT_BELOW or 2 * l_cols > n)):
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
        return u[..., :k], s[..., :k], vh[..., :k, :]
    a = a.reshape(-1, m, n)
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    aw = a.to(work)
    gen = torch.Generator().manual_seed(_SKETCH_SEED)
    z = torch.randn(n, l_cols, generator=gen, dtype=work).expand(a.shape[0], n, l_cols)
    z = _well_conditioned_basis(aw.mT @ _well_conditioned_basis(aw @ z))
    iters, done = power_iters, 1
    if iters is None:  # error ≈ 0.35 ρ^q with ρ = (σ_{l+1}/σ_k)², estimated by the Ritz values
        y = aw @ z
        theta = torch.linalg.eigvalsh((y.mT @ y).double())  # ascending
        top = theta[..., -k]
        ratio = torch.where(top > 1e-10 * theta[..., -1], theta[..., 0].clamp_min(0) / top, 0.0)
        rho = float(ratio.amax()) ** 0.75 if ratio.numel() else 0.0  # early Ritz values underestimate ρ
        iters = 2 if rho <= 0 else (_MAX_POWER_ITERS if rho >= 1 else
                                    int(min(_MAX_POWER_ITERS, max(2, math.ceil(math.log(_SKETCH_ERROR / 0.35) / math.log(rho))))))
        z, done = _well_conditioned_basis(aw.mT @ _well_conditioned_basis(y)), 2
    for _ in range(iters - done):
        z = _well_conditioned_basis(aw.mT @ _well_conditioned_basis(aw @ z))
    # Rayleigh-Ritz on the right subspace in float64: A Z = Ũ S̃ W̃ᵀ gives U ≈ Ũ, σ ≈ S̃, V ≈ Z W̃.
    ad = a.double()
    zd = _orthonormal(z.double())
    y = ad @ zd
    theta, w = torch.linalg.eigh(y.mT @ y)
    theta, w = theta.flip(-1)[..., :k], w.flip(-1)[..., :k]
    s = theta.clamp_min(0).sqrt()
    pos = (s > 0).unsqueeze(-2)
    u = torch.where(pos, (y @ w) / torch.where(pos, s.unsqueeze(-2), 1.0), 0.0)
    vh = (zd @ w).mT
    return u.reshape(*batch, m, k), s.reshape(*batch, k), vh.reshape(*batch, k, n)


def _gram(x: Tensor) -> Tensor:
    """The smaller Gram matrix of every matrix in a batch: XᵀX for tall x, XXᵀ for wide x."""
    return x.mT @ x if x.shape[-1] <= x.shape[-2] else x @ x.mT


def _inverse_sqrt(gram: Tensor) -> Tensor:
    """G^(-1/2) of symmetric PSD matrices (float64 eigh); eigenvalues ≤ c·eps·λ_max count as zero."""
    lam, q = torch.linalg.eigh(gram)
    tol = lam[..., -1:].clamp_min(0) * (gram.shape[-1] * torch.finfo(gram.dtype).eps)
    inv_sqrt = torch.where(lam > tol, lam.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt(), 0.0)
    return (q * inv_sqrt.unsqueeze(-2)) @ q.mT


def _whiten(x: Tensor, root: Tensor | None = None) -> Tensor:
    """Polar factor of every matrix in a batch as x (XᵀX)^(-1/2) (tall) or (XXᵀ)^(-1/2) x (wide).

    Equal to ``polar_factor`` (Prop. 4.1 of the TSV paper), at the cost of one eigendecomposition of
    the smaller Gram matrix instead of an SVD of x. ``root`` is that matrix's inverse square root
    when already computed.
    """
    if root is None:
        root = _inverse_sqrt(_gram(x))
    return x @ root if x.shape[-1] <= x.shape[-2] else root @ x


def _tsv_merge_batch(mats: Tensor, *, method: str = "fast") -> Tensor:
    """TSV-M for a batch of layers of one shape: ``mats`` (L, T, m, n) → merged (L, m, n), float64."""
    num_layers, t, m, n = mats.shape
    k = max(1, min(m, n) // t)
    tol = _rank_tol(mats.dtype, (m, n))
    u, s, vh = top_singular_triplets(mats, k, method="exact" if method == "exact" else "auto")
    keep = s > tol * s[..., :1]  # numerically zero triplets carry nothing of their task
    s = s * keep
    u_cat = (u * keep.unsqueeze(-2)).permute(0, 2, 1, 3).reshape(num_layers, m, t * k)
    v_cat = (vh * keep.unsqueeze(-1)).permute(0, 3, 1, 2).reshape(num_layers, n, t * k)
    s_cat = s.reshape(num_layers, t * k)
    if method == "exact":
        pu, pv = polar_factor(u_cat), polar_factor(v_cat)
    else:
        gu, gv = _gram(u_cat), _gram(v_cat)
        if gu.shape == gv.shape:  # one batched eigendecomposition for both sides
            ru, rv = _inverse_sqrt(torch.cat([gu, gv])).split(num_layers)
        else:
            ru, rv = _inverse_sqrt(gu), _inverse_sqrt(gv)
        pu, pv = _whiten(u_cat, ru), _whiten(v_cat, rv)
        if mats.dtype != torch.float64:  # orthonormal factors: the last product is exact enough in float32
            pu, pv, s_cat = pu.float(), pv.float(), s_cat.float()
    return (pu * s_cat.unsqueeze(-2)) @ pv.mT


def tsv_merge_matrix(matrices: Sequence[Tensor], *, method: str = "fast") -> Tensor:
    """TSV-M for one layer: top k = max(1, ⌊min(m,n)/T⌋) triplets per task, orthogonalised bases.

    ``method="fast"`` (default) or ``"exact"`` (full SVDs, the reference); see the notes above.
    Returns the merged matrix in float64 ("exact") or float32 ("fast", float64 for float64 input).
    """
    if method not in ("fast", "exact"):
        raise ValueError(f"method must be 'fast' or 'exact', got {method!r}")
    return _tsv_merge_batch(torch.stack(list(matrices))[None], method=method)[0]


def tsv_merge_matrix_reference(matrices: Sequence[Tensor]) -> Tensor:
    """TSV-M with full SVDs everywhere (the published algorithm): the reference for tests."""
    return tsv_merge_matrix(matrices, method="exact")


_TSV_BATCH_BYTES = 256 * 2**20  # layers of one shape are merged together up to this much input


@register("tsv", natural_scale="sum")
def tsv(task_vectors: TaskVectors, p: Sequence[float]) -> dict[str, Tensor]:
    """TSV-Merge: per 2-D tensor U⊥ diag(σ) V⊥ᵀ of the tasks' top singular triplets; other tensors Σ p_i τ_i."""
    first = task_vectors[0]
    out = linear_combination(task_vectors, p, keys=[k for k, v in first.items() if v.dim() != 2])
    groups: dict[tuple, list[str]] = {}
    for key, ref in first.items():
        if ref.dim() == 2:
            groups.setdefault((tuple(ref.shape), ref.dtype), []).append(key)
    for (shape, dtype), keys in groups.items():
        per_layer = len(task_vectors) * shape[0] * shape[1] * 8
        step = max(1, _TSV_BATCH_BYTES // per_layer)
        for i in range(0, len(keys), step):
            chunk = keys[i:i + step]
            mats = torch.stack([torch.stack([tv[key] for tv in task_vectors]) for key in chunk])
            merged = _tsv_merge_batch(mats if mats.dtype == torch.float64 else mats.float())
            for key, mat in zip(chunk, merged):
                out[key] = mat.to(dtype)
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


def per_matrix(task_vectors: TaskVectors, p: Sequence[float], merge_matrix: MatrixMerge) -> dict[str, Tensor]:
    """``merge_matrix(matrices, p)`` on every 2-D tensor, the weighted mean Σ p_i τ_i on the others."""
    first = task_vectors[0]
    out = linear_combination(task_vectors, p, keys=[k for k, v in first.items() if v.dim() != 2])
    for key, ref in first.items():
        if ref.dim() == 2:
            out[key] = merge_matrix([tv[key] for tv in task_vectors], p).to(ref.dtype)
    return {key: out[key] for key in first}


def tsv_compress_matrix(matrices: Sequence[Tensor], p: Sequence[float] = ()) -> Tensor:
    """Σ_t of each task's rank-k approximation U_t[:, :k] diag(σ_t[:k]) V_t[:, :k]ᵀ, k = task_rank."""
    u, s, vh = task_singular_vectors(matrices, task_rank(matrices[0].shape, len(matrices)))
    return torch.einsum("tmk,tk,tkn->mn", u, s, vh)


@register("tsv_compress", natural_scale="sum")
def tsv_compress(task_vectors: TaskVectors, p: Sequence[float]) -> dict[str, Tensor]:
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
    keep = s > _rank_tol(matrices[0].dtype, shape) * s[:, :1]
    if not bool(keep.any()):
        return 0.0
    u_cat = torch.cat([u[t][:, keep[t]] for t in range(len(matrices))], dim=1)
    v_cat = torch.cat([vh[t][keep[t]].T for t in range(len(matrices))], dim=1)
    eye = torch.eye(u_cat.shape[1], dtype=torch.float64)
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


def _weighted_sum_matrix(matrices: Sequence[Tensor], p: Sequence[float]) -> Tensor:
    """N Σ_i p_i Δ_i in float64: the summed task matrix Σ_i Δ_i when weights are uniform."""
    n = len(matrices)
    return sum(n * pi * m.double() for pi, m in zip(p, matrices))


def iso_c_matrix(matrices: Sequence[Tensor], p: Sequence[float]) -> Tensor:
    """Iso-C for one layer: σ̄ U Vᵀ where U diag(σ) Vᵀ is the SVD of the summed task matrix."""
    u, s, vh = torch.linalg.svd(_weighted_sum_matrix(matrices, p), full_matrices=False)
    return s.mean() * (u @ vh)


@register("iso_c", natural_scale="sum")
def iso_c(task_vectors: TaskVectors, p: Sequence[float]) -> dict[str, Tensor]:
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


@register("iso_cts", natural_scale="sum")
def iso_cts(task_vectors: TaskVectors, p: Sequence[float], *, common_space_fraction: float = 0.8) -> dict[str, Tensor]:
    """Iso-CTS: Iso-C's common subspace completed by task-specific directions, isotropic spectrum.

    Marczak et al., ICML 2025 (see :func:`iso_cts_matrix`). ``common_space_fraction`` in [0, 1]
    (default 0.8, the paper's) is the share of the rank given to the summed task matrix's top
    directions; 1 gives Iso-C. Other tensors get Σ_i p_i τ_i. Natural scale: "sum".
    """
    f = _check_range("iso_cts", "common_space_fraction", common_space_fraction, 0.0, 1.0)
    return per_matrix(task_vectors, p, lambda mats, w: iso_cts_matrix(mats, w, f))
