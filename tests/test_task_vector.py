"""Task-vector arithmetic, apply, and safetensors / weights-only file I/O."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmerge import CheckpointError, MergeError, TaskVector, apply, load_state, save_state


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
    assert torch.equal(TaskVector({"x": torch.ones(2, 2), "y": torch.zeros(1)}).flatten(), torch.tensor([1.0] * 4 + [0]))


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


def test_torch_state_dict_is_loaded_weights_only(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(bn_model(0), path)
    assert set(load_state(path)) == set(bn_model(0))


@pytest.mark.parametrize("content,name,needle", [
    (b"not a checkpoint", "x.safetensors", "not a readable safetensors file"),
    (b"\x80\x04junk", "x.pt", "not a safetensors file or a weights-only"),
])
def test_bad_files_raise_checkpoint_error(tmp_path, content, name, needle):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=needle):
        load_state(tmp_path / name)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_state(tmp_path / "evil.pt")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_state(tmp_path / "nope.safetensors")


def test_save_state_is_atomic_on_failure(tmp_path):
    path = tmp_path / "x.safetensors"
    save_state({"a": torch.ones(1)}, path)
    with pytest.raises(Exception):
        save_state({"a": "not a tensor"}, path)  # type: ignore[dict-item]
    assert torch.equal(load_state(path)["a"], torch.ones(1))  # the old file survives intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
