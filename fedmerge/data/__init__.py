"""Data: datasets and partitioners (each behind a registry), splits, and the CLIP image-task suite."""

from fedmerge.data.datasets import DATASETS, Dataset, dataset, load_dataset
from fedmerge.data.federated import load_federated
from fedmerge.data.partitioners import PARTITIONERS, Partitioner, partition_indices, partitioner
from fedmerge.data.spec import TRANSFORM_KINDS, DataSpec
from fedmerge.data.splits import MIN_CLIENT_EXAMPLES, ClientData, FederatedData, Split, iterate_batches

__all__ = [
    "DATASETS", "MIN_CLIENT_EXAMPLES", "PARTITIONERS", "TRANSFORM_KINDS", "ClientData", "DataSpec", "Dataset",
    "FederatedData", "Partitioner", "Split", "dataset", "iterate_batches", "load_dataset", "load_federated",
    "partition_indices", "partitioner",
]
