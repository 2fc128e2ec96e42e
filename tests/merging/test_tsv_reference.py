"""The fast TSV-Merge behind ``merge("tsv", ...)`` against TSV-M written here from its definition in
numpy float64 (Gargiulo et al., CVPR 2025, Algorithm 1), sharing no code with fedmerge.

Per 2-D tensor of T task vectors: each task's top k = max(1, ⌊min(m, n)/T⌋) singular triplets from
a full SVD; their left and right singular vectors concatenated into Û (m × Tk) and V̂ (n × Tk); each
replaced by its orthogonal polar factor P Qᵀ (from the SVD P D Qᵀ of the concatenation); the merge
is U⊥ diag(σ̂) V⊥ᵀ. Every other tensor is the weighted mean Σ_i p_i τ_i.

The shapes are large enough for the fast path's randomized block Krylov triplets (smaller side
> 64 and at least twice the Krylov width 11·max(4, ⌈k/3⌉)): 400×300 and 300×500 with T = 8 (k = 37).
With T = 4 (k = ⌊r/4⌋) the Krylov space would be too wide, so the fast path takes exact triplets
and only its polar factors by whitening are on trial. Tasks sharing a common component (IID-like
clients) make the concatenated bases nearly singular, the hard case for the fast polar factors;
mostly shared ones (spread 0.3) are "alike" and take the fast path's float64 Gram triplets, a shared
part under larger private updates (spread 3) the Krylov ones. Measured errors: 3e-6 to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge import merge

TOLERANCE = 1e-3  # relative Frobenius error; the fast path reaches about 1e-5


def tsv_m(mats: list[np.ndarray]) -> np.ndarray:
    """TSV-M of T task matrices in float64 from full SVDs."""
    mats = [np.asarray(m, dtype=np.float64) for m in mats]
    t = len(mats)
    k = max(1, min(mats[0].shape) // t)
    us, sigmas, vs = [], [], []
    for m in mats:
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        us.append(u[:, :k])
        sigmas.append(s[:k])
        vs.append(vt[:k].T)

    def polar(x: np.ndarray) -> np.ndarray:  # P Qᵀ of x = P D Qᵀ
        p, _, qt = np.linalg.svd(x, full_matrices=False)
        return p @ qt

    return polar(np.hstack(us)) @ np.diag(np.concatenate(sigmas)) @ polar(np.hstack(vs)).T


def decaying(m: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """An m×n matrix with random singular vectors and σ_j = 1e-2 / j, like a fine-tuning update."""
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return 1e-2 * (u / np.arange(1, r + 1)) @ v.T


def rel_err(actual: torch.Tensor, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual.double().numpy() - expected) / np.linalg.norm(expected))


def task_vectors(mats: list[np.ndarray], dtype: torch.dtype, rng: np.random.Generator) -> list[dict]:
    """One task vector per matrix, with a bias (non-2-D: merged by the weighted mean)."""
    return [{"w": torch.tensor(m, dtype=dtype), "b": torch.tensor(rng.standard_normal(7), dtype=dtype)}
            for m in mats]


def check(mats: list[np.ndarray], dtype: torch.dtype = torch.float32, seed: int = 0, weights=None) -> float:
    rng = np.random.default_rng(seed)
    tvs = task_vectors(mats, dtype, rng)
    out = merge("tsv", tvs, weights=weights)
    assert out["w"].dtype == dtype and out["w"].shape == mats[0].shape
    # the reference sees exactly the values the merge saw (float32 inputs included)
    expected = tsv_m([tv["w"].double().numpy() for tv in tvs])
    err = rel_err(out["w"], expected)
    assert err <= TOLERANCE, err
    p = np.ones(len(mats)) if weights is None else np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    mean = sum(pi * tv["b"].double().numpy() for pi, tv in zip(p, tvs))
    np.testing.assert_allclose(out["b"].double().numpy(), mean, rtol=0,
                               atol=(1e-6 if dtype == torch.float32 else 1e-12) * np.abs(mean).max())
    return err


@pytest.mark.parametrize("shape,tasks", [
    ((400, 300), 8),  # tall, k = 37: block Krylov triplets
    ((300, 500), 8),  # wide, k = 37: block Krylov triplets of the transpose
    ((200, 160), 4),  # k = 40: exact triplets, polar factors by whitening
])
def test_independent_tasks_with_decaying_spectra(shape, tasks):
    rng = np.random.default_rng(sum(shape) + tasks)
    check([decaying(*shape, rng) for _ in range(tasks)])


@pytest.mark.parametrize("spread", [0.3, 3.0])  # mostly shared (alike tasks), and a shared part under noise
@pytest.mark.parametrize("shape,tasks", [((400, 300), 8), ((300, 500), 8), ((200, 160), 4)])
def test_tasks_sharing_a_common_component(shape, tasks, spread):
    # IID-like clients: every task is one common update plus its own, so the tasks' top singular
    # vectors nearly coincide and the concatenated bases are close to singular
    rng = np.random.default_rng(sum(shape) + tasks + 1)
    common = decaying(*shape, rng)
    check([common + spread * decaying(*shape, rng) for _ in range(tasks)], seed=1)


@pytest.mark.slow  # float64 Krylov
def test_float64_inputs_and_client_weights():
    # TSV-M's matrices ignore the weights; the bias is the weighted mean
    rng = np.random.default_rng(5)
    mats = [decaying(400, 300, rng) for _ in range(8)]
    assert check(mats, torch.float64, weights=[1, 2, 3, 4, 5, 6, 7, 8]) <= 1e-6


def test_the_reference_is_tsv_m():
    # sanity of the reference itself: one task is that task's rank-k truncation (k = r), and tasks in
    # orthogonal blocks add up
    rng = np.random.default_rng(9)
    a = decaying(30, 20, rng)
    np.testing.assert_allclose(tsv_m([a]), a, atol=1e-14)
    b = np.zeros((40, 40))
    c = np.zeros((40, 40))
    b[:20, :20], c[20:, 20:] = decaying(20, 20, rng), decaying(20, 20, rng)
    np.testing.assert_allclose(tsv_m([b, c]), b + c, atol=1e-14)
