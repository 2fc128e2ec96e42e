"""The fedmerge ClientApp.

Message contract (what :mod:`strategies` sends and expects back):

* ``query`` → reply ``MetricRecord({"partition-id", "num-partitions"})`` so the server can give each
  client its own training plan.
* ``train`` carrying ``{"arrays": θ0, "config": ConfigRecord}``, the config holding the data spec
  (``dataset``, ``num-clients``, ``partition``, ``alpha``, ``classes-per-client``, ``seed``, …),
  ``model`` and this client's plan (``local-steps``, ``lr``, ``batch-size``, ``optimizer``,
  ``weight-decay``) and optionally ``task-vector-cache`` (a directory shared with the server) →
  reply ``{"arrays": τ_i, "metrics": MetricRecord}`` with ``num-examples``, ``local-steps``,
  ``train-loss``, ``local-accuracy``, ``partition-id``, ``cached`` (1 when read from the cache) and
  ``train-seconds`` (wall-clock seconds this client worked: loading its data and training, not the
  handler's first import of torch and the data stack, so the server can tell an engine's overhead
  from the clients' own work).
  A plan with ``byzantine = true`` makes the client an attacker: it replies
  ``fedmerge.attacks.attack(byzantine-mode, τ_i, scale=byzantine-scale, std=byzantine-std)``
  instead of τ_i (its metrics stay honest).
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


@app.query()
def identify(msg: Message, context: Context) -> Message:
    pid, n = _partition(context)
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid, "num-partitions": n})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    # Imported here, not at the top: on Flower's deployment engine every message starts a fresh
    # ClientApp process, and a `query` then needs neither torch nor the data stack (seconds each).
    from fedmerge.data import DataSpec, load_federated
    from fedmerge.registry import load_plugin_file
    from fedmerge.train import TrainPlan
    from fedmerge.train.local import client_seed, local_update

    started = time.perf_counter()  # after the imports: a worker's first import is the engine's cost
    pid, num_partitions = _partition(context)
    config: ConfigRecord = msg.content["config"]
    for plugin in filter(None, str(config.get("plugins", "")).split(",")):
        load_plugin_file(plugin)  # datasets, partitioners and models of the experiment's plugins
    spec = DataSpec.from_config(config)
    if spec.num_clients != num_partitions:
        raise ValueError(f"server expects {spec.num_clients} clients, this node is one of {num_partitions}")
    data = load_federated(spec)
    base = msg.content["arrays"].to_torch_state_dict()
    update = local_update(
        str(config["model"]), base, data.clients[pid], TrainPlan.from_config(config),
        seed=spec.seed, input_shape=data.input_shape, num_classes=data.num_classes,
        cache_dir=str(config.get("task-vector-cache", "")) or None,
    )
    metrics = MetricRecord({
        "num-examples": update.num_examples,
        "local-steps": update.local_steps,
        "train-loss": float(update.train_loss),
        "local-accuracy": float(update.accuracy),
        "partition-id": pid,
        "cached": int(update.cached),
    })
    task_vector = dict(update.task_vector)
    if config.get("byzantine", False):  # an attacker, by the experiment's design: it lies about τ_i only
        from fedmerge.attacks import attack

        task_vector = attack(str(config["byzantine-mode"]), task_vector, scale=float(config["byzantine-scale"]),
                             std=float(config["byzantine-std"]), seed=client_seed(spec.seed, pid))
    metrics["train-seconds"] = time.perf_counter() - started
    return Message(RecordDict({"arrays": ArrayRecord(task_vector), "metrics": metrics}), reply_to=msg)
