"""Training heterogeneity: each client's training plan, from per-client settings.

A per-client setting is one value for every client, a list with one value per client, or (for
numbers) ``"MIN:MAX"``: each client draws its own value from the experiment's seed, one stream per
key. ``local_steps_spread`` instead spreads K_i log-evenly around a geometric mean ``local_steps``
so that max/min equals the spread, in a seed-drawn client order.
"""

from __future__ import annotations

import random
from typing import Annotated, Any

from pydantic import BeforeValidator, model_validator

from fedmerge.errors import ConfigError
from fedmerge.spec import Float, LearningRate, Names, Spec, WeightDecay, check, conform
from fedmerge.train.loop import TrainPlan

PerClient = int | float | str | list[Any]
MAX_STEPS = 10_000_000  # more local steps than this is a typo, not a week-long run


def _number(key: str, text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"!{key}: {text!r} is not a number") from None


def _per_client(key: str, kind: type, limits: Any = None) -> BeforeValidator:
    """Normalise a per-client value: scalar, list, "a,b,c" (flat configs) or "MIN:MAX" (numbers).
    ``limits`` (an annotated type of :mod:`fedmerge.spec`) checks every value, both ends of a range."""

    def scalar(value: Any) -> Any:
        return _scalar(key, value, kind, limits)

    def convert(value: Any) -> PerClient:
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",")]
            value = value if kind is str else [_number(key, v) for v in value]
        if isinstance(value, (list, tuple)):
            return [scalar(v) for v in value]
        if isinstance(value, str) and kind is not str:
            if ":" not in value:
                return scalar(_number(key, value))
            lo_text, _, hi_text = value.partition(":")
            lo, hi = scalar(_number(key, lo_text)), scalar(_number(key, hi_text))
            if lo > hi:
                raise ValueError(f"!{key} range {value!r} has MIN > MAX")
            return f"{lo}:{hi}"
        return scalar(value)

    return BeforeValidator(convert)


def _scalar(key: str, value: Any, kind: type, limits: Any = None) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        what = {float: "a number", int: "an integer"}.get(kind, "a string")
        raise ValueError(f"!{key} must be {what}, got {value!r}")
    if limits is not None:
        try:
            conform(limits, value)
        except ValueError as exc:
            raise ValueError(f"!{key} {exc}, got {value!r}") from None
    return value


_NAMES = ("optimizer", "lr_schedule", "lora_send")  # text: never a "MIN:MAX" range


class TrainingSpec(Spec):
    """Per-client training settings (training heterogeneity); :meth:`plans` gives each client's plan."""

    local_steps: Annotated[PerClient, _per_client("local-steps", int)] = "20:100"
    local_steps_spread: Annotated[Float, check(lambda v: 1 <= v <= MAX_STEPS, f"must lie in [1, {MAX_STEPS:,}] (the "
                                               "longest client's local steps over the shortest's)")] = 1.0
    lr: Annotated[PerClient, _per_client("lr", float, LearningRate)] = 0.1
    batch_size: Annotated[PerClient, _per_client("batch-size", int)] = 32
    optimizer: Annotated[PerClient, _per_client("optimizer", str)] = "sgd"
    weight_decay: Annotated[PerClient, _per_client("weight-decay", float, WeightDecay)] = 0.0
    warmup_steps: Annotated[PerClient, _per_client("warmup-steps", int)] = 0
    lr_schedule: Annotated[PerClient, _per_client("lr-schedule", str)] = "constant"
    grad_clip: Annotated[PerClient, _per_client("grad-clip", float)] = 0.0
    lora_rank: Annotated[PerClient, _per_client("lora-rank", int)] = 0
    lora_alpha: Annotated[PerClient, _per_client("lora-alpha", float)] = 8.0
    lora_dropout: Annotated[PerClient, _per_client("lora-dropout", float)] = 0.0
    lora_targets: Names = ()  # the same layers for every client
    lora_send: Annotated[PerClient, _per_client("lora-send", str)] = "dense"

    @model_validator(mode="after")
    def _spread_needs_one_value(self) -> TrainingSpec:
        if self.local_steps_spread > 1 and not isinstance(self.local_steps, int):
            raise ValueError("!local-steps-spread needs a single local-steps value (the geometric mean)")
        return self

    def plans(self, num_clients: int, seed: int) -> list[TrainPlan]:
        """Each client's plan; "MIN:MAX" ranges are drawn from ``seed``, once per key. A list must
        have one entry per client; every plan is checked (``ConfigError`` naming the key)."""
        columns: dict[str, list[Any]] = {}
        for name in TrainPlan.model_fields:
            key = name.replace("_", "-")
            value = getattr(self, name)
            kind = {int: int, float: float}.get(type(TrainPlan.model_fields[name].default), int)
            if isinstance(value, list):
                if len(value) != num_clients:
                    raise ConfigError(f"{key} has {len(value)} entries but num-clients is {num_clients}")
                columns[name] = list(value)
            elif isinstance(value, str) and ":" in value and name not in _NAMES:
                lo, hi = (_number(key, v) for v in value.split(":"))
                rng = random.Random(f"{seed}:{key}")
                columns[name] = [rng.randint(int(lo), int(hi)) if kind is int else rng.uniform(lo, hi)
                                 for _ in range(num_clients)]
            else:
                columns[name] = [value] * num_clients
        if self.local_steps_spread > 1:
            columns["local_steps"] = self._spread_steps(num_clients, seed)
        plans = [TrainPlan(**{name: column[i] for name, column in columns.items()}) for i in range(num_clients)]
        longest = max(p.local_steps for p in plans)
        if longest > MAX_STEPS and self.local_steps_spread > 1:
            raise ConfigError(f"local-steps={self.local_steps:,} with local-steps-spread={self.local_steps_spread:g} "
                              f"gives the longest client {longest:,} local steps, more than {MAX_STEPS:,}")
        if longest > MAX_STEPS:
            raise ConfigError(f"local-steps must be at most {MAX_STEPS:,}, got {longest:,}")
        return plans

    def _spread_steps(self, num_clients: int, seed: int) -> list[int]:
        """K_i = K · spread^u_i, u_i evenly spaced in [-1/2, 1/2], in a seed-drawn client order:
        max/min = spread, geometric mean K, and the long-trained clients are not the first ids."""
        assert isinstance(self.local_steps, int)
        n = num_clients
        exponents = [i / (n - 1) - 0.5 for i in range(n)] if n > 1 else [0.0]
        random.Random(f"{seed}:local-steps-spread").shuffle(exponents)
        return [max(1, round(self.local_steps * self.local_steps_spread ** u)) for u in exponents]
