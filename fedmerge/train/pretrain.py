"""The shared pre-trained base θ0: trained here on a split no client sees (cached on disk), or the
published weights of a model family that has them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fedmerge.data.splits import FederatedData
from fedmerge.io.state import load_state, save_state
from fedmerge.models.registry import build_model, pretrained_state
from fedmerge.train.loop import TrainPlan, single_thread, train


@dataclass(frozen=True)
class PretrainSpec:
    """Settings of the shared pre-trained base; its cache file is keyed by all of them."""

    model: str
    steps: int = 100
    lr: float = 0.1
    batch_size: int = 32
    seed: int = 0

    def cache_key(self, data: FederatedData) -> str:
        key = {"format": 1, **asdict(self), "dataset": data.spec.dataset,
               "pretrain_fraction": data.spec.pretrain_fraction, "data_seed": data.spec.seed}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_base(spec: PretrainSpec, data: FederatedData, cache_dir: Path | None) -> tuple[dict, bool]:
    """θ0: the model trained on the pre-training split. Returns (state dict, came from cache)."""
    if (state := pretrained_state(spec.model)) is not None:  # e.g. clip:...: published weights, not trained here
        return state, True
    path = None if cache_dir is None else Path(cache_dir) / f"base-{spec.model}-{spec.cache_key(data)}.safetensors"
    model = build_model(spec.model, data.input_shape, data.num_classes, seed=spec.seed)
    if path is not None and path.is_file():
        model.load_state_dict(load_state(path))
        return model.state_dict(), True
    plan = TrainPlan(local_steps=spec.steps, lr=spec.lr, batch_size=spec.batch_size)
    with single_thread():
        train(model, data.pretrain, plan, seed=spec.seed)
    state = model.state_dict()
    if path is not None:
        save_state(state, path)
    return state, False
