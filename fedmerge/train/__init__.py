"""Training: K-step local fine-tuning, a client's cached local update, the cached pre-trained base."""

from fedmerge.train.local import LocalUpdate, client_seed, local_update
from fedmerge.train.loop import LR_SCHEDULES, OPTIMIZERS, OutOfTime, TrainPlan, single_thread, time_limit, train
from fedmerge.train.plans import TrainingSpec
from fedmerge.train.pretrain import PretrainSpec, pretrained_base

__all__ = [
    "LR_SCHEDULES", "OPTIMIZERS", "LocalUpdate", "OutOfTime", "PretrainSpec", "TrainPlan", "TrainingSpec",
    "client_seed", "local_update", "pretrained_base", "single_thread", "time_limit", "train",
]
