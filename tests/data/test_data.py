"""Splits and partitions: disjointness, coverage, reproducibility, and clear errors."""

from __future__ import annotations

import numpy as np
import torch
import pytest

from fedmerge import ConfigError
from fedmerge.data import DataSpec, load_federated, partition_indices


def rows_of(split):
    """Identify examples by their pixels (digits has a few exact duplicates, so compare multisets)."""
    return sorted(map(bytes, split.x.reshape(len(split), -1).numpy().astype(np.float32)))


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "pathological"])
def test_every_pool_example_goes_to_exactly_one_client(partition):
    labels = np.random.default_rng(0).integers(0, 10, size=500)
    spec = DataSpec(num_clients=5, partition=partition, alpha=0.3, classes_per_client=3, seed=1)
    parts = partition_indices(labels, spec)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined))  # no example twice
    if partition != "pathological":  # pathological may leave examples of unassigned classes unused
        assert sorted(joined) == list(range(500))
    else:
        assert all(len(np.unique(labels[p])) <= 3 for p in parts)


def test_iid_sizes_are_balanced():
    parts = partition_indices(np.zeros(103, dtype=int), DataSpec(num_clients=4, partition="iid"))
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]


def test_same_seed_same_partitions_other_seed_other():
    labels = np.random.default_rng(0).integers(0, 10, size=400)
    a = partition_indices(labels, DataSpec(num_clients=4, partition="dirichlet", alpha=0.5, seed=7))
    b = partition_indices(labels, DataSpec(num_clients=4, partition="dirichlet", alpha=0.5, seed=7))
    c = partition_indices(labels, DataSpec(num_clients=4, partition="dirichlet", alpha=0.5, seed=8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_federated_splits_are_disjoint_and_complete():
    data = load_federated(DataSpec(num_clients=6, partition="dirichlet", alpha=1.0, seed=0))
    pieces = [data.pretrain, data.test] + [s for c in data.clients for s in (c.train, c.val, c.test)]
    total = sum(len(p) for p in pieces)
    assert total == 1797
    assert sorted(r for p in pieces for r in rows_of(p)) == rows_of(
        __import__("fedmerge.data", fromlist=["load_dataset"]).load_dataset("digits").data)
    for c in data.clients:
        assert len(c.test) >= 1 and len(c.val) >= 1 and len(c.train) >= 1
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10


def test_small_alpha_skews_labels_more_than_large_alpha():
    def skew(alpha):
        data = load_federated(DataSpec(num_clients=5, partition="dirichlet", alpha=alpha, seed=0))
        dists = [np.bincount(c.train.y.numpy(), minlength=10) / len(c.train) for c in data.clients]
        return np.mean([0.5 * np.abs(d - 0.1).sum() for d in dists])

    assert skew(0.1) > skew(100.0) + 0.2


@pytest.mark.parametrize("values,needle", [
    ({"num_clients": 0}, "num-clients must be an integer >= 1, got 0"),
    ({"num_clients": 4, "alpha": 0.0}, r"^alpha must be > 0, got 0.0$"),
    ({"num_clients": 4, "alpha": 1e308}, r"^alpha must lie in \(0, 1000000\], got 1e\+308$"),
    ({"num_clients": 4, "seed": -1}, r"^seed must be an integer in \[0, 4294967295\], got -1$"),
    ({"num_clients": 4, "seed": 2**32}, r"^seed must be an integer in \[0, 4294967295\], got 4294967296$"),
    ({"num_clients": 4, "partition": "nope"}, "unknown partition 'nope'; known: "),
    ({"num_clients": 4, "dataset": "imagenet"}, "unknown dataset 'imagenet'; known: digits"),
    ({"num_clients": 4, "test_fraction": 1.5}, "test-fraction must lie strictly between 0 and 1, got 1.5"),
    ({"num_clients": 4, "pretrain_fraction": 0.5, "test_fraction": 0.45}, "must leave at least 10%"),
    ({"num_clients": 3, "partition": "sizes", "sizes": [5, 5, 5]}, "sizes must each be >= 10"),
    ({"num_clients": 3, "partition": "sizes", "sizes": [50, 50]}, "sizes has 2 entries but num-clients is 3"),
    ({"num_clients": 4, "transforms": ["blur"]}, "transforms: 'blur' is not known"),
])
def test_bad_specs_are_refused_when_built(values, needle):
    """Every check that needs only the spec runs when it is built, before any data is loaded."""
    with pytest.raises(ConfigError, match=needle):
        DataSpec(**values)


def test_a_pool_too_small_for_the_clients_is_refused_at_load():
    with pytest.raises(ConfigError, match="more than the digits client pool"):
        load_federated(DataSpec(num_clients=500))


def test_transforms_partition_gives_every_client_a_different_task():
    data = load_federated(DataSpec(num_clients=12, partition="transforms", seed=0))
    names = [c.task for c in data.clients]
    assert len(set(names)) == 12
    inputs = [t.x for t in data.task_tests]  # the global test split under each client's transform
    for i in range(12):
        for j in range(i):
            assert not torch.equal(inputs[i], inputs[j]), (names[i], names[j])
    assert all(torch.equal(t.y, data.test.y) for t in data.task_tests)  # labels unchanged: same 10 classes
