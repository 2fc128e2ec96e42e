"""Task-vector arithmetic, apply, and safetensors / weights-only file I/O."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
import torch
from torch import nn

from fedmerge import MergeError, TaskVector, apply
from fedmerge.errors import MergeOverflowError
from fedmerge.task_vector import l2_norm


def bn_model(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).state_dict()


def test_between_skips_integer_buffers_and_round_trips():
    base, ft = bn_model(0), bn_model(1)
    tv = TaskVector.between(base, ft)
    assert "1.num_batches_tracked" not in tv and "0.weight" in tv
    rebuilt = tv.apply_to(base, 1.0)
    for k in ft:
        if ft[k].is_floating_point():
            torch.testing.assert_close(rebuilt[k], ft[k])
    assert torch.equal(rebuilt["1.num_batches_tracked"], base["1.num_batches_tracked"])


def test_arithmetic_reads_like_math():
    a = TaskVector({"w": torch.tensor([1.0, 2.0])})
    b = TaskVector({"w": torch.tensor([3.0, -1.0])})
    assert torch.equal((a + b)["w"], torch.tensor([4.0, 1.0]))
    assert torch.equal((a - b)["w"], torch.tensor([-2.0, 3.0]))
    assert torch.equal((-a)["w"], torch.tensor([-1.0, -2.0]))
    assert torch.equal((2 * a)["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(sum([a, b])["w"], torch.tensor([4.0, 1.0]))
    assert a.norm() == pytest.approx(5 ** 0.5)
    flat = TaskVector({"x": torch.ones(2, 2), "y": torch.zeros(1)}).flatten()
    assert torch.equal(flat, torch.tensor([1.0] * 4 + [0]))


def test_apply_scales_and_keeps_dtype():
    base = {"w": torch.tensor([1.0, 1.0], dtype=torch.bfloat16), "n": torch.tensor(3)}
    out = apply(base, {"w": torch.tensor([2.0, -2.0], dtype=torch.bfloat16)}, 0.5)
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"].float(), torch.tensor([2.0, 0.0]))
    assert torch.equal(out["n"], torch.tensor(3))


@pytest.mark.parametrize("merged,needle", [
    ({"x": torch.zeros(2)}, "'x' is not in the base"),
    ({"w": torch.zeros(3)}, "merged shape"),
])
def test_apply_rejects_mismatches(merged, needle):
    with pytest.raises(MergeError, match=needle):
        apply({"w": torch.zeros(2)}, merged, 1.0)


@pytest.mark.parametrize("dtype,value,scale,name", [
    (torch.float32, 1e38, 10.0, "float32"),
    (torch.float16, 1000.0, 100.0, "float16"),
    (torch.float64, 1e307, 1e10, "float64"),
    (torch.float32, 1e-3, -1e308, "float32"),  # λ itself beyond float32
])
def test_apply_whose_result_leaves_the_dtype_is_an_error_naming_tensor_and_scale(dtype, value, scale, name):
    base = {"w": torch.ones(3, dtype=dtype), "ok": torch.ones(2, dtype=dtype)}
    merged = {"w": torch.tensor([value, 0.0, -value], dtype=dtype), "ok": torch.zeros(2, dtype=dtype)}
    with pytest.raises(MergeOverflowError, match=re.escape(f"λ = {scale:g}, tensor 'w',") + f".* {name} "):
        apply(base, merged, scale)


@pytest.mark.parametrize("dtype,b,m,scale", [
    (torch.float32, 3e38, -3.5e37, 10.0),  # λ·τ = -3.5e38 overflows float32, θ0 + λ·τ = -5e37 does not
    (torch.float64, 1.7e308, -1e308, 3.0),  # λ·τ = -3e308 overflows float64, θ0 + λ·τ = -1.3e308 does not
    (torch.float32, 2.0, 0.0, -1e308),  # λ beyond float32 times τ = 0: θ0
])
def test_apply_is_exact_where_scale_times_merged_overflows_but_the_result_fits(dtype, b, m, scale):
    bs, ms = torch.tensor([b], dtype=dtype), torch.tensor([m], dtype=dtype)
    expected = float(Fraction(bs.item()) + Fraction(scale) * Fraction(ms.item()))  # exact, rounded once
    out = apply({"w": bs}, {"w": ms}, scale)["w"]
    assert out.dtype == dtype and out.item() == torch.tensor([expected], dtype=torch.float64).to(dtype).item()


@pytest.mark.parametrize("values", [[1e300, -2e300, 3e299], [1e-300, 2e-310, -5e-324], [1.7e308, 1.7e308]])
def test_norm_of_entries_whose_squares_leave_float64_is_right(values):
    expected = math.hypot(*values)  # Python's hypot scales against over- and underflow
    t = torch.tensor(values, dtype=torch.float64)
    got = l2_norm({"a": t[:1], "b": t[1:]})
    if math.isfinite(expected):
        assert got == pytest.approx(expected, rel=1e-14, abs=0)
    else:  # the norm itself lies beyond float64's range
        assert got == math.inf


def test_safetensors_round_trip(tmp_path):
    tv = TaskVector({"a": torch.randn(3, 2), "b": torch.randn(4, dtype=torch.float64)})
    tv.save(tmp_path / "tv.safetensors")
    back = TaskVector.load(tmp_path / "tv.safetensors")
    assert set(back) == {"a", "b"} and all(torch.equal(back[k], tv[k]) for k in tv)
    assert not list(tmp_path.glob(".*tmp"))  # no staging file left behind
