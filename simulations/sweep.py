"""Sweeps: a grid of config values × seeds, each cell one experiment, one tidy CSV and plots.

A spec (TOML)::

    name = "data-heterogeneity"
    preset = "default"              # a shipped preset name, or a path relative to the spec
    seeds = [0, 1, 2]
    [set]                           # overrides for every cell
    local-steps = 50
    [grid]                          # every combination of these values is a cell
    alpha = [0.05, 0.5, 5.0, 100.0]

Cells run on the in-process engine unless the spec sets ``engine`` (no Ray start-up per cell) and
cache client task vectors on disk, so adding a strategy or re-plotting never retrains. Each cell's
results directory is written atomically; an interrupted sweep resumes where it stopped, because a
cell whose directory exists is read back instead of run again. A cell whose results cannot be read
back whole (damaged, edited, half-deleted) is named and run again.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, FiniteFloat, Strict, ValidationError
from rich.console import Console
from rich.table import Table

from fedmerge.errors import ConfigError
from fedmerge.io import atomic_path, check_output, write_text_atomic, writing
from simulations.config import PRESETS_DIR, ExperimentConfig, check_run_name, find_shipped, plugin_files, read_toml
from simulations.experiment import run_experiment
from simulations.plots import plot_sweep
from simulations.progress import labelled, progress_bar
from simulations.results import describe_setup

SWEEPS_DIR = Path(__file__).parent / "sweeps"
SPEC_KEYS = {"name", "preset", "seeds", "set", "grid", "plugins"}
# Per cell × strategy: the knobs, then these columns.
CSV_COLUMNS = [
    "seed", "strategy", "scale", "accuracy", "client_accuracy", "normalized_accuracy",
    "base_accuracy", "clients_own_accuracy", "label_skew", "mean_cosine", "norm_cv", "interference_total",
    "mean_local_steps", "num_failed", "cell",
]


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: dict[str, Any]  # preset values with the spec's [set] overrides
    grid: dict[str, list[Any]]
    seeds: list[int] = field(default_factory=lambda: [0])

    @classmethod
    def load(cls, path: str | os.PathLike, plugins: Sequence[str | os.PathLike] = ()) -> SweepSpec:
        """Read a spec; ``plugins`` (files, e.g. from ``--plugin``) are added to the preset's and the spec's."""
        path = find_shipped(path, SWEEPS_DIR, "sweep spec")
        raw = read_toml(path)
        unknown = sorted(set(raw) - SPEC_KEYS)
        if unknown:
            raise ConfigError(f"{path}: unknown sweep key {unknown[0]!r}; known: {', '.join(sorted(SPEC_KEYS))}")
        preset = str(raw.get("preset", "default"))
        local = path.parent / preset  # a path relative to the spec, else a shipped preset's name
        preset_path = local if local.is_file() else find_shipped(preset, PRESETS_DIR, "preset")
        preset_values = read_toml(preset_path)
        overrides = dict(raw.get("set", {}))
        files = [*plugin_files(preset_values.pop("plugins", []), preset_path.parent),
                 *plugin_files(raw.get("plugins", []), path.parent),
                 *plugin_files(overrides.pop("plugins", []), path.parent), *map(str, plugins)]
        base = {**preset_values, "engine": "inprocess", "cache-task-vectors": True, **overrides,
                "plugins": files}
        grid = raw.get("grid", {})
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{path}: [grid] must list at least one config key with a list of values")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: grid.{key} must be a non-empty list of values")
        seeds = raw.get("seeds", [base.get("seed", 0)])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ConfigError(f"{path}: seeds must be a non-empty list of integers")
        name = str(raw.get("name", path.stem))
        try:
            check_run_name(name)
        except ValueError as exc:
            raise ConfigError(f"{path}: name {exc}, got {name!r}") from None
        spec = cls(name, base, dict(grid), list(seeds))
        for cell in spec.cells():  # validate every cell before running any
            _ = cell.config
        return spec

    def cells(self) -> Iterator[Cell]:
        keys = list(self.grid)
        for values in itertools.product(*(self.grid[k] for k in keys)):
            for seed in self.seeds:
                yield Cell(dict(zip(keys, values)), seed, self.base)


@dataclass(frozen=True)
class Cell:
    knobs: dict[str, Any]
    seed: int
    base: dict[str, Any]

    @property
    def config(self) -> ExperimentConfig:
        try:
            return ExperimentConfig.from_mapping({**self.base, **self.knobs, "seed": self.seed})
        except ConfigError as exc:
            raise ConfigError(f"sweep cell {self.knobs} seed {self.seed}: {exc}") from None

    @property
    def id(self) -> str:
        """Readable knob values, the seed, and a digest of the whole effective config."""
        config = self.config.to_dict()
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        knobs = "-".join(f"{k}={v}" for k, v in self.knobs.items())
        return re.sub(r"[^A-Za-z0-9=._-]+", "_", f"{knobs}-seed{self.seed}-{digest}")


def run_sweep(spec: SweepSpec, out: Path, console: Console | None = None, progress: bool = True) -> Path:
    """Run (or resume) every cell, then write ``results.csv`` and the plots into ``out``."""
    cells = list(spec.cells())
    check_output(out, directory=True, resume=True, option="sweep directory")  # before any cell runs
    with writing(out):
        (out / "cells").mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "sweep.json", json.dumps({"name": spec.name, "grid": spec.grid, "seeds": spec.seeds,
                                                          "set": spec.base}, indent=2) + "\n")
    rows: list[dict[str, Any]] = []
    with progress_bar(console, enabled=progress) as bar:
        task = bar.add_task(f"sweep {spec.name}", total=len(cells))
        for cell in cells:
            cell_dir = out / "cells" / cell.id
            results = None
            if cell_dir.exists():  # done before: resume
                try:
                    results = read_cell_results(cell, cell_dir)
                except ValueError as exc:
                    bar.console.print(labelled("running again:", "yellow", f"cell {cell.id}: {exc}"))
                    shutil.rmtree(cell_dir)
            if results is None:
                bar.update(task, description=f"sweep {spec.name}: {cell.knobs} seed {cell.seed}")
                results = run_experiment(cell.config, cell_dir, progress=False).results
            rows.extend(tidy_rows(cell, results))
            bar.advance(task)
    with writing(out):
        write_csv(rows, list(spec.grid), out / "results.csv")
        plot_sweep(rows, list(spec.grid), out, title=sweep_title(spec))
    return out


Number = Annotated[FiniteFloat, Strict()]  # a JSON number (never text, a boolean or NaN)


class _Client(BaseModel):
    accuracy: Number
    local_steps: Annotated[int, Strict()]


class _Base(BaseModel):
    accuracy: Number


class _Strategy(BaseModel):
    scale: Number
    accuracy: Number
    client_accuracy: Number | None
    normalized_accuracy: Number | None  # null where the clients' own accuracy is zero


class _DataMeasures(BaseModel):
    label_skew: Number | None = None


class _TaskVectorMeasures(BaseModel):
    mean_cosine: Number | None = None
    norm_cv: Number | None = None
    interference_total: Number | None = None


class _Measures(BaseModel):
    data: _DataMeasures = _DataMeasures()
    task_vectors: _TaskVectorMeasures = _TaskVectorMeasures()


class _CellResults(BaseModel):
    """The parts of a cell's results.json that its CSV rows are made of."""

    base: _Base
    clients: Annotated[list[_Client], Field(min_length=1)]
    failures: list[Any]
    strategies: dict[str, _Strategy]
    method_failures: dict[str, str] = {}
    measures: _Measures = _Measures()


def read_cell_results(cell: Cell, cell_dir: Path) -> dict[str, Any]:
    """The results a finished cell left in ``cell_dir``, or a ValueError saying why they cannot be
    used: no results.json, not JSON, a missing or mistyped entry, a strategy of the cell missing."""
    try:
        results = json.loads((cell_dir / "results.json").read_bytes())
    except FileNotFoundError:
        raise ValueError("its directory holds no results.json") from None
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"results.json is not readable JSON ({exc})") from None
    try:
        parsed = _CellResults.model_validate(results)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "the top level"
        raise ValueError(f"results.json: {where}: {first['msg']}") from None
    if missing := [m for m in cell.config.strategies if m not in parsed.strategies and m not in parsed.method_failures]:
        raise ValueError(f"results.json has no result for {', '.join(missing)}")
    return results


def tidy_rows(cell: Cell, results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per strategy of one cell, with the cell's knobs and heterogeneity measures."""
    clients = results["clients"]
    measures = results.get("measures", {})
    tv = measures.get("task_vectors", {})
    common = {
        **cell.knobs, "seed": cell.seed, "cell": cell.id,
        "base_accuracy": results["base"]["accuracy"],
        "clients_own_accuracy": sum(c["accuracy"] for c in clients) / len(clients),
        "label_skew": measures.get("data", {}).get("label_skew"),
        "mean_cosine": tv.get("mean_cosine"), "norm_cv": tv.get("norm_cv"),
        "interference_total": tv.get("interference_total"),
        "mean_local_steps": sum(c["local_steps"] for c in clients) / len(clients),
        "num_failed": len(results["failures"]),
    }
    return [{**common, "strategy": name, "scale": s["scale"], "accuracy": s["accuracy"],
             "client_accuracy": s["client_accuracy"], "normalized_accuracy": s["normalized_accuracy"]}
            for name, s in results["strategies"].items()]


def write_csv(rows: Sequence[dict[str, Any]], knobs: Sequence[str], path: Path) -> None:
    """The tidy CSV, written atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*knobs, *CSV_COLUMNS])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def sweep_title(spec: SweepSpec) -> str:
    """The sweep's name and the settings its cells share (the first cell's, less the swept knobs)."""
    first = next(spec.cells()).config.to_dict()
    seeds = f"{len(spec.seeds)} seeds" if len(spec.seeds) > 1 else f"seed {spec.seeds[0]}"
    return f"{spec.name}: {describe_setup(first, skip={*spec.grid, 'seed'})} · {seeds}"


def print_sweep_summary(csv_path: Path, knobs: Sequence[str], console: Console, title: str = "") -> None:
    """The sweep's table: mean normalized accuracy (%) over seeds per strategy (rows) and per value of
    the swept knobs (columns), read back from ``results.csv``."""
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))

    def column_of(r: dict[str, str]) -> str:  # one knob: its value; several: key=value, ...
        return r[knobs[0]] if len(knobs) == 1 else ", ".join(f"{k}={r[k]}" for k in knobs)

    columns = list(dict.fromkeys(column_of(r) for r in rows))
    cells: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["normalized_accuracy"] not in ("", None):
            cells.setdefault((r["strategy"], column_of(r)), []).append(float(r["normalized_accuracy"]))
    console.print(f"sweep {title}: mean normalized accuracy % over seeds" if title
                  else "sweep: mean normalized accuracy % over seeds", soft_wrap=True)
    table = Table()
    table.add_column(f"strategy \\ {knobs[0]}" if len(knobs) == 1 else "strategy", no_wrap=True)
    for column in columns:
        table.add_column(column, justify="right")
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        values = [cells.get((strategy, c)) for c in columns]
        table.add_row(strategy, *("—" if not v else f"{100 * sum(v) / len(v):.1f}" for v in values))
    console.print(table)
