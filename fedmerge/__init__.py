"""fedmerge: one-shot model merging as federated learning (Flower-free library layer)."""

from fedmerge.errors import CheckpointError, ConfigError, FederationError, FedmergeError, MergeError
from fedmerge.merging import METHODS, merge
from fedmerge.task_vector import TaskVector, apply, load_state, save_state

__all__ = [
    "METHODS", "CheckpointError", "ConfigError", "FederationError", "FedmergeError", "MergeError",
    "TaskVector", "apply", "load_state", "merge", "save_state",
]
__version__ = "0.1.0"
