"""A whole run trusts no cache: changed task-vector entries give the merges a run without a cache
gives, and a diverged pre-training is one error about the base before any client trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import clients.work
from fedmerge import ConfigError
from fedmerge.data import Split
from simulations.experiment import run_experiment


def test_run_with_changed_task_vector_cache_merges_as_without_cache(small_config, tmp_path):
    config = small_config.replace(**{"strategies": ["ties", "fedavg"], "cache-dir": str(tmp_path),
                                     "cache-task-vectors": True})
    first = run_experiment(config, progress=False)
    entries = sorted((tmp_path / "task-vectors").glob("*.safetensors"))
    assert len(entries) == config.num_clients
    for path in entries:  # scale the last 256 float32 values of each file; the header stays intact
        raw = bytearray(path.read_bytes())
        raw[-1024:] = (np.frombuffer(bytes(raw[-1024:]), dtype="<f4") * 7.0).astype("<f4").tobytes()
        path.write_bytes(bytes(raw))
    again = run_experiment(config, progress=False)
    for method in ("ties", "fedavg"):
        assert all(torch.equal(first.merged[method][k], again.merged[method][k]) for k in first.merged[method])
        assert again.results["strategies"][method]["accuracy"] == first.results["strategies"][method]["accuracy"]
    assert again.results["failures"] == []


def test_diverged_pretraining_blames_the_base_not_the_clients(small_config, tmp_path, monkeypatch):
    """Pre-training on inputs of scale 1e10 (at an ordinary lr) overflows float32: the run stops with
    one error about the base, before any client trains, and caches no base."""
    import fedmerge.train.pretrain

    real_train = fedmerge.train.pretrain.train

    def train_on_unscaled_inputs(model, data, plan, seed):
        real_train(model, Split(data.x * 1e10, data.y), plan, seed)

    monkeypatch.setattr(fedmerge.train.pretrain, "train", train_on_unscaled_inputs)
    clients_trained = []
    monkeypatch.setattr(clients.work, "local_update", lambda *a, **k: clients_trained.append(a))
    config = small_config.replace(**{"cache-dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"^the pre-trained base θ0 of mlp diverged: tensor '.*' is NaN") as info:
        run_experiment(config, progress=False)
    assert "client" not in str(info.value) and "\n" not in str(info.value)
    assert clients_trained == [] and list(tmp_path.glob("base-*")) == []
