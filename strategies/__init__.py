"""Flower strategies (message API) that merge clients' task vectors in one round."""

from strategies.methods import (
    CClipMerge, FedAvgMerge, FedGMAMerge, FedNovaMerge, MedianMerge, SingleMethodMerge, TaskArithmeticMerge, TSVMerge,
)
from strategies.one_shot import ClientFailure, ClientReport, OneShotMerge

__all__ = [
    "CClipMerge", "ClientFailure", "ClientReport", "FedAvgMerge", "FedGMAMerge", "FedNovaMerge", "MedianMerge",
    "OneShotMerge", "SingleMethodMerge", "TSVMerge", "TaskArithmeticMerge",
]
