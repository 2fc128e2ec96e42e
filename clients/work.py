"""What a client does with a ``train`` message: load its partition, fine-tune, reply τ_i and metrics.

Kept apart from :mod:`clients.app` so that the ClientApp starts without torch and the data stack
(a deployment SuperNode runs a fresh process per message, and a ``query`` needs neither).
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedmerge.attacks import attack
from fedmerge.data import DataSpec, load_federated
from fedmerge.registry import load_plugin_file
from fedmerge.train import TrainPlan, time_limit
from fedmerge.train.local import client_seed, local_update


def reply_deadline(msg: Message) -> float | None:
    """When the server stops waiting for this message's reply: its creation time plus its TTL."""
    meta = msg.metadata
    return meta.created_at + meta.ttl if meta.created_at and meta.ttl else None


def fine_tune(msg: Message, pid: int, num_partitions: int) -> Message:
    """Partition ``pid`` of ``num_partitions`` fine-tunes θ0 from ``msg`` and replies τ_i (see the
    message contract in :mod:`clients.app`)."""
    started = time.perf_counter()  # after the imports: a worker's first import is the engine's cost
    config: ConfigRecord = msg.content.config_records["config"]
    for plugin in filter(None, str(config.get("plugins", "")).split(",")):
        load_plugin_file(plugin)  # datasets, partitioners and models of the experiment's plugins
    spec = DataSpec.from_config(config)
    if spec.num_clients != num_partitions:
        raise ValueError(f"server expects {spec.num_clients} clients, this node is one of {num_partitions}")
    data = load_federated(spec)
    base = msg.content.array_records["arrays"].to_torch_state_dict()
    with time_limit(reply_deadline(msg)):  # a reply after the server stops waiting is wasted work
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
    task_vector = update.sent  # the dense τ_i, or a LoRA client's factors
    if config.get("byzantine", False):  # an attacker, by the experiment's design: it lies about τ_i only
        scale, std = config["byzantine-scale"], config["byzantine-std"]
        assert isinstance(scale, (int, float)) and isinstance(std, (int, float))  # the server sends numbers
        task_vector = attack(str(config["byzantine-mode"]), dict(update.task_vector), scale=float(scale),
                             std=float(std), seed=client_seed(spec.seed, pid))
    metrics["train-seconds"] = time.perf_counter() - started
    return Message(RecordDict({"arrays": ArrayRecord(task_vector), "metrics": metrics}), reply_to=msg)
