"""The task-vector and pre-trained-base caches are verified when read: an entry whose values changed
(header intact), that holds NaN, is truncated or carries no checksum is named, discarded and
recomputed, and the run's result is the one it would have had without a cache."""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedmerge import ConfigError, merge
from fedmerge.data import DataSpec, Split, load_federated
from fedmerge.models import build_model
from fedmerge.train import PretrainSpec, TrainPlan, pretrained_base
from fedmerge.train.local import local_update

DAMAGES = ["values", "nan", "truncated", "no-checksum"]


@pytest.fixture(scope="module")
def data():
    return load_federated(DataSpec(num_clients=3, seed=0))


def damage(path: Path, how: str) -> None:
    """Change a safetensors file on disk the way a bad disk, an old version or a hand would: read
    the header (8-byte little-endian length, JSON) and edit the raw float32 bytes behind it."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = max((k for k in header if k != "__metadata__"), key=lambda k: np.prod(header[k]["shape"]))
    assert header[name]["dtype"] == "F32"
    start, end = (8 + n + o for o in header[name]["data_offsets"])
    values = np.frombuffer(bytes(raw[start:end]), dtype="<f4").copy()
    if how == "values":
        values = -3.0 * values + 0.01  # same header, every number of one tensor changed
    elif how == "nan":
        values[len(values) // 2] = np.nan
    elif how == "truncated":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
        return
    elif how == "no-checksum":  # as an older fedmerge wrote it: same tensors, metadata without a digest
        meta = {k: v for k, v in header.get("__metadata__", {}).items() if "sha256" not in k}
        save_file(load_file(path), str(path), metadata=meta)
        return
    raw[start:end] = values.astype("<f4").tobytes()
    path.write_bytes(bytes(raw))


def updates(data, base, cache_dir):
    plan = TrainPlan(local_steps=8, lr=0.05)
    return [local_update("mlp", base, client, plan, 0, data.input_shape, data.num_classes, cache_dir=cache_dir)
            for client in data.clients]


def warned_files(caplog) -> set[str]:
    return {r.getMessage().split(" ")[2].rstrip(":") for r in caplog.records if r.levelno == logging.WARNING}


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_task_vector_entries_are_recomputed(data, tmp_path, caplog, how):
    base = build_model("mlp", data.input_shape, data.num_classes, seed=0).state_dict()
    reference = updates(data, base, None)
    updates(data, base, tmp_path)
    entries = sorted((tmp_path / "task-vectors").iterdir())
    assert len(entries) == len(data.clients)
    for path in entries:
        damage(path, how)
    with caplog.at_level(logging.WARNING):
        again = updates(data, base, tmp_path)
    assert [u.cached for u in again] == [False] * len(entries)
    assert warned_files(caplog) == {str(p) for p in entries}  # each bad entry named once
    for method in ("ties", "fedavg"):
        want = merge(method, [u.task_vector for u in reference])
        got = merge(method, [u.task_vector for u in again])
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert [u.accuracy for u in again] == [u.accuracy for u in reference]
    third = updates(data, base, tmp_path)  # the rewritten entries are good again
    assert all(u.cached for u in third)
    assert all(torch.equal(a.task_vector[k], b.task_vector[k]) for a, b in zip(third, reference) for k in a.task_vector)


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_base_entry_is_retrained(data, tmp_path, caplog, how):
    spec = PretrainSpec(steps=20)
    first, _ = pretrained_base(spec, "mlp", 0, data, tmp_path)
    (path,) = tmp_path.glob("base-*.safetensors")
    damage(path, how)
    with caplog.at_level(logging.WARNING):
        second, cached = pretrained_base(spec, "mlp", 0, data, tmp_path)
    assert cached is False and warned_files(caplog) == {str(path)}
    assert all(torch.equal(first[k], second[k]) for k in first)
    third, cached = pretrained_base(spec, "mlp", 0, data, tmp_path)
    assert cached is True and all(torch.equal(first[k], third[k]) for k in first)


def test_base_entry_that_no_longer_fits_the_model_is_retrained(data, tmp_path, caplog):
    spec = PretrainSpec(steps=20)
    first, _ = pretrained_base(spec, "mlp", 0, data, tmp_path)
    (path,) = tmp_path.glob("base-*.safetensors")
    from fedmerge.io.state import save_verified

    save_verified({"renamed.weight": torch.zeros(2, 2)}, path)
    with caplog.at_level(logging.WARNING):
        second, cached = pretrained_base(spec, "mlp", 0, data, tmp_path)
    assert cached is False and warned_files(caplog) == {str(path)}
    assert all(torch.equal(first[k], second[k]) for k in first)


def unscaled(split: Split) -> Split:
    """``split`` with inputs on a scale of 1e10 instead of [0, 1]: plain SGD at lr 0.1 on such inputs
    overflows float32 within a few steps (the model's weights become Inf, then NaN)."""
    return Split(split.x * 1e10, split.y)


def test_a_diverged_pretraining_is_one_error_naming_the_base(data, tmp_path):
    diverging = dataclasses.replace(data, pretrain=unscaled(data.pretrain))
    with pytest.raises(ConfigError, match=r"pre-trained base .* diverged.*pretrain-lr") as info:
        pretrained_base(PretrainSpec(steps=20, lr=0.1), "mlp", 0, diverging, tmp_path)
    assert "\n" not in str(info.value) and "client" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing cached


def test_a_diverged_client_update_is_not_cached(data, tmp_path):
    base = build_model("mlp", data.input_shape, data.num_classes, seed=0).state_dict()
    client = dataclasses.replace(data.clients[0], train=unscaled(data.clients[0].train))
    plan = TrainPlan(local_steps=20, lr=0.1)
    update = local_update("mlp", base, client, plan, 0, data.input_shape, data.num_classes, cache_dir=tmp_path)
    assert not all(torch.isfinite(t).all() for t in update.task_vector.values())  # it did diverge
    assert not (tmp_path / "task-vectors").exists() or not any((tmp_path / "task-vectors").iterdir())


def test_two_cells_needing_one_client_at_once_train_it_once(data, tmp_path, monkeypatch):
    """Parallel sweep cells that share a client (a grid over rules or λ) ask for its task vector at
    the same moment: one trains it while the other waits for the entry and reads it."""
    import threading
    import time

    import fedmerge.train.local as local

    base = build_model("mlp", data.input_shape, data.num_classes, seed=0).state_dict()
    trainings, real = [], local._fine_tune

    def slow_fine_tune(*args, **kwargs):
        trainings.append(threading.current_thread().name)
        time.sleep(0.5)  # long enough that the other thread asks while this one trains
        return real(*args, **kwargs)

    monkeypatch.setattr(local, "_fine_tune", slow_fine_tune)
    plan, results = TrainPlan(local_steps=8, lr=0.05), {}

    def cell(name: str) -> None:
        results[name] = local_update("mlp", base, data.clients[0], plan, 0, data.input_shape, data.num_classes,
                                     cache_dir=tmp_path)

    threads = [threading.Thread(target=cell, args=(f"cell-{i}",), name=f"cell-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(trainings) == 1
    assert sorted(r.cached for r in results.values()) == [False, True]  # the waiting cell read the entry
    a, b = (results[name].task_vector for name in ("cell-0", "cell-1"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert [p.suffix for p in (tmp_path / "task-vectors").iterdir()] == [".safetensors"]  # no lock file there


def test_two_runs_needing_one_base_at_once_pretrain_it_once(data, tmp_path, monkeypatch):
    import threading
    import time

    import fedmerge.train.pretrain as pretrain

    calls, real = [], pretrain.train

    def counted_train(*args, **kwargs):
        calls.append(1)
        time.sleep(0.5)  # long enough that the other thread asks while this one trains
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "train", counted_train)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        pretrained_base(PretrainSpec(), "mlp", 0, data, tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(cached for _, cached in results) == [False, True]
