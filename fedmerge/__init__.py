"""fedmerge: one-shot model merging as federated learning (Flower-free library layer).

The public verbs: ``merge(method, task_vectors, weights=None, **options)``, ``apply(base, merged,
scale)`` and ``TaskVector``; ``METHODS`` lists every merging rule. Subpackages by concept:
``merging`` (rules and their registry), ``data`` (datasets, partitioners, splits), ``models``,
``io`` (state dicts, checkpoints, Hugging Face directories), ``train``, ``evaluation`` (scores,
measures, tuning); ``offline`` merges checkpoints, ``attacks`` makes hostile clients, ``registry``
holds the plugin machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedmerge.errors import (
    CheckpointError, ConfigError, FederationError, FedmergeError, MergeError, PluginError,
)

# The public verbs load torch; they are imported on first use, so that `import fedmerge.errors` (and a
# command's --help) does not wait for it.
_LAZY = {
    "load_state": "fedmerge.io.state", "save_state": "fedmerge.io.state",
    "METHODS": "fedmerge.merging", "MergeMethod": "fedmerge.merging", "Option": "fedmerge.merging",
    "merge": "fedmerge.merging", "rule": "fedmerge.merging",
    "load_plugin_file": "fedmerge.registry",
    "TaskVector": "fedmerge.task_vector", "apply": "fedmerge.task_vector",
}

if TYPE_CHECKING:
    from fedmerge.io.state import load_state, save_state
    from fedmerge.merging import METHODS, MergeMethod, Option, merge, rule
    from fedmerge.registry import load_plugin_file
    from fedmerge.task_vector import TaskVector, apply


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedmerge' has no attribute {name!r}")


__all__ = [
    "METHODS", "CheckpointError", "ConfigError", "FederationError", "FedmergeError", "MergeError", "MergeMethod",
    "Option", "PluginError", "TaskVector", "apply", "load_plugin_file", "load_state", "merge", "rule", "save_state",
]
__version__ = "0.1.0"
