"""The fedmerge ClientApp.

Message contract (what :mod:`strategies` sends and expects back):

* ``query`` → reply ``MetricRecord({"partition-id", "num-partitions"})`` so the server can give each
  client its own training plan.
* ``train`` carrying ``{"arrays": θ0, "config": ConfigRecord}``, the config holding the data spec
  (``dataset``, ``num-clients``, ``partition``, ``alpha``, ``classes-per-client``, ``seed``, …),
  ``model`` and this client's plan (``local-steps``, ``lr``, ``batch-size``, ``optimizer``,
  ``weight-decay``, ...), optionally ``plugins`` (plugin files to load first) and
  ``task-vector-cache`` (a directory shared with the server) →
  reply ``{"arrays": τ_i, "metrics": MetricRecord}`` with ``num-examples``, ``local-steps``,
  ``train-loss``, ``local-accuracy``, ``partition-id``, ``cached`` (1 when read from the cache) and
  ``train-seconds`` (wall-clock seconds this client worked: loading its data and training, not the
  handler's first import of torch and the data stack, so the server can tell an engine's overhead
  from the clients' own work).
  A plan with ``byzantine = true`` makes the client an attacker: it replies
  ``fedmerge.attacks.attack(byzantine-mode, τ_i, scale=byzantine-scale, std=byzantine-std)``
  instead of τ_i (its metrics stay honest).
* Every message's ``created_at + ttl`` is the server's reply deadline: a client still training
  then stops at its next step (``fedmerge.train.OutOfTime``) instead of working for a reply nobody
  waits for.
"""

from __future__ import annotations


from flwr.app import Context, Message, MetricRecord, RecordDict
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
    from clients.work import fine_tune

    return fine_tune(msg, *_partition(context))
