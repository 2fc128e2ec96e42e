"""Experiment configuration: one typed schema, validated once, with one set of defaults.

An :class:`ExperimentConfig` is made of sections that are the library's own specs: ``data``
(:class:`fedmerge.data.DataSpec`), ``train`` (:class:`fedmerge.train.TrainingSpec`), ``pretrain``
(:class:`fedmerge.train.PretrainSpec`), ``attack`` (:class:`fedmerge.attacks.AttackSpec`), plus
``merging`` and ``run`` (below). Users write flat, hyphenated keys (``alpha = 0.1``,
``pretrain-steps = 50``, as in presets, ``--set`` and Flower's run config); each flat key belongs to
exactly one section (:data:`KEYS`), and nested tables (``[data] alpha = 0.1``) work too. The schema's
defaults are the default experiment; every bad value is one line naming the key and the value. The
same object is saved with the results (``config.toml``, flat keys) so a run can be repeated.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import tomli_w
import torch
from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from fedmerge.attacks import AttackSpec, byzantine_count
from fedmerge.data import DataSpec
from fedmerge.errors import ConfigError, MergeError
from fedmerge.merging import MERGE_DEVICES, METHODS
from fedmerge.merging.registry import DeviceName
from fedmerge.models import family_of, split_name
from fedmerge.registry import load_plugin_file
from fedmerge.spec import (MAX_SEED, Bool, Factor, Names, NonNegative, PositiveInt, Seconds, Spec, Str, conform,
                           hyphenate, known, one_of)
from fedmerge.train import PretrainSpec, TrainingSpec, TrainPlan

ENGINES = ("ray", "inprocess")
WEIGHTINGS = ("num-examples", "uniform")
TUNE = "tune"  # a scale value: choose λ (and rho) on the clients' validation splits
PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = PRESETS_DIR / "default.toml"
RECIPES_DIR = Path(__file__).parent / "recipes"  # merge recipes (fedmerge merge --recipe)


# ------------------------------------------------------------------------------------------------
# The two sections that are not library specs
# ------------------------------------------------------------------------------------------------


def _scale_value(key: str, value: Any) -> float | str:
    """A scale is a finite number in [-1e6, 1e6] or ``"tune"`` (λ searched on validation data)."""
    if isinstance(value, str) and value.strip() == TUNE:
        return TUNE
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"!{key} must be a number or \"{TUNE}\", got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"!{key} must be a finite number or \"{TUNE}\", got {value!r}")
    try:
        return float(conform(Factor, value))
    except ValueError as exc:
        raise ValueError(f"!{key} {exc} (or be \"{TUNE}\"), got {value!r}") from None


def _scale(value: Any) -> float | str | dict[str, float | str]:
    if isinstance(value, str) and "=" in value:  # flat run configs: "fedavg=1,tsv=0.25"
        pairs = (item.partition("=") for item in value.split(",") if item.strip())
        value = {m.strip(): v.strip() for m, _, v in pairs}
    if isinstance(value, Mapping):
        for method in value:
            if method not in METHODS:
                raise ValueError(f"!scale={method!r} is not known; choose from {', '.join(METHODS.names())}")
        return {m: _scale_value(f"scale.{m}", v) for m, v in value.items()}
    return _scale_value("scale", value)


# Mean-like rules sit at the scale of one task vector (λ = 1 is one FedAvg round with server learning
# rate 1); TSV-Merge keeps every client's singular values, so λ ≈ 2/N suits the default 8 clients.
DEFAULT_SCALE: dict[str, float | str] = {"fedavg": 1.0, "fednova": 1.0, "median": 1.0, "tsv": 0.25}


class MergingSpec(Spec):
    """Which rules merge the clients' task vectors, with which λ and options, weighting and bound."""

    strategies: Names = ("fedavg", "fednova", "median", "tsv")
    scale: Annotated[float | str | dict[str, float | str], BeforeValidator(_scale)] = Field(
        default_factory=lambda: dict(DEFAULT_SCALE))
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    weighting: Annotated[Str, one_of(WEIGHTINGS)] = "num-examples"
    max_update_norm: NonNegative = 0.0
    merge_device: DeviceName = "auto"

    @field_validator("strategies")
    @classmethod
    def _known_rules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must be a non-empty list of method names")
        for name in value:
            if name not in METHODS:
                raise ValueError(f"!strategies={name!r} is not known; choose from {', '.join(METHODS.names())}")
        if len(set(value)) != len(value):
            raise ValueError(f"!strategies lists a method twice: {list(value)}")
        return value

    @field_validator("method_options", mode="before")
    @classmethod
    def _known_options(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise ValueError(f"!method-options must be a table of tables, got {value!r}")
        for method, options in value.items():
            if method not in METHODS:
                raise ValueError(f"!method-options={method!r} is not known; choose from {', '.join(METHODS.names())}")
            if not isinstance(options, Mapping):
                raise ValueError(f"!method-options.{method} must be a table, got {options!r}")
            settable = METHODS[method].settable
            for option in options:
                if option not in settable:
                    raise ValueError(f"!method-options.{method}.{option} is not an option of {method} "
                                     f"(options: {', '.join(sorted(settable)) or 'none'})")
            try:  # types and ranges, from the rule's registry entry
                METHODS[method].check_options(options, num_clients=1)
            except MergeError as exc:
                raise ValueError(f"!method-options.{method}.{str(exc).removeprefix(method + ': ')}") from None
        return value

    @model_validator(mode="after")
    def _required_options_given(self) -> MergingSpec:
        for method in self.strategies:
            entry = METHODS[method]
            missing = sorted(entry.required - entry.per_client - set(self.method_options.get(method, {})))
            if missing:
                raise ValueError(f"!{method} needs option {missing[0]!r}: set method-options.{method}.{missing[0]}")
        return self

    @model_validator(mode="after")
    def _scale_per_strategy(self) -> MergingSpec:
        # A scale table may name rules this run does not use (so that a preset's table survives
        # `--set strategies=[...]`); it is kept for the run's rules only, 1.0 where it is silent.
        if isinstance(self.scale, dict):
            object.__setattr__(self, "scale", {m: self.scale.get(m, 1.0) for m in self.strategies})
        return self

    def scale_of(self, method: str) -> float | str:
        """λ of ``method``: a number, or ``"tune"`` (chosen on the clients' validation splits)."""
        return self.scale[method] if isinstance(self.scale, dict) else self.scale


class RunSpec(Spec):
    """How the experiment runs: engine and resources, patience, caches and plugins."""

    engine: Annotated[Str, one_of(ENGINES)] = "ray"
    min_clients: PositiveInt = 2
    timeout: Seconds = 600.0
    client_cpus: PositiveInt = 1
    client_gpus: NonNegative = 0.0
    cache_dir: Str = ""
    cache_task_vectors: Bool = False
    plugins: Names = ()


# ------------------------------------------------------------------------------------------------
# The flat keys users write, each with its section, field and description
# ------------------------------------------------------------------------------------------------

SECTIONS: dict[str, type[Spec]] = {"data": DataSpec, "train": TrainingSpec, "pretrain": PretrainSpec,
                                   "merging": MergingSpec, "attack": AttackSpec, "run": RunSpec}

# key: (section or "" for the top level, field, description). The README's table is built from it.
KEYS: dict[str, tuple[str, str, str]] = {
    "name": ("", "name", "run name: the results directory is runs/NAME-TIME"),
    "num-clients": ("data", "num_clients", "number of Flower clients (one partition each)"),
    "model": ("", "model", "model family: mlp, cnn, a plugin's, or FAMILY:SOURCE for published weights, "
                           "e.g. clip:openai/clip-vit-base-patch32"),
    "dataset": ("data", "dataset", "dataset of the pool (digits: scikit-learn's bundled handwritten digits)"),
    "partition": ("data", "partition", "how the pool is split: iid, dirichlet, pathological, shards, sizes, "
                                       "transforms, or a plugin's"),
    "alpha": ("data", "alpha", "Dirichlet concentration under partition = dirichlet, in (0, 1e6] (small: strong "
                               "label skew)"),
    "classes-per-client": ("data", "classes_per_client", "labels per client under partition = pathological"),
    "shards-per-client": ("data", "shards_per_client", "label-sorted shards per client under partition = shards"),
    "sizes": ("data", "sizes", "under partition = sizes: per-client sizes [n1, n2, ...] or a power-law exponent"),
    "transforms": ("data", "transforms", "input transforms dealt to clients under partition = transforms "
                                         "(permutation, rotation, flip, inversion)"),
    "tasks": ("data", "tasks", "one CLIP image task per client (Cars, DTD, ..., or folder:PATH); replaces "
                               "dataset and partition"),
    "local-steps": ("train", "local_steps", "K_i, local SGD steps per client: a value, a list, or \"MIN:MAX\" "
                                            "drawn from the seed"),
    "local-steps-spread": ("train", "local_steps_spread", "K_i spread log-evenly so that max/min equals this, "
                                                          "around a geometric mean local-steps (1: off)"),
    "lr": ("train", "lr", "client learning rate in (0, 10] (per client: value, list or \"MIN:MAX\")"),
    "batch-size": ("train", "batch_size", "client batch size (per client)"),
    "optimizer": ("train", "optimizer", "client optimizer: sgd, adam or adamw (per client)"),
    "weight-decay": ("train", "weight_decay", "client weight decay in [0, 100] (per client)"),
    "warmup-steps": ("train", "warmup_steps", "linear learning-rate warm-up steps (per client)"),
    "lr-schedule": ("train", "lr_schedule", "after warm-up: constant or cosine (per client)"),
    "grad-clip": ("train", "grad_clip", "clip each gradient's global L2 norm to this; 0: off (per client)"),
    "lora-rank": ("train", "lora_rank", "LoRA rank r through PEFT; 0: every weight trains (per client)"),
    "lora-alpha": ("train", "lora_alpha", "LoRA α: the update is (α/r)·B·A (per client)"),
    "lora-dropout": ("train", "lora_dropout", "dropout on the LoRA branch, in [0, 1) (per client)"),
    "lora-targets": ("train", "lora_targets", "linear layers that get adapters, by name or name ending (e.g. "
                                              "[\"q_proj\", \"v_proj\"]); empty: all"),
    "lora-send": ("train", "lora_send", "a LoRA client replies its dense update or its factors (per client)"),
    "strategies": ("merging", "strategies", "merging rules applied to the same task vectors (`fedmerge methods`)"),
    "scale": ("merging", "scale", "λ in θ0 + λ·τ_merged, in [-1e6, 1e6]: one number, a table per rule, or \"tune\" "
                                  "(chosen on validation splits)"),
    "method-options": ("merging", "method_options", "options per rule, e.g. {fedgma = {rho = 0.4}}"),
    "weighting": ("merging", "weighting", "client weights p_i: num-examples or uniform"),
    "max-update-norm": ("merging", "max_update_norm", "reject task vectors with a larger L2 norm; 0: no bound"),
    "merge-device": ("merging", "merge_device", f"where the server merges: {MERGE_DEVICES} (auto: the GPU when "
                                                f"there is one)"),
    "seed": ("data", "seed", f"drives data splits, initialisation, client shuffling and MIN:MAX draws; an integer "
                             f"in [0, {MAX_SEED}] (2^32 − 1: derived per-client seeds stay valid for numpy and torch)"),
    "engine": ("run", "engine", "ray (Flower's simulation engine) or inprocess (same apps, one process)"),
    "min-clients": ("run", "min_clients", "fewest valid replies to merge"),
    "timeout": ("run", "timeout", "seconds to wait for the clients' replies, at most 1e7"),
    "client-cpus": ("run", "client_cpus", "CPUs per client on Ray, at most the machine's"),
    "client-gpus": ("run", "client_gpus", "GPUs per client on Ray: a share of one GPU or whole GPUs, at most those "
                                          "visible"),
    "byzantine-fraction": ("attack", "fraction", "fraction of clients that attack (seed-drawn), in [0, 1); at least "
                                                 "one client must stay honest"),
    "byzantine-mode": ("attack", "mode", "attack: sign-flip, scale, gaussian or random"),
    "byzantine-scale": ("attack", "scale", "factor of the scale attack, in [-1e6, 1e6]"),
    "byzantine-std": ("attack", "std", "noise (standard deviation) of the gaussian attack, in [0, 1e6]"),
    "pretrain-steps": ("pretrain", "steps", "SGD steps that pre-train θ0 on a split no client sees"),
    "pretrain-lr": ("pretrain", "lr", "learning rate of pre-training, in (0, 10]"),
    "pretrain-batch-size": ("pretrain", "batch_size", "batch size of pre-training"),
    "pretrain-optimizer": ("pretrain", "optimizer", "optimizer of pre-training: sgd, adam or adamw"),
    "pretrain-fraction": ("data", "pretrain_fraction", "share of the dataset kept for pre-training"),
    "test-fraction": ("data", "test_fraction", "share of the dataset kept as the global test split"),
    "local-test-fraction": ("data", "local_test_fraction", "share of each client's partition held out as its "
                                                           "local test split"),
    "local-val-fraction": ("data", "local_val_fraction", "share of each client's partition held out for tuning λ"),
    "cache-dir": ("run", "cache_dir", "where bases, task vectors and heads are cached (default $FEDMERGE_CACHE or "
                                      "~/.cache/fedmerge)"),
    "cache-task-vectors": ("run", "cache_task_vectors", "cache client task vectors on disk (sweeps turn it on)"),
    "plugins": ("run", "plugins", "Python files that register rules, datasets, partitioners or models"),
}
_KEY_OF = {(section, field): key for key, (section, field, _) in KEYS.items()}
# Renamed since earlier releases; still read, so that a saved config.toml repeats its run.
RENAMED_KEYS = {"task-kinds": "transforms"}
RENAMED_VALUES = {("partition", "tasks"): "transforms"}


def unknown_key(key: str) -> str:
    """The error for a key that is not in :data:`KEYS`: the nearest key, else all of them."""
    near = difflib.get_close_matches(hyphenate(key), KEYS, n=1, cutoff=0.6)
    if near:
        return f"unknown config key {key!r}; did you mean {near[0]!r}?"
    return f"unknown config key {key!r}; known keys: {', '.join(sorted(KEYS))}"


def _route(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flat keys (hyphenated or underscored) and nested section tables → one nested dict."""
    nested: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = RENAMED_KEYS.get(hyphenate(raw_key), hyphenate(raw_key))
        if isinstance(value, str):
            value = RENAMED_VALUES.get((key, value), value)
        if key in SECTIONS and isinstance(value, Spec):
            nested[key] = {**value.model_dump(), **nested.get(key, {})}
        elif key in SECTIONS and isinstance(value, Mapping):
            nested.setdefault(key, {}).update(value)
        elif key in KEYS:
            section, field, _ = KEYS[key]
            if section:
                nested.setdefault(section, {})[field] = value
            else:
                nested[field] = value
        else:
            raise ValueError(f"!{unknown_key(raw_key)}")
    return nested


MAX_NAME_BYTES = 200  # a run directory is NAME-TIME: within the 255 bytes a file name may have
_NOT_IN_NAMES = frozenset({"Cc", "Cs", "Zl", "Zp"})  # control characters, lone surrogates, line breaks


def check_run_name(name: str) -> str:
    """A run's (or sweep's) name becomes a directory under ``runs/``: one plain path component, never a path, that
    file systems accept (at most ``MAX_NAME_BYTES`` bytes) and terminals print as it is written."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name
            or any(unicodedata.category(c) in _NOT_IN_NAMES for c in name)
            or len(name.encode("utf-8")) > MAX_NAME_BYTES):
        raise ValueError(f"must be a plain name for a directory under runs/: at most {MAX_NAME_BYTES} bytes in "
                         "UTF-8, without '/', '\\', control characters or line breaks, and not '.' or '..'")
    return name


RunName = Annotated[Str, AfterValidator(check_run_name)]


class ExperimentConfig(Spec):
    """Every setting of one experiment, in sections that are the library's specs (see the module)."""

    name: RunName = "default"
    model: Str = "mlp"
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainingSpec = Field(default_factory=TrainingSpec)
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec)
    merging: MergingSpec = Field(default_factory=MergingSpec)
    attack: AttackSpec = Field(default_factory=AttackSpec)
    run: RunSpec = Field(default_factory=RunSpec)

    @classmethod
    def key_name(cls, location: tuple[str, ...]) -> str:
        """The flat key of a section's field: ``("attack", "fraction")`` is ``byzantine-fraction``."""
        section, field = (location[0], location[1]) if len(location) > 1 else ("", location[0])
        return _KEY_OF.get((section, field.replace("-", "_")), ".".join(location))

    @model_validator(mode="before")
    @classmethod
    def _flat_keys_and_plugins(cls, values: Any) -> Any:
        """Route flat keys to their sections; load plugins first, since they may add the very
        rules, datasets, partitioners and models that the rest of the config names."""
        if not isinstance(values, Mapping):
            return values
        nested = _route(values)
        run = nested.get("run", {})
        if "plugins" in run:
            try:
                run["plugins"] = load_plugins(run["plugins"])
            except ConfigError as exc:
                raise ValueError(f"!{exc}") from None
        return nested

    _known_model = field_validator("model")(known(family_of))

    @model_validator(mode="after")
    def _check_together(self) -> ExperimentConfig:
        n = self.num_clients
        attackers = byzantine_count(n, self.attack.fraction)
        if attackers >= n:
            raise ValueError(f"!byzantine-fraction={self.attack.fraction:g} makes all num-clients={n} clients "
                             f"attackers (⌈{self.attack.fraction:g} · {n}⌉ = {attackers}); keep at least one honest "
                             f"client: byzantine-fraction <= {largest_honest_fraction(n):g}")
        if self.data.tasks and split_name(self.model)[0] != "clip":
            raise ValueError(f"!tasks need a CLIP model (model = \"clip:HUB_ID_OR_DIR\"), got model={self.model!r}")
        if not self.run.min_clients <= self.num_clients:
            if "min_clients" not in self.run.model_fields_set:  # the default min-clients: num-clients is too small
                raise ValueError(f"!num-clients={n} is fewer than min-clients={self.run.min_clients}, the fewest "
                                 f"valid replies a round merges: use num-clients >= {self.run.min_clients}, or "
                                 f"set min-clients = {n}")
            raise ValueError(f"!min-clients must lie in [1, num-clients={self.num_clients}], "
                             f"got {self.run.min_clients}")
        try:
            self.client_plans()  # every client's plan: list lengths, ranges, types
        except ConfigError as exc:
            raise ValueError(f"!{exc}") from None
        return self

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ExperimentConfig:
        """Build and validate from flat hyphenated keys (or section tables), as files, ``--set`` and
        Flower's run config write them; unknown keys (underscored ones included) are an error."""
        for key in values:
            if key not in KEYS and key not in SECTIONS and key not in RENAMED_KEYS:
                raise ConfigError(unknown_key(key))
        return cls(**dict(values))

    def replace(self, **overrides: Any) -> ExperimentConfig:
        """A validated copy with flat-key overrides, e.g. ``replace(**{"num-clients": 4})``."""
        return ExperimentConfig.from_mapping({**self.to_dict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The effective config as flat hyphenated keys, as written to ``config.toml``."""
        sections = {name: getattr(self, name).to_config() for name in SECTIONS}
        return {key: sections[section][hyphenate(field)] if section else getattr(self, field)
                for key, (section, field, _) in KEYS.items()}

    # -- what the rest of fedmerge reads -------------------------------------------------------------
    @property
    def num_clients(self) -> int:
        return self.data.num_clients

    @property
    def seed(self) -> int:
        return self.data.seed

    @property
    def strategies(self) -> tuple[str, ...]:
        return self.merging.strategies

    def scale_of(self, method: str) -> float | str:
        return self.merging.scale_of(method)

    def data_spec(self) -> DataSpec:
        """The data spec clients load: under ``tasks``, with the CLIP model and cache that heads need."""
        if not self.data.tasks:
            return self.data
        return self.data.replace(encoder=split_name(self.model)[1], cache_dir=str(self.cache_path()))

    def client_plans(self) -> list[TrainPlan]:
        """Each client's training plan (see :meth:`fedmerge.train.TrainingSpec.plans`)."""
        return self.train.plans(self.num_clients, self.seed)

    def byzantine_clients(self) -> list[int]:
        """Partition ids of the attackers: the first ⌈byzantine-fraction · N⌉ of a seed-drawn permutation."""
        return self.attack.clients(self.num_clients, self.seed)

    def cache_path(self) -> Path:
        return Path(self.run.cache_dir).expanduser() if self.run.cache_dir else default_cache_dir()


def largest_honest_fraction(num_clients: int) -> float:
    """The largest byzantine-fraction with six decimals that leaves one of ``num_clients`` clients
    honest: (n − 1)/n rounded down, so that the value advised is one that is accepted."""
    return (num_clients - 1) * 10**6 // num_clients / 10**6


# ------------------------------------------------------------------------------------------------
# Plugins, caches, the documentation table
# ------------------------------------------------------------------------------------------------


def config_table() -> str:
    """The README's table of config keys, from the schema: key, default, description."""
    defaults = ExperimentConfig().to_dict()
    rows = ["| key | default | what it sets |", "|---|---|---|"]
    for key, (_, _, doc) in KEYS.items():
        rows.append(f"| `{key}` | `{_inline_toml(defaults[key])}` | {doc} |")
    return "\n".join(rows) + "\n"


def _inline_toml(value: Any) -> str:
    """A value as one line of TOML (inline arrays and tables), for the README's table."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_inline_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_inline_toml(v) for v in value) + "]"
    return tomli_w.dumps({"v": value})[4:].strip()


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


def machine_resources() -> tuple[int, int]:
    """(CPUs this process may run on, CUDA GPUs it sees): all that Ray can give to clients here."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cpus, torch.cuda.device_count()


def check_resources(cpus_each: float, gpus_each: float, what: str = "client") -> None:
    """Refuse per-``what`` resources (a client's, or a sweep cell's) that a Ray started on this
    machine could never grant (it would start, then wait or fail forever): more CPUs or GPUs than
    the machine has, or a GPU share Ray cannot split. Checked where a local Ray starts, not in the
    config: a ServerApp deployed elsewhere, or a Ray cluster, has other machines' resources."""
    cpus, gpus = machine_resources()
    if cpus_each > cpus:
        raise ConfigError(f"{what}-cpus={cpus_each:g} is more than the {cpus} CPUs of this machine; "
                          f"use {what}-cpus <= {cpus}" + (' (or engine = "inprocess")' if what == "client" else ""))
    if gpus_each > gpus:
        seen, fix = ("no CUDA GPU is", f"{what}-gpus = 0") if gpus == 0 else (f"only {gpus} CUDA GPUs are",
                                                                            f"{what}-gpus <= {gpus}")
        raise ConfigError(f"{what}-gpus={gpus_each:g} but {seen} visible on this machine; use {fix}")
    if gpus_each > 1 and not float(gpus_each).is_integer():
        raise ConfigError(f"{what}-gpus={gpus_each:g}: Ray gives a {what} a share of one GPU or whole GPUs; "
                          "use a value <= 1 or an integer")


def default_cache_dir() -> Path:
    """Where bases, task vectors and heads are cached: ``$FEDMERGE_CACHE`` or ~/.cache/fedmerge."""
    return Path(os.environ.get("FEDMERGE_CACHE", Path.home() / ".cache" / "fedmerge"))


# ------------------------------------------------------------------------------------------------
# Files and overrides
# ------------------------------------------------------------------------------------------------


def find_shipped(name: str | os.PathLike, shipped: Path, what: str) -> Path:
    """The file ``name`` names: a path that exists as given, else a file shipped in ``shipped``
    (``default``, ``default.toml``). A name that is neither is one line listing the shipped ones."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    for candidate in (shipped / path.name, shipped / f"{path.name}.toml"):
        if path.parent == Path(".") and candidate.is_file():
            return candidate
    names = ", ".join(sorted(p.stem for p in shipped.glob("*.toml")))
    raise ConfigError(f"{name}: no such {what} file; shipped {what}s: {names} (or give a path)")


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
        parsed = tomllib.loads(f"v = {raw.strip()}")
    except tomllib.TOMLDecodeError:
        return key, raw.strip()
    if set(parsed) != {"v"}:  # e.g. "lr=0.5\nseed=3": the rest would be dropped without a word
        raise ConfigError(f"--set takes one key=value at a time, got {text!r}")
    return key, parsed["v"]


def load_config(preset: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                plugins: Sequence[str | os.PathLike] = ()) -> ExperimentConfig:
    """Defaults ← preset (a path, or a shipped preset's name; the default when None) ← ``--set``
    overrides, validated once.

    A preset's ``plugins`` are paths relative to the preset file; ``plugins`` given here (``--plugin``)
    are added to them."""
    path = DEFAULT_PRESET if preset is None else find_shipped(preset, PRESETS_DIR, "preset")
    values = read_toml(path)
    values["plugins"] = plugin_files(values.get("plugins", []), path.parent)
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    values["plugins"] = [*plugin_files(values["plugins"], "."), *map(str, plugins)]
    return ExperimentConfig.from_mapping(values)


def plugin_files(value: Any, relative_to: str | os.PathLike) -> list[str]:
    """The ``plugins`` of a file (a list, or one comma-separated string), as paths relative to the
    directory of the file that names them."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"plugins must be a list of Python files, got {value!r}")
    return [str(Path(relative_to) / Path(v).expanduser()) for v in value]


def write_toml(config: ExperimentConfig, path: str | os.PathLike) -> None:
    values = config.to_dict()
    if not values["method-options"]:
        del values["method-options"]
    Path(path).write_text(tomli_w.dumps(values))
