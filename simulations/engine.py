"""Two engines that run the same ServerApp and ClientApp.

* ``ray``: Flower's simulation runtime (``flwr.simulation.run_simulation``): each ClientApp in a Ray
  actor, ``client-cpus``/``client-gpus`` per client, clients in parallel.
* ``inprocess``: :class:`InProcessGrid`, a Flower ``Grid`` that calls the ClientApp directly in this
  process, one message at a time. No Ray start-up; for tests, sweeps and debugging. Both give the
  same merged weights for the same config (clients train single-threaded and deterministically).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedmerge.train import OutOfTime, time_limit
from simulations.cluster import ray_init_args
from simulations.flower_private import Run, set_task_identity

_client_threads: list[threading.Thread] = []  # the in-process engine's, until their OS threads are gone


def _os_thread_alive(thread: threading.Thread) -> bool:
    """Whether ``thread``'s OS thread still exists. A thread that ran torch still runs its C++
    thread-local destructors after ``join`` returns; on Linux it is gone with its /proc entry."""
    task = Path(f"/proc/self/task/{thread.native_id}")
    return task.exists() if thread.native_id is not None and task.parent.is_dir() else thread.is_alive()


def settle_client_threads(limit: float = 1.0) -> bool:
    """Wait at most ``limit`` seconds until every client thread the in-process engine started has
    ended down to its OS thread; False if one has not (a client it stopped waiting for, at the
    timeout or on Ctrl-C, still inside a long computation). A process that exits normally while such
    a thread runs torch code has the C++ runtime abort it: the caller must then end it at once."""
    end = time.monotonic() + limit
    while any(map(_os_thread_alive, _client_threads)) and time.monotonic() < end:
        time.sleep(0.01)
    _client_threads[:] = [t for t in _client_threads if _os_thread_alive(t)]
    return not _client_threads


class InProcessGrid(Grid):
    """A Flower ``Grid`` whose nodes are ClientApp calls in this process.

    Each node gets a ``Context`` with ``node_config = {"partition-id": i, "num-partitions": N}``,
    as Flower's simulation runtime gives it. A client that raises produces an error reply, exactly
    as under Ray. Messages run lazily, one per ``pull_messages`` call, so callers see progress.

    Clients run one after another here, but stand for clients that run in parallel, so a timeout
    (``reply_timeout``, set from ``send_and_receive``'s ``timeout``) applies to each client's own
    run time: a client that takes longer is treated as one whose reply never came (its reply is
    dropped and it is told to stop), as on a real deployment; the others are unaffected however
    long the round takes. Ctrl-C stops the running client within one training step.
    """

    _ERROR_CODE_CLIENT_EXCEPTION = 1
    _STOP_GRACE_SECONDS = 2.0

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
        self._cancel = threading.Event()

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
        """Run one client in a worker thread and wait at most ``reply_timeout`` for it. A client still
        working then is dropped; its clock (``created_at`` + ``ttl``) has run out, so fedmerge's training
        loop stops it at its next step (see ``fedmerge.train.time_limit``)."""
        msg = self._pending.pop(mid)
        msg.metadata.created_at = time.time()  # it stands for a client running in parallel: its clock starts now
        if self.reply_timeout is not None:
            msg.metadata.ttl = self.reply_timeout
        context = self.contexts[msg.metadata.dst_node_id]
        outcome: list[Message] = []

        def call() -> None:
            with time_limit(cancel=self._cancel):
                try:
                    outcome.append(self.client_app(msg, context))
                except OutOfTime:  # it gave up at the deadline: no reply, as on a real deployment
                    pass
                except Exception as exc:  # a crashing client is a failed reply, not a crashed server
                    outcome.append(Message(Error(self._ERROR_CODE_CLIENT_EXCEPTION, f"{type(exc).__name__}: {exc}"),
                                           reply_to=msg))

        worker = threading.Thread(target=call, name=f"fedmerge-client-{msg.metadata.dst_node_id}", daemon=True)
        _client_threads[:] = [t for t in _client_threads if _os_thread_alive(t)]
        _client_threads.append(worker)
        worker.start()
        try:
            worker.join(self.reply_timeout)
        except BaseException:  # Ctrl-C: tell the client to stop, give it a moment to do so, go on stopping
            self._cancel.set()
            worker.join(self._STOP_GRACE_SECONDS)
            raise
        if outcome:  # else: too late, the server has stopped waiting for this client
            self._done[mid] = outcome[0]

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
    """Wraps a Grid; ``send_and_receive`` reports the messages it sends and each reply as it arrives,
    and gives each message the round's timeout as its TTL, so clients know when to give up."""

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
        if timeout is not None:  # a message expires when the server stops waiting for its reply
            for msg in messages:
                msg.metadata.ttl = timeout
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
        "init_args": {**ray_init_args(), "configure_logging": True},
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

