"""The README's reference tables are generated from the registries and the config schema, and
Flower's run config in pyproject.toml agrees with the schema's defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path

from fedmerge.merging import METHODS
from simulations.config import KEYS, SECTIONS, ExperimentConfig, config_table
from simulations.reference import methods_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_are_the_generated_ones():
    readme = (ROOT / "README.md").read_text()
    assert methods_table() in readme, "regenerate with: fedmerge methods --markdown"
    assert config_table() in readme, "regenerate with: python -c 'from simulations.config import config_table'"


def test_every_rule_and_every_config_key_is_documented():
    for name, entry in METHODS.items():
        assert entry.citation and (entry.formula or entry.summary), name
        assert f"| `{name}` |" in methods_table()
    sections = {name: set(spec.model_fields) for name, spec in SECTIONS.items()}
    covered = {(section, field) for section, field, _ in KEYS.values()}
    for section, fields in sections.items():  # every field users may set has its one key and description
        for field in fields - {"encoder", "cache_dir"} if section == "data" else fields:
            assert (section, field) in covered, (section, field)
    assert all(doc for _, _, doc in KEYS.values())


def test_flower_run_config_matches_the_schema_defaults():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = ExperimentConfig().to_dict()
    # every key a run can override must be declared (Flower refuses undeclared --run-config keys);
    # method-options is a table, which Flower's scalar run config cannot hold
    assert set(flwr) == set(defaults) - {"method-options"} | {"out"}
    for key, value in flwr.items():
        if key in ("name", "out"):
            continue
        parsed = ExperimentConfig.from_mapping({key: value}).to_dict()[key]
        assert parsed == defaults[key], f"[tool.flwr.app.config] {key} = {value!r} is not the default {defaults[key]!r}"
