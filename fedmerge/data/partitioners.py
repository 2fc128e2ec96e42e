"""The partitioner registry: how the client pool is split across clients (the data-heterogeneity knob).

Built-ins go through flwr-datasets partitioners: ``iid``; ``dirichlet`` (label skew, ``alpha``);
``pathological`` (``classes-per-client`` labels each); ``shards`` (label-sorted shards,
``shards-per-client`` each, as in McMahan et al.); ``sizes`` (quantity skew: explicit per-client
``sizes`` or a power law with exponent ``sizes``); ``transforms`` (an IID split in which every client
gets a *different task*: the digits under its own fixed transform, see :mod:`fedmerge.data.transforms`).

A plugin adds a partitioner with a function ``split(labels, spec) -> list of row-index arrays`` (one
per client, ``labels`` the pool's labels, ``spec`` the :class:`DataSpec`) through the
``fedmerge.partitioners`` entry-point group or :func:`partitioner` in a plugin file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from fedmerge.data.splits import MIN_CLIENT_EXAMPLES
from fedmerge.errors import ConfigError, PluginError
from fedmerge.registry import Registry

class PartitionSpec(Protocol):
    """What a partitioner may read of the data spec (:class:`fedmerge.data.DataSpec` has all of it)."""

    @property
    def num_clients(self) -> int: ...

    @property
    def seed(self) -> int: ...

    @property
    def partition(self) -> str: ...

    @property
    def alpha(self) -> float: ...

    @property
    def classes_per_client(self) -> int: ...

    @property
    def shards_per_client(self) -> int: ...

    @property
    def sizes(self) -> float | tuple[int, ...]: ...


SplitFunction = Callable[[np.ndarray, PartitionSpec], list[np.ndarray]]


@dataclass(frozen=True)
class Partitioner:
    """A way to split the pool: ``split(labels, spec)`` gives each client's row indices.
    ``transforms``: each client's inputs then get their own fixed transform (a task of its own)."""

    name: str
    split: SplitFunction
    summary: str = ""
    transforms: bool = False


def _adapt(name: str, obj: object) -> Partitioner:
    if isinstance(obj, Partitioner):
        return obj
    if callable(obj):
        return Partitioner(name, obj, (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else "")  # type: ignore[arg-type]
    raise PluginError(f"partitioner {name!r} must be a function (labels, spec) -> index arrays, "
                      f"got {type(obj).__name__}")


PARTITIONERS: Registry[Partitioner] = Registry("partition", "fedmerge.partitioners", adapt=_adapt)


def partitioner(name: str | None = None, *, transforms: bool = False) -> Callable[[SplitFunction], SplitFunction]:
    """Register ``split(labels, spec) -> [row indices per client]`` as a partitioner (for plugin files)."""

    def deco(split: SplitFunction) -> SplitFunction:
        PARTITIONERS.add_object(name or split.__name__, Partitioner(name or split.__name__, split,
                                                                    (split.__doc__ or "").strip(), transforms))
        return split

    return deco


def quantity_sizes(spec: PartitionSpec, pool_size: int) -> list[int]:
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


def _through_flwr_datasets(make: Callable[[ModuleType, PartitionSpec, int], Any]) -> SplitFunction:
    """A split function that runs a flwr-datasets partitioner, ``make(flwr_datasets.partitioner,
    spec, pool_size)``, over a table of (label, row)."""

    def split(labels: np.ndarray, spec: PartitionSpec) -> list[np.ndarray]:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        # Imported here: datasets and flwr-datasets (pyarrow, pandas, matplotlib) take over a second
        # to import, which a process that only writes or reads results should not pay.
        import datasets
        from flwr_datasets import partitioner

        datasets.disable_progress_bars()
        table = datasets.Dataset.from_dict({"label": labels.tolist(), "row": list(range(len(labels)))})
        flwr_partitioner = make(partitioner, spec, len(labels))
        flwr_partitioner.dataset = table
        try:
            with warnings.catch_warnings():
                # Unused classes under `pathological` show in the measures' label distributions instead.
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", FutureWarning)
                return [np.asarray(flwr_partitioner.load_partition(i)["row"], dtype=np.int64)
                        for i in range(spec.num_clients)]
        except ValueError as exc:  # Dirichlet gives up when it cannot meet min_partition_size
            raise ConfigError(
                f"partition={spec.partition!r} could not serve num-clients={spec.num_clients} "
                f"with at least {MIN_CLIENT_EXAMPLES} examples each ({exc}); use fewer clients or a larger alpha"
            ) from None

    return split


def _iid(flwr: ModuleType, spec: PartitionSpec, pool_size: int) -> Any:
    return flwr.IidPartitioner(num_partitions=spec.num_clients)  # contiguous chunks of the seed-shuffled pool


for _entry in (
    Partitioner("iid", _through_flwr_datasets(_iid), "equal IID shares"),
    Partitioner("dirichlet", _through_flwr_datasets(lambda flwr, spec, n: flwr.DirichletPartitioner(
        num_partitions=spec.num_clients, partition_by="label", alpha=spec.alpha,
        min_partition_size=MIN_CLIENT_EXAMPLES, self_balancing=False, seed=spec.seed)),
        "label skew: each client's labels drawn from Dirichlet(alpha)"),
    Partitioner("pathological", _through_flwr_datasets(lambda flwr, spec, n: flwr.PathologicalPartitioner(
        num_partitions=spec.num_clients, partition_by="label", num_classes_per_partition=spec.classes_per_client,
        class_assignment_mode="first-deterministic", seed=spec.seed)),
        "classes-per-client labels per client"),
    Partitioner("shards", _through_flwr_datasets(lambda flwr, spec, n: flwr.ShardPartitioner(
        num_partitions=spec.num_clients, partition_by="label", num_shards_per_partition=spec.shards_per_client,
        seed=spec.seed)),
        "shards-per-client label-sorted shards per client"),
    Partitioner("sizes", _through_flwr_datasets(lambda flwr, spec, n: flwr.SizePartitioner(
        partition_sizes=quantity_sizes(spec, n))),
        "quantity skew: explicit sizes or a power law"),
    Partitioner("transforms", _through_flwr_datasets(_iid),
                "IID shares, each client's inputs under its own fixed transform (a task each)", transforms=True),
):
    PARTITIONERS.add(_entry.name, _entry)


def partition_indices(labels: np.ndarray, spec: PartitionSpec) -> list[np.ndarray]:
    """Row indices of each client's partition under ``spec.partition``; checked to be one array per client."""
    parts = PARTITIONERS[spec.partition].split(labels, spec)
    if not isinstance(parts, (list, tuple)) or len(parts) != spec.num_clients:
        raise PluginError(f"partition {spec.partition!r} must return one index array per client "
                          f"({spec.num_clients}), got {type(parts).__name__}")
    return [np.asarray(p, dtype=np.int64) for p in parts]
