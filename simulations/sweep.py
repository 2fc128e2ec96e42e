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

import contextlib
import csv
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, FiniteFloat, Strict, ValidationError
from rich.console import Console
from rich.table import Table
import torch

from fedmerge.errors import ConfigError, FederationError
from fedmerge.io import atomic_path, check_output, write_text_atomic, writing
from fedmerge.spec import TaskCPUs, TaskGPUs, conform
from simulations.config import (
    PRESETS_DIR, ExperimentConfig, check_resources, check_run_name, find_shipped, load_plugins, machine_resources,
    plugin_files, read_toml,
)
from simulations.cluster import joins_a_cluster, set_offline_env, start_ray
from simulations.experiment import run_experiment
from simulations.isolation import Post, run_isolated
from simulations.plots import plot_sweep
from simulations.progress import labelled, progress_bar
from simulations.results import ServerOutput, describe_setup, write_results

SWEEPS_DIR = Path(__file__).parent / "sweeps"
SPEC_KEYS = {"name", "preset", "seeds", "set", "grid", "plugins", "cell-cpus", "cell-gpus"}
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
    cell_cpus: float = 1.0  # Ray resources of one cell in a parallel sweep
    cell_gpus: float = 0.0

    @classmethod
    def over_seeds(cls, config: ExperimentConfig, seeds: Sequence[int]) -> SweepSpec:
        """``config`` run once per seed: a sweep of one cell per seed, with no grid, on the in-process
        engine (as every sweep's cells: no Ray start-up per seed)."""
        if not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds must list distinct seeds, got {list(seeds)}")
        spec = cls(config.name, {**config.to_dict(), "engine": "inprocess"}, {}, list(seeds))
        for cell in spec.cells():  # every seed's config is checked before any runs
            _ = cell.config
        return spec

    def with_resources(self, cell_cpus: float | None = None, cell_gpus: float | None = None) -> SweepSpec:
        """This spec with the given per-cell resources (None keeps the spec's), checked."""
        cpus = self.cell_cpus if cell_cpus is None else cell_cpus
        gpus = self.cell_gpus if cell_gpus is None else cell_gpus
        _check_resources(cpus, gpus, "cell-cpus", "cell-gpus")
        return replace(self, cell_cpus=float(cpus), cell_gpus=float(gpus))

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
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise ConfigError(f"{path}: grid.{key} lists a value twice: {values}")
        seeds = raw.get("seeds", [base.get("seed", 0)])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ConfigError(f"{path}: seeds must be a non-empty list of integers")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{path}: seeds lists a seed twice: {seeds}")
        name = str(raw.get("name", path.stem))
        try:
            check_run_name(name)
        except ValueError as exc:
            raise ConfigError(f"{path}: name {exc}, got {name!r}") from None
        resources = {key: raw.get(key, default) for key, default in (("cell-cpus", 1.0), ("cell-gpus", 0.0))}
        for key, value in resources.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{path}: {key} must be a number, got {value!r}")
        _check_resources(resources["cell-cpus"], resources["cell-gpus"], f"{path}: cell-cpus", f"{path}: cell-gpus")
        spec = cls(name, base, dict(grid), list(seeds), float(resources["cell-cpus"]), float(resources["cell-gpus"]))
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

    @functools.cached_property
    def config(self) -> ExperimentConfig:
        """The cell's validated config, built once (a sweep reads it, and its id, many times per cell)."""
        try:
            return ExperimentConfig.from_mapping({**self.base, **self.knobs, "seed": self.seed})
        except ConfigError as exc:
            raise ConfigError(f"sweep cell {self.knobs} seed {self.seed}: {exc}") from None

    @functools.cached_property
    def id(self) -> str:
        """Readable knob values, the seed, and a digest of the whole effective config."""
        config = self.config.to_dict()
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        knobs = "-".join(f"{k}={v}" for k, v in self.knobs.items())
        return re.sub(r"[^A-Za-z0-9=._-]+", "_", "-".join(filter(None, [knobs, f"seed{self.seed}", digest])))


def _check_resources(cpus: float, gpus: float, cpus_key: str, gpus_key: str) -> None:
    for kind, value, key in ((TaskCPUs, cpus, cpus_key), (TaskGPUs, gpus, gpus_key)):
        try:
            conform(kind, value)
        except ValueError as exc:
            raise ConfigError(f"{key} {exc}, got {value:g}") from None


def cell_threads(cell_cpus: float) -> int:
    """torch threads of a cell with ``cell_cpus`` CPUs: the whole CPUs it has, at least one."""
    return max(1, int(cell_cpus))


def default_workers(cell_cpus: float) -> int:
    """As many cells as this machine's usable cores hold at ``cell_cpus`` each, at least one and at
    most one per core (each worker is a process with torch loaded)."""
    cores = machine_resources()[0]
    return max(1, min(cores, int(cores // cell_cpus)))


def run_sweep(spec: SweepSpec, out: Path, console: Console | None = None, progress: bool = True, *,
              workers: int | None = 1) -> Path:
    """Run (or resume) every cell, then write ``results.csv`` and the plots into ``out``.

    ``workers`` cells run at a time (None: as many as the Ray cluster at ``RAY_ADDRESS``, or this
    machine, has CPUs for): one runs them here, one after another; more run them as Ray
    tasks in a child process (:func:`_run_cells_on_ray`), each task on the in-process engine with
    the spec's ``cell_cpus`` CPUs and ``cell_gpus`` GPUs. Either way a cell uses as many torch threads as it has
    whole CPUs (:func:`attempt_cell`). Either way a cell's directory is written whole or not
    at all, rows are read back in cell order (the order cells finish in changes nothing), and a cell
    that raises is tried once more (not for a ConfigError), then recorded in ``failures.json`` with
    its error and what it logged; the others go on. Failed
    cells are a :class:`FederationError` at the end, after the CSV and plots of the rest."""
    cells = list(spec.cells())
    cell_cpus, cell_gpus = spec.cell_cpus, spec.cell_gpus
    check_output(out, directory=True, resume=True, option="sweep directory")  # before any cell runs
    with writing(out):
        (out / "cells").mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "sweep.json", json.dumps({"name": spec.name, "grid": spec.grid, "seeds": spec.seeds,
                                                          "set": spec.base}, indent=2) + "\n")
    failed: dict[str, dict[str, Any]] = {}  # cell id: its last error and what it logged
    with progress_bar(console, enabled=progress) as bar:
        task = bar.add_task(f"sweep {spec.name}", total=len(cells))
        done_before = {cell.id: results for cell in cells if (results := _finished(cell, out, bar.console))}
        pending = [cell for cell in cells if cell.id not in done_before]
        bar.advance(task, len(cells) - len(pending))

        running: set[str] = set()

        def show(current: str = "") -> None:  # "sweep NAME[: the cell running here], 2 running, 1 failed"
            counts = [f"{len(running)} running"] if running else []
            counts += [f"{len(failed)} failed"] if failed else []
            bar.update(task, description=", ".join([f"sweep {spec.name}" + (f": {current}" if current else ""),
                                                    *counts]))

        def started(cell_id: str) -> None:
            running.add(cell_id)
            show()

        def finished(cell_id: str, error: str | None, log: list[str]) -> None:
            running.discard(cell_id)
            if error is not None:
                failed[cell_id] = {"error": error, "log": log}
                bar.console.print(labelled("cell failed:", "red", f"{cell_id}: {error}"))
            bar.advance(task)
            show()

        def on_event(kind: str, payload: tuple) -> None:
            (started if kind == "cell-started" else finished)(*payload)

        if workers is None and not joins_a_cluster():
            workers = default_workers(cell_cpus)
        if (workers is not None and workers <= 1) or len(pending) <= 1:
            for cell in pending:
                show(f"{cell.knobs} seed {cell.seed}")
                attempt = _run_cell(cell, out, cell_threads(cell_cpus))
                finished(cell.id, attempt.error, attempt.log)
        else:
            set_offline_env()  # before the child starts: a local Ray stays on loopback, offline
            if not joins_a_cluster():
                check_resources(cell_cpus, cell_gpus, "cell")  # else tasks would wait forever
            gpus = machine_resources()[1] if cell_gpus else 0
            cpus = 0 if workers is None else math.ceil(workers * cell_cpus)  # joining a cluster: its own
            run_isolated(_run_cells_on_ray, (pending, out, workers, cell_cpus, cell_gpus), on_event,
                         start=functools.partial(start_ray, cpus, gpus))
    rows = [row for cell in cells if cell.id not in failed
            for row in tidy_rows(cell, done_before.get(cell.id) or read_cell_results(cell, out / "cells" / cell.id))]
    with writing(out):
        if failed:
            write_text_atomic(out / "failures.json", json.dumps(failed, indent=2) + "\n")
        else:
            (out / "failures.json").unlink(missing_ok=True)
        write_csv(rows, list(spec.grid), out / "results.csv")
        if rows:  # every cell failed: a CSV of its header, and nothing to plot
            plot_sweep(rows, list(spec.grid), out, title=sweep_title(spec))
    if failed:
        raise FederationError(f"{len(failed)} of {len(cells)} cells failed twice (their errors: "
                              f"{out / 'failures.json'}); the rest are in {out / 'results.csv'}; re-run to retry")
    return out


def _finished(cell: Cell, out: Path, console: Console) -> dict[str, Any] | None:
    """The results ``cell`` left when it ran before, if they can be read back whole, else None; a
    directory with damaged results is named and removed, so that the cell runs again."""
    cell_dir = out / "cells" / cell.id
    for staging in (out / "cells").glob(f".{cell.id}.*"):  # left by an interrupted write
        shutil.rmtree(staging, ignore_errors=True)
    if not cell_dir.exists():
        return None
    if not cell_dir.is_dir():
        console.print(labelled("running again:", "yellow", f"cell {cell.id}: not a directory"))
        cell_dir.unlink()
        return None
    try:
        return read_cell_results(cell, cell_dir)
    except ValueError as exc:
        console.print(labelled("running again:", "yellow", f"cell {cell.id}: {exc}"))
        shutil.rmtree(cell_dir)
        return None


CELL_LOG = "log.txt"  # in each cell's directory: the warnings of its run (clients left out, caches)


@contextlib.contextmanager
def kept_logs() -> Iterator[list[str]]:
    """The warnings logged in the block, kept for a cell's ``log.txt`` instead of printed between the
    sweep's progress lines."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    keep = Keep(logging.WARNING)
    keep.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root, flower = logging.getLogger(), logging.getLogger("flwr")  # Flower's has a console handler of its own
    saved = [(logger, logger.handlers[:]) for logger in (root, flower)]
    root.handlers = [keep]
    flower.handlers = [] if flower.propagate else [keep]
    try:
        yield lines
    finally:
        for logger, handlers in saved:
            logger.handlers = handlers


def _write_cell_log(cell_dir: Path, lines: list[str]) -> None:
    write_text_atomic(cell_dir / CELL_LOG, "".join(f"{line}\n" for line in lines))


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch on ``threads`` threads in the block (the process-wide setting, restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Attempt:
    """One try at a cell: its output or the error it raised, and the warnings it logged either way."""

    output: ServerOutput | None
    log: list[str]
    error: str | None = None
    worth_retrying: bool = False  # not a ConfigError: the same input fails the same way


def attempt_cell(run: Callable[[], ServerOutput], threads: int) -> Attempt:
    """``run()`` (one cell) on ``threads`` torch threads (its ``cell-cpus``) with its warnings kept
    for its log: the one way both paths run a cell, so that their floating-point sums, and so the
    CSV, agree to the last digit whichever path ran it."""
    with torch_threads(threads), kept_logs() as lines:
        try:
            return Attempt(run(), lines)
        except ConfigError as exc:
            return Attempt(None, lines, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # any failure of one cell is recorded; the sweep goes on
            return Attempt(None, lines, f"{type(exc).__name__}: {exc}", worth_retrying=True)


def _run_cell(cell: Cell, out: Path, threads: int) -> Attempt:
    """Run ``cell`` into its directory here, trying once more if it raises something worth retrying."""
    cell_dir = out / "cells" / cell.id
    for _ in range(2):
        attempt = attempt_cell(lambda: run_experiment(cell.config, cell_dir, progress=False), threads)
        if attempt.error is None:
            _write_cell_log(cell_dir, attempt.log)
        if not attempt.worth_retrying:
            break
    return attempt


def cell_output(config: ExperimentConfig, threads: int) -> Attempt:
    """A cell's run where a Ray worker runs it (on the in-process engine), and where it ran: its
    plugins first (a worker process has not read the config that loads them)."""
    import ray

    def run() -> ServerOutput:
        load_plugins(config.run.plugins)
        output = run_experiment(config.replace(engine="inprocess"), None, progress=False)
        output.results["node"] = {"host": platform.node(), "ray_node_id": ray.get_runtime_context().get_node_id()}
        return output

    return attempt_cell(run, threads)


def _run_cells_on_ray(post: Post, deliver: Callable[[Any], None], cells: list[Cell], out: Path,
                      workers: int | None, cell_cpus: float, cell_gpus: float) -> None:
    """The parallel sweep's process: on the Ray it started (:func:`start_ray`: ``workers`` ×
    ``cell_cpus`` CPUs on this machine, or the cluster at ``RAY_ADDRESS``), runs :func:`cell_output`
    per cell, at most ``workers`` at once (None: as many as the cluster's CPUs hold); this process
    alone writes each cell's directory as its result arrives. It posts ``("cell-started", (id,))``
    and ``("cell-done", (id, error or None, log))``. A cell whose run raised is
    submitted once more (unless the error was a ConfigError); Ray itself retries a task once whose
    worker died.

    Ray's worker processes stay up from cell to cell, so imports, data and the cached base are paid
    once per worker. Cells that share clients (a grid over rules or λ only) or a base need the same
    cache entries at once: on one machine the first computes each entry under its lock while the
    others wait and read it (:func:`fedmerge.io.state.read_or_compute`); on a cluster each node
    keeps its own cache."""
    import ray

    remote = ray.remote(num_cpus=cell_cpus, num_gpus=cell_gpus, max_retries=1)(cell_output)
    threads = cell_threads(cell_cpus)
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1) // cell_cpus))
    waiting: list[Cell] = list(cells)
    running: dict[Any, Cell] = {}
    tries: dict[str, int] = {}

    def fill() -> None:  # at most ``workers`` cells at once, on a cluster too
        while waiting and len(running) < workers:
            cell = waiting.pop(0)
            tries[cell.id] = tries.get(cell.id, 0) + 1
            running[remote.remote(cell.config, threads)] = cell
            post("cell-started", cell.id)

    while waiting or running:
        fill()
        (ref,), _ = ray.wait(list(running), num_returns=1)
        cell = running.pop(ref)
        try:
            attempt: Attempt = ray.get(ref)
        except Exception as exc:  # the worker died, twice
            cause = getattr(exc, "cause", None) or exc
            attempt = Attempt(None, [], f"{type(cause).__name__}: {cause}")
        if attempt.error is not None and attempt.worth_retrying and tries[cell.id] < 2:
            waiting.insert(0, cell)
            continue
        fill()  # the next cell starts before this one is written
        if attempt.output is not None:
            try:
                write_results(attempt.output, cell.config.replace(engine="inprocess"), out / "cells" / cell.id)
                _write_cell_log(out / "cells" / cell.id, attempt.log)
            except Exception as exc:  # a failed write fails this cell only
                attempt.error = f"{type(exc).__name__}: {exc}"
        post("cell-done", cell.id, attempt.error, attempt.log)
    deliver(None)


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


def print_seed_summary(csv_path: Path, console: Console, title: str = "") -> None:
    """Per strategy, test and normalized accuracy over the seeds of ``results.csv``: mean ± standard
    deviation (n − 1 in the denominator) and the range."""
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    seeds = sorted({int(r["seed"]) for r in rows})
    table = Table(title=f"{title}: {len(seeds)} seeds ({', '.join(map(str, seeds))})" if title else None)
    table.add_column("strategy", no_wrap=True)
    for column in ("test acc % (mean ± sd)", "normalized % (mean ± sd)"):
        table.add_column(column, justify="right")
        table.add_column("range", justify="right")

    def spread(values: list[float]) -> list[str]:
        if not values:
            return ["—", "—"]
        mean = sum(values) / len(values)
        if len(values) == 1:
            return [f"{100 * mean:.2f}", "—"]
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        return [f"{100 * mean:.2f} ± {100 * sd:.2f}", f"{100 * min(values):.2f}–{100 * max(values):.2f}"]

    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == strategy]
        cells = [spread([float(r[key]) for r in mine if r[key] not in ("", None)])
                 for key in ("accuracy", "normalized_accuracy")]
        table.add_row(strategy, *cells[0], *cells[1])
    console.print(table)


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
