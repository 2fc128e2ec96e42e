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
# ``method="fast"`` (the default) needs only the top k = ⌊r/T⌋ triplets of each task:
# 1. a randomized block Krylov method in float32 (float64 for float64 input), batched over tasks and
#    layers of one shape, with a Rayleigh-Ritz step (the projected Gram matrix's eigenpairs in
#    float64, the Ritz vectors from the blocks in their own precision) whose every triplet is checked by its
#    residual: matrices whose Krylov space did not converge (spectra flat around σ_k, like noise) get
#    their triplets from a float64 eigendecomposition of AᵀA instead, and those that look flat after
#    5 of the 11 blocks leave the Krylov recursion there;
# 2. both polar factors by whitening X (XᵀX)^(-1/2) (Prop. 4.1 of the TSV paper) from Gram
#    eigendecompositions: float64, except tall stacks (≥ 2× as long as wide) whose float32
#    eigenvalues show κ ≤ 8, which stay float32 throughout (products in float32 where the stacked
#    bases are well conditioned);
# 3. layers whose stacked bases come out nearly singular (tasks sharing their top directions) are
#    merged again from float64 triplets of AᵀA; layers of alike tasks take that path at once.
# Both paths drop triplets whose σ is numerically zero (≤ max(m, n) · eps · σ_1 of that task), so
# zero matrices, tasks of rank < k and duplicated tasks give well-defined results rather than
# arbitrary singular vectors.
#
# Why these choices (measured on ViT-B/32 shapes, T = 8; see benchmarks/ and the README):
# - TSV-M is ill-conditioned in the per-task subspaces: the stacked bases of square layers have
#   condition numbers up to ~5e3, so a top-k subspace off by 1e-3 near the cut-off σ_k moves the
#   merge by ~1e-1. The triplets must be nearly as accurate as a full SVD's, also for slowly (1/j)
#   decaying spectra where σ_k/σ_{k+1} ≈ 1.01. Subspace (power) iteration on 2k columns needed 13
#   products with A or Aᵀ (26 k-column passes) for 5e-5; block Krylov on blocks of ⌈k/3⌉ columns
#   with depth 10 needs 22 narrow products (7⅓ k-column passes) for 4e-5 (Musco & Musco, NeurIPS
#   2015). Depth 8 or blocks of k/2 with depth 6 leave 5e-4 on 1/j spectra.
# - Gram matrices square condition numbers: formed or diagonalised in float32 they lose σ_k²'s
#   digits (a float32 eigh of the polar Gram matrices of square layers, κ up to 5e3, gives a 1e-1
#   error), so they are float64, except on the tall sides of fc1/fc2/in_proj: stacks of unrelated
#   subspaces at least twice as long as wide have κ ≈ 3-4, and when the float32 eigenvalues confirm
#   κ ≤ 8 the whole whitening stays float32 (merge change ≤ 2e-6, fc1's merge 0.37 s → 0.31 s).
#   The products with the whitening matrices are float64 too unless the stacked basis is well
#   conditioned (κ ≤ 32): in float32 they lose orthogonality like eps·κ, and tasks sharing a
#   component (IID clients) make κ reach 1e5. Beyond κ ≈ 1e6 the Gram matrix cannot resolve σ_min
#   at all, and the SVD takes over.
# - The polar step's two eigendecompositions per layer and the Krylov products are a floor the
#   benchmark times alone: 0.78 s of a 2.15 s ViT-B/32 block at T = 8, against 6.6 s for the
#   published code; the float64 Rayleigh-Ritz eigendecompositions (352 × 352 per task) add 0.2-0.46 s.
# - The residual check costs one narrow product: Aᵀu comes from AᵀAZ, which the Krylov recursion
#   computes anyway as each next block's seed. Converged float32 triplets reach 2e-7 to 8e-7 · σ_1
#   on ViT shapes; the tolerance 1e-5 · σ_1 leaves a margin. Spectra flat near σ_k (noise) stay at
#   1e-3 to 6e-2 and, unchecked, moved the merge by 0.25-0.45. Those matrices cost a float64
#   eigendecomposition of AᵀA (2-3× cheaper than the SVD, about the published code's float32 SVD)
#   plus the Krylov blocks before the flatness check: a ViT-B/32 block of noise-like tasks took
#   10.2 s with the whole recursion, 6.5 s with the check (published: 7.4 s).
# - Tasks sharing most of their top directions (IID clients: a common update plus a small own part)
#   make the stacked bases nearly singular (σ_min 1e-5 to 1e-7), and the merge amplifies the float32
#   triplets' errors to 1e-3 (the published float32 code: 4e-4 to 2e-3). Such layers are found
#   after the first merge from the whitening's smallest σ (< 1e-4) and merged again with float64
#   triplets from AᵀA: errors ~1e-6 (4e-5 when the own parts are 3e-4 of the common one). Layers
#   whose tasks are alike (mean cosine > 0.3) go there directly, skipping the Krylov pass they
#   would waste: IID-like tasks 1.5× faster than the published code, which is off by 8.6e-4.

_SKETCH_SEED = 0x75F  # fixed: the fast path is deterministic
_KRYLOV_DEPTH = 10  # block Krylov steps after the first block
_EXACT_BELOW = 64  # matrices whose smaller side is at most this get the full SVD
_RESIDUAL_TOL = 1e-5  # Ritz triplets with ‖Aᵀu − σv‖ above this · σ_1 are recomputed from AᵀA
_GRAM_MIN_RATIO = 1e-4  # σ_k/σ_1 below which AᵀA cannot give the triplets accurately: full SVD
_WHITENING_MIN_RATIO = 1e-12  # Gram eigenvalues below this · λ_max are zero or unresolved (κ > 1e6)
_LOW_PRECISION_MAX_COND = 32.0  # stacked bases this well conditioned are whitened in float32
_FLOAT32_GRAM_MAX_COND = 8.0  # ... and tall ones this well conditioned even diagonalised in float32
_REFINE_BELOW = 1e-4  # stacked bases with σ_min below this get float64 triplets (see _tsv_merge_batch)
_ALIKE_TASKS = 0.3  # layers whose tasks' mean pairwise cosine exceeds this get float64 triplets at once
_FLATNESS_CHECK_BLOCKS = 5  # Krylov blocks after which spectra flat around σ_k are given up on
_FLAT_RATIO = 0.65  # θ_k/θ_⌈k/2⌉ above this after those blocks: flat (see _looks_flat)...
_FLAT_TAIL = 0.1  # ... unless the spectrum beyond σ_k falls away (a rank a little above k)


def _rank_tol(dtype: torch.dtype, shape: Sequence[int]) -> float:
    """Relative σ below which a triplet is numerical noise of a tensor stored in ``dtype``."""
    dt = torch.float64 if dtype == torch.float64 else torch.float32
    return max(shape) * torch.finfo(dt).eps


def _orthonormal(y: Tensor) -> Tensor:
    """An orthonormal basis of the columns of every matrix in a batch (Householder QR)."""
    return torch.linalg.qr(y).Q


def _orthonormal_complement(w: Tensor, basis: Tensor, gen: torch.Generator) -> Tensor:
    """Orthonormal columns spanning w's part outside the span of ``basis`` (orthonormal columns).

    Block classical Gram-Schmidt with reorthogonalisation (BCGS2: project, QR, project, QR): the
    Krylov basis stays orthonormal to working precision (‖ZᵀZ − I‖ ≈ 1e-6 in float32, as with a
    third projection), which Rayleigh-Ritz assumes. Columns of w that lay (numerically) inside the
    span already, as for matrices of rank below the Krylov space's size, are replaced by random
    directions instead of normalised rounding noise.
    """
    def project_out(x: Tensor) -> Tensor:
        return x - basis @ (basis.mT @ x)

    q = project_out(_orthonormal(project_out(w)))
    fresh = q.norm(dim=-2, keepdim=True) > 0.5
    if not bool(fresh.all()):
        noise = torch.randn(q.shape, generator=gen, dtype=q.dtype)
        q = project_out(project_out(torch.where(fresh, q, noise)))
    return _orthonormal(q)


def krylov_block_size(k: int) -> int:
    """Columns per block Krylov step for top-k triplets: ⌈k/3⌉, at least 4."""
    return max(4, -(-k // 3))


def _exact_top_k(a: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k triplets of every matrix in a batch from its full float64 SVD."""
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return u[..., :k], s[..., :k], vh[..., :k, :]


def _gram_top_k(a: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets of a batch (B, m, n), m ≥ n, from the float64 eigendecomposition of AᵀA.

    Two to three times cheaper than the full SVD (measured on 768-wide matrices) and as good for
    triplets with σ ≥ 1e-4 · σ_1 (errors ~eps·σ_1²/σ² ≤ 2e-8). The Gram matrix rounds σ ≲ 1e-8 · σ_1
    away, so a matrix with a triplet between its numerical rank cut-off (:func:`_rank_tol` of its
    dtype: ~1e-4 for float32, which TSV-M drops anyway) and 1e-4 · σ_1 gets the SVD; triplets below
    the cut-off (tasks of rank < k) are left as the Gram matrix gives them.
    """
    batch, m, n = a.shape
    u = a.new_empty(batch, m, k, dtype=torch.float64)
    s = a.new_empty(batch, k, dtype=torch.float64)
    v = a.new_empty(batch, n, k, dtype=torch.float64)
    for i, ai in enumerate(a):  # one float64 copy of a matrix at a time, not of the batch
        ai = ai.double()
        lam, q = torch.linalg.eigh(ai.mT @ ai)
        s[i], v[i] = lam.flip(-1)[:k].clamp_min(0).sqrt(), q.flip(-1)[:, :k]
        u[i] = (ai @ v[i]) / s[i].clamp_min(torch.finfo(torch.float64).tiny)
    relative = s / s[..., :1].clamp_min(torch.finfo(torch.float64).tiny)
    unresolved = ((relative < _GRAM_MIN_RATIO) & (relative > _rank_tol(a.dtype, (m, n)))).any(dim=-1)
    unresolved = unresolved.nonzero().squeeze(-1)
    if len(unresolved):
        u[unresolved], s[unresolved], vh = _exact_top_k(a[unresolved], k)
        v[unresolved] = vh.mT
    return u, s, v.mT


def _block_krylov_top_k(
    a: Tensor, k: int, block_size: int, steps: int, *, give_up_on_flat: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k Ritz triplets of a batch (B, m, n), m ≥ n, from a block Krylov space of ``steps`` blocks.

    Returns U, σ, Vᵀ (float64) and each matrix's largest residual ‖Aᵀu_i − σ_i v_i‖ / σ_1 over its k
    triplets: how far the Ritz pairs are from singular pairs of A (zero for exact ones). With
    ``give_up_on_flat``, matrices whose spectrum looks flat around σ_k after
    ``_FLATNESS_CHECK_BLOCKS`` blocks (see :func:`_looks_flat`) are not iterated further: their
    triplets are zero and their residual is ∞.
    """
    batch, m, n = a.shape
    b = block_size
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    aw = a.to(work)
    gen = torch.Generator().manual_seed(_SKETCH_SEED)
    z = aw.new_empty(batch, n, steps * b)  # the Krylov basis Z, filled block by block
    y = aw.new_empty(batch, m, steps * b)  # A Z
    w = aw.new_empty(batch, n, steps * b)  # Aᵀ A Z / scale: the next block's seed, then the residuals
    z[..., :b] = _orthonormal(torch.randn(n, b, generator=gen, dtype=work).expand(batch, n, b))
    live = torch.arange(batch)  # the matrices still iterated
    for j in range(steps):
        block = slice(j * b, (j + 1) * b)
        if j:
            z[..., block] = _orthonormal_complement(w[..., block.start - b:block.start], z[..., :block.start], gen)
        y[..., block] = aw @ z[..., block]
        if not j:  # Aᵀ(A z) scales like ‖A‖²: divide A z by about ‖A‖ so float32 neither over- nor underflows
            scale = y[..., :b].abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(work).tiny)
        w[..., block] = aw.mT @ (y[..., block] / scale)
        if give_up_on_flat and j + 1 == _FLATNESS_CHECK_BLOCKS < steps and block.stop > k:
            keep = ~_looks_flat(z[..., :block.stop], w[..., :block.stop], scale, k)
            if not bool(keep.all()):  # drop them from the batch: the rest goes on without them
                aw, z, y, w, scale, live = aw[keep], z[keep], y[keep], w[keep], scale[keep], live[keep]
            if not len(live):
                break
    u_all = a.new_zeros(batch, m, k, dtype=torch.float64)
    s_all = a.new_zeros(batch, k, dtype=torch.float64)
    vh_all = a.new_zeros(batch, k, n, dtype=torch.float64)
    residual_all = a.new_full((batch,), torch.inf, dtype=torch.float64)
    if not len(live):
        return u_all, s_all, vh_all, residual_all
    # Rayleigh-Ritz on Z: the projected Gram matrix and its eigenpairs in float64, the Ritz vectors
    # from the stored blocks in their own precision (float64 products would round to the same).
    theta, ritz = torch.linalg.eigh(_projected_gram(z, w, scale))
    theta, ritz = theta.flip(-1)[..., :k], ritz.flip(-1)[..., :k]
    s = theta.clamp_min(0).sqrt()
    pos = (s > 0).unsqueeze(-2)
    s_safe = torch.where(pos, s.unsqueeze(-2), 1.0)
    ritz_w = ritz.to(work)
    u = torch.where(pos, (y @ ritz_w).double() / s_safe, 0.0)
    v = (z @ ritz_w).double()
    at_u = torch.where(pos, (w @ ritz_w).double() * (scale.double() / s_safe), 0.0)  # Aᵀ u = Aᵀ A Z w / σ
    residual = (at_u - v * s.unsqueeze(-2)).norm(dim=-2).amax(dim=-1)
    residual = residual / s[..., 0].clamp_min(torch.finfo(torch.float64).tiny)
    u_all[live], s_all[live], vh_all[live], residual_all[live] = u, s, v.mT, residual
    return u_all, s_all, vh_all, residual_all


def _projected_gram(z: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    """ZᵀAᵀAZ in float64 from W = AᵀAZ / scale: n-long products instead of (AZ)ᵀ(AZ)'s m-long ones.

    Its eigenvalues are σ², so it must not be rounded to float32; symmetrised against rounding.
    """
    projected = (z.double().mT @ w.double()) * scale.double()
    return (projected + projected.mT) / 2


def _looks_flat(z: Tensor, w: Tensor, scale: Tensor, k: int) -> Tensor:
    """Whether each matrix's spectrum looks flat around σ_k, from the first Krylov blocks' Ritz values θ.

    Flat: θ_k/θ_⌈k/2⌉ > 0.65 and the last Ritz value θ_w (w = the columns so far, > k) > 0.1 θ_k.
    Measured after 5 blocks of ⌈k/3⌉ columns, θ_k/θ_⌈k/2⌉ is 0.33-0.53 on spectra the Krylov space
    then resolves (σ_j ∝ j^-0.7 … j^-1.5, exp(−16j/r)) and 0.71-0.72 on signal plus noise and on
    Gaussian matrices, whose triplets never converge; but also 0.66-0.77 on matrices of rank a little
    above k (LoRA-like), which converge at once: their θ_w/θ_k is below 0.01, against 0.17 for
    Gaussian ones. Only a guide for saving work: the residual check still decides what is accurate.
    """
    if k < 8:
        return torch.zeros(z.shape[0], dtype=torch.bool)
    theta = torch.linalg.eigvalsh(_projected_gram(z, w, scale)).flip(-1).clamp_min(0).sqrt()
    sigma_k = theta[..., k - 1]
    return (sigma_k > _FLAT_RATIO * theta[..., (k + 1) // 2 - 1]) & (theta[..., -1] > _FLAT_TAIL * sigma_k)


def top_singular_triplets(
    a: Tensor, k: int, *, method: str = "auto", block_size: int | None = None, depth: int = _KRYLOV_DEPTH,
    tol: float = _RESIDUAL_TOL,
) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k singular triplets of every matrix in a batch ``a`` (…, m, n), in float64.

    Returns U (…, m, k), σ (…, k) in descending order and Vᵀ (…, k, n), like
    ``torch.linalg.svd(a)[:k]``. ``method="exact"`` takes the full SVD; ``"randomized"`` a randomized
    block Krylov method: the space spanned by Ω, AᵀAΩ, …, (AᵀA)^depth Ω for a Gaussian Ω of
    ``block_size`` columns (default :func:`krylov_block_size`), built in float32 (float64 for
    float64 input) with 2·depth + 2 products with A or Aᵀ, then a Rayleigh-Ritz step (eigenpairs of
    the projected Gram matrix in float64, Ritz vectors from the blocks in their precision)
    (Musco & Musco, "Randomized Block Krylov Methods for Stronger and Faster Approximate SVD",
    NeurIPS 2015). Every Ritz triplet is checked: a matrix whose residual ‖Aᵀu_i − σ_i v_i‖ exceeds
    ``tol`` · σ_1 for some i ≤ k (the space had not converged: spectra flat around σ_k, like noise)
    gets them from the float64 eigendecomposition of AᵀA instead (or the SVD when σ_k < 1e-4 · σ_1),
    which ``method="gram"`` uses for every matrix; ``tol=inf`` returns the unchecked Ritz triplets.
    ``"auto"`` takes the full SVD when the Krylov space would exceed half the matrix's smaller side,
    or that side is at most 64.
    """
    if method not in ("auto", "exact", "randomized", "gram"):
        raise ValueError(f"method must be 'auto', 'exact', 'randomized' or 'gram', got {method!r}")
    *batch, m, n = a.shape
    r = min(m, n)
    k = max(1, min(k, r))
    if m < n:  # work on the tall side: Aᵀ = V Σ Uᵀ
        v, s, uh = top_singular_triplets(a.mT, k, method=method, block_size=block_size, depth=depth, tol=tol)
        return uh.mT, s, v.mT
    b = krylov_block_size(k) if block_size is None else block_size
    width = min(n, (depth + 1) * b)
    if method == "exact" or (method == "auto" and (n <= _EXACT_BELOW or 2 * width > n)) or (width // b) * b < k:
        return _exact_top_k(a, k)
    a = a.reshape(-1, m, n)
    if method == "gram":
        u, s, vh = _gram_top_k(a, k)
        return u.reshape(*batch, m, k), s.reshape(*batch, k), vh.reshape(*batch, k, n)
    u, s, vh, residual = _block_krylov_top_k(a, k, b, width // b, give_up_on_flat=math.isfinite(tol))
    unconverged = (residual > tol).nonzero().squeeze(-1)
    if len(unconverged):
        u[unconverged], s[unconverged], vh[unconverged] = _gram_top_k(a[unconverged], k)
    return u.reshape(*batch, m, k), s.reshape(*batch, k), vh.reshape(*batch, k, n)


def _polar_by_whitening(x: Tensor, live_columns: Tensor, dtype: torch.dtype, *,
                        float32_gram: bool = True) -> tuple[Tensor, Tensor]:
    """The polar factor x (XᵀX)^(-1/2) (tall x) or (XXᵀ)^(-1/2) x (wide) of every matrix in a batch.

    :func:`polar_factor` (Prop. 4.1 of the TSV paper) at the cost of one eigendecomposition Q Λ Qᵀ
    of the smaller Gram matrix instead of an SVD of x. ``live_columns`` counts each matrix's non-zero
    columns. The result has ``dtype``. Also returns each matrix's smallest resolved σ (0 where the
    Gram matrix could not resolve it, ∞ for a zero matrix).

    With ``float32_gram`` and float32 results, stacks at least twice as long as wide are whitened
    entirely in float32 (Gram matrix, eigendecomposition, product) where that shows them well
    conditioned (κ ≤ ``_FLOAT32_GRAM_MAX_COND``; independent subspaces stacked give κ ≈ (1 + √c) /
    (1 − √c) ≤ 5.8 for width/length c ≤ 1/2), at half the cost, with errors ~eps·κ². All others
    (zero columns give κ = ∞) go to :func:`_whiten_in_float64`.
    """
    wide = x.shape[-1] > x.shape[-2]
    if wide:
        x = x.mT
    out = x.new_empty(x.shape, dtype=dtype)
    sigma_min = x.new_empty(x.shape[0], dtype=torch.float64)
    rest = torch.ones(x.shape[0], dtype=torch.bool)
    if float32_gram and dtype == torch.float32 and x.shape[-2] >= 2 * x.shape[-1]:
        x32 = x.float()
        lam, q = torch.linalg.eigh(x32.mT @ x32)
        done = (lam[..., 0] * _FLOAT32_GRAM_MAX_COND**2 >= lam[..., -1]) & (lam[..., -1] > 0)
        if bool(done.any()):
            lam, q = lam[done], q[done]
            out[done] = x32[done] @ ((q * lam.rsqrt().unsqueeze(-2)) @ q.mT)
            sigma_min[done] = lam[..., 0].double().sqrt()
            rest = ~done
    if bool(rest.any()):
        out[rest], sigma_min[rest] = _whiten_in_float64(x[rest], live_columns[rest], dtype)
    return (out.mT if wide else out), sigma_min


def _whiten_in_float64(x: Tensor, live_columns: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`_polar_by_whitening` for tall x from a float64 Gram eigendecomposition.

    The Gram matrix cannot resolve σ below ~1e-6 · σ_max, so a matrix with more eigenvalues under
    ``_WHITENING_MIN_RATIO`` · λ_max than its zero columns explain (duplicated tasks, κ > 1e6) gets
    the SVD. The product with the whitening matrix is float32 when ``dtype`` is and x is well
    conditioned (κ ≤ ``_LOW_PRECISION_MAX_COND``, error ~eps·κ), float64 otherwise.
    """
    x = x.double()
    lam, q = torch.linalg.eigh(x.mT @ x)
    small = lam <= _WHITENING_MIN_RATIO * lam[..., -1:]
    structural_zeros = (lam.shape[-1] - live_columns).clamp_min(0)
    inv_sqrt = torch.where(small, 0.0, lam.clamp_min(torch.finfo(torch.float64).tiny).rsqrt())
    whiten = (q * inv_sqrt.unsqueeze(-2)) @ q.mT
    lam_min = torch.where(small, torch.inf, lam).amin(dim=-1)
    cond_sq = lam[..., -1] / lam_min
    out = x.new_empty(x.shape, dtype=dtype)
    ill = small.sum(dim=-1) > structural_zeros
    sigma_min = torch.where(ill, 0.0, lam_min.sqrt())  # lam_min = ∞: nothing live, nothing to refine
    cheap = ~ill & (cond_sq <= _LOW_PRECISION_MAX_COND**2) if dtype != torch.float64 else torch.zeros_like(ill)
    for subset, work in ((cheap, dtype), (~ill & ~cheap, torch.float64)):
        if bool(subset.any()):
            out[subset] = (x[subset].to(work) @ whiten[subset].to(work)).to(dtype)
    if bool(ill.any()):
        out[ill] = polar_factor(x[ill]).to(dtype)
    return out, sigma_min


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

    Triplets with σ ≤ max(m, n) · eps(``dtype``) · σ_1 of their task are dropped. ``exact``: polar
    factors by SVD, float64; otherwise by whitening, in float32 unless ``dtype`` is float64.
    ``float32_gram=False`` skips the float32 Gram eigendecomposition where the stacked bases are known
    to be ill conditioned (alike tasks), as it would be wasted.
    """
    num_layers, t, m, k = u.shape
    n = vh.shape[-1]
    keep = s > _rank_tol(dtype, (m, n)) * s[..., :1]  # numerically zero triplets carry nothing of their task
    s_cat = (s * keep).reshape(num_layers, t * k)
    u_cat = (u * keep.unsqueeze(-2)).permute(0, 2, 1, 3).reshape(num_layers, m, t * k)
    v_cat = (vh * keep.unsqueeze(-1)).permute(0, 3, 1, 2).reshape(num_layers, n, t * k)
    if exact:
        pu, pv, sigma_min = polar_factor(u_cat), polar_factor(v_cat), s_cat.new_zeros(num_layers)
    else:
        work = torch.float64 if dtype == torch.float64 else torch.float32
        live = keep.reshape(num_layers, t * k).sum(dim=-1)
        (pu, su), (pv, sv) = (_polar_by_whitening(x, live, work, float32_gram=float32_gram) for x in (u_cat, v_cat))
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
        per_layer = len(task_vectors) * shape[0] * shape[1] * (8 if dtype == torch.float64 else 4)
        step = max(1, _TSV_BATCH_BYTES // per_layer)
        for i in range(0, len(keys), step):
            chunk = keys[i:i + step]
            mats = torch.empty(len(chunk), len(task_vectors), *shape,
                               dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            for i_layer, key in enumerate(chunk):  # one copy of the inputs, converted on the way
                for i_task, tv in enumerate(task_vectors):
                    mats[i_layer, i_task] = tv[key]
            merged = _tsv_merge_batch(mats)
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
