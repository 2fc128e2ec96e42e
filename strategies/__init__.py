"""Flower strategies (message API) that merge clients' task vectors in one round."""

from strategies.methods import (
    CClipMerge, FedAvgMerge, FedGMAMerge, FedNovaMerge, IsoCMerge, IsoCTSMerge, MedianMerge, SingleMethodMerge,
    TaskArithmeticMerge, TiesMerge, TrimmedMeanMerge, TSVCompressMerge, TSVMerge,
)
from strategies.one_shot import ClientFailure, ClientReport, OneShotMerge

__all__ = [
    "CClipMerge", "ClientFailure", "ClientReport", "FedAvgMerge", "FedGMAMerge", "FedNovaMerge", "IsoCMerge",
    "IsoCTSMerge", "MedianMerge", "OneShotMerge", "SingleMethodMerge", "TSVCompressMerge", "TSVMerge",
    "TaskArithmeticMerge", "TiesMerge", "TrimmedMeanMerge",
]
