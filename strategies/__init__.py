"""Flower strategies (message API) that merge clients' task vectors: one-shot, and multi-round FedAvg.

``OneShotMerge`` serves every merging rule of ``fedmerge.merging.METHODS`` (built-in or plugin):
``OneShotMerge(["fedavg", "tsv"])`` merges the same task vectors with both, and
``OneShotMerge.single("fedgma", rho=0.4)`` is the strategy of one rule.
"""

from strategies.multi_round import TaskVectorFedAvg
from strategies.one_shot import ClientFailure, ClientReport, OneShotMerge

__all__ = ["ClientFailure", "ClientReport", "OneShotMerge", "TaskVectorFedAvg"]
