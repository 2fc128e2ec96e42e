"""Faults and hostile clients, end to end: crashing, slow and vanishing clients, byzantine attackers,
the norm bound on replies, Ray resources per client, and results that are never half-written."""

from __future__ import annotations

import json
import time

import pytest
import torch
from flwr.app import ArrayRecord, Message
from flwr.clientapp import ClientApp
from typer.testing import CliRunner

import clients
from fedmerge import FederationError
from fedmerge.errors import OutputError
from simulations.cli import app as cli_app
from simulations.engine import InProcessGrid, ProgressGrid
from simulations.experiment import run_experiment
from strategies import OneShotMerge

REAL_APP = clients.app


def faulty(behaviour: dict[int, str], delay: float = 0.0) -> ClientApp:
    """The real ClientApp, except that partition i misbehaves as ``behaviour[i]`` says."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, ctx) -> Message:
        return REAL_APP(msg, ctx)

    @app.train()
    def train(msg: Message, ctx) -> Message:
        mode = behaviour.get(int(ctx.node_config["partition-id"]))
        if mode == "raise":
            raise RuntimeError("GPU fell off the bus")
        reply = REAL_APP(msg, ctx)
        if mode == "slow":
            time.sleep(delay)
        return reply

    return app


# -- faults -------------------------------------------------------------------------------------


@pytest.mark.slow  # waits out a 3 s client timeout
def test_crashing_and_slow_clients_are_left_out_and_recorded(small_config, monkeypatch, tmp_path):
    monkeypatch.setattr(clients, "app", faulty({1: "raise", 2: "slow"}, delay=3.5))
    config = small_config.replace(timeout=3.0, strategies=["fedavg", "median"])
    out = run_experiment(config, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    reasons = {f["partition_id"]: f["reason"] for f in saved["failures"]}
    assert reasons == {1: "client raised an error: RuntimeError: GPU fell off the bus",
                       2: "no reply before the timeout"}
    assert [c["partition_id"] for c in saved["clients"]] == [0, 3]
    assert sorted(out.task_vectors) == [0, 3] and set(out.merged) == {"fedavg", "median"}


def test_a_vanished_node_does_not_hang_the_round():
    """A node that never answers (gone mid-round) ends as a named failure, the rest are merged."""
    class Vanishing(InProcessGrid):
        def _execute(self, mid: str) -> None:
            msg = self._pending[mid]
            if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == self.node_ids[0]:
                del self._pending[mid]  # the node is gone: no reply, ever
                return
            super()._execute(mid)

    base = {"w": torch.zeros(2, 2)}
    app = ClientApp()

    @app.train()
    def train(msg: Message, ctx) -> Message:
        from flwr.app import MetricRecord, RecordDict
        tv = {"w": torch.ones(2, 2)}
        return Message(RecordDict({"arrays": ArrayRecord(tv), "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)

    strategy = OneShotMerge(("fedavg",), min_available_nodes=3)
    grid = ProgressGrid(Vanishing(app, 3), lambda m: None, lambda r: None)
    strategy.start(grid, ArrayRecord(base), num_rounds=1, timeout=3600)
    assert len(strategy.reports) == 2
    assert [f.reason for f in strategy.failures] == ["no reply before the timeout"]


def test_too_few_replies_fail_the_run_with_exit_code_1_and_no_output(small_config, monkeypatch, tmp_path):
    monkeypatch.setattr(clients, "app", faulty({0: "raise", 1: "raise", 2: "raise"}))
    with pytest.raises(FederationError, match="only 1 valid task vectors, fewer than the 2 required"):
        run_experiment(small_config, tmp_path / "api", progress=False)
    assert not (tmp_path / "api").exists()
    result = CliRunner().invoke(cli_app, [
        "run", "--set", "num-clients=3", "--set", "engine='inprocess'", "--set", "pretrain-steps=30",
        "--set", "local-steps=[5, 10, 15]", "--set", f"cache-dir='{small_config.run.cache_dir}'", "-q",
        "--out", str(tmp_path / "cli")])
    assert result.exit_code == 1, result.output
    assert "fewer than the 2 required" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "cli").exists()


# -- byzantine clients ----------------------------------------------------------------------------


def test_byzantine_clients_attack_through_the_clientapp_and_are_recorded(small_config):
    honest = run_experiment(small_config.replace(strategies=["fedavg"]), progress=False)
    config = small_config.replace(**{"strategies": ["fedavg", "median"], "byzantine-fraction": 0.25})
    attacked = run_experiment(config, progress=False)
    (bad,) = config.byzantine_clients()
    assert attacked.results["byzantine"] == [bad]
    assert [c["byzantine"] for c in attacked.results["clients"]] == [i == bad for i in range(4)]
    for pid, tau in honest.task_vectors.items():
        sign = -1 if pid == bad else 1
        assert all(torch.equal(attacked.task_vectors[pid][k], sign * tau[k]) for k in tau)


def test_norm_bound_excludes_and_names_the_attacker(small_config):
    config = small_config.replace(**{"strategies": ["fedavg"], "byzantine-fraction": 0.25,
                                     "byzantine-mode": "scale", "byzantine-scale": 50.0})
    attacked = run_experiment(config, progress=False)
    (bad,) = config.byzantine_clients()
    honest_max = max(c["task_vector_norm"] for c in attacked.results["clients"] if not c["byzantine"])
    bounded = run_experiment(config.replace(**{"max-update-norm": 2 * honest_max}), progress=False)
    (failure,) = bounded.results["failures"]
    assert failure["partition_id"] == bad and "exceeds max-update-norm" in failure["reason"]
    assert sorted(bounded.task_vectors) == sorted(set(range(4)) - {bad})


# -- Ray resources ------------------------------------------------------------------------------


@pytest.mark.slow  # imports Flower's Ray simulation
def test_ray_engine_passes_client_resources_to_flower(small_config, monkeypatch):
    """The Ray engine's child-process function, run here with Flower's run_simulation replaced."""
    import flwr.simulation

    from simulations.engine import run_inprocess
    from simulations.experiment import _run_on_ray
    from simulations.server import make_server_app

    seen, delivered, events = {}, [], []

    def fake_run_simulation(server_app, client_app, num_supernodes, backend_config, **kw):
        seen.update(num_supernodes=num_supernodes, backend_config=backend_config)
        run_inprocess(server_app, client_app, num_supernodes)  # same apps, without starting Ray

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    config = small_config.replace(**{"engine": "ray", "client-cpus": 2, "client-gpus": 0.25,
                                     "strategies": ["fedavg"]})
    _run_on_ray(lambda kind, *payload: events.append(kind), delivered.append, make_server_app, config)
    assert seen["num_supernodes"] == 4
    assert seen["backend_config"]["client_resources"] == {"num_cpus": 2, "num_gpus": 0.25}
    assert seen["backend_config"]["init_args"]["_node_ip_address"] == "127.0.0.1"
    assert len(delivered) == 1 and "fedavg" in delivered[0].merged
    assert "stage" in events and "advance" in events  # progress goes to the parent as events


# -- atomic results -----------------------------------------------------------------------------


@pytest.mark.parametrize("crash", [OSError("disk full"), KeyboardInterrupt()])
def test_a_crash_while_writing_results_leaves_nothing_behind(small_config, monkeypatch, tmp_path, crash):
    import simulations.results as results

    real_save, calls = results.save_state, []

    def crashing_save(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # base.safetensors written, the first merged file half-way
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"half")
            raise crash
        real_save(tensors, path)

    monkeypatch.setattr(results, "save_state", crashing_save)
    with pytest.raises(OutputError if isinstance(crash, OSError) else KeyboardInterrupt):
        run_experiment(small_config, tmp_path / "run", progress=False)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither the results directory nor a staging directory
