"""Reference tables generated from the registries and the config schema (README, ``fedmerge methods``)."""

from __future__ import annotations

from fedmerge.merging import METHODS
from simulations.config import config_table

__all__ = ["config_table", "methods_table"]


def methods_table() -> str:
    """The merging rules as a markdown table, from their registry entries."""
    rows = ["| rule | merged task vector | scale | weights p_i | options | reference |", "|---|---|---|---|---|---|"]
    for name, entry in METHODS.items():
        options = ", ".join(f"`{o.describe()}`" for o in entry.options) or "—"
        formula = (entry.formula or entry.summary).replace("|", "\\|")
        weights = "used" if entry.uses_weights else "ignored"
        reference = entry.citation or "—"
        rows.append(f"| `{name}` | {formula} | {entry.natural_scale} | {weights} | {options} | {reference} |")
    return "\n".join(rows) + "\n"
