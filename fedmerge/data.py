"""Datasets and federated partitions: the data-heterogeneity knobs.

The embedded default is scikit-learn's bundled handwritten digits (1,797 8×8 images, 10 classes):
real data, no network. One seed splits it into a pre-training set (disjoint from every client), a
global test set and a client pool; flwr-datasets partitioners split the pool across clients, and each
client keeps held-out validation and test splits of its own partition.

Partitions: ``iid``; ``dirichlet`` (label skew, ``alpha``); ``pathological`` (``classes_per_client``
labels each); ``shards`` (label-sorted shards, ``shards_per_client`` each, as in McMahan et al.);
``sizes`` (quantity skew: explicit per-client ``sizes`` or a power law with exponent ``sizes``);
``tasks`` (every client a *different task*: the same 10 digits under its own fixed pixel
permutation, rotation, flip or inversion — the classic task-arithmetic setting).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedmerge.errors import ConfigError

PARTITIONS = ("iid", "dirichlet", "pathological", "shards", "sizes", "tasks")
TASK_KINDS = ("permutation", "rotation", "flip", "inversion")
MIN_CLIENT_EXAMPLES = 10  # a client needs enough data for a train and a local test split


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` (N × C × H × W, float32) and integer labels ``y`` (N)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray | Tensor) -> Split:
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(self.x[index], self.y[index])

    def label_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.y, minlength=num_classes).tolist()

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]


def iterate_batches(data, index_batches: list[Tensor]):
    """``(x, y)`` for each index batch of ``data``: a :class:`Split` (tensors in memory) or any split with
    ``batch(index)``, e.g. :class:`fedmerge.image_tasks.ImageSplit`, decoded by ``data.workers`` processes."""
    if isinstance(data, Split) or not getattr(data, "workers", 0):
        for index in index_batches:
            yield data.batch(index)
        return
    loader = torch.utils.data.DataLoader(data, batch_sampler=[i.tolist() for i in index_batches],
                                         num_workers=data.workers, persistent_workers=False)
    yield from loader


def call_model(model, data, x: Tensor) -> Tensor:
    """Logits of ``model`` on inputs of ``data``; a split with a task ``head`` (CLIP tasks) passes it along."""
    head = getattr(data, "head", None)
    return model(x) if head is None else model(x, head)


@dataclass(frozen=True)
class Dataset:
    name: str
    data: Split
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data.x.shape[1:])


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)  # N × 1 × 8 × 8 in [0, 1]
    return Dataset("digits", Split(x, torch.tensor(bunch.target, dtype=torch.long)), 10)


DATASETS: dict[str, Callable[[], Dataset]] = {"digits": _load_digits}


@functools.lru_cache(maxsize=4)
def load_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ConfigError(f"dataset={name!r} is not known; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]()


@dataclass(frozen=True)
class DataSpec:
    """Everything that determines every split: two equal specs give identical data."""

    num_clients: int
    partition: str = "iid"
    alpha: float = 0.5
    classes_per_client: int = 2
    seed: int = 0
    dataset: str = "digits"
    pretrain_fraction: float = 0.1
    test_fraction: float = 0.2
    local_test_fraction: float = 0.2
    local_val_fraction: float = 0.1
    shards_per_client: int = 2
    sizes: float | tuple[int, ...] = 1.0
    task_kinds: tuple[str, ...] = TASK_KINDS
    tasks: tuple[str, ...] = ()  # one image task per client (fedmerge.image_tasks); replaces dataset/partition
    encoder: str = ""  # under tasks: the CLIP model whose heads and preprocessing the tasks use
    cache_dir: str = ""  # under tasks: where zero-shot heads are cached

    def __post_init__(self) -> None:  # lists arrive from configs and messages; keep the spec hashable
        if isinstance(self.sizes, (list, tuple)):
            object.__setattr__(self, "sizes", tuple(int(v) for v in self.sizes))
        if isinstance(self.task_kinds, (list, tuple)):
            object.__setattr__(self, "task_kinds", tuple(self.task_kinds))
        if isinstance(self.tasks, (list, tuple)):
            object.__setattr__(self, "tasks", tuple(self.tasks))


@dataclass(frozen=True)
class ClientData:
    """One client's partition: ``train`` for fine-tuning, ``val`` for choosing λ, ``test`` for scores."""

    partition_id: int
    train: Split
    val: Split
    test: Split
    task: str = "digits"  # under partition="tasks": the client's input transform, e.g. "rotation-180"


@dataclass(frozen=True)
class FederatedData:
    spec: DataSpec
    num_classes: int
    input_shape: tuple[int, ...]
    pretrain: Split
    test: Split
    clients: tuple[ClientData, ...]
    task_tests: tuple[Split, ...] = ()  # under partition="tasks": the global test split in each task

    @property
    def global_tests(self) -> tuple[Split, ...]:
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


_DISTINCT_VARIANTS = {"rotation": 3, "flip": 2, "inversion": 1}  # permutations never repeat


def task_transform(kind: str, variant: int, seed: int) -> tuple[str, Callable[[Tensor], Tensor]]:
    """A fixed input transform that turns digits into another 10-class task, and its name.

    Kinds with few variants (three rotations, two flips, one inversion) are composed with a pixel
    permutation once they run out, so every client's task differs from every other's."""
    if kind not in TASK_KINDS:
        raise ConfigError(f"task-kinds: {kind!r} is not known; known: {', '.join(TASK_KINDS)}")

    def permutation(index: int) -> Callable[[Tensor], Tensor]:
        def permute(x: Tensor) -> Tensor:
            order = torch.as_tensor(np.random.default_rng([seed, index, 7]).permutation(x[0].numel()))
            return x.reshape(len(x), -1)[:, order].reshape(x.shape)
        return permute

    if kind == "permutation":
        return f"permutation-{variant}", permutation(variant)
    base_variant = variant % _DISTINCT_VARIANTS[kind]
    if kind == "rotation":
        quarter_turns = 1 + base_variant
        name, fn = f"rotation-{90 * quarter_turns}", lambda x: torch.rot90(x, quarter_turns, dims=(-2, -1))
    elif kind == "flip":
        axis = -1 if base_variant == 0 else -2
        name, fn = ("flip-horizontal" if axis == -1 else "flip-vertical"), lambda x: torch.flip(x, dims=(axis,))
    else:
        name, fn = "inversion", lambda x: 1.0 - x
    if variant < _DISTINCT_VARIANTS[kind]:
        return name, fn
    extra = permutation(10_000 + variant)  # disjoint from the plain permutation tasks' indices
    return f"{name}+permutation-{variant}", lambda x: extra(fn(x))


def quantity_sizes(spec: DataSpec, pool_size: int) -> list[int]:
    """Per-client sizes: the explicit list, or a power law n_i ∝ (i+1)^(-a) over the whole pool."""
    if isinstance(spec.sizes, tuple):
        if len(spec.sizes) != spec.num_clients:
            raise ConfigError(f"sizes has {len(spec.sizes)} entries but num-clients is {spec.num_clients}")
        if min(spec.sizes) < MIN_CLIENT_EXAMPLES or sum(spec.sizes) > pool_size:
            raise ConfigError(f"sizes must each be >= {MIN_CLIENT_EXAMPLES} and sum to at most the pool of "
                              f"{pool_size} examples, got {list(spec.sizes)}")
        return list(spec.sizes)
    a = float(spec.sizes)
    if not a >= 0:
        raise ConfigError(f"sizes must be a list of sizes or a power-law exponent >= 0, got {spec.sizes}")
    spare = pool_size - MIN_CLIENT_EXAMPLES * spec.num_clients
    shares = np.array([(i + 1) ** -a for i in range(spec.num_clients)])
    sizes = MIN_CLIENT_EXAMPLES + np.floor(spare * shares / shares.sum()).astype(int)
    sizes[0] += pool_size - sizes.sum()  # hand out the rounding remainder
    return sizes.tolist()


def _partitioner(spec: DataSpec, pool_size: int):
    from flwr_datasets.partitioner import (
        DirichletPartitioner, IidPartitioner, PathologicalPartitioner, ShardPartitioner, SizePartitioner,
    )

    n = spec.num_clients
    if spec.partition in ("iid", "tasks"):
        return IidPartitioner(num_partitions=n)  # contiguous chunks of the seed-shuffled pool
    if spec.partition == "shards":
        return ShardPartitioner(num_partitions=n, partition_by="label", num_shards_per_partition=spec.shards_per_client,
                                seed=spec.seed)
    if spec.partition == "sizes":
        return SizePartitioner(partition_sizes=quantity_sizes(spec, pool_size))
    if spec.partition == "dirichlet":
        return DirichletPartitioner(
            num_partitions=n, partition_by="label", alpha=spec.alpha,
            min_partition_size=MIN_CLIENT_EXAMPLES, self_balancing=False, seed=spec.seed,
        )
    if spec.partition == "pathological":
        return PathologicalPartitioner(
            num_partitions=n, partition_by="label", num_classes_per_partition=spec.classes_per_client,
            class_assignment_mode="first-deterministic", seed=spec.seed,
        )
    raise ConfigError(f"partition={spec.partition!r} is not known; known: {', '.join(PARTITIONS)}")


def partition_indices(labels: np.ndarray, spec: DataSpec) -> list[np.ndarray]:
    """Row indices of each client's partition, through a flwr-datasets partitioner."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    table = datasets.Dataset.from_dict({"label": labels.tolist(), "row": list(range(len(labels)))})
    partitioner = _partitioner(spec, len(labels))
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():
            # Unused classes under `pathological` show in the measures' label distributions instead.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            parts = [np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)
                     for i in range(spec.num_clients)]
    except ValueError as exc:  # Dirichlet gives up when it cannot meet min_partition_size
        raise ConfigError(
            f"partition={spec.partition!r} could not serve num-clients={spec.num_clients} "
            f"with at least {MIN_CLIENT_EXAMPLES} examples each ({exc}); use fewer clients or a larger alpha"
        ) from None
    return parts


def _validate(spec: DataSpec, pool_size: int) -> None:
    if spec.num_clients < 1:
        raise ConfigError(f"num-clients must be at least 1, got {spec.num_clients}")
    if spec.partition == "dirichlet" and not spec.alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {spec.alpha}")
    if spec.partition == "shards" and spec.shards_per_client < 1:
        raise ConfigError(f"shards-per-client must be >= 1, got {spec.shards_per_client}")
    if spec.partition == "tasks" and not spec.task_kinds:
        raise ConfigError("task-kinds must name at least one transform")
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
        from fedmerge.image_tasks import load_task_suite

        return load_task_suite(spec)
    ds = load_dataset(spec.dataset)
    n = len(ds.data)
    order = np.random.default_rng(spec.seed).permutation(n)
    n_pre, n_test = round(spec.pretrain_fraction * n), round(spec.test_fraction * n)
    _validate(spec, n - n_pre - n_test)
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
        client = ClientData(pid, train=pool.subset(rows[n_test + n_val:]), val=pool.subset(rows[n_test:n_test + n_val]),
                            test=pool.subset(rows[:n_test]))
        if spec.partition == "tasks":
            kinds = spec.task_kinds
            name, fn = task_transform(kinds[pid % len(kinds)], pid // len(kinds), spec.seed)
            client = ClientData(pid, *(Split(fn(s.x), s.y) for s in (client.train, client.val, client.test)), task=name)
            task_tests.append(Split(fn(test.x), test.y))
        clients.append(client)
    return FederatedData(spec, ds.num_classes, ds.input_shape, pretrain, test, tuple(clients), tuple(task_tests))
