"""OneShotMerge through a real Flower Grid with hand-made clients: plans, failures, waiting."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

import clients
from fedmerge import FederationError, MergeError, merge
from simulations.engine import InProcessGrid
from strategies import OneShotMerge

BASE = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}


def make_app(behaviour: dict[int, str] | None = None) -> ClientApp:
    """Client i replies τ_i = (i+1)·1 with num-examples 10·(i+1) and echoes its local-steps plan."""
    behaviour = behaviour or {}
    app = ClientApp()

    @app.query()
    def query(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": int(ctx.node_config["partition-id"])})}),
                       reply_to=msg)

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        pid = int(ctx.node_config["partition-id"])
        mode = behaviour.get(pid)
        if mode == "raise":
            raise RuntimeError("disk full")
        tv = {k: torch.full_like(v, float(pid + 1)) for k, v in msg.content["arrays"].to_torch_state_dict().items()}
        if mode == "nan":
            tv["b"][0] = float("nan")
        if mode == "shape":
            tv["b"] = torch.zeros(4)
        metrics = {"num-examples": 10 * (pid + 1), "local-steps": int(msg.content["config"].get("local-steps", 1)),
                   "partition-id": pid}
        if mode == "no-weight":
            del metrics["num-examples"]
        return Message(RecordDict({"arrays": ArrayRecord(tv), "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def run(strategy: OneShotMerge, app: ClientApp, nodes: int = 4, **kw):
    return strategy.start(InProcessGrid(app, nodes), ArrayRecord(BASE), num_rounds=1, **kw)


def test_each_client_gets_its_own_plan_and_fednova_uses_it():
    plans = {i: {"local-steps": 5 * (i + 1)} for i in range(4)}
    strategy = OneShotMerge.single("fednova", train_plans=plans, min_available_nodes=4)
    result = run(strategy, make_app())
    assert [r.metrics["local-steps"] for r in strategy.reports] == [5, 10, 15, 20]
    vectors = [{k: torch.full_like(v, float(i + 1)) for k, v in BASE.items()} for i in range(4)]
    expected = merge("fednova", vectors, weights=[10, 20, 30, 40], local_steps=[5, 10, 15, 20])
    torch.testing.assert_close(result.arrays.to_torch_state_dict()["w"], expected["w"])


def test_failed_and_invalid_replies_are_dropped_and_named():
    app = make_app({1: "raise", 2: "nan", 3: "shape"})
    strategy = OneShotMerge(("fedavg", "median"), min_train_nodes=1, min_available_nodes=5,
                            train_plans={i: {} for i in range(5)})
    app_nodes = 5
    run(strategy, app, nodes=app_nodes)
    reasons = {f.partition_id: f.reason for f in strategy.failures}
    assert set(reasons) == {1, 2, 3}
    assert "RuntimeError: disk full" in reasons[1]
    assert "'b': contains NaN" in reasons[2]
    assert "'b': shape (4,)" in reasons[3]
    # the merge goes on with partitions 0 and 4: τ = 1 and 5, weights 10 and 50
    torch.testing.assert_close(strategy.merged["fedavg"]["w"], torch.full((2, 3), (10 * 1 + 50 * 5) / 60))
    torch.testing.assert_close(strategy.merged["median"]["w"], torch.full((2, 3), 3.0))


def test_missing_weight_metric_is_invalid():
    strategy = OneShotMerge.single("fedavg", min_train_nodes=1, min_available_nodes=2)
    run(strategy, make_app({0: "no-weight"}), nodes=2)
    assert [f.reason for f in strategy.failures] == ["reply metrics lack 'num-examples'"]


def test_too_few_valid_replies_stop_with_a_clear_message():
    strategy = OneShotMerge(("fedavg",), min_train_nodes=3, min_available_nodes=3)
    with pytest.raises(FederationError, match=r"only 1 valid task vectors, fewer than the 3 required .*disk full"):
        run(strategy, make_app({0: "raise", 1: "nan"}), nodes=3)


def test_waiting_for_absent_nodes_times_out():
    strategy = OneShotMerge(("fedavg",), min_available_nodes=5, node_wait_timeout=0.2)
    with pytest.raises(FederationError, match="only 4 of 5 expected nodes connected within 0.2 s"):
        run(strategy, make_app())


def test_constructor_validation():
    with pytest.raises(MergeError, match="unknown merging method 'avg'"):
        OneShotMerge(("avg",))
    with pytest.raises(MergeError, match="option 'local_steps' cannot be set here"):
        OneShotMerge(("fednova",), method_options={"fednova": {"local_steps": [1]}})
    assert OneShotMerge.single("tsv").methods == ("tsv",)
    assert OneShotMerge(("fedgma",), method_options={"fedgma": {"rho": 0.2}}).method_options == {"fedgma": {"rho": 0.2}}


def test_result_is_base_plus_scaled_merge():
    strategy = OneShotMerge.single("fedavg", scale=0.5, min_available_nodes=2, weighted_by_key=None)
    result = run(strategy, make_app(), nodes=2)
    torch.testing.assert_close(result.arrays.to_torch_state_dict()["b"], torch.full((3,), 0.5 * 1.5))


def test_fedavg_merge_equals_flowers_own_fedavg_on_the_real_client(small_config):
    """Flower's FedAvg averaging the same task vectors, plus θ0, is our one-shot FedAvg model."""
    from fedmerge.data import load_federated
    from fedmerge.train import pretrained_base

    config = small_config
    data = load_federated(config.data_spec())
    base, _ = pretrained_base(config.pretrain, config.model, config.seed, data, config.cache_path())
    train_config = ConfigRecord({"model": config.model, **config.data_spec().to_config(), "local-steps": 12})
    grid_args = (clients.app, config.num_clients)
    ours = OneShotMerge.single("fedavg", min_available_nodes=4).start(
        InProcessGrid(*grid_args), ArrayRecord(base), num_rounds=1, train_config=train_config)
    flower = FedAvg(min_available_nodes=4, min_train_nodes=4, fraction_evaluate=0.0).start(
        InProcessGrid(*grid_args), ArrayRecord(base), num_rounds=1, train_config=train_config)
    mean_tv = flower.arrays.to_torch_state_dict()
    ours_state = ours.arrays.to_torch_state_dict()
    for k, v in base.items():
        torch.testing.assert_close(ours_state[k], v + mean_tv[k].to(v.dtype), atol=1e-6, rtol=0)


def test_a_rule_that_fails_is_recorded_and_the_others_still_merge():
    from fedmerge.merging import METHODS, rule

    @rule("always_overflows")
    def always_overflows(task_vectors, weights=None):
        return {k: torch.full_like(v, float("inf")) for k, v in task_vectors[0].items()}

    try:
        strategy = OneShotMerge(("always_overflows", "fedavg"), min_available_nodes=2, weighted_by_key=None)
        result = run(strategy, make_app(), nodes=2)
        assert "not finite" in strategy.method_failures["always_overflows"] and set(strategy.merged) == {"fedavg"}
        torch.testing.assert_close(result.arrays.to_torch_state_dict()["b"], torch.full((3,), 1.5))
    finally:
        METHODS._entries.pop("always_overflows")


def test_a_method_whose_model_overflows_is_a_recorded_failure_not_a_non_finite_model():
    # θ0 + λ·τ with λ = -1e308 and τ_i = i + 1 lies far beyond float32's range: the method is
    # recorded as failed, naming the tensor and λ, and never handed on as a model.
    strategy = OneShotMerge(("fedavg", "median"), scale={"fedavg": -1e308, "median": 0.5},
                            min_available_nodes=2, weighted_by_key=None)
    result = run(strategy, make_app(), nodes=2)
    reason = strategy.method_failures["fedavg"]
    assert "λ = -1e+308" in reason and "tensor 'w'" in reason and "float32" in reason
    assert set(strategy.merged) == {"median"}
    torch.testing.assert_close(result.arrays.to_torch_state_dict()["b"], torch.full((3,), 0.5 * 1.5))
    strategy = OneShotMerge.single("fedavg", scale=-1e308, min_available_nodes=2, weighted_by_key=None)
    with pytest.raises(FederationError, match="every merging rule failed: .*λ = -1e\\+308"):
        run(strategy, make_app(), nodes=2)
