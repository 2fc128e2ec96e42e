"""State dicts on disk: safetensors and weights-only PyTorch files, atomic writes, and one
CheckpointError naming the file for anything unreadable, without running pickled code."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fedmerge import CheckpointError, load_state, save_state


def bn_model(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).state_dict()


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


def test_save_state_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    save_state({"a": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="entry 'a' is not a tensor"):
        save_state({"a": "not a tensor"}, path)  # type: ignore[dict-item]

    def half_write(tensors, filename, metadata=None):  # the disk fills up halfway through
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 7)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fedmerge.io.state.save_file", half_write)
    with pytest.raises(OSError):
        save_state({"a": torch.zeros(1)}, path)
    assert torch.equal(load_state(path)["a"], torch.ones(1))  # the old file survives intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # and no temporary is left


@pytest.fixture
def ckpts(tmp_path, write_unreadable_checkpoints):
    """A good checkpoint and unreadable ones: truncated, empty, text, not a checkpoint, pickles."""
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({"fc.weight": torch.zeros(4, 3), "fc.bias": torch.zeros(4)}, str(d / "good.safetensors"))
    write_unreadable_checkpoints(d, d / "good.safetensors")
    return d


@pytest.mark.parametrize("name", ["nope.safetensors", "truncated.safetensors", "empty.safetensors",
                                  "text.safetensors", "notes.txt", "evil.pt", "evil.safetensors"])
def test_load_state_rejects_unreadable_files_without_running_pickles(ckpts, capsys, name):
    with pytest.raises(CheckpointError) as info:
        load_state(ckpts / name)
    assert name in str(info.value) and "\n" not in str(info.value)
    assert "pwned" not in capsys.readouterr().out
