"""Flower strategies (message API) that merge clients' task vectors: one-shot, and multi-round FedAvg."""

from strategies.methods import (
    CClipMerge, FedAvgMerge, FedGMAMerge, FedNovaMerge, IsoCMerge, IsoCTSMerge, MedianMerge, SingleMethodMerge,
    TaskArithmeticMerge, TiesMerge, TrimmedMeanMerge, TSVCompressMerge, TSVMerge,
)
from strategies.multi_round import TaskVectorFedAvg
from strategies.one_shot import ClientFailure, ClientReport, OneShotMerge

__all__ = [
    "CClipMerge", "ClientFailure", "ClientReport", "FedAvgMerge", "FedGMAMerge", "FedNovaMerge", "IsoCMerge",
    "IsoCTSMerge", "MedianMerge", "OneShotMerge", "SingleMethodMerge", "TSVCompressMerge", "TSVMerge",
    "TaskArithmeticMerge", "TaskVectorFedAvg", "TiesMerge", "TrimmedMeanMerge",
]
