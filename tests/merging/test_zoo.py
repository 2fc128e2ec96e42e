"""The merging zoo (trimmed_mean, ties, tsv_compress, iso_c, iso_cts) and the interference measure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmerge import METHODS, MergeError, merge
from fedmerge.merging.spectral import interference, tsv_compress_storage
from strategies import OneShotMerge


def tv(**tensors):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in tensors.items()}


def assert_close(actual, expected, atol=1e-9):
    for k in expected:
        torch.testing.assert_close(actual[k], torch.as_tensor(expected[k], dtype=actual[k].dtype), atol=atol, rtol=0)


def random_tvs(n, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(*shape, generator=g, dtype=torch.float64),
             "b": torch.randn(shape[1], generator=g, dtype=torch.float64)} for _ in range(n)]


NEW = ("trimmed_mean", "ties", "tsv_compress", "iso_c", "iso_cts")


def test_every_new_method_is_registered_with_a_natural_scale_and_a_flower_strategy():
    for name in NEW:
        assert METHODS[name].natural_scale in ("sum", "mean")
        assert OneShotMerge.single(name).methods == (name,)
    assert OneShotMerge.single("ties", k=0.5).method_options == {"ties": {"k": 0.5}}


# --- trimmed mean -----------------------------------------------------------------------------------


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    vals = [[1.0, 10.0], [2.0, -5.0], [3.0, 0.0], [100.0, 1.0], [-50.0, 2.0]]
    vectors = [tv(v=v) for v in vals]
    # beta = 0.2, n = 5: drop 1 lowest and 1 highest per coordinate
    assert_close(merge("trimmed_mean", vectors, beta=0.2), {"v": [(1 + 2 + 3) / 3, (0 + 1 + 2) / 3]})
    # beta = 0.1: floor(0.5) = 0 dropped: the plain mean
    assert_close(merge("trimmed_mean", vectors, beta=0.1), {"v": np.mean(vals, axis=0)})


def test_trimmed_mean_with_beta_zero_is_uniform_fedavg_and_ignores_weights():
    vectors = random_tvs(4)
    assert_close(merge("trimmed_mean", vectors, weights=[1, 2, 3, 4], beta=0.0), merge("fedavg", vectors))


def test_trimmed_mean_of_one_is_that_one_and_near_half_is_the_median_for_odd_n():
    vectors = random_tvs(5)
    assert_close(merge("trimmed_mean", vectors[:1], beta=0.4), vectors[0])
    assert_close(merge("trimmed_mean", vectors, beta=0.49), merge("median", vectors))


# --- TIES ---------------------------------------------------------------------------------------------


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    x = tv(v=[4.0, -1.0, 3.0, 0.5])
    y = tv(v=[2.0, 3.0, -1.0, -2.0])
    z = tv(v=[-1.0, 2.0, -1.0, 0.1])
    # k = 0.5 of d = 4: each keeps its 2 largest magnitudes
    # x -> [4, 0, 3, 0], y -> [2, 3, 0, -2]; z's magnitudes [1, 2, 1, 0.1] have 2nd largest 1, and ties at
    # the threshold are kept: z -> [-1, 2, -1, 0]
    # sums: [5, 5, 2, -2] -> signs [+, +, +, -]
    # coord 0: agreeing 4, 2 -> 3; coord 1: 3, 2 -> 2.5; coord 2: only x (3) agrees -> 3; coord 3: y -> -2
    assert_close(merge("ties", [x, y, z], k=0.5), {"v": [3.0, 2.5, 3.0, -2.0]})


def test_ties_threshold_is_over_the_whole_task_vector():
    a = {"big": torch.tensor([10.0, 9.0]), "small": torch.tensor([0.1, 0.2])}
    out = merge("ties", [a], k=0.5)  # top 2 of 4 entries, both in "big": "small" is trimmed entirely
    assert_close(out, {"big": [10.0, 9.0], "small": [0.0, 0.0]})


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float64, torch.float32), (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("k", [1e-6, 0.2, 0.5, 1.0])
def test_ties_thresholds_are_the_exact_order_statistic_of_all_magnitudes(dtypes, k):
    from fedmerge.merging.ties import ties_thresholds

    g = torch.Generator().manual_seed(len(dtypes))
    tv = {f"t{i}": (torch.randn(37, 11, generator=g) * 10 ** i).round(decimals=2).to(dt) for i, dt in enumerate(dtypes)}
    tv["zeros"] = torch.zeros(50)  # many equal entries, -0.0 among them
    tv["zeros"][::2] = -0.0
    if torch.float64 in dtypes:  # beyond float32's range both ways, where its buckets saturate
        tv["extreme"] = torch.tensor([1e300, -1e-300, 3e38, 3.5e38, 1e-46, 2e-46] * 20, dtype=torch.float64)
    work = torch.float64 if torch.float64 in dtypes else torch.float32
    flat = torch.cat([t.reshape(-1).to(work).abs() for t in tv.values()])
    keep = max(1, math.ceil(k * flat.numel()))
    expected = flat.sort(descending=True).values[keep - 1].item()
    assert ties_thresholds([tv], k) == [expected]


def test_ties_with_k_one_and_agreeing_signs_is_the_weighted_mean():
    vectors = [{k: v.abs() + 0.1 for k, v in x.items()} for x in random_tvs(3)]
    assert_close(merge("ties", vectors, k=1.0), merge("fedavg", vectors))
    assert_close(merge("ties", vectors, weights=[1, 2, 5], k=1.0), merge("fedavg", vectors, weights=[1, 2, 5]))


def test_ties_sign_tie_merges_to_zero_and_n_one_is_the_trimmed_vector():
    x, y = tv(v=[1.0, 2.0]), tv(v=[-1.0, 2.0])
    assert_close(merge("ties", [x, y], k=1.0), {"v": [0.0, 2.0]})
    assert_close(merge("ties", [tv(v=[5.0, -1.0, 0.5, 3.0])], k=0.5), {"v": [5.0, 0.0, 0.0, 3.0]})


# --- TSV-C ---------------------------------------------------------------------------------------------


def test_tsv_compress_sums_each_tasks_rank_k_approximation():
    vectors = random_tvs(2, shape=(6, 4))  # r = 4, T = 2: k = 2 triplets per task
    expected = np.zeros((6, 4))
    for x in vectors:
        u, s, vt = np.linalg.svd(x["w"].numpy(), full_matrices=False)
        expected += u[:, :2] @ np.diag(s[:2]) @ vt[:2]
    out = merge("tsv_compress", vectors)
    np.testing.assert_allclose(out["w"].numpy(), expected, atol=1e-10)
    assert_close(out, {"b": (vectors[0]["b"] + vectors[1]["b"]) / 2})  # non-matrix: the mean


def test_tsv_compress_of_one_task_is_that_task_and_rank_below_tasks_keeps_one_triplet():
    one = random_tvs(1)
    assert_close(merge("tsv_compress", one), one[0])
    vectors = random_tvs(3, shape=(2, 5))  # rank 2 < 3 tasks: k = 1
    expected = sum(np.outer(*(lambda u, s, vt: (u[:, 0] * s[0], vt[0]))(*np.linalg.svd(x["w"].numpy())))
                   for x in vectors)
    np.testing.assert_allclose(merge("tsv_compress", vectors)["w"].numpy(), expected, atol=1e-10)


def test_tsv_compress_storage_counts_u_sigma_v_per_matrix():
    vectors = [{"w": torch.zeros(10, 6), "b": torch.zeros(6)} for _ in range(3)]  # k = 2
    report = tsv_compress_storage(vectors)
    assert report.dense_values == 66 and report.compressed_values == 2 * (10 + 6 + 1) + 6
    assert report.ratio == pytest.approx(40 / 66) and report.total_ratio == pytest.approx(3 * 40 / 66)


# --- Iso-C and Iso-CTS -----------------------------------------------------------------------------------


def test_iso_c_flattens_the_spectrum_of_the_sum():
    vectors = random_tvs(3)
    total = sum(x["w"] for x in vectors).numpy()
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    out = merge("iso_c", vectors)
    np.testing.assert_allclose(out["w"].numpy(), s.mean() * u @ vt, atol=1e-10)
    np.testing.assert_allclose(np.linalg.svd(out["w"].numpy(), compute_uv=False), np.full(5, s.mean()), atol=1e-10)
    assert_close(out, {"b": sum(x["b"] for x in vectors) / 3})


def test_iso_c_hand_checked_and_weighted():
    # sum = diag(3, 1): singular values 3 and 1 -> mean 2 -> 2·I
    assert_close(merge("iso_c", [tv(w=[[2.0, 0.0], [0.0, 0.0]]), tv(w=[[1.0, 0.0], [0.0, 1.0]])]),
                 {"w": [[2.0, 0.0], [0.0, 2.0]]})
    # weights (3, 1): N Σ p_i Δ_i = 2·(0.75·diag(2, 0) + 0.25·I) = diag(3.5, 0.5) -> 2·I again
    assert_close(merge("iso_c", [tv(w=[[2.0, 0.0], [0.0, 0.0]]), tv(w=[[1.0, 0.0], [0.0, 1.0]])], weights=[3, 1]),
                 {"w": [[2.0, 0.0], [0.0, 2.0]]})


def iso_cts_reference(mats, fraction):
    """Iso-CTS written from the paper's description, in numpy."""
    r, t = min(mats[0].shape), len(mats)
    per_task = min(round((r - int(np.floor(fraction * r))) / t), r // t)
    common = r - per_task * t
    u, s, vt = np.linalg.svd(sum(mats), full_matrices=False)
    us, ss, vs = [u[:, :common]], [s[:common]], [vt[:common].T]
    for m in mats:
        res = m - u[:, :common] @ u[:, :common].T @ m
        a, b, c = np.linalg.svd(res, full_matrices=False)
        us.append(a[:, :per_task]), ss.append(b[:per_task]), vs.append(c[:per_task].T)

    def polar(x):
        p, _, q = np.linalg.svd(x, full_matrices=False)
        return p @ q

    return np.concatenate(ss).mean() * polar(np.hstack(us)) @ polar(np.hstack(vs)).T


@pytest.mark.parametrize("shape,tasks,fraction", [((12, 10), 2, 0.8), ((9, 12), 3, 0.5), ((8, 8), 4, 0.0)])
def test_iso_cts_matches_an_independent_reference(shape, tasks, fraction):
    vectors = random_tvs(tasks, shape=shape, seed=4)
    out = merge("iso_cts", vectors, common_space_fraction=fraction)
    np.testing.assert_allclose(out["w"].numpy(), iso_cts_reference([x["w"].numpy() for x in vectors], fraction),
                               atol=1e-9)
    # the spectrum is isotropic
    s = np.linalg.svd(out["w"].numpy(), compute_uv=False)
    np.testing.assert_allclose(s, np.full_like(s, s[0]), atol=1e-9)


def test_iso_cts_with_the_whole_rank_common_is_iso_c_and_one_task_works():
    vectors = random_tvs(3)
    assert_close(merge("iso_cts", vectors, common_space_fraction=1.0), merge("iso_c", vectors))
    one = merge("iso_cts", random_tvs(1))
    assert torch.isfinite(one["w"]).all()


# --- interference -------------------------------------------------------------------------------------------


def test_interference_of_orthogonal_tasks_is_zero():
    # block-diagonal tasks: disjoint row and column spaces
    a = torch.zeros(6, 6, dtype=torch.float64)
    b = torch.zeros(6, 6, dtype=torch.float64)
    a[:3, :3] = torch.randn(3, 3, dtype=torch.float64)
    b[3:, 3:] = torch.randn(3, 3, dtype=torch.float64)
    per_layer, total = interference([{"w": a, "v": torch.ones(2)}, {"w": b, "v": torch.zeros(2)}])
    assert set(per_layer) == {"w"} and total == pytest.approx(0.0, abs=1e-10)


def test_interference_of_collinear_rank_one_tasks_is_two_sigma():
    # Δ1 = Δ2 = σ u vᵀ: UᵀU − I = VᵀV − I = [[0, 1], [1, 0]], so the product is σ I and ‖·‖₁ = 2σ
    u, v = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    d = 3.0 * torch.outer(u, v)
    _, total = interference([{"w": d}, {"w": d}])
    assert total == pytest.approx(6.0)


def test_interference_matches_eq_6_on_random_tasks():
    vectors = random_tvs(3, shape=(7, 6))  # k = 2 per task
    us, ss, vs = [], [], []
    for x in vectors:
        u, s, vt = np.linalg.svd(x["w"].numpy(), full_matrices=False)
        us.append(u[:, :2]), ss.append(s[:2]), vs.append(vt[:2].T)
    u, v, s = np.hstack(us), np.hstack(vs), np.concatenate(ss)
    eye = np.eye(6)
    expected = np.abs((u.T @ u - eye) @ np.diag(s) @ (v.T @ v - eye)).sum()
    per_layer, total = interference(vectors)
    assert total == pytest.approx(expected) and per_layer["w"] == pytest.approx(expected)
    assert interference(vectors[:1])[1] == pytest.approx(0.0, abs=1e-9)  # one task: U, V orthonormal


# --- options ----------------------------------------------------------------------------------------------


A, B = random_tvs(2)


@pytest.mark.parametrize("method,options,needle", [
    ("trimmed_mean", {"beta": 0.5}, r"trimmed_mean: beta must lie in \[0.0, 0.5\), got 0.5"),
    ("trimmed_mean", {"beta": -0.1}, "beta must lie"),
    ("trimmed_mean", {"beta": "x"}, "trimmed_mean: beta must be a number, got 'x'"),
    ("ties", {"k": 0.0}, r"ties: k must lie in \(0.0, 1.0\], got 0.0"),
    ("ties", {"k": 1.5}, "k must lie"),
    ("ties", {"k": float("nan")}, "k must lie"),
    ("iso_cts", {"common_space_fraction": 1.2}, r"iso_cts: common_space_fraction must lie in \[0.0, 1.0\]"),
    ("iso_c", {"k": 1}, "unknown option 'k'"),
])
def test_bad_options_name_the_option_and_value(method, options, needle):
    with pytest.raises(MergeError, match=needle):
        merge(method, [A, B], **options)
