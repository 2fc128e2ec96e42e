"""Merge recipes: one ``fedmerge merge`` (or several rules over the same models) written down in a
TOML file, as mergekit users keep theirs.

.. code-block:: toml

    base = "meta-llama/Llama-2-13b-hf"          # a Hub id in the cache, a directory or a file
    models = ["WizardLMTeam/WizardLM-13B-V1.2", "./my-finetune"]
    methods = ["task_arithmetic", "ties"]       # or: method = "ties"
    out = "merged"                              # several methods: merged/<method>/
    scale = {task_arithmetic = 0.3, ties = 1.0} # or one number for all
    dtype = "bfloat16"                          # model directories: the output's dtype
    max-shard-size = "5GB"
    embeddings = "base"                         # vocabularies that differ: merge the shared rows
    merge-device = "auto"
    [options.ties]
    k = 0.2

Relative paths are read from the current directory, as on the command line; a name that is no
path there and looks like ``org/name`` is a Hub id. Every key is checked when the recipe is loaded,
before any model is read: one line naming it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, field_validator, model_validator

from fedmerge.errors import ConfigError, MergeError
from fedmerge.merging import METHODS
from fedmerge.merging.registry import DeviceName
from fedmerge.offline import EMBEDDING_POLICIES, OUTPUT_DTYPES, merge_checkpoints
from fedmerge.spec import Factor, Names, Spec, Str, one_of


def _listed(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class MergeRecipe(Spec):
    """The models, rules and output of a merge; see the module's documentation for the keys."""

    base: Str
    models: Annotated[tuple[Str, ...], BeforeValidator(_listed), Field(min_length=1)]
    methods: Names
    out: Str
    scale: Factor | dict[str, Factor] = 1.0
    weights: tuple[Factor, ...] | None = None
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    dtype: Annotated[Str, one_of(tuple(OUTPUT_DTYPES))] | None = None
    max_shard_size: Str | int = "5GB"
    embeddings: Annotated[Str, one_of(EMBEDDING_POLICIES)] = "error"
    merge_device: DeviceName = "auto"

    @model_validator(mode="before")
    @classmethod
    def _one_method(cls, values: Any) -> Any:
        if isinstance(values, Mapping) and "method" in values:
            if "methods" in values:
                raise ValueError("!give method or methods, not both")
            values = {**values, "methods": [values["method"]]}
            del values["method"]
        return values

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("!methods must name at least one rule")
        for name in value:
            if name not in METHODS:
                raise ValueError(f"!methods: {name!r} is not a merging rule; choose from {', '.join(METHODS.names())}")
        if len(set(value)) != len(value):
            raise ValueError(f"!methods lists a rule twice: {list(value)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MergeRecipe:
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ValueError(f"!weights has {len(self.weights)} entries for {len(self.models)} models")
        for table, what in ((self.options, "options"), (self.scale if isinstance(self.scale, dict) else {}, "scale")):
            stray = sorted(set(table) - set(self.methods))
            if stray:
                raise ValueError(f"!{what}.{stray[0]} is for a rule the recipe does not use "
                                 f"({', '.join(self.methods)})")
        if isinstance(self.scale, dict):
            missing = [m for m in self.methods if m not in self.scale]
            if missing:
                raise ValueError(f"!scale has no value for {missing[0]}; give one number or one per rule")
        for method in self.methods:  # a recipe gives per-client options (FedNova's local_steps) too
            try:
                METHODS[method].check_options(self.options.get(method, {}), len(self.models))
            except MergeError as exc:
                raise ValueError(f"!options.{exc}") from None
        return self

    @classmethod
    def load(cls, path: str | os.PathLike) -> MergeRecipe:
        """The recipe in the TOML file ``path``."""
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def outputs(self) -> dict[str, Path]:
        """Where each rule's model goes: ``out`` for one rule, ``out/<rule>`` for several."""
        out = Path(self.out)
        return {self.methods[0]: out} if len(self.methods) == 1 else {m: out / m for m in self.methods}

    def scale_of(self, method: str) -> float:
        return self.scale[method] if isinstance(self.scale, dict) else self.scale

    def run(self, overwrite: bool = False, on_read: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        """Merge with every rule in turn; the summaries of :func:`merge_checkpoints`."""
        # Set in the recipe: for a checkpoint file, merge_checkpoints says they apply to directories only.
        model_options: dict[str, Any] = {k: getattr(self, k) for k in ("dtype", "max_shard_size", "embeddings")
                         if k in self.model_fields_set}
        return [merge_checkpoints(self.base, list(self.models), method, out, scale=self.scale_of(method),
                                  options=self.options.get(method, {}), weights=self.weights, overwrite=overwrite,
                                  on_read=on_read, device=self.merge_device, model_options=model_options)
                for method, out in self.outputs().items()]
