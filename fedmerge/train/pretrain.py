"""The shared pre-trained base θ0: trained here on a split no client sees (cached on disk), or the
published weights of a model family that has them."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated
from pathlib import Path

from torch import Tensor

from fedmerge.data.federated import FederatedData
from fedmerge.errors import ConfigError
from fedmerge.io.state import non_finite_tensor, read_cache_entry, read_or_compute, write_cache_entry
from fedmerge.models.registry import build_model, pretrained_state
from fedmerge.spec import LearningRate, PositiveInt, Spec, Str, check, one_of
from fedmerge.train.loop import OPTIMIZERS, TrainPlan, single_thread, train
from fedmerge.train.plans import MAX_STEPS


class PretrainSpec(Spec):
    """How the shared base θ0 is pre-trained on the split no client sees (for models trained here)."""

    steps: Annotated[PositiveInt, check(lambda v: v <= MAX_STEPS, f"must be at most {MAX_STEPS:,}")] = 100
    lr: LearningRate = 0.1
    batch_size: PositiveInt = 32
    optimizer: Annotated[Str, one_of(OPTIMIZERS)] = "sgd"

    @classmethod
    def key_name(cls, location: tuple[str, ...]) -> str:
        return "pretrain-" + ".".join(location)

    def cache_key(self, model: str, seed: int, data: FederatedData) -> str:
        """A digest of everything that determines the pre-trained weights."""
        key = {"format": 1, "model": model, "seed": seed, **self.model_dump(), "dataset": data.spec.dataset,
               "pretrain_fraction": data.spec.pretrain_fraction, "data_seed": data.spec.seed}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_base(spec: PretrainSpec, model_name: str, seed: int, data: FederatedData,
                    cache_dir: Path | None) -> tuple[dict, bool]:
    """θ0 of ``model_name``: published weights where the family has them, else the model initialised
    from ``seed`` and trained on the pre-training split (cached). Returns (state dict, came from cache)."""
    if (state := pretrained_state(model_name)) is not None:  # e.g. clip:...: published weights
        return state, True
    path = None if cache_dir is None else (
        Path(cache_dir) / f"base-{model_name}-{spec.cache_key(model_name, seed, data)}.safetensors")

    def cached_model(tensors: dict[str, Tensor], _: object) -> dict[str, Tensor]:
        model = build_model(model_name, data.input_shape, data.num_classes, seed=seed)
        model.load_state_dict(tensors)  # raises RuntimeError for weights that no longer fit the model
        return model.state_dict()

    def read(entry: Path) -> tuple[dict, bool] | None:
        cached = read_cache_entry(entry, cached_model)
        return None if cached is None else (cached, True)

    def pretrained() -> tuple[dict, bool]:
        model = build_model(model_name, data.input_shape, data.num_classes, seed=seed)
        plan = TrainPlan(local_steps=spec.steps, lr=spec.lr, batch_size=spec.batch_size, optimizer=spec.optimizer)
        with single_thread():
            train(model, data.pretrain, plan, seed=seed)
        state = model.state_dict()
        if (bad := non_finite_tensor(state)) is not None:
            raise ConfigError(f"the pre-trained base θ0 of {model_name} diverged: tensor {bad!r} is NaN or Inf "
                              f"after {spec.steps} pre-training steps at lr {spec.lr:g}; lower "
                              f"{spec.key_name(('lr',))}")
        if path is not None:
            write_cache_entry(state, path)
        return state, False

    return read_or_compute(path, read, pretrained)
