"""The one home of Flower's private API (flwr 1.42, pinned in pyproject.toml).

The in-process engine builds runs and messages without a SuperLink, which needs two internals:
an empty ``Run`` and the process-wide ``TaskIdentity`` that ``Message`` reads its metadata from.
When Flower changes them, this module is the only one to adapt.
"""

from __future__ import annotations

from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["Run", "set_task_identity"]


def set_task_identity(run_id: int, node_id: int = 0, task_id: int = 1) -> None:
    """Tell Flower which run, node and task the messages built in this process belong to."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
