"""Writing and showing results: results.json, results.csv, config.toml, tensors and the table.

A results directory holds ``results.json``, ``results.csv`` (one row per strategy plus the base and
the clients' own models), ``config.toml`` (the effective config: ``fedmerge run config.toml``
repeats the run), ``base.safetensors`` (θ0) and ``merged/<method>.safetensors`` (each merged task
vector before λ, so θ = θ0 + λ·τ can be rebuilt or re-scaled offline).

``results.json`` holds: ``config`` (effective), ``base`` {accuracy, client_accuracy,
normalized_accuracy}, ``clients`` (one entry per accepted client: plan, num_examples, train_loss,
accuracy of its own model on its local test split, global_accuracy, task_vector_norm,
train_seconds as the client measured it), ``failures``,
``strategies.<name>`` {scale, accuracy, client_accuracy, normalized_accuracy, client_accuracies,
merge_seconds} and ``timing`` (seconds per stage). Accuracies are fractions in [0, 1].

Normalized accuracy (:func:`fedmerge.evaluation.normalized_accuracy`) is the mean over clients of
acc(model, client i's test split) / acc(client i's own model, same split), over the clients whose own
model scores above chance (1 / number of classes): below chance the ratio says nothing but that the
denominator is tiny. Where no client qualifies it is missing: ``null`` in results.json, empty in
results.csv and "—" in the table, never a percentage in the thousands. The clients' own-models row is
1 by definition, and missing exactly when every other normalized accuracy is.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import itertools
import json
import math
from collections.abc import Collection, Iterator
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import Tensor

from fedmerge.io import check_output, save_state, staged_directory
from simulations.config import ExperimentConfig, write_toml
from simulations.progress import labelled



@dataclass
class ServerOutput:
    """What one run leaves behind: the results dict and the tensors behind it."""

    results: dict[str, Any]
    base: dict[str, Tensor]
    merged: dict[str, dict[str, Tensor]]  # method -> merged task vector (before λ)
    task_vectors: dict[int, dict[str, Tensor]]  # partition-id -> τ_i of every accepted client

CSV_COLUMNS = ("row", "scale", "accuracy", "client_accuracy", "normalized_accuracy")


RUNS_DIR = Path("runs")


def check_out_dir(out: Path) -> None:
    """Refuse, before any work, a results directory that cannot be written or already holds something."""
    check_output(out, directory=True)


@contextlib.contextmanager
def results_directory(out: Path | None, name: str) -> Iterator[Path]:
    """The run's results directory: ``out``, checked before any work, or a new ``runs/NAME-TIME``
    reserved for this run at once (``-2``, ``-3``, ... after it when another run took that name in
    the same second), so that runs started together never pick the same one. A reserved directory
    still empty when the block fails (no results were written) is removed."""
    if out is not None:
        check_out_dir(out)
        yield out
        return
    stamp = f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    check_output(RUNS_DIR, directory=True, resume=True, option="results directory")
    reserved = None
    for attempt in itertools.count(1):
        candidate = RUNS_DIR / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        reserved = candidate
        break
    assert reserved is not None
    try:
        yield reserved
    except BaseException:
        with contextlib.suppress(OSError):
            reserved.rmdir()  # only if empty: complete results are never removed
        raise


def own_models_row(results: dict[str, Any]) -> str:
    """The name of the clients' own-models row: it covers honest clients only when some attacked."""
    clients = results["clients"]
    honest = [c for c in clients if not c.get("byzantine")]
    if len(honest) == len(clients):
        return "clients' own models (mean)"
    return f"clients' own models (mean of {len(honest)} honest)"


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Reference rows (base, mean of the honest clients' own models) then one row per strategy.

    An attacker's own model is θ0 plus its attacked task vector: it is left out of the clients' row."""
    clients = [c for c in results["clients"] if not c.get("byzantine")] or results["clients"]
    mean = lambda key: sum(c[key] for c in clients) / len(clients)
    defined = _number(results["base"]["normalized_accuracy"]) is not None  # some client beat chance
    rows = [
        {"row": "base (pre-trained)", "scale": None, **{k: results["base"][k] for k in CSV_COLUMNS[2:]}},
        {"row": own_models_row(results), "scale": None, "accuracy": mean("global_accuracy"),
         "client_accuracy": mean("accuracy"), "normalized_accuracy": 1.0 if defined else None},
    ]
    for name, r in results["strategies"].items():
        rows.append({"row": name, **{k: r[k] for k in CSV_COLUMNS[1:]}})
    for row in rows:  # NaN (no client above chance) is missing, in the CSV as in the table
        row["normalized_accuracy"] = _number(row["normalized_accuracy"])
    return rows


def _number(value: Any) -> float | None:
    """A finite number, or None for a missing one (None, NaN, ±inf)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


# The key that sets each shipped partitioner's heterogeneity (see the README's table of keys).
PARTITION_KEYS = {"dirichlet": "alpha", "pathological": "classes-per-client", "shards": "shards-per-client",
                  "sizes": "sizes", "transforms": "transforms"}


def describe_setup(config: dict[str, Any], skip: Collection[str] = ()) -> str:
    """What ran, in one line: model and data, the partition and its heterogeneity setting, local steps
    (with their spread), learning rate and attackers. Keys in ``skip`` (a sweep's knobs) are left out."""
    def shown(key: str) -> bool:
        return key not in skip

    def value(v: Any) -> str:
        return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else f"{v:g}" if isinstance(v, float) else str(v)

    parts = [f"model {config['model']}"]
    if config.get("tasks"):
        parts.append(f"tasks {value(config['tasks'])}")
    else:
        data = [f"{config['dataset']}" if shown("dataset") else "", f"partition {config['partition']}"
                if shown("partition") else ""]
        knob = PARTITION_KEYS.get(config["partition"])
        if knob and shown(knob) and shown("partition"):
            data.append(f"{knob} {value(config[knob])}")
        parts.append(" ".join(d for d in data if d))
    if shown("num-clients"):
        parts.append(f"{config['num-clients']} clients")
    if shown("local-steps"):
        steps = f"local steps {value(config['local-steps'])}"
        if config.get("local-steps-spread", 1.0) != 1.0 and shown("local-steps-spread"):
            steps += f" (spread {value(config['local-steps-spread'])}×)"
        parts.append(steps)
    elif shown("local-steps-spread") and config.get("local-steps-spread", 1.0) != 1.0:
        parts.append(f"local-steps spread {value(config['local-steps-spread'])}×")
    if shown("lr"):
        parts.append(f"lr {value(config['lr'])}")
    if config.get("byzantine-fraction") and shown("byzantine-fraction"):
        parts.append(f"byzantine-fraction {value(config['byzantine-fraction'])} ({config['byzantine-mode']})")
    if shown("seed") and "seed" in config:
        parts.append(f"seed {config['seed']}")
    return " · ".join(p for p in parts if p)


def to_json(value: Any) -> str:
    """JSON text in which non-finite floats (e.g. an undefined normalized accuracy) become null."""
    def default(v: Any) -> Any:
        raise TypeError(f"cannot write {type(v).__name__} to JSON")

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), indent=2, default=default) + "\n"


def write_results(output: ServerOutput, config: ExperimentConfig, out: Path) -> Path:
    """results.json, results.csv, config.toml and the tensors, written through a staging directory."""
    results = output.results
    check_out_dir(out)
    with staged_directory(out) as staging:
        (staging / "results.json").write_text(to_json(results))
        with (staging / "results.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(summary_rows(results))
        write_toml(config, staging / "config.toml")
        save_state(output.base, staging / "base.safetensors")
        for method, merged in output.merged.items():
            save_state(merged, staging / "merged" / f"{method}.safetensors")
    return out


def _pct(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def print_table(results: dict[str, Any], console: Console) -> None:
    """The run's table (base, clients' own models, every strategy), then what ran: the setup, the
    attackers, the clients left out and the rules without a result. λ is marked where it was tuned."""
    table = Table(title=f"fedmerge: {results['config']['name']} ({len(results['clients'])} clients)")
    table.add_column("strategy")
    table.add_column("λ", justify="right")
    table.add_column("test acc %", justify="right")
    table.add_column("client acc %", justify="right")
    table.add_column("normalized %", justify="right")
    rows = summary_rows(results)
    best = max((r["accuracy"] for r in rows[2:]), default=None)
    for i, r in enumerate(rows):
        style = "dim" if i < 2 else ("bold green" if r["accuracy"] == best else None)
        scale = "" if r["scale"] is None else f"{r['scale']:g}"
        if "tuning" in results["strategies"].get(r["row"], {}):
            scale += " (tuned)"
        table.add_row(r["row"], scale, _pct(r["accuracy"]), _pct(r["client_accuracy"]),
                      _pct(r["normalized_accuracy"]), style=style, end_section=(i == 1))
    console.print(table)
    console.print(labelled("setup:", "bold", describe_setup(results["config"])))
    attackers = [c for c in results["clients"] if c.get("byzantine")]
    if attackers:
        mode = results["config"].get("byzantine-mode", "")
        ids = ", ".join(str(c["partition_id"]) for c in sorted(attackers, key=lambda c: c["partition_id"]))
        console.print(labelled("attackers:", "yellow", f"client {ids} ({mode}); their own models are left out "
                                                       "of the clients' row"))
    for f in results["failures"]:
        console.print(labelled("left out:", "yellow",
                               f"client {f['partition_id']} (node {f['node_id']}): {f['reason']}"))
    for method, reason in results.get("method_failures", {}).items():
        console.print(labelled("no result:", "yellow", f"{method}: {reason}"))
