"""Experiment configuration: one validated object, built from a preset, overrides and defaults.

Keys use Flower's hyphenated style. Every check names the key and the bad value, so a user sees one
clear line. The same object is saved with the results (``config.toml``) so a run can be repeated.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedmerge.attacks import byzantine_clients, check_attack, check_fraction
from fedmerge.data import PARTITIONERS, TRANSFORM_KINDS, DataSpec
from fedmerge.data.image_tasks import check_task
from fedmerge.errors import ConfigError, MergeError
from fedmerge.merging import METHODS
from fedmerge.models import check_model_name, split_name
from fedmerge.records import to_config
from fedmerge.registry import load_plugin_file
from fedmerge.train import PretrainSpec, TrainPlan

ENGINES = ("ray", "inprocess")
WEIGHTINGS = ("num-examples", "uniform")
TUNE = "tune"  # a scale value: choose λ (and rho) on the clients' validation splits
PRESETS_DIR = Path(__file__).parent / "presets"
MAX_STEPS = 10_000_000  # local-steps / pretrain-steps above this are rejected as typos
DEFAULT_PRESET = PRESETS_DIR / "default.toml"

# Training-plan keys that may differ per client: one value, a list with one per client, or "MIN:MAX".
PER_CLIENT_KEYS = {"local-steps": int, "lr": float, "batch-size": int, "optimizer": str, "weight-decay": float,
                   "warmup-steps": int, "lr-schedule": str, "grad-clip": float}
PerClient = int | float | str | list


def _key(default: Any, doc: str) -> Any:
    """A config field: its default and its one-line description (the README's table is built from them)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of one experiment. Field ``num_clients`` is key ``num-clients``, and so on.

    The defaults are the default experiment (``fedmerge run`` with no preset); each field's
    description is its documentation (``config_table``)."""

    name: str = _key("default", "run name: the results directory is runs/NAME-TIME")
    num_clients: int = _key(8, "number of Flower clients (one partition each)")
    model: str = _key("mlp", "model family: mlp, cnn, a plugin's, or FAMILY:SOURCE for published "
                             "weights, e.g. clip:openai/clip-vit-base-patch32")
    dataset: str = _key("digits", "dataset of the pool (digits: scikit-learn's bundled handwritten digits)")
    partition: str = _key("dirichlet", "how the pool is split: iid, dirichlet, pathological, shards, sizes, "
                                       "transforms, or a plugin's")
    alpha: float = _key(0.5, "Dirichlet concentration under partition = dirichlet (small: strong label skew)")
    classes_per_client: int = _key(2, "labels per client under partition = pathological")
    shards_per_client: int = _key(2, "label-sorted shards per client under partition = shards")
    sizes: float | list[int] = _key(1.0, "under partition = sizes: per-client sizes [n1, n2, ...] or a "
                                         "power-law exponent")
    transforms: tuple[str, ...] = _key(TRANSFORM_KINDS, "input transforms dealt to clients under partition = "
                                                        "transforms (permutation, rotation, flip, inversion)")
    tasks: tuple[str, ...] = _key((), "one CLIP image task per client (Cars, DTD, ..., or folder:PATH); "
                                      "replaces dataset and partition")
    local_steps: PerClient = _key("20:100", "K_i, local SGD steps per client: a value, a list, or \"MIN:MAX\" "
                                           "drawn from the seed")
    local_steps_spread: float = _key(1.0, "K_i spread log-evenly so that max/min equals this, around a "
                                          "geometric mean local-steps (1: off)")
    lr: PerClient = _key(0.1, "client learning rate (per client: value, list or \"MIN:MAX\")")
    batch_size: PerClient = _key(32, "client batch size (per client)")
    optimizer: PerClient = _key("sgd", "client optimizer: sgd, adam or adamw (per client)")
    weight_decay: PerClient = _key(0.0, "client weight decay (per client)")
    warmup_steps: PerClient = _key(0, "linear learning-rate warm-up steps (per client)")
    lr_schedule: PerClient = _key("constant", "after warm-up: constant or cosine (per client)")
    grad_clip: PerClient = _key(0.0, "clip each gradient's global L2 norm to this; 0: off (per client)")
    strategies: tuple[str, ...] = _key(("fedavg", "fednova", "median", "tsv"),
                                       "merging rules applied to the same task vectors (`fedmerge methods`)")
    scale: float | str | Mapping[str, float | str] = _key(
        {"fedavg": 1.0, "fednova": 1.0, "median": 1.0, "tsv": 0.25},
        "λ in θ0 + λ·τ_merged: one number, a table per rule, or \"tune\" (chosen on validation splits)")
    method_options: Mapping[str, Mapping[str, Any]] = _key({}, "options per rule, e.g. {fedgma = {rho = 0.4}}")
    weighting: str = _key("num-examples", "client weights p_i: num-examples or uniform")
    seed: int = _key(0, "drives data splits, initialisation, client shuffling and MIN:MAX draws")
    engine: str = _key("ray", "ray (Flower's simulation engine) or inprocess (same apps, one process)")
    min_clients: int = _key(2, "fewest valid replies to merge")
    timeout: float = _key(600.0, "seconds to wait for the clients' replies")
    client_cpus: int = _key(1, "CPUs per client on Ray")
    client_gpus: float = _key(0.0, "GPUs per client on Ray")
    byzantine_fraction: float = _key(0.0, "fraction of clients that attack (seed-drawn)")
    byzantine_mode: str = _key("sign-flip", "attack: sign-flip, scale, gaussian or random")
    byzantine_scale: float = _key(10.0, "factor of the scale attack")
    byzantine_std: float = _key(0.1, "noise of the gaussian attack")
    max_update_norm: float = _key(0.0, "reject task vectors with a larger L2 norm; 0: no bound")
    pretrain_steps: int = _key(100, "SGD steps that pre-train θ0 on a split no client sees")
    pretrain_lr: float = _key(0.1, "learning rate of pre-training")
    pretrain_fraction: float = _key(0.1, "share of the dataset kept for pre-training")
    test_fraction: float = _key(0.2, "share of the dataset kept as the global test split")
    local_test_fraction: float = _key(0.2, "share of each client's partition held out as its local test split")
    local_val_fraction: float = _key(0.1, "share of each client's partition held out for tuning λ")
    cache_dir: str = _key("", "where bases, task vectors and heads are cached (default $FEDMERGE_CACHE "
                              "or ~/.cache/fedmerge)")
    cache_task_vectors: bool = _key(False, "cache client task vectors on disk (sweeps turn it on)")
    plugins: tuple[str, ...] = _key((), "Python files that register rules, datasets, partitioners or models")

    def __post_init__(self) -> None:
        self.validate()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ExperimentConfig:
        """Build and validate from hyphenated keys; unknown keys are an error."""
        names = {f.name.replace("_", "-"): f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(names))}")
        return cls(**{names[k]: v for k, v in values.items()})

    def replace(self, **overrides: Any) -> ExperimentConfig:
        """A validated copy with hyphenated-key overrides, e.g. ``replace(**{"num-clients": 4})``."""
        return ExperimentConfig.from_mapping({**self.to_dict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The effective config with hyphenated keys, as written to ``config.toml``."""
        out = to_config(self)
        out["strategies"] = list(self.strategies)
        out["scale"] = dict(self.scale) if isinstance(self.scale, Mapping) else self.scale
        out["method-options"] = {k: dict(v) for k, v in self.method_options.items()}
        out["transforms"] = list(self.transforms)
        out["plugins"] = list(self.plugins)
        return out

    # -- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        _set = lambda name, value: object.__setattr__(self, name, value)
        _set("plugins", load_plugins(self.plugins))  # first: they may add rules, datasets, models
        for name, kind in (("num_clients", int), ("classes_per_client", int), ("seed", int), ("min_clients", int),
                           ("client_cpus", int), ("pretrain_steps", int), ("shards_per_client", int)):
            _set(name, _as(kind, getattr(self, name), name))
        for name in ("alpha", "timeout", "client_gpus", "pretrain_lr", "pretrain_fraction", "test_fraction",
                     "local_test_fraction", "local_val_fraction", "local_steps_spread"):
            _set(name, _as(float, getattr(self, name), name))
        for name in ("name", "model", "dataset", "partition", "weighting", "engine", "cache_dir"):
            _set(name, _as(str, getattr(self, name), name))
        _set("cache_task_vectors", _as(bool, self.cache_task_vectors, "cache_task_vectors"))
        check_model_name(self.model)
        _choice("partition", self.partition, PARTITIONERS.names())
        _choice("weighting", self.weighting, WEIGHTINGS)
        _choice("engine", self.engine, ENGINES)
        _positive("num-clients", self.num_clients)
        _positive("alpha", self.alpha)
        _positive("classes-per-client", self.classes_per_client)
        _positive("timeout", self.timeout)
        _positive("client-cpus", self.client_cpus)
        _positive("pretrain-steps", self.pretrain_steps)
        _positive("pretrain-lr", self.pretrain_lr)
        _positive("shards-per-client", self.shards_per_client)
        if not self.local_steps_spread >= 1 or not math.isfinite(self.local_steps_spread):
            raise ConfigError(f"local-steps-spread must be a finite number >= 1, got {self.local_steps_spread}")
        _set("sizes", self._sizes())
        kinds = self.transforms.split(",") if isinstance(self.transforms, str) else self.transforms
        if not isinstance(kinds, Sequence) or not kinds:
            raise ConfigError(f"transforms must be a non-empty list, got {self.transforms!r}")
        for kind in kinds:
            _choice("transforms", kind, TRANSFORM_KINDS)
        _set("transforms", tuple(kinds))
        _set("tasks", self._tasks())
        if self.client_gpus < 0:
            raise ConfigError(f"client-gpus must be >= 0, got {self.client_gpus}")
        self._validate_attacks()
        if not 1 <= self.min_clients <= self.num_clients:
            raise ConfigError(f"min-clients must lie in [1, num-clients={self.num_clients}], got {self.min_clients}")
        for key, kind in PER_CLIENT_KEYS.items():
            attr = key.replace("-", "_")
            _set(attr, _per_client_setting(key, getattr(self, attr), kind, self.num_clients))
        _set("strategies", self._strategies())
        _set("scale", self._scale())
        _set("method_options", self._method_options())
        plans = self.client_plans()  # range and type checks of every client's plan
        for key, value in (("local-steps", max(p.local_steps for p in plans)), ("pretrain-steps", self.pretrain_steps)):
            if value > MAX_STEPS:  # an absurd value is a typo, not a week-long run
                raise ConfigError(f"{key} must be at most {MAX_STEPS:,}, got {value:,}")

    def _tasks(self) -> tuple[str, ...]:
        tasks = self.tasks
        if isinstance(tasks, str):  # flat run configs: "MNIST,SVHN"
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        if not isinstance(tasks, Sequence) or not all(isinstance(t, str) for t in tasks):
            raise ConfigError(f"tasks must be a list of task names, got {self.tasks!r}")
        if tasks:
            for t in tasks:
                check_task(t)
            if len(tasks) != self.num_clients:
                raise ConfigError(f"tasks lists {len(tasks)} tasks but num-clients is {self.num_clients}; "
                                  "each client fine-tunes one task")
            if split_name(self.model)[0] != "clip":
                raise ConfigError(f"tasks need a CLIP model (model = \"clip:HUB_ID_OR_DIR\"), got model={self.model!r}")
        return tuple(tasks)

    def _sizes(self) -> float | list[int]:
        if isinstance(self.sizes, str) and "," in self.sizes:
            return self._sizes_list([_parse_number("sizes", v) for v in self.sizes.split(",")])
        if isinstance(self.sizes, (list, tuple)):
            return self._sizes_list(self.sizes)
        exponent = _finite("sizes", self.sizes)
        if exponent < 0:
            raise ConfigError(f"sizes must be a list of per-client sizes or a power-law exponent >= 0, got {exponent}")
        return exponent

    def _sizes_list(self, values: Sequence[Any]) -> list[int]:
        if len(values) != self.num_clients:
            raise ConfigError(f"sizes has {len(values)} entries but num-clients is {self.num_clients}")
        sizes = [_as(int, v, "sizes") for v in values]
        if min(sizes) < 1:
            raise ConfigError(f"sizes must all be >= 1, got {sizes}")
        return sizes

    def _validate_attacks(self) -> None:
        for name in ("byzantine_fraction", "byzantine_scale", "byzantine_std", "max_update_norm"):
            object.__setattr__(self, name, _finite(name.replace("_", "-"), getattr(self, name)))
        object.__setattr__(self, "byzantine_mode", _as(str, self.byzantine_mode, "byzantine_mode"))
        check_fraction(self.byzantine_fraction)
        check_attack(self.byzantine_mode, self.byzantine_scale, self.byzantine_std)
        if self.max_update_norm < 0:
            raise ConfigError(f"max-update-norm must be >= 0 (0: no bound), got {self.max_update_norm}")

    def byzantine_clients(self) -> list[int]:
        """Partition ids of the attackers: the first ⌈byzantine-fraction · N⌉ of a seed-drawn permutation."""
        return byzantine_clients(self.num_clients, self.byzantine_fraction, self.seed)

    def _strategies(self) -> tuple[str, ...]:
        value = self.strategies
        if isinstance(value, str):
            value = [s.strip() for s in value.split(",") if s.strip()]
        if not isinstance(value, Sequence) or not value or not all(isinstance(s, str) for s in value):
            raise ConfigError(f"strategies must be a non-empty list of method names, got {value!r}")
        for s in value:
            _choice("strategies", s, METHODS.names())
        if len(set(value)) != len(value):
            raise ConfigError(f"strategies lists a method twice: {list(value)}")
        return tuple(value)

    def _scale(self) -> float | dict[str, float]:
        if isinstance(self.scale, str) and "=" in self.scale:  # flat configs: "fedavg=1,tsv=0.25"
            pairs = [item.partition("=") for item in self.scale.split(",") if item.strip()]
            object.__setattr__(self, "scale", {m.strip(): v.strip() if v.strip() == TUNE else _parse_number("scale", v)
                                               for m, _, v in pairs})
        if isinstance(self.scale, Mapping):
            # Entries for known methods that this run does not use are allowed (and dropped), so a
            # preset's table survives `--set strategies=[...]`; an unknown name is a typo.
            for m in self.scale:
                _choice("scale", m, METHODS.names())
            out = {m: _scale_value("scale." + m, v) for m, v in self.scale.items()}
            return {m: out.get(m, 1.0) for m in self.strategies}
        return _scale_value("scale", self.scale)

    def _method_options(self) -> dict[str, dict[str, Any]]:
        if not isinstance(self.method_options, Mapping):
            raise ConfigError(f"method-options must be a table of tables, got {self.method_options!r}")
        out = {}
        for method, options in self.method_options.items():
            _choice("method-options", method, METHODS.names())
            if not isinstance(options, Mapping):
                raise ConfigError(f"method-options.{method} must be a table, got {options!r}")
            settable = METHODS[method].settable
            for opt in options:
                if opt not in settable:
                    raise ConfigError(
                        f"method-options.{method}.{opt} is not an option of {method} "
                        f"(options: {', '.join(sorted(settable)) or 'none'})"
                    )
            _check_option_values(method, options)
            out[method] = dict(options)
        return out

    # -- derived settings ----------------------------------------------------------------------------
    def scale_of(self, method: str) -> float | str:
        """λ of ``method``: a number, or ``"tune"`` (chosen on the clients' validation splits)."""
        return self.scale[method] if isinstance(self.scale, Mapping) else self.scale

    def data_spec(self) -> DataSpec:
        return DataSpec(
            num_clients=self.num_clients, partition=self.partition, alpha=self.alpha,
            classes_per_client=self.classes_per_client, seed=self.seed, dataset=self.dataset,
            pretrain_fraction=self.pretrain_fraction, test_fraction=self.test_fraction,
            local_test_fraction=self.local_test_fraction, local_val_fraction=self.local_val_fraction,
            shards_per_client=self.shards_per_client,
            sizes=tuple(self.sizes) if isinstance(self.sizes, list) else self.sizes, transforms=self.transforms,
            **({"tasks": self.tasks, "encoder": split_name(self.model)[1], "cache_dir": str(self.cache_path())}
               if self.tasks else {}),
        )

    def pretrain_spec(self) -> PretrainSpec:
        return PretrainSpec(model=self.model, steps=self.pretrain_steps, lr=self.pretrain_lr, seed=self.seed)

    def client_plans(self) -> list[TrainPlan]:
        """Each client's training plan; "MIN:MAX" ranges are drawn from the seed, once per key."""
        columns = {}
        for key, kind in PER_CLIENT_KEYS.items():
            rng = random.Random(f"{self.seed}:{key}")
            columns[key] = _resolve(getattr(self, key.replace("-", "_")), kind, self.num_clients, rng)
        if self.local_steps_spread > 1:
            columns["local-steps"] = self._spread_steps()
        return [
            TrainPlan(local_steps=columns["local-steps"][i], lr=columns["lr"][i], batch_size=columns["batch-size"][i],
                      optimizer=columns["optimizer"][i], weight_decay=columns["weight-decay"][i],
                      warmup_steps=columns["warmup-steps"][i], lr_schedule=columns["lr-schedule"][i],
                      grad_clip=columns["grad-clip"][i])
            for i in range(self.num_clients)
        ]

    def _spread_steps(self) -> list[int]:
        """K_i = K · spread^u_i, u_i evenly spaced in [-1/2, 1/2], in a seed-drawn client order:
        max/min = spread, geometric mean K, and the long-trained clients are not the first ids."""
        if not isinstance(self.local_steps, int):
            raise ConfigError("local-steps-spread needs a single local-steps value (the geometric mean)")
        n = self.num_clients
        exponents = [i / (n - 1) - 0.5 for i in range(n)] if n > 1 else [0.0]
        random.Random(f"{self.seed}:local-steps-spread").shuffle(exponents)
        return [max(1, round(self.local_steps * self.local_steps_spread ** u)) for u in exponents]

    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


# ------------------------------------------------------------------------------------------------
# Value checks, each naming the key
# ------------------------------------------------------------------------------------------------


def _check_option_values(method: str, options: Mapping[str, Any]) -> None:
    """Option values are checked against the rule's registry entry (type and range), before any training."""
    try:
        METHODS[method].check_options(options, num_clients=1)
    except MergeError as exc:
        raise ConfigError(f"method-options.{method}: {exc}") from None


def config_table() -> str:
    """The README's table of config keys, from the schema: key, default, description."""
    rows = ["| key | default | what it sets |", "|---|---|---|"]
    for f in dataclasses.fields(ExperimentConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = tomli_w.dumps({"v": list(default) if isinstance(default, tuple) else default})[4:].strip()
        rows.append(f"| `{f.name.replace('_', '-')}` | `{shown}` | {f.metadata['doc']} |")
    return "\n".join(rows) + "\n"


def load_plugins(plugins: Any) -> tuple[str, ...]:
    """Load plugin files (``plugins = [...]`` or ``--plugin``) and return their absolute paths, so that
    clients in other processes load the very same files."""
    if isinstance(plugins, str):  # flat run configs: "a.py,b.py"
        plugins = [p.strip() for p in plugins.split(",") if p.strip()]
    if not isinstance(plugins, Sequence) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"plugins must be a list of Python files, got {plugins!r}")
    paths = tuple(str(Path(p).expanduser().resolve()) for p in plugins)
    for path in paths:
        load_plugin_file(path)
    return paths


def default_cache_dir() -> Path:
    """Where bases, task vectors and heads are cached: ``$FEDMERGE_CACHE`` or ~/.cache/fedmerge."""
    return Path(os.environ.get("FEDMERGE_CACHE", Path.home() / ".cache" / "fedmerge"))


def _as(kind: type, value: Any, name: str) -> Any:
    key = name.replace("_", "-")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"  # flat run configs may carry booleans as strings
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        what = {float: "a number", int: "an integer", bool: "true or false"}.get(kind, "a string")
        raise ConfigError(f"{key} must be {what}, got {value!r}")
    return value


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not known; choose from {', '.join(allowed)}")


def _positive(key: str, value: float) -> None:
    if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{key} must be > 0, got {value}")


def _scale_value(key: str, value: Any) -> float | str:
    """A scale is a finite number or ``"tune"`` (λ searched on validation data, see fedmerge.tuning)."""
    if isinstance(value, str) and value.strip() == TUNE:
        return TUNE
    if isinstance(value, str):
        raise ConfigError(f"{key} must be a number or \"{TUNE}\", got {value!r}")
    return _finite(key, value)


def _finite(key: str, value: Any) -> float:
    value = _as(float, value, key)
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    return value


def _per_client_setting(key: str, value: Any, kind: type, n: int) -> PerClient:
    """Normalise a per-client value: scalar, list of n, "a,b,c" (from flat configs) or "MIN:MAX"."""
    if isinstance(value, str) and "," in value:
        value = [v.strip() for v in value.split(",")]
        value = [v if kind is str else _parse_number(key, v) for v in value]
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"{key} has {len(value)} entries but num-clients is {n}")
        return [_as(kind, v, key) for v in value]
    if isinstance(value, str) and kind is not str:
        if ":" not in value:
            return _as(kind, _parse_number(key, value), key)
        lo, _, hi = value.partition(":")
        lo, hi = _as(kind, _parse_number(key, lo), key), _as(kind, _parse_number(key, hi), key)
        if lo > hi:
            raise ConfigError(f"{key} range {value!r} has MIN > MAX")
        return f"{lo}:{hi}"
    return _as(kind, value, key)


def _parse_number(key: str, text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: {text!r} is not a number") from None


def _resolve(value: PerClient, kind: type, n: int, rng: random.Random) -> list:
    if isinstance(value, list):
        return list(value)
    if isinstance(value, str) and kind is not str:
        lo, hi = (kind(_parse_number("", v)) for v in value.split(":"))
        return [rng.randint(lo, hi) if kind is int else rng.uniform(lo, hi) for _ in range(n)]
    return [value] * n


# ------------------------------------------------------------------------------------------------
# Files and overrides
# ------------------------------------------------------------------------------------------------


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such preset file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with ``value`` read as TOML (``[1, 2]``, ``0.5``, ``true``) or else as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def load_config(preset: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                plugins: Sequence[str | os.PathLike] = ()) -> ExperimentConfig:
    """Defaults ← preset (the shipped default when None) ← ``--set`` overrides, validated once.

    A preset's ``plugins`` are paths relative to the preset file; ``plugins`` given here (``--plugin``)
    are added to them."""
    path = Path(preset if preset is not None else DEFAULT_PRESET)
    values = read_toml(path)
    values["plugins"] = [str(path.parent / p) for p in _as_list(values.get("plugins", []), "plugins")]
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    values["plugins"] = [*_as_list(values["plugins"], "plugins"), *map(str, plugins)]
    return ExperimentConfig.from_mapping(values)


def _as_list(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"{key} must be a list, got {value!r}")
    return value


def write_toml(config: ExperimentConfig, path: str | os.PathLike) -> None:
    values = config.to_dict()
    if not values["method-options"]:
        del values["method-options"]
    Path(path).write_text(tomli_w.dumps(values))
