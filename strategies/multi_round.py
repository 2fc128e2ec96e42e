"""Multi-round FedAvg for clients that reply with task vectors.

Flower's built-in ``FedAvg`` replaces the global model with the weighted mean of the replies, which
is right when clients send full weights. fedmerge's ClientApp sends task vectors Δ_i = θ_i − θ_t, so
the server step is θ_{t+1} = θ_t + η Σ_i p_i Δ_i (η the server learning rate). ``TaskVectorFedAvg``
is Flower's ``FedAvg`` with only that step changed: node sampling, reply checks and the weighted mean
(p_i ∝ ``num-examples``) stay Flower's own. With one round it is one-shot FedAvg, i.e. Task
Arithmetic with λ = η/N for uniform p_i.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmerge.errors import FederationError
from fedmerge.task_vector import apply


class TaskVectorFedAvg(FedAvg):
    """FedAvg over task vectors: θ_{t+1} = θ_t + ``server_lr`` · Σ_i p_i Δ_i.

    Parameters
    ----------
    server_lr : float (default: 1.0)
        η, the server learning rate.
    **kwargs
        Passed to ``flwr.serverapp.strategy.FedAvg`` (``min_available_nodes``, ``weighted_by_key``, …);
        ``fraction_evaluate`` defaults to 0 (no federated evaluation). Unlike ``FedAvg``, a round in
        which fewer than ``min_train_nodes`` clients reply validly raises ``FederationError``
        instead of averaging fewer clients.
    """

    def __init__(self, *, server_lr: float = 1.0, **kwargs: Any) -> None:
        kwargs.setdefault("fraction_evaluate", 0.0)  # fedmerge's ClientApp trains; the server evaluates
        flwr_logger = logging.getLogger("flwr")
        level = flwr_logger.level
        flwr_logger.setLevel(logging.ERROR)  # FedAvg warns that fraction_evaluate=0 skips evaluation: intended
        try:
            super().__init__(**kwargs)
        finally:
            flwr_logger.setLevel(level)
        self.server_lr = float(server_lr)
        self._current: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = arrays  # θ_t, to which this round's mean task vector is added
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = [r for r in replies if not r.has_error()]
        if len(valid) < self.min_train_nodes:
            reasons = "; ".join(str(r.error.reason) for r in replies if r.has_error()) or "no replies"
            raise FederationError(
                f"round {server_round}: {len(valid)} valid replies, fewer than {self.min_train_nodes} ({reasons})"
            )
        mean_delta, metrics = super().aggregate_train(server_round, valid)
        if mean_delta is None or self._current is None:
            return None, metrics
        theta = apply(self._current.to_torch_state_dict(), mean_delta.to_torch_state_dict(), self.server_lr)
        return ArrayRecord(theta), metrics
