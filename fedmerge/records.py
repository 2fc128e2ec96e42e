"""Flat, hyphenated key/value forms of fedmerge's settings dataclasses.

Flower configs, TOML presets and results use Flower's hyphenated style (``local-steps``); Python
fields use underscores. These two functions are the one place that maps between them, so a
message config, a preset and ``results.json`` always name a setting the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def to_config(obj: Any) -> dict[str, Any]:
    """``{"local-steps": 10, ...}`` for a dataclass instance (tuples become lists, as configs want)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name.replace("_", "-")] = list(value) if isinstance(value, tuple) else value
    return out


def from_config(cls: type[T], config: Mapping[str, Any]) -> T:
    """Build ``cls`` from the hyphenated keys it knows in ``config``; other keys are ignored."""
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f.name.replace("_", "-")
        if key in config:
            kwargs[f.name] = config[key]
    return cls(**kwargs)
