"""Merging at the edges of floating point: results are finite or a MergeError says why, every input
the checks accept merges without another exception, TIES elects no sign where the summed mass is
zero, and TSV-M gives one answer for float32 and float64 inputs of the same values.

References are written here in numpy float64, sharing no code with fedmerge."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmerge import METHODS, MergeError, merge
from fedmerge.errors import MergeOverflowError
from fedmerge.merging.spectral import singular_task_interference, tsv_merge_matrix, tsv_merge_matrix_reference

FLOAT32_MAX = float(np.finfo(np.float32).max)


def column(values, dtype=torch.float32):
    return [{"w": torch.tensor([v], dtype=dtype)} for v in values]


def options_for(method: str, n: int) -> dict:
    return {"local_steps": [1.0] * n} if method == "fednova" else {}


# --- results that leave the dtype's range ------------------------------------------------------------


@pytest.mark.parametrize("pair", [(3e38, 3e38), (-3e38, -3.2e38), (3e38, -3e38), (3.4e38, 1.0)])
def test_median_of_two_values_near_float32_max_is_their_midpoint(pair):
    out = merge("median", column(pair))["w"]
    expected = np.float32(np.median(np.array(pair, dtype=np.float32).astype(np.float64)))
    assert out.item() == expected


def test_median_and_trimmed_mean_of_float64_values_near_the_maximum():
    values = [1.7e308, 1.6e308, 1.5e308, 1.75e308]
    expected = float(np.median(np.array(values) / 2) * 2)  # numpy's own (a + b)/2 overflows here
    assert merge("median", column(values, torch.float64))["w"].item() == pytest.approx(expected, rel=1e-15)
    assert merge("trimmed_mean", column(values, torch.float64), beta=0.25)["w"].item() == pytest.approx(expected,
                                                                                                       rel=1e-15)


def test_a_sum_whose_partial_sums_overflow_but_whose_result_fits_is_exact():
    values = [3e38, 3e38, -3e38]  # Σ = 3e38 fits float32; 3e38 + 3e38 does not
    expected = np.float32(np.sum(np.array(values, dtype=np.float32).astype(np.float64)))
    assert merge("task_arithmetic", column(values))["w"].item() == expected


@pytest.mark.parametrize("method,values,dtype,needle", [
    ("task_arithmetic", [1e38] * 4, torch.float32, "float32"),  # 4e38
    ("task_arithmetic", [40000.0, 30000.0], torch.float16, "float16"),  # 70000 > 65504
    ("tsv_compress", [1e38] * 4, torch.float32, "float32"),  # four rank-1 copies add up to 4e38
    # σ̄ = 3.6e39 / 3 times an orthogonal 3×3 U Vᵀ, which has an entry of at least 1/√3 in every row
    ("iso_c", [3e38] * 4, torch.float32, "float32"),
    ("iso_cts", [3e38] * 4, torch.float32, "float32"),
])
def test_a_result_beyond_the_dtypes_range_is_an_error_naming_method_tensor_and_dtype(method, values, dtype, needle):
    vectors = [{"w": torch.full((3, 3), v, dtype=dtype)} for v in values]
    with pytest.raises(MergeOverflowError, match=rf"{method}: merged tensor 'w' .*{needle}"):
        merge(method, vectors)


def test_tsv_of_copies_of_one_task_near_float32_max_is_that_task():
    # TSV-M of T copies of one rank-1 task is the task itself (the polar factor of [u … u] is
    # u·1ᵀ/√T), so 3e38 fits float32 although σ = 9e38 and the sum of the copies do not.
    out = merge("tsv", [{"w": torch.full((3, 3), 3e38)} for _ in range(4)])["w"]
    np.testing.assert_allclose(out.double().numpy(), np.full((3, 3), np.float32(3e38), dtype=np.float64), rtol=1e-6)


def iso_c_reference(mats: list[np.ndarray]) -> np.ndarray:
    """Iso-C in numpy float64: σ̄ U Vᵀ of the summed task matrix (Marczak et al., 2025)."""
    u, s, vt = np.linalg.svd(np.sum(mats, axis=0), full_matrices=False)
    return s.mean() * (u @ vt)


def unit_tasks(m: int, n: int, tasks: int, seed: int) -> list[np.ndarray]:
    """Full-rank random task matrices whose largest |entry| over all tasks lies in [0.5, 1)."""
    rng = np.random.default_rng(seed)
    mats = [rng.standard_normal((m, n)) for _ in range(tasks)]
    top = max(np.abs(x).max() for x in mats)
    return [(x / top * 0.75).astype(np.float32).astype(np.float64) for x in mats]


@pytest.mark.parametrize("method", ["tsv", "iso_c"])
def test_spectral_results_beyond_float32_are_errors_and_those_within_are_right(method):
    # Four rank-1 tasks h_i h_iᵀ from the rows of a 4×4 Hadamard matrix: mutually orthogonal, so both
    # rules give their sum, the identity (diagonal 1), from tasks whose entries are ±1/4.
    h = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=np.float64) / 2
    tasks = [np.outer(r, r) for r in h]
    reference = {"tsv": tsv_numerical_rank, "iso_c": iso_c_reference}[method]
    np.testing.assert_allclose(reference(tasks), np.eye(4), atol=1e-12)
    fits = 3e38  # entries ±7.5e37 merge to 3e38 < 3.4e38
    out = merge(method, [{"w": torch.tensor(t * fits, dtype=torch.float32)} for t in tasks])["w"]
    assert rel_err(out, reference([t * fits for t in tasks])) < 1e-6
    with pytest.raises(MergeOverflowError, match=rf"{method}: merged tensor 'w' .*float32"):
        merge(method, [{"w": torch.tensor(t * 3.5e38, dtype=torch.float32)} for t in tasks])


@pytest.mark.parametrize("method", ["tsv", "tsv_compress", "iso_c", "iso_cts"])
@pytest.mark.parametrize("dtype,exponents", [(torch.float32, (100, -100)), (torch.float64, (1000, -1000))])
def test_spectral_rules_merge_very_large_and_very_small_tasks_like_unit_ones(method, dtype, exponents):
    # The spectral rules are homogeneous: merge(2^e Δ) = 2^e merge(Δ). Singular values of 2^100-sized
    # float32 entries square beyond float32's range, and those of 2^1000-sized float64 ones beyond float64's.
    mats = unit_tasks(12, 9, 3, seed=5)
    unit = merge(method, [{"w": torch.tensor(x, dtype=dtype)} for x in mats])["w"].double().numpy()
    for e in exponents:
        out = merge(method, [{"w": torch.tensor(x * 2.0**e, dtype=dtype)} for x in mats])["w"]
        assert rel_err(out.double().numpy() / 2.0**e, unit) < (1e-6 if dtype == torch.float32 else 1e-12)


def test_the_mean_of_values_whose_sum_overflows_float16_is_exact():
    values = [60000.0, 65000.0, 50000.0]  # the float16 sum overflows; the float32 one and the mean do not
    expected = np.float16(np.mean(np.array(values, dtype=np.float16).astype(np.float64)))
    assert merge("fedavg", column(values, torch.float16))["w"].item() == expected


# --- every input the checks accept merges, or is a MergeError ----------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0), (0, 0)])
def test_empty_tensors_merge_to_empty_tensors(method, shape):
    vectors = [{"w": torch.zeros(shape), "b": torch.ones(2) * (i + 1)} for i in range(3)]
    out = merge(method, vectors, **options_for(method, 3))
    assert out["w"].shape == shape and out["w"].dtype == torch.float32
    assert torch.isfinite(out["b"]).all()


def test_fednova_whose_coefficients_leave_every_float_range_is_a_merge_error():
    vectors = [{"w": torch.ones(2)}, {"w": torch.ones(2)}]
    with pytest.raises(MergeError, match="fednova: merged tensor 'w'"):
        merge("fednova", vectors, local_steps=[1e-300, 1])
    # steps that are all tiny normalise away: the mean
    out = merge("fednova", [{"w": torch.ones(2)}, {"w": torch.full((2,), 3.0)}], local_steps=[1e-300, 1e-300])
    assert torch.equal(out["w"], torch.full((2,), 2.0))


@pytest.mark.parametrize("weights", [[1e308, 1e308], [5e-324, 5e-324], [1e308, 5e-324 * 0]])
def test_weights_at_the_ends_of_the_float_range_normalise(weights):
    vectors = [{"w": torch.ones(2)}, {"w": torch.full((2,), 3.0)}]
    w = np.array(weights, dtype=np.float64)
    p = (w / w.max()) / (w / w.max()).sum()
    expected = p[0] * 1.0 + p[1] * 3.0
    assert merge("fedavg", vectors, weights=weights)["w"].tolist() == pytest.approx([expected] * 2)


magnitudes = st.sampled_from([0.0, 5e-324, 1e-310, 1e-40, 1e-8, 1.0, 3e4, 6e4, 1e30, 3e38, 1e300, 1.7e308])
dtypes = st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64])
shapes = st.sampled_from([(), (0,), (3,), (2, 3), (4, 2), (0, 2), (3, 3)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(1, 4), shape=shapes, dtype=dtypes, mixed=st.booleans())
def test_every_rule_returns_finite_tensors_of_the_input_shapes_and_dtypes_or_a_merge_error(data, n, shape, dtype,
                                                                                           mixed):
    size = int(np.prod(shape))

    def tensor(dt):
        values = [data.draw(magnitudes) * data.draw(st.sampled_from([-1.0, 1.0])) for _ in range(size)]
        return torch.tensor(values, dtype=torch.float64).reshape(shape).to(dt)

    vectors = []
    for _ in range(n):
        dt = data.draw(dtypes) if mixed else dtype  # mixed: each client its own dtype
        t = tensor(dt)
        if not bool(torch.isfinite(t).all()):  # a value the dtype cannot hold: the checks refuse it
            t = torch.zeros(shape, dtype=dt)
        vectors.append({"w": t, "b": tensor(dtype).reshape(-1)[:2].clone() if size else torch.ones(2, dtype=dtype)})
    weights = data.draw(st.none() | st.lists(magnitudes.filter(lambda m: m > 0), min_size=n, max_size=n))
    steps = data.draw(st.lists(magnitudes.filter(lambda m: m > 0), min_size=n, max_size=n))
    for method in METHODS:
        opts = {"local_steps": steps} if method == "fednova" else {}
        try:
            out = merge(method, vectors, weights=weights, **opts)
        except MergeError:
            continue
        for key, v in out.items():
            ref = vectors[0][key]
            assert v.shape == ref.shape and v.dtype == ref.dtype, (method, key)
            assert bool(torch.isfinite(v).all()), (method, key)


# --- TIES: the elected sign -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_ties_merges_entries_whose_summed_mass_is_zero_to_zero_in_every_dtype(dtype):
    # Stored values that cancel exactly in every dtype: ±0.1 round to exact negatives, the others are dyadic.
    assert merge("ties", column((-0.1, 0.0, 0.1), dtype), k=1.0)["w"].item() == 0.0
    assert merge("ties", column((0.375, -0.125, 0.25, -0.5, 0.0), dtype), k=1.0)["w"].item() == 0.0
    # weighted: 0.25·0.2 − 0.5·0.2 + 0.25·0.2 = 0
    assert merge("ties", column((0.2, -0.2, 0.2), dtype), weights=[1, 2, 1], k=1.0)["w"].item() == 0.0
    # weights whose p_i = w_i / 6 round: 1·0.25 + 2·0.25 − 3·0.25 = 0, whatever the rounding of p
    assert merge("ties", column((0.25, 0.25, -0.25), dtype), weights=[1, 2, 3], k=1.0)["w"].item() == 0.0


def test_ties_elects_the_sign_of_the_stored_values_mass():
    # 0.3 − 0.1 + 0.2 − 0.4 is 0 in decimal, not in binary: the float32 values sum to +7.45e-9
    # (exactly, in float64), far above their rounding, so the positive side wins: (0.3f + 0.2f) / 2.
    values = (0.3, -0.1, 0.2, -0.4)
    stored = np.array(values, dtype=np.float32).astype(np.float64)
    assert stored.sum() > 1e-9
    out = merge("ties", column(values, torch.float32), k=1.0)["w"].item()
    assert out == np.float32((stored[0] + stored[2]) / 2)
    assert out == np.float32(ties_reference([stored[i:i + 1] for i in range(4)], np.ones(4), 1.0)[0])
    # The float64 values' mass, −2.8e-17, lies within the rounding bound 5·eps·Σ|τ̂| ≈ 1.1e-15 of its
    # float64 sum: no sign is elected (the documented rule), where exact arithmetic would say −.
    assert merge("ties", column(values, torch.float64), k=1.0)["w"].item() == 0.0


def ties_reference(taus: list[np.ndarray], w: np.ndarray, k: float) -> np.ndarray:
    """TIES-Merging in float64 (Yadav et al., 2023): trim to the top-k magnitudes of each task vector,
    elect sign(Σ p_i τ̂_i), take the p-weighted mean of the kept entries of the elected sign, with
    p = w / Σ w. The sign is taken of Σ w_i τ̂_i, exact for the small integer weights and dyadic
    values used here."""
    trimmed = []
    for t in taus:
        keep = max(1, int(np.ceil(k * t.size)))
        threshold = np.sort(np.abs(t).ravel())[::-1][keep - 1]
        trimmed.append(np.where(np.abs(t) >= threshold, t, 0.0))
    stack = np.stack(trimmed)
    sign = np.sign(np.tensordot(w, stack, axes=1))
    p = w / w.sum()
    agree = (stack * sign) > 0
    mass = np.tensordot(p, agree.astype(np.float64), axes=1)
    total = np.tensordot(p, np.where(agree, stack, 0.0), axes=1)
    return np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), 0.0)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-15), (torch.float32, 1e-7)])
@pytest.mark.parametrize("weights", [None, [3, 1, 4, 1, 5]])
def test_ties_agrees_with_a_float64_reference_on_inputs_with_zero_mass_entries(dtype, atol, weights):
    rng = np.random.default_rng(7)
    # values on a coarse dyadic grid, so that many entries' masses cancel exactly
    taus = [rng.integers(-3, 4, size=(40, 30)).astype(np.float64) / 8 for _ in range(5)]
    vectors = [{"w": torch.tensor(t, dtype=dtype)} for t in taus]
    w = np.ones(5) if weights is None else np.asarray(weights, dtype=np.float64)
    for k in (1.0, 0.5):
        expected = ties_reference([v["w"].double().numpy() for v in vectors], w, k)
        got = merge("ties", vectors, weights=weights, k=k)["w"].double().numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


# --- TSV-M on tasks of rank below k ---------------------------------------------------------------------


def low_rank_tasks(m: int, n: int, tasks: int, rank: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, rank, generator=g, dtype=torch.float64)
             @ torch.randn(rank, n, generator=g, dtype=torch.float64)).float() for _ in range(tasks)]


def tsv_numerical_rank(mats: list[np.ndarray]) -> np.ndarray:
    """TSV-M in numpy float64, keeping of each task's top k = max(1, ⌊r/T⌋) triplets those with
    σ > max(m, n) · eps(float32) · σ_1: the documented rule, for every input dtype."""
    t = len(mats)
    m, n = mats[0].shape
    k = max(1, min(m, n) // t)
    us, ss, vs = [], [], []
    for a in mats:
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        keep = s[:k] > max(m, n) * np.finfo(np.float32).eps * s[0]
        us.append(u[:, :k][:, keep])
        ss.append(s[:k][keep])
        vs.append(vt[:k][keep].T)

    def polar(x: np.ndarray) -> np.ndarray:
        p, _, qt = np.linalg.svd(x, full_matrices=False)
        return p @ qt

    return polar(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ polar(np.hstack(vs)).T


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("m,n,tasks,rank", [(10, 8, 2, 1), (40, 30, 4, 1), (120, 100, 4, 2), (300, 200, 8, 5)])
def test_tsv_of_tasks_of_rank_below_k_is_the_same_for_float32_and_float64_inputs(m, n, tasks, rank):
    mats32 = low_rank_tasks(m, n, tasks, rank, seed=m + tasks)
    mats64 = [x.double() for x in mats32]  # the same values
    expected = tsv_numerical_rank([x.numpy().astype(np.float64) for x in mats32])
    for mats, tol in ((mats32, 1e-5), (mats64, 1e-9)):
        assert rel_err(tsv_merge_matrix_reference(mats), expected) < 1e-9
        assert rel_err(tsv_merge_matrix(mats), expected) < tol
        assert rel_err(merge("tsv", [{"w": x} for x in mats])["w"], expected) < tol
    assert singular_task_interference(mats32) == pytest.approx(singular_task_interference(mats64), rel=1e-9)


# --- scaling by the power of two above the largest magnitude --------------------------------------------


def exponent_above(x: float) -> int:
    """The e with 2^(e-1) <= |x| < 2^e, by exact rational comparison (0 for x = 0)."""
    q = abs(Fraction(x))
    if q == 0:
        return 0
    e = q.numerator.bit_length() - q.denominator.bit_length()
    while Fraction(2) ** e <= q:
        e += 1
    while Fraction(2) ** (e - 1) > q:
        e -= 1
    return e


@pytest.mark.parametrize("values", [
    [0.0], [1.0], [0.5, -0.75], [-3.0, 2.0], [1.7e308, 1.0], [5e-324], [1e-310, -2e-310], [1e38, 0.1], [-1024.0],
])
def test_unit_exponent_is_that_of_the_power_of_two_just_above_the_largest_magnitude(values):
    from fedmerge.numerics import scaled_to_unit, unit_exponent
    e = exponent_above(max(values, key=abs))
    assert unit_exponent(values) == e
    assert unit_exponent([torch.tensor(values, dtype=torch.float64), torch.empty(0)]) == e
    scaled = scaled_to_unit(values)
    assert [Fraction(s) for s in scaled] == [Fraction(v) / Fraction(2) ** e for v in values]  # exact
    if any(values):
        assert 0.5 <= max(abs(s) for s in scaled) < 1


def test_unit_exponent_of_tensors_reads_every_entry_and_skips_empty_tensors():
    from fedmerge.numerics import largest_magnitude, unit_exponent
    tensors = [torch.empty(0, 3), torch.tensor([[1.0, -3e38]]), torch.tensor([1e-3], dtype=torch.bfloat16)]
    assert largest_magnitude(tensors) == float(np.float32(3e38))
    assert unit_exponent(tensors) == exponent_above(float(np.float32(3e38))) == 128
    assert unit_exponent([]) == 0 and largest_magnitude([torch.empty(0)]) == 0.0
