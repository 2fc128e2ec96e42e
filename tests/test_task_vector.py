"""Task-vector arithmetic, apply, and safetensors / weights-only file I/O."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmerge import MergeError, TaskVector, apply


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


def test_safetensors_round_trip(tmp_path):
    tv = TaskVector({"a": torch.randn(3, 2), "b": torch.randn(4, dtype=torch.float64)})
    tv.save(tmp_path / "tv.safetensors")
    back = TaskVector.load(tmp_path / "tv.safetensors")
    assert set(back) == {"a", "b"} and all(torch.equal(back[k], tv[k]) for k in tv)
    assert not list(tmp_path.glob(".*tmp"))  # no staging file left behind
