"""fedmerge: one-shot model merging as federated learning (Flower-free library layer).

The public verbs: ``merge(method, task_vectors, weights=None, **options)``, ``apply(base, merged,
scale)`` and ``TaskVector``; ``METHODS`` lists every merging rule. Subpackages by concept:
``merging`` (rules and their registry), ``data`` (datasets, partitioners, splits), ``models``,
``io`` (state dicts, checkpoints, Hugging Face directories), ``train``, ``evaluation`` (scores,
measures, tuning); ``offline`` merges checkpoints, ``attacks`` makes hostile clients, ``registry``
holds the plugin machinery.
"""

from fedmerge.errors import (
    CheckpointError, ConfigError, FederationError, FedmergeError, MergeError, PluginError,
)
from fedmerge.io.state import load_state, save_state
from fedmerge.merging import METHODS, MergeMethod, Option, merge, rule
from fedmerge.registry import load_plugin_file
from fedmerge.task_vector import TaskVector, apply

__all__ = [
    "METHODS", "CheckpointError", "ConfigError", "FederationError", "FedmergeError", "MergeError", "MergeMethod",
    "Option", "PluginError", "TaskVector", "apply", "load_plugin_file", "load_state", "merge", "rule", "save_state",
]
__version__ = "0.1.0"
