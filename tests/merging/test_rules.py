"""Every merging method against its formula on hand-checkable inputs, and against each other."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge import METHODS, MergeError, merge
from fedmerge.merging.spectral import polar_factor


def tv(**tensors):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}


A = tv(w=[[1.0, 2.0], [3.0, 4.0]], b=[1.0, -1.0])
B = tv(w=[[3.0, 2.0], [1.0, 0.0]], b=[3.0, 1.0])
C = tv(w=[[-1.0, 5.0], [2.0, 2.0]], b=[2.0, 0.0])


def assert_close(actual, expected, atol=1e-6):
    for k in expected:
        torch.testing.assert_close(actual[k], torch.as_tensor(expected[k], dtype=actual[k].dtype), atol=atol, rtol=0)


def test_registry_lists_the_design_methods():
    assert {"task_arithmetic", "fedavg", "fednova", "median", "fedgma", "cclip", "tsv"} <= set(METHODS)


def test_task_arithmetic_is_the_plain_sum_and_ignores_weights():
    out = merge("task_arithmetic", [A, B], weights=[1, 3])
    assert_close(out, {"w": [[4, 4], [4, 4]], "b": [4, 0]})


def test_fedavg_is_the_weighted_mean():
    # p = (1/4, 3/4): 0.25*A + 0.75*B
    out = merge("fedavg", [A, B], weights=[1, 3])
    assert_close(out, {"w": [[2.5, 2.0], [1.5, 1.0]], "b": [2.5, 0.5]})


def test_fedavg_uniform_by_default():
    assert_close(merge("fedavg", [A, B]), {"w": [[2, 2], [2, 2]], "b": [2, 0]})


def test_fednova_normalises_by_local_steps():
    # p = (1/2, 1/2), K = (1, 3): tau_eff = 2, coefficients 2*0.5/1 = 1 and 2*0.5/3 = 1/3
    out = merge("fednova", [A, B], local_steps=[1, 3])
    expected = {k: A[k] * 1.0 + B[k] / 3.0 for k in A}
    assert_close(out, expected)


def test_fednova_with_weights():
    # p = (1/4, 3/4), K = (2, 4): tau_eff = 0.5 + 3 = 3.5; c = 3.5*0.25/2, 3.5*0.75/4
    out = merge("fednova", [A, B], weights=[1, 3], local_steps=[2, 4])
    assert_close(out, {k: A[k] * (3.5 * 0.25 / 2) + B[k] * (3.5 * 0.75 / 4) for k in A})


def test_fednova_equals_fedavg_when_steps_are_equal():
    assert_close(merge("fednova", [A, B, C], weights=[1, 2, 3], local_steps=[7, 7, 7]),
                 merge("fedavg", [A, B, C], weights=[1, 2, 3]))


def test_median_odd_is_the_middle_value():
    assert_close(merge("median", [A, B, C]), {"w": [[1, 2], [2, 2]], "b": [2, 0]})


def test_median_even_is_the_mean_of_the_two_middle_values():
    D = tv(w=[[0, 0], [0, 0]], b=[10, 10])
    # per coordinate sorted values of A, B, C, D; mean of 2nd and 3rd
    assert_close(merge("median", [A, B, C, D]), {"w": [[0.5, 2.0], [1.5, 1.0]], "b": [2.5, 0.5]})


@pytest.mark.parametrize("n", range(1, 11))
def test_the_sorting_network_sorts_every_zero_one_input(n):
    # the 0-1 principle: a comparator network that sorts every 0/1 input sorts every input
    from fedmerge.merging.order import _sorting_network

    for bits in itertools.product((0, 1), repeat=n):
        wires = list(bits)
        for a, b in _sorting_network(n, tuple(range(n))):
            assert a < b
            wires[a], wires[b] = min(wires[a], wires[b]), max(wires[a], wires[b])
        assert wires == sorted(bits)


@pytest.mark.parametrize("shape", [(6, 7), (50, 60)])  # fewer entries than comparators: torch.sort
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 20, 129])
def test_order_statistics_agree_with_sorting(n, shape):
    g = torch.Generator().manual_seed(n)
    vectors = [{"w": torch.randint(-3, 4, shape, generator=g).float()} for _ in range(n)]  # many ties
    ordered = torch.stack([v["w"] for v in vectors]).sort(dim=0).values
    middle = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    median = merge("median", vectors)["w"]
    assert torch.equal(median, middle)
    assert median.untyped_storage().nbytes() == median.numel() * 4  # its own storage, not a stack's view
    assert all(median.untyped_storage().data_ptr() != v["w"].untyped_storage().data_ptr() for v in vectors)
    cut = math.floor(0.2 * n)
    torch.testing.assert_close(merge("trimmed_mean", vectors, beta=0.2)["w"], ordered[cut:n - cut].mean(dim=0))


def test_median_of_two_is_their_mean():
    assert_close(merge("median", [A, B]), merge("fedavg", [A, B]))


def test_fedgma_soft_mask_by_sign_agreement():
    x = tv(v=[1.0, 1.0, 2.0, 0.0])
    y = tv(v=[1.0, -1.0, 2.0, 0.0])
    z = tv(v=[1.0, 1.0, -4.0, 0.0])
    # sum of signs: 3, 1, 1, 0 -> A = 1, 1/3, 1/3, 0; mean = (1, 1/3, 0, 0)
    out = merge("fedgma", [x, y, z], rho=0.5)
    assert_close(out, {"v": [1.0, (1 / 3) * (1 / 3), 0.0, 0.0]})
    # rho = 1/3 keeps coordinates with A >= 1/3 at full weight
    assert_close(merge("fedgma", [x, y, z], rho=1 / 3 - 1e-9), {"v": [1.0, 1 / 3, 0.0, 0.0]})


def test_fedgma_rho_zero_is_fedavg():
    assert_close(merge("fedgma", [A, B, C], weights=[1, 2, 3], rho=0.0), merge("fedavg", [A, B, C], weights=[1, 2, 3]))


def test_cclip_clips_each_task_vector_to_rho():
    x, y = tv(v=[3.0, 4.0]), tv(v=[1.0, 0.0])  # norms 5 and 1
    # rho = 2: factors 0.4 and 1; uniform p: 0.5*(1.2, 1.6) + 0.5*(1, 0)
    assert_close(merge("cclip", [x, y], rho=2.0), {"v": [1.1, 0.8]})


def test_cclip_default_rho_is_the_median_norm():
    x, y, z = tv(v=[3.0, 4.0]), tv(v=[1.0, 0.0]), tv(v=[0.0, 2.0])  # norms 5, 1, 2
    assert_close(merge("cclip", [x, y, z]), merge("cclip", [x, y, z], rho=2.0))


def test_cclip_with_large_rho_is_fedavg():
    assert_close(merge("cclip", [A, B, C], rho=1e6), merge("fedavg", [A, B, C]))


def test_tsv_of_one_task_is_that_task():
    torch.manual_seed(0)
    x = {"w": torch.randn(5, 4), "b": torch.randn(4)}
    assert_close(merge("tsv", [x]), x, atol=1e-5)


def test_tsv_of_orthogonal_tasks_is_their_sum():
    # task 1 lives in rows/cols {0}, task 2 in {1}: singular vectors already orthogonal
    x = tv(w=[[3.0, 0.0], [0.0, 0.0]])
    y = tv(w=[[0.0, 0.0], [0.0, 2.0]])
    assert_close(merge("tsv", [x, y]), {"w": [[3.0, 0.0], [0.0, 2.0]]})


def tsv_reference(mats: list[np.ndarray]) -> np.ndarray:
    """TSV-M written independently from the paper's Algorithm 1, in numpy float64."""
    t = len(mats)
    k = max(1, min(mats[0].shape) // t)
    us, ss, vs = [], [], []
    for m in mats:
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vt[:k].T)
    u_hat, s_hat, v_hat = np.hstack(us), np.concatenate(ss), np.hstack(vs)

    def whiten(x):  # X (XᵀX)^(-1/2), Proposition 4.1 of the paper
        w, q = np.linalg.eigh(x.T @ x)
        return x @ q @ np.diag(w ** -0.5) @ q.T

    return whiten(u_hat) @ np.diag(s_hat) @ whiten(v_hat).T


@pytest.mark.parametrize("shape,tasks", [((8, 6), 3), ((6, 9), 2), ((12, 12), 4)])
def test_tsv_matches_an_independent_reference(shape, tasks):
    rng = np.random.default_rng(1)
    mats = [rng.normal(size=shape) for _ in range(tasks)]
    vectors = [{"w": torch.tensor(m, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64) * i}
               for i, m in enumerate(mats)]
    out = merge("tsv", vectors)
    np.testing.assert_allclose(out["w"].numpy(), tsv_reference(mats), atol=1e-10)
    np.testing.assert_allclose(out["b"].numpy(), np.ones(3) * np.mean(range(tasks)))  # non-matrix: mean


def test_tsv_keeps_one_triplet_when_tasks_outnumber_the_rank():
    rng = np.random.default_rng(2)
    mats = [rng.normal(size=(2, 5)) for _ in range(3)]  # rank 2 < 3 tasks: k = max(1, 0) = 1
    out = merge("tsv", [{"w": torch.tensor(m)} for m in mats])
    # with k = 1 the concatenated left factor is 2×3: its polar factor P Qᵀ has orthonormal rows
    u = np.hstack([np.linalg.svd(m)[0][:, :1] for m in mats])
    s = np.array([np.linalg.svd(m)[1][0] for m in mats])
    v = np.hstack([np.linalg.svd(m)[2][:1].T for m in mats])
    p = polar_factor(torch.tensor(u)).numpy()
    np.testing.assert_allclose(p @ p.T, np.eye(2), atol=1e-10)

    def polar(x):  # written out from the SVD, independently of the code under test
        a, _, bt = np.linalg.svd(x, full_matrices=False)
        return a @ bt

    np.testing.assert_allclose(out["w"].numpy(), polar(u) @ np.diag(s) @ polar(v).T, atol=1e-8)


def test_polar_factor_has_orthonormal_columns_and_is_nearest():
    torch.manual_seed(0)
    x = torch.randn(7, 3, dtype=torch.float64)
    p = polar_factor(x)
    torch.testing.assert_close(p.T @ p, torch.eye(3, dtype=torch.float64))
    q, _ = torch.linalg.qr(x)  # another orthonormal basis of the same span is farther from x
    assert torch.linalg.norm(p - x) <= torch.linalg.norm(q - x) + 1e-12


@pytest.mark.parametrize("method", sorted(METHODS))
def test_inputs_are_not_mutated_and_dtypes_are_kept(method):
    vectors = [
        {"w": torch.randn(4, 3, dtype=torch.float16), "b": torch.randn(3, dtype=torch.bfloat16),
         "d": torch.randn(2, dtype=torch.float64)}
        for _ in range(3)
    ]
    before = [{k: v.clone() for k, v in x.items()} for x in vectors]
    opts = {"local_steps": [1, 2, 3]} if method == "fednova" else {}
    out = merge(method, vectors, **opts)
    for x, y in zip(vectors, before):
        for k in x:
            assert torch.equal(x[k], y[k])
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in vectors[0].items()}


def test_task_arithmetic_is_n_times_uniform_fedavg():
    n = 3
    assert_close(merge("task_arithmetic", [A, B, C]), {k: n * v for k, v in merge("fedavg", [A, B, C]).items()},
                 atol=1e-5)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("vectors,needle", [
    ([], "no task vectors"),
    ([A, {"w": A["w"]}], "client 1: tensor 'b' is missing"),
    ([A, {**B, "x": torch.zeros(1)}], "client 1: unexpected tensor 'x'"),
    ([A, {"w": torch.zeros(3, 2), "b": B["b"]}], "client 1, tensor 'w': shape"),
    ([A, {"w": B["w"], "b": torch.tensor([float("nan"), 0.0])}], "client 1, tensor 'b': contains NaN"),
    ([A, {"w": B["w"], "b": torch.tensor([1, 2])}], "client 1, tensor 'b': dtype torch.int64"),
])
def test_bad_task_vectors_name_client_and_tensor(vectors, needle):
    with pytest.raises(MergeError, match=needle.replace("(", r"\(")):
        merge("fedavg", vectors)


@pytest.mark.parametrize("call,needle", [
    (lambda: merge("nope", [A]), "unknown merging method 'nope'"),
    (lambda: merge("fedavg", [A], rho=1), "unknown option 'rho'"),
    (lambda: merge("fednova", [A, B]), "required option 'local_steps'"),
    (lambda: merge("fednova", [A, B], local_steps=[1]), "local_steps has 1 entries for 2 clients"),
    (lambda: merge("fednova", [A, B], local_steps=[1, 0]), r"local_steps\[1\] \(client 1\)"),
    (lambda: merge("fedavg", [A, B], weights=[1, -1]), r"weights\[1\]"),
    (lambda: merge("fedavg", [A, B], weights=[0, 0]), "weights sum to zero"),
    (lambda: merge("fedgma", [A, B], rho=1.5), r"rho must lie in \[0.0, 1.0\]"),
    (lambda: merge("cclip", [A, B], rho=-1), r"^cclip: rho must be a finite number >= 0.0, got -1.0$"),
    (lambda: merge("cclip", [A, B], rho=float("inf")), r"^cclip: rho must be a finite number >= 0.0, got inf$"),
    (lambda: merge("cclip", [A, B], rho=float("nan")), r"^cclip: rho must be a finite number >= 0.0, got nan$"),
    (lambda: merge("fedavg", A), "sequence of task vectors"),
])
def test_bad_options_raise_merge_error(call, needle):
    with pytest.raises(MergeError, match=needle):
        call()


def test_merge_error_is_a_value_error():
    assert issubclass(MergeError, ValueError)


# --- property: random valid inputs never crash nor produce non-finite values ------------------------

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5),
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    data=st.data(),
)
def test_random_valid_task_vectors_merge_to_finite_values(n, rows, cols, data):
    def one():
        w = data.draw(st.lists(finite, min_size=rows * cols, max_size=rows * cols))
        b = data.draw(st.lists(finite, min_size=cols, max_size=cols))
        return {"w": torch.tensor(w).reshape(rows, cols), "b": torch.tensor(b)}

    vectors = [one() for _ in range(n)]
    weights = data.draw(st.lists(st.floats(0.1, 10), min_size=n, max_size=n))
    steps = data.draw(st.lists(st.integers(1, 100), min_size=n, max_size=n))
    for method in METHODS:
        opts = {"local_steps": steps} if method == "fednova" else {}
        out = merge(method, vectors, weights=weights, **opts)
        for k, v in out.items():
            assert v.shape == vectors[0][k].shape
            assert torch.isfinite(v).all(), (method, k)
