"""Shared fixtures: a private cache directory and small, fast experiment configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


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
