"""One client's local update: fine-tune θ0 on its own data and return τ_i = θ_i − θ0."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from fedmerge.data import ClientData
from fedmerge.evaluation import score
from fedmerge.models import build_model
from fedmerge.task_vector import TaskVector
from fedmerge.training import TrainPlan, single_thread, train


@dataclass(frozen=True)
class LocalUpdate:
    task_vector: TaskVector
    num_examples: int
    local_steps: int
    train_loss: float  # loss on the whole local train split after training
    accuracy: float  # the client's own fine-tuned model on its local test split


def client_seed(seed: int, partition_id: int) -> int:
    """The shuffling seed of one client, derived from the experiment seed."""
    return seed * 100_003 + partition_id * 7_919 + 1


def local_update(
    model_name: str, base: Mapping[str, Tensor], client: ClientData, plan: TrainPlan, seed: int,
    input_shape: tuple[int, ...], num_classes: int,
) -> LocalUpdate:
    model = build_model(model_name, input_shape, num_classes)
    model.load_state_dict(base)
    with single_thread():
        train(model, client.train, plan, seed=client_seed(seed, client.partition_id))
        train_scores, test_scores = score(model, client.train), score(model, client.test)
    return LocalUpdate(
        task_vector=TaskVector.between(base, model.state_dict()),
        num_examples=len(client.train),
        local_steps=plan.local_steps,
        train_loss=train_scores.loss,
        accuracy=test_scores.accuracy,
    )
