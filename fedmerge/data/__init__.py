"""Data: datasets and partitioners (each behind a registry), the data spec, splits, the CLIP image-task suite."""

from fedmerge.data.datasets import DATASETS, Dataset, dataset, load_dataset
from fedmerge.data.federated import FederatedData, load_federated
from fedmerge.data.partitioners import PARTITIONERS, Partitioner, PartitionSpec, partition_indices, partitioner
from fedmerge.data.spec import DataSpec
from fedmerge.data.splits import MIN_CLIENT_EXAMPLES, ClientData, Examples, Split, iterate_batches
from fedmerge.data.transforms import TRANSFORM_KINDS

__all__ = [
    "DATASETS", "MIN_CLIENT_EXAMPLES", "PARTITIONERS", "TRANSFORM_KINDS", "ClientData", "DataSpec", "Dataset",
    "Examples", "FederatedData", "PartitionSpec", "Partitioner", "Split", "dataset", "iterate_batches",
    "load_dataset", "load_federated", "partition_indices", "partitioner",
]
