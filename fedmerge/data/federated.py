"""A federation's data from its spec: pre-training split, global test split, one partition per client.

One seed splits the dataset into a pre-training set (disjoint from every client), a global test set
and a client pool; the partitioner splits the pool across clients, and each client keeps held-out
validation and test splits of its own partition.
"""

from __future__ import annotations

import functools

import numpy as np

from fedmerge.data.datasets import load_dataset
from fedmerge.data.image_tasks import load_task_suite
from fedmerge.data.partitioners import PARTITIONERS, partition_indices
from fedmerge.data.spec import DataSpec
from fedmerge.data.splits import MIN_CLIENT_EXAMPLES, ClientData, FederatedData, Split
from fedmerge.data.transforms import task_transform
from fedmerge.errors import ConfigError


def validate(spec: DataSpec, pool_size: int) -> None:
    if spec.num_clients < 1:
        raise ConfigError(f"num-clients must be at least 1, got {spec.num_clients}")
    if spec.partition == "dirichlet" and not spec.alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {spec.alpha}")
    if spec.partition == "shards" and spec.shards_per_client < 1:
        raise ConfigError(f"shards-per-client must be >= 1, got {spec.shards_per_client}")
    if PARTITIONERS[spec.partition].transforms and not spec.transforms:
        raise ConfigError("transforms must name at least one transform")
    for name, frac in (("pretrain-fraction", spec.pretrain_fraction), ("test-fraction", spec.test_fraction),
                       ("local-test-fraction", spec.local_test_fraction),
                       ("local-val-fraction", spec.local_val_fraction)):
        if not 0 < frac < 1:
            raise ConfigError(f"{name} must lie strictly between 0 and 1, got {frac}")
    if spec.local_test_fraction + spec.local_val_fraction >= 0.9:
        raise ConfigError("local-test-fraction + local-val-fraction must leave at least 10% to local training")
    if spec.pretrain_fraction + spec.test_fraction >= 0.9:
        raise ConfigError("pretrain-fraction + test-fraction must leave at least 10% of the data to the clients")
    most = pool_size // MIN_CLIENT_EXAMPLES
    if spec.num_clients > most:
        raise ConfigError(
            f"num-clients={spec.num_clients} is more than the {spec.dataset} client pool of {pool_size} "
            f"examples can serve (at most {most} clients with {MIN_CLIENT_EXAMPLES} examples each)"
        )


@functools.lru_cache(maxsize=8)
def load_federated(spec: DataSpec) -> FederatedData:
    """All splits of ``spec``; deterministic in ``spec.seed`` and cached per process."""
    if spec.tasks:  # one CLIP image task per client
        return load_task_suite(spec)
    ds = load_dataset(spec.dataset)
    n = len(ds.data)
    order = np.random.default_rng(spec.seed).permutation(n)
    n_pre, n_test = round(spec.pretrain_fraction * n), round(spec.test_fraction * n)
    validate(spec, n - n_pre - n_test)
    pretrain = ds.data.subset(order[:n_pre])
    test = ds.data.subset(order[n_pre:n_pre + n_test])
    pool = ds.data.subset(order[n_pre + n_test:])
    clients, task_tests = [], []
    for pid, rows in enumerate(partition_indices(pool.y.numpy(), spec)):
        if len(rows) < 3:
            raise ConfigError(
                f"client {pid} received {len(rows)} examples under partition={spec.partition!r}; "
                "use fewer clients or more classes-per-client"
            )
        rows = np.random.default_rng([spec.seed, pid]).permutation(rows)
        n_test = max(1, round(spec.local_test_fraction * len(rows)))
        n_val = max(1, round(spec.local_val_fraction * len(rows)))
        if n_test + n_val >= len(rows):
            n_test, n_val = 1, 1
        train, val, local_test = (pool.subset(rows[n_test + n_val:]), pool.subset(rows[n_test:n_test + n_val]),
                                  pool.subset(rows[:n_test]))
        client = ClientData(pid, train=train, val=val, test=local_test)
        if PARTITIONERS[spec.partition].transforms:
            kinds = spec.transforms
            name, fn = task_transform(kinds[pid % len(kinds)], pid // len(kinds), spec.seed)
            train, val, local_test = (Split(fn(s.x), s.y) for s in (train, val, local_test))
            client = ClientData(pid, train, val, local_test, task=name)
            task_tests.append(Split(fn(test.x), test.y))
        clients.append(client)
    return FederatedData(spec, ds.num_classes, ds.input_shape, pretrain, test, tuple(clients), tuple(task_tests))
