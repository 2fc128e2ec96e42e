"""Shared fixtures: a private cache directory and small, fast experiment configs; one compute thread."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def one_compute_thread():
    """torch's and numpy's BLAS threads each take every core and spin while they wait: on a shared
    2-core machine with other work running they fight each other and the suite runs several times
    slower (a 400×300 TSV merge: 0.1 s on one thread, 1 s on two). The tests' tensors are small, so
    one thread loses little when the machine is idle; the library's own training is single-threaded
    already (fedmerge.train.single_thread)."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fedmerge-cache"))


@pytest.fixture
def small_config(cache_dir):
    """A 4-client in-process experiment that runs in about a second."""
    from simulations.config import ExperimentConfig

    return ExperimentConfig(
        name="test", num_clients=4, partition="dirichlet", alpha=1.0, local_steps=[5, 10, 15, 20],
        strategies=("fedavg", "fednova", "median", "tsv", "task_arithmetic"), engine="inprocess",
        pretrain_steps=30, cache_dir=cache_dir, seed=3,
    )


def tiny_sweep_spec(path, cache_dir, strategies: str = '["fedavg", "median"]'):
    """Write a two-cell sweep spec (alpha 0.3 and 3.0, three clients, seed 0) to ``path``."""
    path.write_text(f"""
name = "tiny"
seeds = [0]
[set]
num-clients = 3
local-steps = 5
pretrain-steps = 20
strategies = {strategies}
cache-dir = "{cache_dir}"
[grid]
alpha = [0.3, 3.0]
""")
    return path


@pytest.fixture(scope="session")
def write_tiny_sweep_spec():
    """``write(path, cache_dir, strategies=...)``: a two-cell sweep spec that runs in seconds."""
    return tiny_sweep_spec


@pytest.fixture
def write_unreadable_checkpoints():
    """``write(directory, good)``: files a hostile or careless user might hand over (see below)."""
    return _write_unreadable_checkpoints


def _write_unreadable_checkpoints(directory, good) -> None:
    """Files a hostile or careless user might hand over, beside the good checkpoint ``good``:
    truncated, empty, text, not a checkpoint, and pickles whose ``__reduce__`` would run code."""
    import pickle

    data = good.read_bytes()
    (directory / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (directory / "empty.safetensors").write_bytes(b"")
    (directory / "text.safetensors").write_text("not a checkpoint")
    (directory / "notes.txt").write_text("hello")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (directory / "evil.pt").write_bytes(pickle.dumps({"fc.weight": Evil()}))
    (directory / "evil.safetensors").write_bytes(pickle.dumps({"fc.weight": Evil()}))
