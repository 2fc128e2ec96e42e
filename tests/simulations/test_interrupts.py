"""A run's life on both engines: Ctrl-C and SIGTERM stop it at once with nothing written and no process
of ours left, a SIGKILLed run does not hurt the next, ``timeout`` bounds a round even when a client
never finishes, and a Ray run keeps every socket on the loopback address.

Runs are real ``fedmerge run`` processes. The bounds given to ``wait`` catch a run that hangs (before
these behaviours existed, such runs waited out a 600 s timeout or the slow client's hours of training);
they are far above the few seconds a run takes to stop, so a busy machine does not fail them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from simulations.isolation import stop_process_tree

HANG_GUARD_SECONDS = 60
RAY_START_GUARD_SECONDS = 180  # a busy 2-core machine takes a minute or more to start Ray


@pytest.fixture
def fedmerge_run():
    """``start(tmp_path, *settings)``: ``fedmerge run`` in a child that handles Ctrl-C as a terminal's
    foreground process does (a test started from a background shell would otherwise inherit SIGINT
    ignored). Whatever a failed test leaves running is stopped, with its whole process tree."""
    started: list[subprocess.Popen] = []

    def start(tmp_path: Path, *settings: str) -> subprocess.Popen:
        env = {**clean_environment(), "FEDMERGE_CACHE": str(tmp_path / "cache"), "FLWR_HOME": str(tmp_path / "flwr")}
        args = [sys.executable, "-c", "from simulations.cli import main; main()", "run", "-q",
                "--set", "num-clients=3", "--set", "pretrain-steps=20", "--set", "strategies=['fedavg']",
                *(a for s in settings for a in ("--set", s)), "--out", str(tmp_path / "run")]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            stop_process_tree(proc.pid)


def clean_environment() -> dict[str, str]:
    """This process's environment without the settings fedmerge itself puts there (an earlier test's
    run sets them in this process): a child must set up Ray's loopback on its own for a test to
    see that it does."""
    from simulations.cluster import LOOPBACK_ENV

    return {k: v for k, v in os.environ.items() if k not in LOOPBACK_ENV}


def sockets(procs) -> set[tuple[str, str, str]]:
    """(process, local address, remote address) of every internet socket of ``procs``."""
    seen = set()
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                seen.add((p.name(), c.laddr.ip, c.raddr.ip if c.raddr else ""))
        except psutil.Error:
            continue
    return seen


def off_loopback(seen: set[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return sorted(s for s in seen if not all(loopback(ip) for ip in s[1:] if ip))


def descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_until(condition, what: str, limit: float = HANG_GUARD_SECONDS) -> None:
    end = time.monotonic() + limit
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"waited {limit} s for {what}")
        time.sleep(0.2)


def training_on_ray(proc: subprocess.Popen) -> bool:
    """True once a Ray actor that runs clients exists among the run's processes."""
    for p in descendants(proc):
        try:
            if any("ClientAppActor" in part for part in p.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def assert_stopped_cleanly(proc: subprocess.Popen, started: list[psutil.Process], code: int, tmp_path: Path) -> None:
    _, stderr = proc.communicate(timeout=HANG_GUARD_SECONDS)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and ("interrupted" in stderr or "terminated" in stderr), stderr
    assert not (tmp_path / "run").exists()  # nothing written
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, [p.pid for p in alive]  # no process of the run left behind


@pytest.mark.ray
@pytest.mark.parametrize("when,sig,code", [
    ("starting Ray", signal.SIGINT, 130),
    ("training", signal.SIGINT, 130),
    ("training", signal.SIGTERM, 143),
])
def test_a_signal_stops_a_ray_run_at_once(fedmerge_run, tmp_path, when, sig, code):
    proc = fedmerge_run(tmp_path, 'engine="ray"', "local-steps=10000000", "timeout=600")
    if when == "training":
        wait_until(lambda: training_on_ray(proc), "the clients to start", RAY_START_GUARD_SECONDS)
    else:
        wait_until(lambda: len(descendants(proc)) > 0, "the engine's process to start")
        time.sleep(2)
    started = descendants(proc)
    proc.send_signal(sig)
    assert_stopped_cleanly(proc, started, code, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_an_inprocess_run_at_once(fedmerge_run, tmp_path, sig, code):
    proc = fedmerge_run(tmp_path, 'engine="inprocess"', "local-steps=10000000", "timeout=600")
    cache = tmp_path / "cache"
    wait_until(lambda: cache.is_dir() and any(cache.rglob("*.safetensors")), "the base model to be cached")
    time.sleep(1)  # now in the first client's training
    proc.send_signal(sig)
    assert_stopped_cleanly(proc, [], code, tmp_path)


HEAVY_MODEL = '''
import os
from pathlib import Path

import torch
from torch import nn
from fedmerge.models.registry import model

CACHE = Path(os.environ["FEDMERGE_CACHE"])


class Heavy(nn.Module):
    """A linear model whose first training step once the base is cached (a client's first step)
    sits half a minute inside one C++ call."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.lin = nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)

    def forward(self, x):
        once = CACHE / "heavy-step-taken"
        if self.training and not once.exists() and any(CACHE.rglob("*.safetensors")):
            once.touch()
            torch.linalg.matrix_power(torch.randn(3000, 3000), 2**62)  # 62 squarings in one call
        return self.lin(x.flatten(1))


@model("heavy")
def build(input_shape, num_classes):
    return Heavy(input_shape, num_classes)
'''


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["timeout", "SIGINT"])
def test_an_inprocess_run_ends_cleanly_while_an_abandoned_client_is_inside_torch(fedmerge_run, tmp_path, ending):
    """A client stuck in one long C++ operation cannot stop at a step: the run goes on without it
    (or stops on Ctrl-C) and the process still exits with its own code, not SIGABRT."""
    plugin = tmp_path / "heavy.py"
    plugin.write_text(HEAVY_MODEL)
    proc = fedmerge_run(tmp_path, 'engine="inprocess"', f"plugins=['{plugin}']", "model='heavy'", "local-steps=5",
                        f"timeout={3 if ending == 'timeout' else 600}")
    if ending == "SIGINT":
        wait_until(lambda: (tmp_path / "cache" / "heavy-step-taken").exists(), "the long operation to start")
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=HANG_GUARD_SECONDS)
    assert "terminate called" not in stderr and "Traceback" not in stderr, stderr
    if ending == "timeout":
        assert proc.returncode == 0, stderr
        (failure,) = json.loads((tmp_path / "run" / "results.json").read_text())["failures"]
        assert failure["reason"] == "no reply before the timeout"
    else:
        assert proc.returncode == 130, stderr
        assert not (tmp_path / "run").exists()


@pytest.mark.ray
def test_a_killed_ray_run_leaves_no_process_and_the_next_run_works(fedmerge_run, tmp_path):
    def engine_directories() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("fedmerge-engine-*"))

    before = engine_directories()
    proc = fedmerge_run(tmp_path, 'engine="ray"', "local-steps=10000000", "timeout=600")
    wait_until(lambda: training_on_ray(proc), "the clients to start", RAY_START_GUARD_SECONDS)
    started = descendants(proc)
    assert engine_directories() - before  # the engine's private directory, for its result
    proc.kill()
    proc.communicate()
    _, alive = psutil.wait_procs(started, timeout=HANG_GUARD_SECONDS)
    assert not alive, [(p.pid, p.name()) for p in alive]
    assert not engine_directories() - before
    again = fedmerge_run(tmp_path, 'engine="ray"', "local-steps=5")
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert (tmp_path / "run" / "results.json").is_file()


@pytest.mark.ray
def test_timeout_bounds_a_ray_run_whose_client_never_finishes(fedmerge_run, tmp_path):
    timeout = 20
    proc = fedmerge_run(tmp_path, 'engine="ray"', "local-steps=[5, 5, 10000000]", f"timeout={timeout}")
    wait_until(lambda: training_on_ray(proc), "the clients to start", RAY_START_GUARD_SECONDS)
    _, stderr = proc.communicate(timeout=timeout + HANG_GUARD_SECONDS)
    assert proc.returncode == 0, stderr
    failures = json.loads((tmp_path / "run" / "results.json").read_text())["failures"]
    assert [f["partition_id"] for f in failures] == [2]


def test_timeout_drops_an_inprocess_client_that_hangs(small_config, monkeypatch):
    """A client stuck outside training (no step to stop at) is dropped after ``timeout``; the run goes
    on with the others and ends."""
    import clients.work as work

    from simulations.experiment import run_experiment

    release, real = threading.Event(), work.fine_tune

    def fine_tune(msg, pid, num_partitions):
        if pid == 1:
            release.wait()  # hangs until the test ends
        return real(msg, pid, num_partitions)

    monkeypatch.setattr(work, "fine_tune", fine_tune)
    config = small_config.replace(timeout=2.0, strategies=["fedavg"])
    outcome: list = []
    runner = threading.Thread(target=lambda: outcome.append(run_experiment(config, progress=False)), daemon=True)
    try:
        runner.start()
        runner.join(HANG_GUARD_SECONDS)
        assert outcome, "the run did not end"
    finally:
        release.set()
    assert [f["partition_id"] for f in outcome[0].results["failures"]] == [1]
    assert sorted(outcome[0].task_vectors) == [0, 2, 3]


def test_an_inprocess_client_past_its_deadline_stops_training(small_config):
    """The slow client is dropped after ``timeout``, and its training loop, seeing the reply deadline
    pass, gives up within a step instead of training on for hours in the background."""
    from simulations.experiment import run_experiment

    config = small_config.replace(timeout=2.0, strategies=["fedavg"], **{"local-steps": [5, 5, 10000000, 5]})
    out = run_experiment(config, progress=False)
    assert [(f["partition_id"], f["reason"]) for f in out.results["failures"]] == [(2, "no reply before the timeout")]

    def clients_training() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("fedmerge-client")]

    wait_until(lambda: not clients_training(), "the dropped client to stop")


@pytest.mark.ray
def test_a_ray_run_keeps_every_socket_on_the_loopback_address(fedmerge_run, tmp_path):
    proc = fedmerge_run(tmp_path, 'engine="ray"', "local-steps=2000")
    seen: set[tuple[str, str, str]] = set()
    while proc.poll() is None:
        seen |= sockets(descendants(proc))
        time.sleep(0.2)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    assert len({name for name, _, _ in seen}) >= 3  # the GCS, the raylet and workers were seen
    assert not off_loopback(seen), off_loopback(seen)  # a listener on 0.0.0.0 or :: is off loopback too


def loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, also written as an IPv4-mapped IPv6 address (::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.mark.ray
def test_ctrl_c_stops_a_parallel_sweep_and_keeps_its_finished_cells(tmp_path):
    """Two cells finish at once, two never would: Ctrl-C stops every worker within seconds, keeps
    the finished cells whole, and leaves no process behind."""
    spec = tmp_path / "spec.toml"
    spec.write_text('name = "stop"\nseeds = [0]\n[set]\nnum-clients = 3\npretrain-steps = 20\n'
                    'strategies = ["fedavg"]\ntimeout = 600\n[grid]\nlocal-steps = [5, 10000000]\n'
                    'alpha = [0.3, 3.0]\n')
    env = {**clean_environment(), "FEDMERGE_CACHE": str(tmp_path / "cache"), "FLWR_HOME": str(tmp_path / "flwr")}
    proc = subprocess.Popen([sys.executable, "-c", "from simulations.cli import main; main()", "sweep", str(spec),
                             "-q", "--workers", "4", "--out", str(tmp_path / "sweep")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    cells = tmp_path / "sweep" / "cells"
    seen: set[tuple[str, str, str]] = set()

    def two_cells_done() -> bool:
        seen.update(sockets(descendants(proc)))  # the parallel sweep's own Ray stays on loopback too
        return cells.is_dir() and len(list(cells.glob("*/results.json"))) == 2

    try:
        wait_until(two_cells_done, "the two short cells to finish", RAY_START_GUARD_SECONDS)
        started = descendants(proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=HANG_GUARD_SECONDS)
    finally:
        if proc.poll() is None:
            stop_process_tree(proc.pid)
    assert proc.returncode == 130 and "finished cells are kept" in stderr and "Traceback" not in stderr, stderr
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, [(p.pid, p.name()) for p in alive]
    kept = sorted(p.name for p in cells.iterdir())
    assert len(kept) == 2 and all(name.startswith("local-steps=5-") for name in kept)
    for name in kept:
        assert json.loads((cells / name / "results.json").read_text())["strategies"]["fedavg"]["accuracy"] > 0
    assert len({name for name, _, _ in seen}) >= 3 and not off_loopback(seen), off_loopback(seen)


TWO_NODE_CLUSTER = """
import os, sys
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: keep 127.0.0.1
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                       "include_dashboard": False})
cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
cluster.wait_for_nodes()
print(cluster.address, flush=True)
sys.stdin.read()  # until the test closes it
cluster.shutdown()
"""


@pytest.mark.ray
def test_a_parallel_sweep_spreads_over_a_two_node_cluster_on_loopback(tmp_path, write_tiny_sweep_spec):
    """Two Ray nodes on 127.0.0.1, each with one CPU: the cells land on both, the CSV equals a local
    run's, and no socket of the cluster or the sweep leaves the loopback address."""
    spec = write_tiny_sweep_spec(tmp_path / "spec.toml", tmp_path / "cache")
    spec.write_text(spec.read_text().replace("seeds = [0]", "seeds = [0, 1]"))
    env = {**clean_environment(), "FEDMERGE_CACHE": str(tmp_path / "cache"), "FLWR_HOME": str(tmp_path / "flwr")}
    cli = [sys.executable, "-c", "from simulations.cli import main; main()", "sweep", str(spec), "-q"]
    subprocess.run([*cli, "--workers", "1", "--out", str(tmp_path / "local")], env=env, check=True,
                   capture_output=True, timeout=300)
    cluster = subprocess.Popen([sys.executable, "-c", TWO_NODE_CLUSTER], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen: set[tuple[str, str, str]] = set()
    try:
        address = cluster.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        # --address (as RAY_ADDRESS), and no --workers: as many cells at once as the cluster has CPUs
        sweep = subprocess.Popen([*cli, "--address", address, "--out", str(tmp_path / "cluster")],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while sweep.poll() is None:
            seen |= sockets([psutil.Process(cluster.pid), *descendants(cluster), *descendants(sweep)])
            time.sleep(0.2)
        assert sweep.returncode == 0, sweep.stderr.read()
    finally:
        cluster.stdin.close()
        try:
            cluster.wait(timeout=HANG_GUARD_SECONDS)
        finally:
            stop_process_tree(cluster.pid)
    cells = sorted((tmp_path / "cluster" / "cells").glob("*/results.json"))
    nodes = {json.loads(p.read_text())["node"]["ray_node_id"] for p in cells}
    assert len(cells) == 4 and len(nodes) == 2, nodes  # both nodes ran cells
    assert (tmp_path / "cluster" / "results.csv").read_bytes() == (tmp_path / "local" / "results.csv").read_bytes()
    assert seen and not off_loopback(seen), off_loopback(seen)
