"""One client's local update: fine-tune θ0 on its own data and return τ_i = θ_i − θ0.

With a ``cache_dir``, updates are cached on disk (safetensors) under a key hashed from everything
that determines them: the base weights, the client's data, its training plan and seed, the model
and the torch version. A sweep that adds a strategy or re-plots never retrains. Entries are verified
when read (``fedmerge.io.state.read_cache_entry``): a damaged one is discarded and retrained.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fedmerge.data.splits import ClientData, Split
from fedmerge.evaluation.scores import score
from fedmerge.io.state import hash_tensor, non_finite_tensor, read_cache_entry, read_or_compute, write_cache_entry
from fedmerge.models.registry import build_model, device_for
from fedmerge.task_vector import TaskVector
from fedmerge.train.lora import (dense_task_vector, dense_update, factor_arrays, has_factors, lora_factors,
                                 tensor_names, with_lora)
from fedmerge.train.loop import TrainPlan, single_thread, train


@dataclass(frozen=True)
class LocalUpdate:
    task_vector: TaskVector
    num_examples: int
    local_steps: int
    train_loss: float  # loss on the whole local train split after training
    accuracy: float  # the client's own fine-tuned model on its local test split
    cached: bool = False  # read from the task-vector cache instead of trained
    factors: dict[str, Tensor] | None = None  # LoRA factors, when the client sends them instead of τ

    @property
    def sent(self) -> dict[str, Tensor]:
        """What the client's reply carries: its LoRA factors, or the dense task vector."""
        return dict(self.task_vector) if self.factors is None else self.factors


def client_seed(seed: int, partition_id: int) -> int:
    """The shuffling seed of one client, derived from the experiment seed."""
    return seed * 100_003 + partition_id * 7_919 + 1


def update_key(model_name: str, base: Mapping[str, Tensor], client: ClientData, plan: TrainPlan, seed: int) -> str:
    """A digest of everything that determines a client's task vector."""
    h = hashlib.sha256(json.dumps({
        "format": 1, "torch": torch.__version__, "model": model_name, "plan": plan.model_dump(),
        "seed": client_seed(seed, client.partition_id),
    }, sort_keys=True).encode())
    for key in sorted(base):
        h.update(key.encode())
        hash_tensor(h, base[key])
    for split in (client.train, client.test):
        if not isinstance(split, Split):  # lazily read images (CLIP tasks): dataset, rows, preprocessing, head
            h.update(split.fingerprint().encode())  # type: ignore[attr-defined]
            continue
        hash_tensor(h, split.x)
        hash_tensor(h, split.y)
    return h.hexdigest()[:32]


def _read_cached(path: Path, base: Mapping[str, Tensor]) -> LocalUpdate | None:
    """The cached update at ``path`` when it is there and verified (see ``read_cache_entry``): what
    the client sent, its dense task vector, or its LoRA factors made dense with ``base``."""
    def update(tensors: dict[str, Tensor], meta: dict[str, str]) -> LocalUpdate:
        factors = tensors if has_factors(tensors) else None
        dense = tensors if factors is None else dense_task_vector(factors, base)
        return LocalUpdate(TaskVector(dense), int(meta["num_examples"]), int(meta["local_steps"]),
                           float(meta["train_loss"]), float(meta["accuracy"]), cached=True, factors=factors)

    return read_cache_entry(path, update)


def local_update(
    model_name: str, base: Mapping[str, Tensor], client: ClientData, plan: TrainPlan, seed: int,
    input_shape: tuple[int, ...], num_classes: int, cache_dir: str | Path | None = None,
) -> LocalUpdate:
    """Fine-tune ``base`` for ``plan.local_steps`` steps on ``client.train``; cached when ``cache_dir``."""
    path = None
    if cache_dir:
        path = Path(cache_dir) / "task-vectors" / f"{update_key(model_name, base, client, plan, seed)}.safetensors"

    def trained() -> LocalUpdate:
        update = _fine_tune(model_name, base, client, plan, seed, input_shape, num_classes)
        if path is not None and non_finite_tensor(update.task_vector) is None:  # a diverged update is not kept
            meta = {"num_examples": str(update.num_examples), "local_steps": str(update.local_steps),
                    "train_loss": repr(update.train_loss), "accuracy": repr(update.accuracy)}
            write_cache_entry(update.sent, path, metadata=meta)
        return update

    return read_or_compute(path, lambda entry: _read_cached(entry, base), trained)


def _fine_tune(
    model_name: str, base: Mapping[str, Tensor], client: ClientData, plan: TrainPlan, seed: int,
    input_shape: tuple[int, ...], num_classes: int,
) -> LocalUpdate:
    model = build_model(model_name, input_shape, num_classes)
    model.load_state_dict(base)
    model.to(device_for(model_name))
    names = tensor_names(model)  # before LoRA wraps it: θ0's names of each weight
    trained = model if plan.lora_rank == 0 else with_lora(model, plan.lora_rank, plan.lora_alpha, plan.lora_dropout,
                                                           plan.lora_targets, client_seed(seed, client.partition_id))
    with single_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(client_seed(seed, client.partition_id))  # dropout (LoRA's) draws the same each run
        train(trained, client.train, plan, seed=client_seed(seed, client.partition_id))
        train_scores, test_scores = score(trained, client.train), score(trained, client.test)
    factors = None
    if plan.lora_rank == 0:
        task_vector = TaskVector.between(base, {k: v.cpu() for k, v in model.state_dict().items()})
    else:  # the frozen θ0 has not moved: τ is the adapters' (α/r)·B·A
        low_rank = {k: (b.cpu(), a.cpu()) for k, (b, a) in lora_factors(trained, names).items()}
        task_vector = TaskVector(dense_update(low_rank, base))
        factors = factor_arrays(low_rank) if plan.lora_send == "factors" else None
    return LocalUpdate(
        task_vector=task_vector,
        num_examples=len(client.train),
        local_steps=plan.local_steps,
        train_loss=train_scores.loss,
        accuracy=test_scores.accuracy,
        factors=factors,
    )
