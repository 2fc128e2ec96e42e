"""Run work in a child process that can be stopped at once, together with every process it started.

Flower's Ray simulation runs the ServerApp in a thread and the clients in Ray actors. Neither can be
interrupted from outside: a blocked ``send_and_receive``, a client training past its deadline, Ray's
start-up. So the Ray engine runs in a child process in its own session (Ray's services, workers and
agents join it); the parent keeps the terminal and the progress display, and stops the work by
killing that session's processes: on Ctrl-C, on SIGTERM, or as soon as the result is in.

* The child is in its own session, so the terminal's Ctrl-C reaches only the parent, which then
  stops everything at once (Ray's C++ processes would otherwise dump stacks on signals).
* The child watches its parent: if the parent is killed outright, the child kills every process
  it started (Ray's services, workers and agents, which would otherwise linger for a minute) and
  itself, so even a SIGKILLed run leaves nothing going on.
* Events (progress) and the result travel back through a queue; a large result goes through a file
  in a private temporary directory, read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from fedmerge.errors import FederationError

Post = Callable[..., None]
"""``post(kind, *payload)``: send an event from the child to the parent."""

_POLL_SECONDS = 0.1
_REAP_SECONDS = 5.0


def _stop_everything_when_the_parent_dies(parent: int, private: Path) -> None:
    """A thread that, once the parent is gone (killed outright, with no chance to clean up), kills
    every process this one started (Ray's services, workers and agents), removes the parent's
    private directory ``private`` and ends this process."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_POLL_SECONDS)
        shutil.rmtree(private, ignore_errors=True)
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        os.killpg(os.getpgid(0), signal.SIGKILL)  # this session (and this process) last

    threading.Thread(target=watch, name="fedmerge-parent-watch", daemon=True).start()


def _child_main(payload: bytes, start: Callable[[], None] | None, events: Any, result_path: str,
                parent: int) -> None:
    os.setsid()  # Ray's processes join this session; the terminal's Ctrl-C goes to the parent only
    _stop_everything_when_the_parent_dies(parent, Path(result_path).parent)

    def post(kind: str, *payload: Any) -> None:
        events.put((kind, payload))

    def deliver(result: Any) -> None:
        import torch

        torch.save(result, result_path)
        post("result")

    try:
        work, args = _unpickled_while(start, payload)
        work(post, deliver, *args)
    except BaseException as exc:  # every failure goes back to the parent, to be reported as one line
        post("error", _picklable(exc))
    post("finished")


def _unpickled_while(start: Callable[[], None] | None, payload: bytes) -> Any:
    """``pickle.loads(payload)``, which imports what the work needs (seconds: torch, Flower), in a
    thread while ``start()`` (such as starting Ray, which mostly waits on processes it launched)
    runs here; each one's exception is raised here."""
    loaded: dict[str, Any] = {}

    def load() -> None:
        try:
            loaded["value"] = pickle.loads(payload)
        except BaseException as exc:
            loaded["error"] = exc

    loader = threading.Thread(target=load, name="fedmerge-imports")
    loader.start()
    try:
        if start is not None:
            start()
    finally:
        loader.join()
    if "error" in loaded:
        raise loaded["error"]
    return loaded["value"]


def _picklable(exc: BaseException) -> BaseException:
    """``exc`` itself if it survives pickling, else a FederationError carrying its message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return FederationError(f"{type(exc).__name__}: {exc}")


def stop_process_tree(pid: int) -> None:
    """Kill process ``pid``, its session and every descendant, and reap them (a few seconds at most)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    with contextlib.suppress(OSError):
        if os.getsid(pid) == pid:  # the child made its own session: its process group is its pid
            os.killpg(pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _wait_until_dead(procs, _REAP_SECONDS)


def _wait_until_dead(procs: list[psutil.Process], timeout: float) -> None:
    """Wait until every one of ``procs`` has ended. A killed process that is left a zombie counts as
    ended: it holds no memory, file or socket any more, and whoever reaps it (its parent is killed
    too, so this machine's init) may take seconds to."""
    deadline = time.monotonic() + timeout
    while procs and time.monotonic() < deadline:
        procs = [proc for proc in procs if _running(proc)]
        if procs:
            time.sleep(0.01)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone, or no longer ours to see
        return False


def run_isolated(work: Callable[..., Any], args: tuple, on_event: Callable[[str, tuple], None], *,
                 start: Callable[[], None] | None = None) -> Any:
    """Run ``work(post, deliver, *args)`` in a child process and return what it ``deliver``-ed.

    ``start()``, if given, runs in the child first, while ``work`` and ``args`` are still being
    unpickled (imported) in a thread beside it; it must come from a module that imports quickly.

    ``on_event(kind, payload)`` receives the child's ``post``-ed events as they come. An exception in
    the child is raised here; a child that dies without a result is a :class:`FederationError`. On
    return, on an exception, and on KeyboardInterrupt the child and all its processes are killed.
    ``work``, ``args`` and ``start`` must pickle (module-level functions, partials of them and plain data)."""
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    with tempfile.TemporaryDirectory(prefix="fedmerge-engine-") as private:
        result_path = str(Path(private) / "result.pt")
        payload = pickle.dumps((work, args))
        child = context.Process(target=_child_main, args=(payload, start, events, result_path, os.getpid()),
                                name="fedmerge-engine")
        with _sigint_ignored():  # inherited: the child never turns Ctrl-C into a traceback of its own
            child.start()
        assert child.pid is not None
        try:
            return _wait_for_result(child, events, result_path, on_event)
        finally:
            stop_process_tree(child.pid)
            child.join(_REAP_SECONDS)
            events.close()
            events.cancel_join_thread()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _wait_for_result(child: Any, events: Any, result_path: str, on_event: Callable[[str, tuple], None]) -> Any:
    import torch

    while True:
        try:
            kind, payload = events.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if not child.is_alive():
                raise FederationError(f"the engine's process ended without a result (exit code {child.exitcode})"
                                      ) from None
            continue
        if kind == "result":
            with _safe_result_types():
                return torch.load(result_path, weights_only=True)
        if kind == "error":
            raise payload[0]
        if kind == "finished":
            raise FederationError("the engine finished without a result")
        on_event(kind, payload)


_SAFE_TYPES: list[type] = []


def allow_result_type(cls: type) -> type:
    """Let instances of ``cls`` (a dataclass of tensors and plain data) come back as a result."""
    _SAFE_TYPES.append(cls)
    return cls


@contextlib.contextmanager
def _safe_result_types() -> Iterator[None]:
    import torch

    with torch.serialization.safe_globals(list(_SAFE_TYPES)):
        yield
