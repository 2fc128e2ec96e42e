"""One-shot merging on Flower's message API.

``OneShotMerge`` runs a single federated round: it sends θ0 and each client's own training plan,
collects the task vectors τ_i that clients reply with, drops and records failed or invalid replies,
and merges the same task vectors with every requested method of :mod:`fedmerge.merging`. Its
``start(...)`` result holds θ0 + λ · τ_merged of the first method; every method's merged task vector
stays in ``strategy.merged`` for the caller to evaluate.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING, getLogger
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from fedmerge.errors import FederationError, MergeError
from fedmerge.merging import METHODS, merge, validate_task_vector
from fedmerge.merging import merge_device as merge_device_of
from fedmerge.task_vector import TaskVector, apply, floating_items
from fedmerge.train.lora import dense_task_vector, has_factors

PARTITION_KEY = "partition-id"
log = getLogger("flwr").log  # Flower's logger, as its own strategies use it


@dataclass
class ClientReport:
    """A client whose reply was accepted: its task vector, the metrics it sent and the bytes of the
    arrays it sent them in (its dense task vector, or a LoRA client's factors)."""

    node_id: int
    partition_id: int | None
    metrics: dict[str, Any]
    task_vector: dict[str, Tensor] = field(repr=False)
    bytes_sent: int = 0


@dataclass(frozen=True)
class ClientFailure:
    """A client left out of the merge, and why."""

    node_id: int
    partition_id: int | None
    reason: str


class OneShotMerge(Strategy):
    """Collect task vectors in one round and merge them with one or more fedmerge methods.

    Parameters
    ----------
    methods : Sequence[str]
        Names from ``fedmerge.merging.METHODS``; the first one forms the returned global model.
    scale : float or Mapping[str, float] (default: 1.0)
        λ in θ0 + λ · τ_merged, one number for every method or one per method.
    method_options : Mapping[str, Mapping[str, Any]], optional
        Extra options per method, e.g. ``{"fedgma": {"rho": 0.4}}``. Per-client options
        (FedNova's ``local_steps``) are read from each reply's metrics (``local-steps``).
    min_train_nodes : int (default: 2)
        Fewest valid replies to merge; fewer raise ``FederationError``.
    min_available_nodes : int (default: 2)
        Nodes to wait for before the round starts.
    weighted_by_key : str or None (default: "num-examples")
        Reply metric giving each client's weight p_i; ``None`` weighs clients equally.
    train_plans : Mapping[int, Mapping[str, Any]], optional
        Per partition-id config entries (``local-steps``, ``lr``, …) merged into the train config.
        When given, nodes are first asked for their ``partition-id`` with a ``query`` message.
    node_wait_timeout : float (default: 120.0)
        Seconds to wait for ``min_available_nodes`` to connect (and for ``query`` replies).
    max_update_norm : float, optional
        A reply whose task vector has a larger L2 norm (over all entries) is excluded and named,
        like any other invalid reply; ``None`` sets no bound.
    merge_device : str (default: "auto")
        Where every rule computes: auto (the GPU when there is one), cpu, cuda, cuda:N or mps. The
        merged task vectors come back to the CPU; a device this machine lacks is a ``MergeError``
        here, before the round.
    arrayrecord_key, configrecord_key : str
        Record names in messages, as in Flower's built-in strategies.

    A method whose merge fails, or whose model θ0 + λ · τ_merged is not finite (an overflow, e.g.
    for a huge λ), is recorded in ``method_failures`` with the reason and left out of ``merged``;
    the others are unaffected. Only when every method fails is it a ``FederationError``.
    """

    def __init__(
        self,
        methods: Sequence[str] = ("fedavg",),
        *,
        scale: float | Mapping[str, float] = 1.0,
        method_options: Mapping[str, Mapping[str, Any]] | None = None,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str | None = "num-examples",
        train_plans: Mapping[int, Mapping[str, Any]] | None = None,
        node_wait_timeout: float = 120.0,
        max_update_norm: float | None = None,
        merge_device: str = "auto",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        self.methods = tuple(methods)
        if not self.methods:
            raise MergeError("no merging methods given")
        for m in self.methods:
            METHODS.check(m)
        self.scale = {m: float(scale[m] if isinstance(scale, Mapping) else scale) for m in self.methods}
        self.method_options = {m: dict((method_options or {}).get(m, {})) for m in self.methods}
        for m, opts in self.method_options.items():
            bad = sorted(set(opts) - set(METHODS[m].settable))
            if bad:
                raise MergeError(f"{m}: option {bad[0]!r} cannot be set here")
            missing = sorted(METHODS[m].required - METHODS[m].per_client - set(opts))
            if missing:  # found now, not after every client has trained
                raise MergeError(f"{m}: required option {missing[0]!r} is missing")
        if min_train_nodes < 1 or min_available_nodes < 1:
            raise FederationError("min_train_nodes and min_available_nodes must be at least 1")
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.weighted_by_key = weighted_by_key
        self.train_plans = {int(k): dict(v) for k, v in (train_plans or {}).items()}
        self.node_wait_timeout = node_wait_timeout
        if max_update_norm is not None and not (isinstance(max_update_norm, (int, float)) and max_update_norm > 0):
            raise FederationError(f"max_update_norm must be a positive number or None, got {max_update_norm!r}")
        self.max_update_norm = None if max_update_norm is None else float(max_update_norm)
        self.merge_device = merge_device_of(merge_device)
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.required_metrics = sorted(
            {o.metric_key for m in self.methods for o in METHODS[m].options if o.per_client}
            | ({weighted_by_key} if weighted_by_key else set())
        )
        self._reset()

    @classmethod
    def single(cls, method: str, *, scale: float = 1.0, **kwargs: Any) -> OneShotMerge:
        """A strategy for one rule: keyword arguments that are options of ``method`` (``rho`` for
        FedGMA) go to the rule, the rest to :class:`OneShotMerge`, e.g.
        ``OneShotMerge.single("fednova", min_train_nodes=4)``."""
        entry = METHODS[method]
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in entry.settable}
        return cls((method,), scale=scale, method_options={method: options}, **kwargs)

    def _reset(self) -> None:
        self.base: dict[str, Tensor] = {}
        self.partition_of: dict[int, int] = {}
        self.sent_to: list[int] = []
        self.reports: list[ClientReport] = []
        self.failures: list[ClientFailure] = []
        self.merged: dict[str, dict[str, Tensor]] = {}
        self.merge_seconds: dict[str, float] = {}
        self.method_failures: dict[str, str] = {}  # rule -> why it produced no merged vector (or model)
        self.timing: dict[str, float] = {}  # seconds: wait-for-nodes, query, clients (until aggregation)
        self._sent_at = time.perf_counter()

    # ------------------------------------------------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├── Merging methods: %s", ", ".join(f"{m} (λ={self.scale[m]:g})" for m in self.methods))
        log(INFO, "\t├── Weighted by: %s", self.weighted_by_key or "uniform")
        log(INFO, "\t└── Nodes: wait for %d, merge at least %d", self.min_available_nodes, self.min_train_nodes)

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Node ids once ``min_available_nodes`` are connected; ``FederationError`` after the timeout."""
        deadline = time.monotonic() + self.node_wait_timeout
        while len(ids := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise FederationError(
                    f"only {len(ids)} of {self.min_available_nodes} expected nodes connected "
                    f"within {self.node_wait_timeout:g} s"
                )
            time.sleep(0.1)
        return ids

    def query_partitions(self, grid: Grid, node_ids: Sequence[int], server_round: int) -> dict[int, int]:
        """Ask every node for its ``partition-id`` (a node that does not answer gets no plan)."""
        msgs = [Message(RecordDict({}), dst_node_id=i, message_type=MessageType.QUERY, group_id=str(server_round))
                for i in node_ids]
        found: dict[int, int] = {}
        for reply in grid.send_and_receive(msgs, timeout=self.node_wait_timeout):
            metrics: Mapping[str, Any] = {} if reply.has_error() else reply.content.metric_records.get("metrics", {})
            pid = metrics.get(PARTITION_KEY)
            if isinstance(pid, int):
                found[reply.metadata.src_node_id] = pid
        return found

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reset()
        self.base = arrays.to_torch_state_dict()
        t0 = time.perf_counter()
        node_ids = self.wait_for_nodes(grid)
        self.timing["wait-for-nodes"] = time.perf_counter() - t0
        if self.train_plans:
            t0 = time.perf_counter()
            self.partition_of = self.query_partitions(grid, node_ids, server_round)
            self.timing["query"] = time.perf_counter() - t0
            for nid in node_ids:
                if nid not in self.partition_of:
                    self.failures.append(ClientFailure(nid, None, "did not report its partition-id"))
            node_ids = [n for n in node_ids if n in self.partition_of]
        messages = []
        for nid in node_ids:
            plan = self.train_plans.get(self.partition_of.get(nid, -1), {})
            cfg = ConfigRecord({**dict(config), **plan, "server-round": server_round})
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            messages.append(Message(content, dst_node_id=nid, message_type=MessageType.TRAIN,
                                    group_id=str(server_round)))
        self.sent_to = node_ids
        self._sent_at = time.perf_counter()
        return messages

    def _accept(self, reply: Message) -> ClientReport:
        """Unpack and validate one reply; ``MergeError`` says what is wrong with it."""
        nid = reply.metadata.src_node_id
        if reply.has_error():
            raise MergeError(f"client raised an error: {reply.error.reason}")
        content = reply.content
        if self.arrayrecord_key not in content.array_records:
            raise MergeError(f"reply has no '{self.arrayrecord_key}' ArrayRecord")
        if len(content.metric_records) != 1:
            raise MergeError("reply must hold exactly one MetricRecord")
        metrics = dict(next(iter(content.metric_records.values())))
        missing = [k for k in self.required_metrics if k not in metrics]
        if missing:
            raise MergeError(f"reply metrics lack {missing[0]!r}")
        for k in self.required_metrics:
            value = metrics[k]
            if not isinstance(value, (int, float)) or not value > 0:
                raise MergeError(f"reply metric {k!r} must be a positive number, got {value!r}")
        record = content.array_records[self.arrayrecord_key]
        try:
            tv: dict[str, Tensor] = dict(record.to_torch_state_dict())
        except Exception as exc:  # undecodable arrays (e.g. an unsupported dtype)
            raise MergeError(f"task vector cannot be decoded: {exc}") from None
        if has_factors(tv):  # a LoRA client's factors: its dense update (α/r)·B·A
            tv = dense_task_vector(tv, self.base)
        validate_task_vector(tv, floating_items(self.base), "task vector")
        if self.max_update_norm is not None:
            norm = TaskVector(tv).norm()
            if not norm <= self.max_update_norm:
                raise MergeError(f"task vector norm {norm:.4g} exceeds max-update-norm {self.max_update_norm:g}")
        pid = self.partition_of.get(nid, metrics.get(PARTITION_KEY))
        return ClientReport(nid, int(pid) if isinstance(pid, (int, float)) else None, metrics, tv,
                            bytes_sent=sum(len(array.data) for array in record.values()))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.timing["clients"] = time.perf_counter() - self._sent_at
        answered = set()
        for reply in replies:
            nid = reply.metadata.src_node_id
            answered.add(nid)
            try:
                self.reports.append(self._accept(reply))
            except MergeError as exc:
                self.failures.append(ClientFailure(nid, self.partition_of.get(nid), str(exc)))
        for nid in self.sent_to:
            if nid not in answered:
                self.failures.append(ClientFailure(nid, self.partition_of.get(nid), "no reply before the timeout"))
        # Replies arrive in any order: the failures are listed by partition, as the reports are merged.
        self.failures.sort(key=lambda f: (f.partition_id if f.partition_id is not None else 1 << 30, f.node_id))
        for f in self.failures:
            log(WARNING, "Client node %s (partition %s) left out: %s", f.node_id, f.partition_id, f.reason)
        if len(self.reports) < self.min_train_nodes:
            why = "; ".join(f"partition {f.partition_id}: {f.reason}" for f in self.failures) or "no replies"
            raise FederationError(
                f"only {len(self.reports)} valid task vectors, fewer than the {self.min_train_nodes} required ({why})"
            )
        # A fixed order makes floating-point sums, and so the merged weights, reproducible.
        self.reports.sort(key=lambda r: (r.partition_id if r.partition_id is not None else 1 << 30, r.node_id))
        first_model = None  # θ0 + λ·τ_merged of the first rule that merged: the round's returned model
        for m in self.methods:
            task_vectors, weights, options = self.merge_inputs(m)
            t0 = time.perf_counter()
            try:
                merged = merge(m, task_vectors, weights, device=self.merge_device, **options)
                seconds = time.perf_counter() - t0
                model = apply(self.base, merged, self.scale[m])  # the model must be finite too
            except MergeError as exc:  # e.g. an overflow: this rule's result is lost, not the others'
                self.method_failures[m] = str(exc)
                log(WARNING, "Merging rule %s failed: %s", m, exc)
                continue
            self.merged[m], self.merge_seconds[m] = merged, seconds
            first_model = model if first_model is None else first_model
        if first_model is None:
            raise FederationError("every merging rule failed: " + "; ".join(self.method_failures.values()))
        metrics = MetricRecord({"num-merged": len(self.reports), "num-failed": len(self.failures)})
        return ArrayRecord(first_model), metrics

    def merge_inputs(self, method: str) -> tuple[list[dict[str, Tensor]], list[float] | None, dict[str, Any]]:
        """What ``merge(method, ...)`` gets from the accepted replies: task vectors, weights p_i (None:
        uniform) and options, per-client ones (FedNova's ``local_steps``) read from reply metrics."""
        task_vectors = [r.task_vector for r in self.reports]
        weights = [float(r.metrics[self.weighted_by_key]) for r in self.reports] if self.weighted_by_key else None
        options = dict(self.method_options[method])
        for opt in METHODS[method].options:
            if opt.per_client:
                options[opt.name] = [r.metrics[opt.metric_key] for r in self.reports]
        return task_vectors, weights, options

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # merged models are evaluated by the caller (centrally, on every method)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
