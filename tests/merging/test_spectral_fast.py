"""The fast TSV-M (top-k triplets by randomized block Krylov, polar factors by whitening) against
the full-SVD reference, on task matrices whose spectra decay like fine-tuning deltas."""

from __future__ import annotations

import math

import pytest
import torch

from fedmerge import merge
from fedmerge.merging.spectral.linalg import (
    _block_krylov_top_k, _gram_top_k, polar_by_whitening, polar_factor, top_singular_triplets,
)
from fedmerge.merging.spectral.tsv import _mean_task_cosine, tsv_merge_matrix, tsv_merge_matrix_reference


def decaying(m: int, n: int, *, decay: str = "power", rank: int | None = None, seed: int = 0) -> torch.Tensor:
    """A float32 m×n matrix with random singular vectors and σ_j ∝ 1/j or exp(−16 j / r)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n) if rank is None else rank
    j = torch.arange(1, r + 1, dtype=torch.float64)
    s = 1.0 / j if decay == "power" else torch.exp(-16.0 * j / min(m, n))
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    return (1e-2 * (u * s) @ v.T).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / max(float(torch.linalg.norm(b.double())), 1e-300))


@pytest.mark.parametrize("shape,tasks,decay", [
    ((320, 160), 8, "power"),  # tall
    ((160, 320), 6, "exp"),  # wide
    ((256, 256), 8, "power"),  # square, k = r/T exactly
    ((256, 256), 14, "exp"),  # T·k < r
])
def test_fast_tsv_matches_the_full_svd_reference(shape, tasks, decay):
    mats = [decaying(*shape, decay=decay, seed=i) for i in range(tasks)]
    assert rel_err(tsv_merge_matrix(mats), tsv_merge_matrix_reference(mats)) < 1e-3


def test_more_tasks_than_the_rank_keeps_one_triplet_each():
    mats = [decaying(66, 90, seed=i) for i in range(70)]  # r = 66 < T = 70: k = 1, T·k > m
    fast, ref = tsv_merge_matrix(mats), tsv_merge_matrix_reference(mats)
    assert torch.isfinite(fast).all() and rel_err(fast, ref) < 1e-3


def test_tasks_of_lower_rank_than_k_ignore_their_null_directions():
    mats = [decaying(300, 200, rank=5, seed=i) for i in range(8)]  # k = 25 > rank 5
    fast, ref = tsv_merge_matrix(mats), tsv_merge_matrix_reference(mats)
    assert rel_err(fast, ref) < 1e-3
    # rank-5 tasks: the 40 kept directions of all tasks together are the whole merge
    assert int((torch.linalg.svdvals(ref) > 1e-6 * torch.linalg.svdvals(ref)[0]).sum()) == 40


def test_zero_matrices():
    zeros = [torch.zeros(200, 120) for _ in range(4)]
    assert torch.equal(tsv_merge_matrix(zeros), torch.zeros(200, 120))
    assert torch.count_nonzero(tsv_merge_matrix_reference(zeros)) == 0
    mixed = [decaying(200, 120, seed=1), torch.zeros(200, 120), decaying(200, 120, seed=2)]
    assert rel_err(tsv_merge_matrix(mixed), tsv_merge_matrix_reference(mixed)) < 1e-3


def test_one_task_is_that_task():
    x = decaying(200, 150)
    assert rel_err(tsv_merge_matrix([x]), x) < 1e-6
    assert rel_err(merge("tsv", [{"w": x}])["w"], x) < 1e-6


def test_tasks_in_orthogonal_subspaces_add_up_exactly():
    # task i lives in rows and columns 64i..64i+63: its singular vectors are orthogonal to the others'
    tasks = []
    for i in range(4):
        t = torch.zeros(256, 256)
        t[64 * i:64 * (i + 1), 64 * i:64 * (i + 1)] = decaying(64, 64, seed=i)
        tasks.append(t)
    total = sum(tasks)
    assert rel_err(tsv_merge_matrix(tasks), total) < 1e-6
    assert rel_err(tsv_merge_matrix_reference(tasks), total) < 1e-6


def test_identical_tasks_give_the_truncated_task():
    x = decaying(256, 192, decay="exp")
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    k = 192 // 4
    truncated = (u[:, :k] * s[:k]) @ vh[:k]
    assert rel_err(tsv_merge_matrix_reference([x] * 4), truncated) < 1e-6
    assert rel_err(tsv_merge_matrix([x] * 4), truncated) < 1e-4


def test_batched_top_k_triplets_match_the_svd():
    a = torch.stack([decaying(400, 300, decay="exp", seed=i) for i in range(3)])
    u, s, vh = top_singular_triplets(a, 20, method="randomized")
    u0, s0, vh0 = torch.linalg.svd(a.double(), full_matrices=False)
    torch.testing.assert_close(s, s0[:, :20], rtol=1e-6, atol=0)
    assert rel_err(u @ torch.diag_embed(s) @ vh, u0[..., :20] @ torch.diag_embed(s0[:, :20]) @ vh0[:, :20]) < 1e-5
    assert u.dtype == torch.float64 and u.shape == (3, 400, 20) and vh.shape == (3, 20, 300)
    ut, st, vht = top_singular_triplets(a.mT, 20)  # wide input: the transposed triplets
    assert ut.shape == (3, 300, 20) and vht.shape == (3, 20, 400)
    torch.testing.assert_close(st, s, rtol=1e-6, atol=0)
    assert rel_err(ut @ torch.diag_embed(st) @ vht, (u @ torch.diag_embed(s) @ vh).mT) < 1e-5


def test_fast_tsv_through_merge_keeps_dtype_and_is_deterministic():
    tvs = [{"w": decaying(256, 128, seed=i).half(), "b": torch.full((3,), float(i))} for i in range(4)]
    a, b = merge("tsv", tvs), merge("tsv", tvs)
    assert a["w"].dtype == torch.float16 and torch.equal(a["w"], b["w"])
    torch.testing.assert_close(a["b"], torch.full((3,), 1.5))


@pytest.mark.slow  # 512×384
def test_krylov_triplets_of_a_slowly_decaying_spectrum_match_the_svd_at_the_cut_off():
    # σ_j ∝ 1/j: σ_k/σ_{k+1} = 1.02 at k = 48, the hard case for randomized methods
    a = torch.stack([decaying(512, 384, decay="power", seed=i) for i in range(2)])
    u, s, vh = top_singular_triplets(a, 48, method="randomized")
    u0, s0, vh0 = torch.linalg.svd(a.double(), full_matrices=False)
    torch.testing.assert_close(s, s0[:, :48], rtol=1e-5, atol=0)
    truncated = u0[..., :48] @ torch.diag_embed(s0[:, :48]) @ vh0[:, :48]
    assert rel_err(u @ torch.diag_embed(s) @ vh, truncated) < 1e-4


def test_krylov_triplets_of_a_matrix_of_lower_rank_than_the_krylov_space():
    # rank 6 < the Krylov space (blocks of 4, 11 of them): later blocks have nothing new to find
    a = decaying(400, 300, rank=6, seed=3)
    u, s, vh = top_singular_triplets(a, 10, method="randomized")
    s0 = torch.linalg.svdvals(a.double())
    torch.testing.assert_close(s[:6], s0[:6], rtol=1e-5, atol=0)
    assert float(s[6:].max()) < 1e-5 * float(s0[0])
    live = u[:, :6]  # the triplets that carry the matrix are orthonormal and rebuild it
    torch.testing.assert_close(live.T @ live, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)
    assert rel_err(u[:, :6] @ torch.diag(s[:6]) @ vh[:6], a) < 1e-5


def low_rank_plus_noise(n: int, noise: float, seed: int) -> torch.Tensor:
    """A rank-8 signal (σ_j = 1/j) plus Gaussian noise of spectral norm ≈ 2·noise: a flat tail."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, 8, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, 8, generator=g, dtype=torch.float64)).Q
    signal = (u / torch.arange(1, 9)) @ v.T
    return (signal + noise * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5).float()


@pytest.mark.parametrize("noise", [0.01, 1.0])
def test_unconverged_krylov_triplets_are_recomputed_from_the_gram_matrix(noise):
    # k = 32 falls in the noise: the Krylov space cannot resolve it, the residual check must notice
    a = torch.stack([low_rank_plus_noise(256, noise, seed=i) for i in range(3)])
    u0, s0, vh0 = torch.linalg.svd(a.double(), full_matrices=False)
    truncated = u0[..., :32] @ torch.diag_embed(s0[:, :32]) @ vh0[:, :32]
    u, s, vh = top_singular_triplets(a, 32, method="randomized", tol=float("inf"))  # unchecked Ritz triplets
    assert rel_err(u @ torch.diag_embed(s) @ vh, truncated) > 1e-2
    u, s, vh = top_singular_triplets(a, 32, method="randomized")
    assert rel_err(u @ torch.diag_embed(s) @ vh, truncated) < 1e-8


def test_top_k_from_the_gram_matrix_matches_the_svd_and_hands_unresolved_spectra_to_it():
    # σ_k = 1e-2 σ_1 is resolved by AᵀA in float64; σ_k ≈ 3e-11 σ_1 is below what it can see
    steep = torch.stack([decaying(300, 200, decay="exp", seed=i) for i in range(2)]).double()
    steep[1] *= torch.logspace(0, -30, 200, dtype=torch.float64)  # column scaling: σ_60 ≈ 3e-11 σ_1
    for a, k in ((steep[:1], 20), (steep, 60)):
        u, s, vh = _gram_top_k(a, k)
        u0, s0, vh0 = torch.linalg.svd(a, full_matrices=False)
        truncated = u0[..., :k] @ torch.diag_embed(s0[:, :k]) @ vh0[:, :k]
        assert rel_err(u @ torch.diag_embed(s) @ vh, truncated) < 1e-9
        torch.testing.assert_close(s, s0[:, :k], rtol=1e-6, atol=0)


@pytest.mark.parametrize("noise", [0.01, 0.1, 1.0])
def test_fast_tsv_of_noisy_task_matrices_matches_the_reference(noise):
    mats = [low_rank_plus_noise(256, noise, seed=i) for i in range(8)]
    assert rel_err(tsv_merge_matrix(mats), tsv_merge_matrix_reference(mats)) < 1e-3


@pytest.mark.slow  # 512×256, 8 tasks; fast: tests/merging/test_tsv_reference.py
@pytest.mark.parametrize("spread,dtype", [(1.0, torch.float32), (0.3, torch.float32), (0.03, torch.float32),
                                          (0.01, torch.float64)])
def test_fast_tsv_of_tasks_sharing_a_component_matches_the_reference(spread, dtype):
    # IID clients: every task is a common update plus its own, so the stacked bases are nearly
    # singular and Krylov triplets are not enough (float32: 1.8e-3 at spread 0.03): such layers are
    # refined, in float64 too
    common = decaying(512, 256, seed=100).to(dtype)
    mats = [common + spread * decaying(512, 256, seed=i).to(dtype) for i in range(8)]
    assert rel_err(tsv_merge_matrix(mats), tsv_merge_matrix_reference(mats)) < 1e-4


@pytest.mark.slow  # 512×256, 8 tasks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_tsv_refines_layers_whose_tasks_share_directions_without_being_alike(dtype):
    # ± one common update: mean cosine −1/7 (not "alike"), the same top subspaces all the same, so
    # the stacked bases are nearly singular; Krylov triplets alone give ~1e-3 (float32), 1.5e-4 (float64)
    common = decaying(512, 256, seed=100).to(dtype)
    mats = [(-1) ** i * common + 0.03 * decaying(512, 256, seed=i).to(dtype) for i in range(8)]
    assert rel_err(tsv_merge_matrix(mats), tsv_merge_matrix_reference(mats)) < 1e-4


@pytest.mark.parametrize("scale", [1e30, 1e-20])
def test_krylov_triplets_of_extreme_scales_neither_overflow_nor_underflow(scale):
    a = torch.stack([decaying(256, 256, seed=i) for i in range(2)]) * scale  # AᵀA would leave float32's range
    _, s, _ = top_singular_triplets(a, 32, method="randomized")
    s0 = torch.linalg.svdvals(a.double())[:, :32]
    torch.testing.assert_close(s, s0, rtol=1e-5, atol=0)


@pytest.mark.parametrize("cond,dtype", [(4.0, torch.float32), (1e4, torch.float32), (1e4, torch.float64),
                                        (1e9, torch.float32)])
def test_polar_factor_by_whitening_equals_the_svd_one(cond, dtype):
    # well conditioned: float32 products; κ = 1e4: float64 ones; κ = 1e9: beyond the Gram matrix, the SVD
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(3, 300, 60, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(3, 60, 60, generator=g, dtype=torch.float64)).Q
    x = (u * torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), 60, dtype=torch.float64)) @ v.mT
    live = torch.full((3,), 60)
    # squaring κ in the Gram matrix costs eps·κ² (float64); float32 products eps·κ (when κ is small)
    tol = 1e-6 if cond < 10 else min(1e-6, 10 * torch.finfo(torch.float64).eps * cond**2)
    for mat in (x, x.mT):  # tall and wide
        p, sigma_min = polar_by_whitening(mat, live, dtype)
        assert p.dtype == dtype
        expected_min = 0.0 if cond > 1e6 else float(torch.linalg.svdvals(mat)[0, -1])  # κ = 1e9: unresolved
        assert float(sigma_min[0]) == pytest.approx(expected_min, rel=1e-3)
        torch.testing.assert_close(p.double(), polar_factor(mat), atol=tol, rtol=0)


def test_polar_factor_by_whitening_of_bases_with_zero_columns():
    # dropped triplets leave zero columns: the partial isometry on the live ones, without the SVD
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 200, 40, generator=g, dtype=torch.float64)
    x[0, :, 30:] = 0
    p, _ = polar_by_whitening(x, torch.tensor([30, 40]), torch.float64)
    torch.testing.assert_close(p, polar_factor(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("cond", [4.0, 16.0])
def test_tall_well_conditioned_bases_are_whitened_accurately(cond):
    # κ ≤ 8 on a stack ≥ 2× as long as wide may take float32 products; κ = 16 must not lose accuracy
    # for it. A zero column (a dropped triplet) makes κ infinite: the partial isometry on the rest.
    g = torch.Generator().manual_seed(2)
    u = torch.linalg.qr(torch.randn(400, 80, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64)).Q
    x = ((u * torch.logspace(0, -math.log10(cond), 80, dtype=torch.float64)) @ v.mT)[None]
    p, sigma_min = polar_by_whitening(x, torch.tensor([80]), torch.float32)
    torch.testing.assert_close(p.double(), polar_factor(x), atol=2e-6, rtol=0)
    assert float(sigma_min[0]) == pytest.approx(1 / cond, rel=1e-4)
    x[..., 79] = 0
    p, _ = polar_by_whitening(x, torch.tensor([79]), torch.float32)
    torch.testing.assert_close(p.double(), polar_factor(x), atol=2e-6, rtol=0)


def test_mean_task_cosine_by_hand():
    a, b = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    mats = torch.stack([torch.stack([a, a, -a]), torch.stack([a, b, a + b])])  # (L=2, T=3, 2, 2)
    # layer 0: cos(a, a) = 1, cos(a, −a) = −1 twice → −1/3
    # layer 1: cos(a, b) = 0, cos(a, a+b) = 1/√5, cos(b, a+b) = 4/(2√5) → 1/√5
    expected = [-1 / 3, (0 + 1 / 5**0.5 + 2 / 5**0.5) / 3]
    torch.testing.assert_close(_mean_task_cosine(mats), torch.tensor(expected, dtype=torch.float64))
    for scale in (1e25, 1e-25):  # squares beyond float32's range
        torch.testing.assert_close(_mean_task_cosine(mats * scale), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.slow  # two 512×256 layers, 8 tasks
def test_a_batch_mixing_alike_and_independent_layers_matches_the_reference():
    # two layers of one shape go through _tsv_merge_batch together: one IID-like, one independent
    common = decaying(512, 256, seed=100)
    tvs = [{"alike": common + 0.1 * decaying(512, 256, seed=i), "independent": decaying(512, 256, seed=50 + i)}
           for i in range(8)]
    out = merge("tsv", tvs)
    for key in ("alike", "independent"):
        assert rel_err(out[key], tsv_merge_matrix_reference([tv[key] for tv in tvs])) < 1e-4


def test_krylov_gives_up_early_on_flat_spectra_and_finishes_the_others():
    # a batch mixing decaying spectra with noise-like ones: the noise leaves after 5 blocks (residual ∞,
    # for the Gram path to take over), the rest go on to converged triplets
    a = torch.stack([decaying(256, 256, seed=0), low_rank_plus_noise(256, 1.0, seed=1),
                     decaying(256, 256, decay="exp", seed=2), low_rank_plus_noise(256, 0.01, seed=3)])
    u, s, vh, residual = _block_krylov_top_k(a, 32, 11, 11)
    assert torch.isinf(residual[[1, 3]]).all() and bool((residual[[0, 2]] < 1e-5).all())
    s0 = torch.linalg.svdvals(a[[0, 2]].double())[:, :32]
    torch.testing.assert_close(s[[0, 2]], s0, rtol=1e-5, atol=0)
    _, _, _, unchecked = _block_krylov_top_k(a, 32, 11, 11, give_up_on_flat=False)
    assert bool(torch.isfinite(unchecked).all()) and bool((unchecked[[1, 3]] > 1e-4).all())


def test_low_rank_matrices_are_not_mistaken_for_flat_ones():
    # rank a little above k (LoRA-like task matrices): the top half of the spectrum is flat, but the
    # Krylov space holds the whole range after a few blocks, so they must stay and converge
    g = torch.Generator().manual_seed(7)

    def flat_low_rank(rank: int) -> torch.Tensor:  # σ falling linearly from 1 to 0.5, then nothing
        u = torch.linalg.qr(torch.randn(256, rank, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(256, rank, generator=g, dtype=torch.float64)).Q
        return ((u * torch.linspace(1, 0.5, rank, dtype=torch.float64)) @ v.T).float()

    a = torch.stack([flat_low_rank(rank) for rank in (40, 48, 52)])
    _, s, _, residual = _block_krylov_top_k(a, 32, 11, 11)
    assert bool((residual < 1e-5).all())
    torch.testing.assert_close(s, torch.linalg.svdvals(a.double())[:, :32], rtol=1e-5, atol=0)


def test_custom_krylov_blocks_smaller_than_k_over_5():
    # 5 blocks of 4 columns cannot show σ_32 yet: no flatness check then, and no crash
    a = torch.stack([decaying(256, 256, decay="exp", seed=i) for i in range(2)])
    _, s, _ = top_singular_triplets(a, 32, method="randomized", block_size=4, depth=20)
    torch.testing.assert_close(s, torch.linalg.svdvals(a.double())[:, :32], rtol=1e-5, atol=0)


def test_alike_low_rank_tasks_match_the_reference():
    # IID clients fine-tuned with LoRA: alike tasks of rank < k, whose σ beyond the rank are at
    # float32's rounding level (dropped by TSV-M anyway)
    common = decaying(256, 256, rank=16, seed=100)
    mats = [common + 0.1 * decaying(256, 256, rank=8, seed=i) for i in range(8)]
    assert rel_err(tsv_merge_matrix(mats), tsv_merge_matrix_reference(mats)) < 1e-4
