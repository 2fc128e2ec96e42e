"""Verified files: the digest covers names, dtypes, shapes, bytes and metadata; a cache entry that
fails verification is named in one warning, deleted and reported as absent."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fedmerge import CheckpointError
from fedmerge.io.state import DIGEST_KEY, load_verified, read_cache_entry, save_verified


def state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"b": torch.randn(3, generator=gen), "a": torch.randn(2, 4, generator=gen, dtype=torch.float64),
            "h": torch.randn(5, generator=gen).to(torch.bfloat16), "n": torch.tensor(7)}


def test_round_trip_keeps_tensors_dtypes_and_metadata(tmp_path):
    tensors, meta = state(), {"accuracy": "0.5"}
    save_verified(tensors, tmp_path / "x.safetensors", metadata=meta)
    got, got_meta = load_verified(tmp_path / "x.safetensors")
    assert got_meta == meta and set(got) == set(tensors)
    assert all(torch.equal(got[k], tensors[k]) and got[k].dtype == tensors[k].dtype for k in tensors)


@pytest.mark.parametrize("change", ["rename", "dtype", "shape", "metadata"])
def test_digest_covers_names_dtypes_shapes_and_metadata(tmp_path, change):
    tensors, meta = {"w": torch.arange(4.0)}, {"steps": "3"}
    save_verified(tensors, tmp_path / "x.safetensors", metadata=meta)
    from safetensors import safe_open

    with safe_open(tmp_path / "x.safetensors", framework="pt") as fh:
        digest = fh.metadata()[DIGEST_KEY]
    other = {"rename": ({"v": torch.arange(4.0)}, meta), "dtype": ({"w": torch.arange(4.0).double()}, meta),
             "shape": ({"w": torch.arange(4.0).reshape(2, 2)}, meta), "metadata": (tensors, {"steps": "4"})}[change]
    save_file(other[0], str(tmp_path / "x.safetensors"), metadata={**other[1], DIGEST_KEY: digest})
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_verified(tmp_path / "x.safetensors")


def test_writer_refuses_non_finite_values(tmp_path):
    with pytest.raises(CheckpointError, match="'w' contains NaN or Inf"):
        save_verified({"w": torch.tensor([1.0, float("inf")])}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content,needle", [
    ("truncated", "not a readable safetensors file"), ("plain", "carries no checksum"),
    ("nan", "contains NaN or Inf"),
])
def test_bad_cache_entry_is_named_deleted_and_absent(tmp_path, caplog, content, needle):
    path = tmp_path / "entry.safetensors"
    save_verified({"w": torch.ones(8)}, path)
    if content == "truncated":
        path.write_bytes(path.read_bytes()[:-5])
    elif content == "plain":
        save_file({"w": torch.ones(8)}, str(path))
    else:  # a NaN under a digest that matches it: only the finiteness check stands in the way
        from fedmerge.io.state import state_digest

        bad = {"w": torch.tensor([1.0, float("nan")])}
        save_file(bad, str(path), metadata={DIGEST_KEY: state_digest(bad)})
    with caplog.at_level(logging.WARNING):
        assert read_cache_entry(path, lambda tensors, meta: tensors) is None
    (record,) = caplog.records
    assert str(path) in record.getMessage() and needle in record.getMessage()
    assert not path.exists()


def test_entry_the_caller_rejects_is_discarded(tmp_path, caplog):
    path = tmp_path / "entry.safetensors"
    save_verified({"w": torch.ones(2)}, path)
    with caplog.at_level(logging.WARNING):
        assert read_cache_entry(path, lambda tensors, meta: int(meta["missing"])) is None
    assert "KeyError" in caplog.text and not path.exists()
    assert read_cache_entry(path, lambda tensors, meta: tensors) is None  # absent: no warning
    assert len(caplog.records) == 1


def test_tampered_zero_shot_head_is_not_used(tmp_path, caplog):
    """A head entry whose values changed is discarded: the head is recomputed from the model (here a
    model that does not exist, so the recomputation says so) instead of the changed one being used."""
    from fedmerge.models.clip import head_key, zero_shot_head

    source, classes, templates = str(tmp_path / "no-clip-here"), ["cat", "dog"], ["a {c}."]
    path = tmp_path / "cache" / "heads" / f"{head_key(source, classes, templates)}.safetensors"
    save_verified({"head": torch.ones(2, 4)}, path)
    assert torch.equal(zero_shot_head(source, classes, templates, tmp_path / "cache"), torch.ones(2, 4))
    raw = bytearray(path.read_bytes())
    raw[-4:] = np.float32(5.0).tobytes()  # the last value, header intact
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError, match="no such model directory"):
        zero_shot_head(source, classes, templates, tmp_path / "cache")
    assert str(path) in caplog.text and not path.exists()


@pytest.mark.parametrize("kind", ["directory", "dangling link"])
def test_something_else_at_an_entrys_path_is_named_removed_and_absent(tmp_path, caplog, kind):
    path = tmp_path / "entry.safetensors"
    if kind == "directory":
        (path / "inside").mkdir(parents=True)
    else:
        path.symlink_to(tmp_path / "nowhere")
    with caplog.at_level(logging.WARNING):
        assert read_cache_entry(path, lambda tensors, meta: tensors) is None
    assert str(path) in caplog.text and "not a file" in caplog.text
    assert not path.exists() and not path.is_symlink()
    save_verified({"w": torch.ones(2)}, path)  # the entry can be written again
    assert torch.equal(read_cache_entry(path, lambda tensors, meta: tensors)["w"], torch.ones(2))
