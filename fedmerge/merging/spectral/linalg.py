"""Singular-value building blocks of the spectral rules: top-k triplets and polar factors.

``top_singular_triplets`` takes a batch's top-k singular triplets exactly (full SVD), from a
randomized block Krylov space whose every Ritz triplet is checked by its residual, or from the
float64 eigendecomposition of AᵀA; ``polar_factor`` and ``polar_by_whitening`` give the orthogonal
polar factor by SVD or by whitening X (XᵀX)^(-1/2). What each constant below is for and how its
value was measured: ``docs/performance.md`` (TSV-M, "The constants").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


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



_SKETCH_SEED = 0x75F  # fixed: the fast path is deterministic
_KRYLOV_DEPTH = 10  # block Krylov steps after the first block
_EXACT_BELOW = 64  # matrices whose smaller side is at most this get the full SVD
_GRAM_FROM = 1 << 24  # entries from which a tall matrix "auto" would give the full SVD takes AᵀA's instead
_RESIDUAL_TOL = 1e-5  # Ritz triplets with ‖Aᵀu − σv‖ above this · σ_1 are recomputed from AᵀA
_GRAM_MIN_RATIO = 1e-4  # σ_k/σ_1 below which AᵀA cannot give the triplets accurately: full SVD
_WHITENING_MIN_RATIO = 1e-12  # Gram eigenvalues below this · λ_max are zero or unresolved (κ > 1e6)
_LOW_PRECISION_MAX_COND = 32.0  # stacked bases this well conditioned are whitened in float32
_FLOAT32_GRAM_MAX_COND = 8.0  # ... and tall ones this well conditioned even diagonalised in float32
_FLATNESS_CHECK_BLOCKS = 5  # Krylov blocks after which spectra flat around σ_k are given up on
_FLAT_RATIO = 0.65  # θ_k/θ_⌈k/2⌉ above this after those blocks: flat (see _looks_flat)...
_FLAT_TAIL = 0.1  # ... unless the spectrum beyond σ_k falls away (a rank a little above k)


def rank_tolerance(shape: Sequence[int]) -> float:
    """Relative σ (σ_i / σ_1) at or below which a task's triplet is numerical noise: max(m, n) · eps(float32).

    One rule for every input dtype. Task vectors come from training in float32 or lower, so a
    float64 copy carries the same rounding noise, whose singular values lie near
    max(m, n) · eps(float32) · σ_1; float64's eps would keep those triplets, with arbitrary singular
    vectors, for float64 copies only, and TSV-M of tasks of rank below k would depend on the dtype
    they were handed in. Triplets this small carry nothing of their task (keeping all k, as
    FusionBench does, leaves the result to the SVD's arbitrary choice of basis for a zero σ).
    """
    return max(shape) * torch.finfo(torch.float32).eps


def _orthonormal(y: Tensor) -> Tensor:
    """An orthonormal basis of the columns of every matrix in a batch (Householder QR)."""
    return torch.linalg.qr(y).Q


def _gaussian(shape: tuple[int, ...] | torch.Size, gen: torch.Generator, dtype: torch.dtype,
              device: torch.device) -> Tensor:
    """Standard normal values drawn on the CPU from ``gen``, then moved to ``device``: the same
    sketch on every device, so a GPU merge agrees with a CPU one to rounding."""
    return torch.randn(shape, generator=gen, dtype=dtype, device="cpu").to(device)


def _orthonormal_complement(w: Tensor, basis: Tensor, gen: torch.Generator) -> Tensor:
    """Orthonormal columns spanning w's part outside the span of ``basis`` (orthonormal columns).

    Block classical Gram-Schmidt with reorthogonalisation (BCGS2: project, QR, project, QR) keeps the
    Krylov basis orthonormal to working precision, which Rayleigh-Ritz assumes. Columns of w that lay
    (numerically) inside the
    span already, as for matrices of rank below the Krylov space's size, are replaced by random
    directions instead of normalised rounding noise.
    """
    def project_out(x: Tensor) -> Tensor:
        return x - basis @ (basis.mT @ x)

    q = project_out(_orthonormal(project_out(w)))
    fresh = q.norm(dim=-2, keepdim=True) > 0.5
    if not bool(fresh.all()):
        noise = _gaussian(q.shape, gen, q.dtype, q.device)
        q = project_out(project_out(torch.where(fresh, q, noise)))
    return _orthonormal(q)


def krylov_block_size(k: int) -> int:
    """Columns per block Krylov step for top-k triplets: ⌈k/3⌉, at least 4."""
    return max(4, -(-k // 3))


def _exact_top_k(a: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k triplets of every matrix in a batch from its full float64 SVD, one matrix at a time:
    a float64 copy and the full U of one matrix at once, not of the whole batch (for a T-task layer of
    a 32000 × 2048 embedding that is a seventh of the memory), and the same triplets."""
    *batch, m, n = a.shape
    flat = a.reshape(-1, m, n)
    u = a.new_empty(len(flat), m, k, dtype=torch.float64)
    s = a.new_empty(len(flat), k, dtype=torch.float64)
    vh = a.new_empty(len(flat), k, n, dtype=torch.float64)
    for i, ai in enumerate(flat):
        ui, si, vhi = torch.linalg.svd(ai.double(), full_matrices=False)
        u[i], s[i], vh[i] = ui[:, :k], si[:k], vhi[:k, :]
        del ui, si, vhi
    return u.reshape(*batch, m, k), s.reshape(*batch, k), vh.reshape(*batch, k, n)


def top_from_gram(grams: list[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Top-k σ (T, k), descending, and right singular vectors V (T, n, k) from Gram matrices AᵀA,
    one eigendecomposition at a time, each Gram matrix let go once decomposed (the list is emptied)."""
    sigmas, vectors = [], []
    while grams:
        lam, q = torch.linalg.eigh(grams.pop(0))
        first = len(lam) - k  # the top k: none when k = 0 (an empty common space)
        sigmas.append(lam[first:].flip(-1).clamp_min(0).sqrt())
        vectors.append(q[:, first:].flip(-1))
        del lam, q
    return torch.stack(sigmas), torch.stack(vectors)


def _gram_top_k(a: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets of a batch (B, m, n), m ≥ n, from the float64 eigendecomposition of AᵀA.

    Cheaper than the full SVD and as accurate for σ ≥ ``_GRAM_MIN_RATIO`` · σ_1; a matrix with a
    triplet between its rank cut-off (:func:`rank_tolerance`) and that ratio gets the SVD. Numbers:
    ``docs/performance.md``.
    """
    batch, m, n = a.shape
    u = a.new_empty(batch, m, k, dtype=torch.float64)
    s = a.new_empty(batch, k, dtype=torch.float64)
    v = a.new_empty(batch, n, k, dtype=torch.float64)
    for i, ai in enumerate(a):  # one float64 copy of a matrix at a time, not of the batch
        ai = ai.double()
        s[i:i + 1], v[i:i + 1] = top_from_gram([ai.mT @ ai], k)
        u[i] = (ai @ v[i]) / s[i].clamp_min(torch.finfo(torch.float64).tiny)
    relative = s / s[..., :1].clamp_min(torch.finfo(torch.float64).tiny)
    unresolved = ((relative < _GRAM_MIN_RATIO) & (relative > rank_tolerance((m, n)))).any(dim=-1)
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
    gen = torch.Generator(device="cpu").manual_seed(_SKETCH_SEED)
    z = aw.new_empty(batch, n, steps * b)  # the Krylov basis Z, filled block by block
    y = aw.new_empty(batch, m, steps * b)  # A Z
    w = aw.new_empty(batch, n, steps * b)  # Aᵀ A Z / scale: the next block's seed, then the residuals
    z[..., :b] = _orthonormal(_gaussian((n, b), gen, work, a.device).expand(batch, n, b))
    live = torch.arange(batch, device=a.device)  # the matrices still iterated
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

    Flat: θ_k/θ_⌈k/2⌉ > ``_FLAT_RATIO`` and the last Ritz value > ``_FLAT_TAIL`` · θ_k (thresholds
    measured in ``docs/performance.md``). Only saves work: the residual check decides what is accurate.
    """
    if k < 8:
        return torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
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
    or that side is at most 64, except for tall matrices of at least ``_GRAM_FROM`` entries (an LLM's
    embeddings and MLP weights), which take AᵀA's eigendecomposition: a third of the time, without
    the full U (at these sizes the rank cut-off lies above ``_GRAM_MIN_RATIO``, so every triplet
    kept is one AᵀA resolves).
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
        if method == "auto" and m * n >= _GRAM_FROM and m >= 2 * n:  # LLM-sized: the full SVD's U is the cost
            u, s, vh = _gram_top_k(a.reshape(-1, m, n), k)
            return u.reshape(*batch, m, k), s.reshape(*batch, k), vh.reshape(*batch, k, n)
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


def polar_by_whitening(x: Tensor, live_columns: Tensor, dtype: torch.dtype, *,
                        float32_gram: bool = True) -> tuple[Tensor, Tensor]:
    """The polar factor x (XᵀX)^(-1/2) (tall x) or (XXᵀ)^(-1/2) x (wide) of every matrix in a batch.

    :func:`polar_factor` (Prop. 4.1 of the TSV paper) at the cost of one eigendecomposition Q Λ Qᵀ
    of the smaller Gram matrix instead of an SVD of x. ``live_columns`` counts each matrix's non-zero
    columns. The result has ``dtype``. Also returns each matrix's smallest resolved σ (0 where the
    Gram matrix could not resolve it, ∞ for a zero matrix).

    With ``float32_gram`` and float32 results, stacks at least twice as long as wide are whitened
    entirely in float32 (Gram matrix, eigendecomposition, product) where that shows them well
    conditioned (κ ≤ ``_FLOAT32_GRAM_MAX_COND``), at half the cost, with errors ~eps·κ² (why this
    bound: ``docs/performance.md``). All others (zero columns give κ = ∞) go to :func:`_whiten_in_float64`.
    """
    wide = x.shape[-1] > x.shape[-2]
    if wide:
        x = x.mT
    out = x.new_empty(x.shape, dtype=dtype)
    sigma_min = x.new_empty(x.shape[0], dtype=torch.float64)
    rest = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
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
    """:func:`polar_by_whitening` for tall x from a float64 Gram eigendecomposition.

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
