"""Two engines that run the same ServerApp and ClientApp.

* ``ray``: Flower's simulation runtime (``flwr.simulation.run_simulation``): each ClientApp in a Ray
  actor, ``client-cpus``/``client-gpus`` per client, clients in parallel.
* ``inprocess``: :class:`InProcessGrid`, a Flower ``Grid`` that calls the ClientApp directly in this
  process, one message at a time. No Ray start-up; for tests, sweeps and debugging. Both give the
  same merged weights for the same config (clients train single-threaded and deterministically).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from simulations.flower_private import Run, set_task_identity

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def set_offline_env() -> None:
    """Flower and Ray must not reach the network at run time; a user's explicit setting wins."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


class InProcessGrid(Grid):
    """A Flower ``Grid`` whose nodes are ClientApp calls in this process.

    Each node gets a ``Context`` with ``node_config = {"partition-id": i, "num-partitions": N}``,
    as Flower's simulation runtime gives it. A client that raises produces an error reply, exactly
    as under Ray. Messages run lazily, one per ``pull_messages`` call, so callers see progress.

    Clients run one after another here, but stand for clients that run in parallel, so a timeout
    (``reply_timeout``, set from ``send_and_receive``'s ``timeout``) applies to each client's own
    run time: a client that takes longer is treated as one whose reply never came (its reply is
    dropped), as on a real deployment; the others are unaffected however long the round takes.
    """

    _ERROR_CODE_CLIENT_EXCEPTION = 1

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        set_task_identity(run_id)
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            nid: Context(run_id=run_id, node_id=nid, node_config={"partition-id": i, "num-partitions": num_nodes},
                         state=RecordDict(), run_config={})
            for i, nid in enumerate(self.node_ids)
        }
        self._pending: dict[str, Message] = {}
        self._done: dict[str, Message] = {}
        self.reply_timeout: float | None = None

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node with id {msg.metadata.dst_node_id}")
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid  # the SuperLink's job in a real deployment
            self._pending[mid] = msg
            ids.append(mid)
        return ids

    def _execute(self, mid: str) -> None:
        msg = self._pending.pop(mid)
        t0 = time.monotonic()
        try:
            reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # a crashing client is a failed reply, not a crashed server
            reply = Message(Error(self._ERROR_CODE_CLIENT_EXCEPTION, f"{type(exc).__name__}: {exc}"), reply_to=msg)
        if self.reply_timeout is not None and time.monotonic() - t0 > self.reply_timeout:
            return  # too late: the server has stopped waiting for this client
        self._done[mid] = reply

    def idle(self, message_ids: Iterable[str]) -> bool:
        """True when none of ``message_ids`` is left to run or to deliver (the rest were dropped)."""
        return not any(mid in self._pending or mid in self._done for mid in message_ids)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = list(message_ids)
        for mid in wanted:
            if mid in self._pending:
                self._execute(mid)
                break
        return [self._done.pop(mid) for mid in wanted if mid in self._done]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self.reply_timeout = timeout
        ids = set(self.push_messages(messages))
        replies: list[Message] = []
        while ids and not self.idle(ids):
            got = list(self.pull_messages(ids))
            ids -= {r.metadata.reply_to_message_id for r in got}
            replies.extend(got)
        return replies


class ProgressGrid(Grid):
    """Wraps a Grid; ``send_and_receive`` reports the messages it sends and each reply as it arrives."""

    def __init__(self, grid: Grid, on_send: Callable[[list[Message]], None], on_reply: Callable[[Message], None],
                 poll_seconds: float = 0.05) -> None:
        self.grid, self.on_send, self.on_reply, self.poll_seconds = grid, on_send, on_reply, poll_seconds

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.on_send(messages)
        sequential = self.grid if isinstance(self.grid, InProcessGrid) else None
        if sequential is not None:  # it applies the timeout to each client's own run time (see InProcessGrid)
            sequential.reply_timeout, timeout = timeout, None
        pending = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            if sequential is not None and sequential.idle(pending):
                break
            got = list(self.grid.pull_messages(pending))
            for reply in got:
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
                self.on_reply(reply)
            if not got:
                time.sleep(self.poll_seconds)
        return replies


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_nodes: int) -> None:
    grid = InProcessGrid(client_app, num_nodes)
    context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server_app(grid, context)


def run_ray(server_app: ServerApp, client_app: ClientApp, num_nodes: int, num_cpus: int, num_gpus: float) -> None:
    """Flower's simulation runtime on Ray, quiet: Ray's and Flower's INFO logs stay out of the terminal."""
    from flwr.simulation import run_simulation

    backend_config: dict[str, dict[str, Any]] = {
        "client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "init_args": {"logging_level": logging.ERROR, "log_to_driver": False, "configure_logging": True,
                      "_node_ip_address": "127.0.0.1",  # local simulation: Ray's traffic stays on loopback
                      "include_dashboard": False},
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # hides run_simulation's deprecation notice; failures still surface
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                       backend_config=backend_config)
    finally:
        flwr_logger.setLevel(level)


def quiet_flower_logs() -> None:
    """Flower logs warnings and errors only, with colour codes only where they go to a terminal."""
    from flwr.common.logger import ConsoleHandler

    logger = logging.getLogger("flwr")
    logger.setLevel(logging.WARNING)
    for handler in logger.handlers:
        if isinstance(handler, ConsoleHandler):
            isatty = getattr(handler.stream, "isatty", None)
            handler.colored = bool(isatty and isatty())

