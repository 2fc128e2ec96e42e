"""The fedmerge ServerApp: pre-trained base → one-shot round → every merge → evaluation → results.

``run_server`` is the whole server side of an experiment. ``make_server_app`` wraps it for the two
engines; the module-level ``app`` is the component that ``flwr run .`` loads (config from
``[tool.flwr.app.config]`` / ``--run-config``, results written to the ``out`` key's directory).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from fedmerge.data import load_federated
from fedmerge.evaluation import Evaluator, normalized_accuracy
from fedmerge.evaluation.measures import data_measures, task_vector_measures
from fedmerge.models import build_model, device_for
from fedmerge.task_vector import TaskVector, apply
from fedmerge.train import pretrained_base, single_thread
from fedmerge.evaluation.tuning import TuningResult, tune_method
from simulations.config import TUNE, ExperimentConfig
from simulations.engine import ProgressGrid
from simulations.progress import RunProgress, terminal
from simulations.results import ServerOutput, print_table, results_directory, write_results
from strategies import ClientReport, OneShotMerge


def build_strategy(config: ExperimentConfig) -> OneShotMerge:
    return OneShotMerge(
        config.strategies,
        # a "tune" scale is chosen after the round, in evaluate(); 1.0 stands in for it until then
        scale={m: _fixed_scale(config.scale_of(m)) for m in config.strategies},
        method_options=config.merging.method_options,
        min_train_nodes=config.run.min_clients,
        min_available_nodes=config.num_clients,
        weighted_by_key="num-examples" if config.merging.weighting == "num-examples" else None,
        train_plans={i: {**plan.to_config(), **attack_plan(config, i)} for i, plan in enumerate(config.client_plans())},
        node_wait_timeout=max(120.0, config.run.timeout),
        max_update_norm=config.merging.max_update_norm or None,
        merge_device=config.merging.merge_device,
    )


def _fixed_scale(scale: float | str) -> float:
    """λ for the round: the configured number, or 1.0 standing in for "tune" until it is chosen."""
    return 1.0 if isinstance(scale, str) else scale


def partition(report: ClientReport) -> int:
    """The report's partition id: the server gives every client a plan, so every report knows it."""
    assert report.partition_id is not None
    return report.partition_id


def attack_plan(config: ExperimentConfig, partition_id: int) -> dict[str, Any]:
    """The byzantine entries of one client's train config (empty for an honest client)."""
    if partition_id not in config.byzantine_clients():
        return {}
    return {"byzantine": True, "byzantine-mode": config.attack.mode, "byzantine-scale": config.attack.scale,
            "byzantine-std": config.attack.std}


def client_config(config: ExperimentConfig) -> ConfigRecord:
    """What every client is told in its train message: the model, the data spec, the cache."""
    record = ConfigRecord({"model": config.model, **config.data_spec().to_config()})
    if config.run.plugins:  # clients may run in other processes: they load the same plugin files
        record["plugins"] = ",".join(config.run.plugins)
    if config.run.cache_task_vectors:
        record["task-vector-cache"] = str(config.cache_path().resolve())
    return record


def run_server(grid: Grid, config: ExperimentConfig, progress: RunProgress) -> ServerOutput:
    """Run one experiment on ``grid``: results (see ``simulations.results``) and its tensors."""
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    progress.stage("Loading data and pre-trained base")
    data = load_federated(config.data_spec())
    timing["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    base, cached = pretrained_base(config.pretrain, config.model, config.seed, data, config.cache_path())
    timing["pretrain"] = time.perf_counter() - t0

    strategy = build_strategy(config)

    def on_send(messages: list[Message]) -> None:
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            progress.stage("Clients fine-tuning", total=len(messages))

    def on_reply(reply: Message) -> None:
        if reply.metadata.message_type == MessageType.TRAIN:
            progress.advance()

    progress.stage(f"Waiting for {config.num_clients} clients")
    strategy.start(grid=ProgressGrid(grid, on_send, on_reply), initial_arrays=ArrayRecord(base), num_rounds=1,
                   timeout=config.run.timeout, train_config=client_config(config))
    timing.update({k.replace("-", "_"): v for k, v in strategy.timing.items()})
    timing["merging"] = sum(strategy.merge_seconds.values())

    progress.stage("Evaluating base, clients and merged models", total=1 + len(strategy.reports) + len(strategy.merged))
    t0 = time.perf_counter()
    results = evaluate(config, data, base, strategy, progress)
    timing["evaluation"] = time.perf_counter() - t0
    results["base"]["from_cache"] = cached
    results["measures"] = {"data": data_measures(data),
                           "task_vectors": task_vector_measures([r.task_vector for r in strategy.reports])}
    results["timing"] = timing
    task_vectors = {partition(r): r.task_vector for r in strategy.reports}
    return ServerOutput(results, base, dict(strategy.merged), task_vectors)


def honest_normalized(config: ExperimentConfig, data, reports: list[ClientReport], own: list[float]
                      ) -> Callable[[list[float]], float]:
    """Normalized accuracy of a model from its accuracies on the clients' splits (in the order of
    ``reports``, ``own`` the clients' own models' on the same splits): over the honest clients only,
    since an attacker's own model is its attacked θ0 + τ_i, and leaving out clients whose own model
    is no better than chance (the dataset's: 1 / number of classes, 0 for exact-match text)."""
    attackers = set(config.byzantine_clients())
    honest = [i for i, r in enumerate(reports) if partition(r) not in attackers]
    chance = data.chance_level

    def normalized(accuracies: list[float]) -> float:
        return normalized_accuracy([accuracies[i] for i in honest], [own[i] for i in honest], chance=chance)

    return normalized


def evaluate(config: ExperimentConfig, data, base, strategy: OneShotMerge, progress: RunProgress) -> dict[str, Any]:
    """Score θ0, every client's θ_i and every θ0 + λ·τ_merged on the global and local test splits."""
    evaluator = Evaluator(build_model(config.model, data.input_shape, data.num_classes).to(device_for(config.model)))
    reports = strategy.reports
    local_tests = [data.clients[partition(r)].test for r in reports]
    plans = config.client_plans()

    def global_accuracy(state) -> float:  # under partition="tasks": the mean over every client's task
        accs = evaluator.accuracies(state, data.global_tests)
        return sum(accs) / len(accs)

    def scores(state) -> tuple[float, list[float]]:
        progress.advance()
        return global_accuracy(state), evaluator.accuracies(state, local_tests)

    base_acc, base_local = scores(base)
    clients, own = [], []
    byzantine = set(config.byzantine_clients())
    for r, test in zip(reports, local_tests):
        theta_i = apply(base, r.task_vector, 1.0)
        global_acc, own_acc = global_accuracy(theta_i), evaluator.accuracy(theta_i, test)
        progress.advance()
        own.append(own_acc)
        plan = plans[partition(r)]
        clients.append({
            "partition_id": r.partition_id, "node_id": r.node_id, "task": data.clients[r.partition_id].task,
            **plan.model_dump(),  # the whole plan this client trained with
            "local_steps": int(r.metrics["local-steps"]), "num_examples": int(r.metrics["num-examples"]),
            "train_loss": float(r.metrics["train-loss"]),
            "accuracy": own_acc, "reported_accuracy": float(r.metrics["local-accuracy"]),
            "global_accuracy": global_acc, "task_vector_norm": TaskVector(r.task_vector).norm(),
            "cached": bool(r.metrics.get("cached", 0)),
            "train_seconds": r.metrics.get("train-seconds"),  # None from clients that do not report it
            "bytes_sent": r.bytes_sent,  # the task vector's (or its LoRA factors') arrays, as received
            "byzantine": r.partition_id in byzantine,  # its τ_i (and so `accuracy`) is the attacked one
        })
    normalized = honest_normalized(config, data, reports, own)
    strategies = {}
    tuned = tune_scales(config, data, base, strategy, evaluator)
    for method, merged in strategy.merged.items():
        scale = strategy.scale[method]
        if method in tuned:  # the tuned options' merged vector replaces the default one everywhere
            merged = strategy.merged[method] = tuned[method].merged
            scale = tuned[method].scale
        acc, local = scores(apply(base, merged, scale))
        strategies[method] = {
            "scale": scale, "accuracy": acc, "client_accuracy": sum(local) / len(local),
            "normalized_accuracy": normalized(local), "client_accuracies": local,
            "merge_seconds": strategy.merge_seconds[method],
        }
        if method in tuned:
            strategies[method]["tuning"] = tuned[method].report()
    return {
        "config": config.to_dict(),
        "base": {"accuracy": base_acc, "client_accuracy": sum(base_local) / len(base_local),
                 "normalized_accuracy": normalized(base_local)},
        "clients": clients,
        "failures": [{"partition_id": f.partition_id, "node_id": f.node_id, "reason": f.reason}
                     for f in strategy.failures],
        "method_failures": dict(strategy.method_failures),  # rules that produced no merged vector, and why
        "byzantine": config.byzantine_clients(),  # partition ids told to attack (see fedmerge.attacks)
        "strategies": strategies,
    }


def tune_scales(config: ExperimentConfig, data, base, strategy: OneShotMerge, evaluator: Evaluator
                ) -> dict[str, TuningResult]:
    """λ (and rho) for every method whose scale is "tune", by normalized accuracy (honest clients, above
    chance: :func:`honest_normalized`) on the clients' validation splits; the same task vectors, weights
    and options as the round's merge."""
    methods = [m for m in strategy.merged if config.scale_of(m) == TUNE]
    if not methods:
        return {}
    reports = strategy.reports
    vals = [data.clients[partition(r)].val for r in reports]
    own = [evaluator.accuracy(apply(base, r.task_vector, 1.0), v) for r, v in zip(reports, vals)]
    normalized = honest_normalized(config, data, reports, own)

    def score(merged, scale: float) -> float:
        return normalized(evaluator.accuracies(apply(base, merged, scale), vals))

    out = {}
    for m in methods:
        task_vectors, weights, options = strategy.merge_inputs(m)  # exactly what the round merged
        with single_thread():  # hundreds of small evaluations: one thread avoids contention
            out[m] = tune_method(m, task_vectors, score, weights=weights, options=options,
                                 merged=strategy.merged[m], device=strategy.merge_device)
    return out


def make_server_app(config: ExperimentConfig, progress: RunProgress,
                    deliver: Callable[[ServerOutput], None]) -> ServerApp:
    """A ServerApp that runs ``config`` and hands its :class:`ServerOutput` to ``deliver``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        deliver(run_server(grid, config, progress))

    return app


# The component `flwr run .` loads ([tool.flwr.app.components] in pyproject.toml).
app = ServerApp()


@app.main()
def flwr_main(grid: Grid, context: Context) -> None:
    values = dict(context.run_config)
    out = str(values.pop("out", "") or "")
    config = ExperimentConfig.from_mapping(values)
    with results_directory(Path(out) if out else None, config.name) as out_dir:
        output = run_server(grid, config, RunProgress(enabled=False))
        write_results(output, config, out_dir)
    console = terminal()  # what `fedmerge run` prints, in the ServerApp's output
    print_table(output.results, console)
    console.print(f"results: {out_dir}/results.json")
