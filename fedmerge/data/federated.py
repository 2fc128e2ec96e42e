"""A federation's data from its spec: pre-training split, global test split, one partition per client.

One seed splits the dataset into a pre-training set (disjoint from every client), a global test set
and a client pool; the partitioner splits the pool across clients, and each client keeps held-out
validation and test splits of its own partition.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import numpy as np

from fedmerge.data.datasets import Dataset, load_dataset
from fedmerge.data.image_tasks import ImageSplit, clip_transform, load_task
from fedmerge.data.partitioners import PARTITIONERS, partition_indices
from fedmerge.data.spec import DataSpec
from fedmerge.data.splits import MIN_CLIENT_EXAMPLES, ClientData, Examples, Split
from fedmerge.data.transforms import task_transform
from fedmerge.errors import ConfigError
from fedmerge.data.text_tasks import tokenizer_encoder
from fedmerge.models.clip import preprocessing, zero_shot_head
from fedmerge.models.language import tokenizer


@dataclass(frozen=True)
class FederatedData:
    spec: DataSpec
    num_classes: int
    input_shape: tuple[int, ...]
    pretrain: Examples
    test: Examples
    clients: tuple[ClientData, ...]
    task_tests: tuple[Examples, ...] = ()  # under partition="transforms": the global test split in each task
    chance: float | None = None  # guessing's accuracy (default 1 / num_classes); see Dataset

    @property
    def chance_level(self) -> float:
        return 1 / self.num_classes if self.chance is None else self.chance

    @property
    def global_tests(self) -> tuple[Examples, ...]:
        """What "global test accuracy" averages over: the test split, or its version in every task."""
        return self.task_tests or (self.test,)

    @property
    def pool_label_counts(self) -> list[int]:
        counts = [0] * self.num_classes
        for c in self.clients:
            for split in (c.train, c.val, c.test):
                for k, v in enumerate(split.label_counts(self.num_classes)):
                    counts[k] += v
        return counts


def _task_name(ds: Dataset, train: Examples) -> str:
    """A client's task: the dataset's name, or for labels that are tasks, those that make up at least a
    tenth of its training examples ("sorting", "addition+counting")."""
    if not ds.label_names:
        return ds.name
    counts = train.label_counts(ds.num_classes)
    total = max(1, sum(counts))
    return "+".join(name for name, n in zip(ds.label_names, counts) if n >= 0.1 * total)


def check_pool(spec: DataSpec, pool_size: int) -> None:
    """The checks that need the dataset: enough examples for so many clients."""
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
    if ds.texts is not None and spec.encoder:  # a language model with a tokenizer of its own
        ds = replace(ds, data=ds.texts.tokens(*tokenizer_encoder(tokenizer(spec.encoder))))
    if PARTITIONERS[spec.partition].transforms and not isinstance(ds.data, Split):
        raise ConfigError(f"partition = {spec.partition!r} transforms images; dataset {spec.dataset!r} is text")
    n = len(ds.data)
    order = np.random.default_rng(spec.seed).permutation(n)
    n_pre, n_test = round(spec.pretrain_fraction * n), round(spec.test_fraction * n)
    check_pool(spec, n - n_pre - n_test)
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
        client = ClientData(pid, train=train, val=val, test=local_test, task=_task_name(ds, train))
        if PARTITIONERS[spec.partition].transforms:
            kinds = spec.transforms
            name, fn = task_transform(kinds[pid % len(kinds)], pid // len(kinds), spec.seed)
            train, val, local_test = (Split(fn(s.x), s.y) for s in (train, val, local_test))
            client = ClientData(pid, train, val, local_test, task=name)
            task_tests.append(Split(fn(test.x), test.y))
        clients.append(client)
    return FederatedData(spec, ds.num_classes, ds.input_shape, pretrain, test, tuple(clients), tuple(task_tests),
                         ds.chance)


def load_task_suite(spec: DataSpec) -> FederatedData:
    """One client per task of ``spec.tasks`` with the CLIP model ``spec.encoder``'s heads and preprocessing."""
    if len(spec.tasks) != spec.num_clients:
        raise ConfigError(f"tasks lists {len(spec.tasks)} tasks but num-clients is {spec.num_clients}; "
                          "each client fine-tunes one task")
    if not spec.encoder:
        raise ConfigError("tasks need a CLIP model: model = \"clip:HUB_ID_OR_DIR\"")
    pre = preprocessing(spec.encoder)
    transform = clip_transform(pre["size"], pre["mean"], pre["std"])
    transform_id = f"clip-{pre['size']}-{pre['mean']}-{pre['std']}"
    workers = int(os.environ.get("FEDMERGE_DATA_WORKERS", "0"))
    clients, tests, num_classes = [], [], 0
    for pid, name in enumerate(spec.tasks):
        task = load_task(name)
        head = zero_shot_head(spec.encoder, task.classnames, task.templates, spec.cache_dir or None)
        num_classes = max(num_classes, len(task.classnames))
        order = np.random.default_rng([spec.seed, pid]).permutation(len(task.train))
        n_val = max(1, min(5000, round(spec.local_val_fraction * len(order))))
        if n_val >= len(order):
            raise ConfigError(f"task {name}: {len(order)} training images are too few for a validation split")
        train = ImageSplit(task.train, order[n_val:], transform, head, transform_id, workers)
        val = ImageSplit(task.train, order[:n_val], transform, head, transform_id, workers)
        test = ImageSplit(task.test, np.arange(len(task.test)), transform, head, transform_id, workers)
        clients.append(ClientData(pid, train=train, val=val, test=test, task=task.name))
        tests.append(test)
    first = tests[0]
    empty = first.subset(np.arange(0))
    return FederatedData(spec, num_classes, (3, pre["size"], pre["size"]), empty, first, tuple(clients), tuple(tests))
