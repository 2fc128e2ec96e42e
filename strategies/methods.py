"""One strategy class per merging rule, to drop into any Flower ServerApp.

Each is :class:`~strategies.one_shot.OneShotMerge` fixed to one method; keyword arguments that are
options of that method (``rho`` for FedGMA) go to the method, the rest to ``OneShotMerge``::

    strategy = FedNovaMerge(scale=1.0, min_train_nodes=4)
    result = strategy.start(grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=1)
"""

from __future__ import annotations

from typing import Any, ClassVar

from fedmerge.merging import METHODS
from strategies.one_shot import OneShotMerge


class SingleMethodMerge(OneShotMerge):
    method: ClassVar[str]

    def __init__(self, *, scale: float = 1.0, **kwargs: Any) -> None:
        spec = METHODS[self.method]
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in spec.options}
        super().__init__((self.method,), scale=scale, method_options={self.method: options}, **kwargs)


class TaskArithmeticMerge(SingleMethodMerge):
    """Task Arithmetic, θ0 + λ Σ_i τ_i: one-shot FedAvg with server learning rate η = λN."""

    method = "task_arithmetic"


class FedAvgMerge(SingleMethodMerge):
    """One-shot FedAvg, θ0 + λ Σ_i p_i τ_i with p_i ∝ ``num-examples`` (or uniform)."""

    method = "fedavg"


class FedNovaMerge(SingleMethodMerge):
    """FedNova, θ0 + λ (Σ_j p_j K_j) Σ_i p_i τ_i / K_i, K_i from each reply's ``local-steps``."""

    method = "fednova"


class MedianMerge(SingleMethodMerge):
    """Coordinate-wise median of the task vectors (robust to a minority of outlying clients)."""

    method = "median"


class FedGMAMerge(SingleMethodMerge):
    """FedGMA: the weighted mean masked by sign agreement; ``rho`` in [0, 1] (default 0.5)."""

    method = "fedgma"


class CClipMerge(SingleMethodMerge):
    """Centred clipping at θ0: each τ_i scaled to norm at most ``rho`` (default: the median norm)."""

    method = "cclip"


class TSVMerge(SingleMethodMerge):
    """TSV-Merge: per layer, the tasks' top singular vectors orthogonalised (Gargiulo et al., 2025)."""

    method = "tsv"


class TrimmedMeanMerge(SingleMethodMerge):
    """Coordinate-wise trimmed mean: the ⌊beta·n⌋ lowest and highest values dropped (default beta 0.1)."""

    method = "trimmed_mean"


class TiesMerge(SingleMethodMerge):
    """TIES-Merging: top-``k`` magnitudes per task (default 0.2), elected signs, disjoint mean (Yadav et al., 2023)."""

    method = "ties"


class TSVCompressMerge(SingleMethodMerge):
    """TSV-C: the sum of every task's rank-⌊r/T⌋ approximation per matrix (Gargiulo et al., 2025)."""

    method = "tsv_compress"


class IsoCMerge(SingleMethodMerge):
    """Iso-C: the summed task matrix with a flat (isotropic) spectrum (Marczak et al., 2025)."""

    method = "iso_c"


class IsoCTSMerge(SingleMethodMerge):
    """Iso-CTS: common plus task-specific subspaces, isotropic spectrum; ``common_space_fraction`` 0.8."""

    method = "iso_cts"
