"""The CLIP benchmark's table, in the papers' layout: one row per model, one column per task, then the
averages of absolute and normalized accuracy. The published numbers to compare with are in docs/clip.md."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

def _pct(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def rows_from_run(results: dict[str, Any]) -> dict[str, Any]:
    """The table's rows from a ``fedmerge run`` results dict whose clients have tasks of their own
    (CLIP tasks, input transforms, text tasks)."""
    clients = results["clients"]
    tasks = [c["task"] for c in clients]
    own = [c["accuracy"] for c in clients]
    base_row = "zero-shot" if results["config"].get("tasks") else "base"  # CLIP's θ0 is zero-shot
    rows = {"fine-tuned": {"accuracies": own, "accuracy": sum(own) / len(own), "normalized_accuracy": 1.0},
            base_row: {"accuracies": None, "accuracy": results["base"]["client_accuracy"],
                       "normalized_accuracy": results["base"]["normalized_accuracy"]}}
    for name, s in results["strategies"].items():
        rows[name] = {"scale": s["scale"], "accuracies": s["client_accuracies"], "accuracy": s["client_accuracy"],
                      "normalized_accuracy": s["normalized_accuracy"]}
    return {"tasks": tasks, "rows": rows}


def print_task_table(report: dict[str, Any], console: Console, title: str = "CLIP tasks") -> None:
    tasks = report["tasks"]
    table = Table(title=f"{title}: accuracy % per task (test splits)")
    table.add_column("method")
    table.add_column("λ", justify="right")
    for t in tasks:
        table.add_column(t, justify="right")
    table.add_column("Avg abs", justify="right")
    table.add_column("Avg norm", justify="right")
    for name, row in report["rows"].items():
        accs = row.get("accuracies") or [None] * len(tasks)
        scale = row.get("scale")
        table.add_row(name, "" if scale is None else f"{scale:g}", *map(_pct, accs), _pct(row["accuracy"]),
                      _pct(row.get("normalized_accuracy")))
    console.print(table)
