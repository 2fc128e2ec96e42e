"""Shipped presets and sweep specs are found by name from any directory, by one lookup."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fedmerge.errors import ConfigError
from simulations.cli import app
from simulations.config import PRESETS_DIR, find_shipped, load_config
from simulations.sweep import SWEEPS_DIR, SweepSpec

runner = CliRunner()


@pytest.mark.parametrize("name", ["default", "default.toml", "clip-vit-b32-8tasks"])
def test_presets_by_name_from_anywhere(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_shipped(name, PRESETS_DIR, "preset") == PRESETS_DIR / (name.removesuffix(".toml") + ".toml")


def test_a_local_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").write_text('name = "mine"\n')
    assert load_config("default").name == "mine"


def test_load_config_takes_a_preset_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("default").name == "default"


def test_sweep_specs_by_name_without_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert SweepSpec.load("data-heterogeneity").name == "data-heterogeneity"
    assert find_shipped("training-heterogeneity.toml", SWEEPS_DIR, "sweep spec").parent == SWEEPS_DIR


def test_a_missing_name_lists_what_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("defualt")
    message = str(info.value)
    assert "no such preset file" in message and "clip-vit-b32-8tasks, default" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="shipped sweep specs: data-heterogeneity, training-heterogeneity"):
        SweepSpec.load("nope.toml")


def test_run_by_preset_name_and_help(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", "nope"])
    assert result.exit_code == 2 and "shipped presets: clip-vit-b32-8tasks, default" in result.output
    help_text = runner.invoke(app, ["run", "--help"]).output
    assert "clip-vit-b32-8tasks" in help_text and "default" in help_text


@pytest.mark.parametrize("key,suggestion", [("local_step", "local-steps"), ("num-client", "num-clients"),
                                            ("apha", "alpha"), ("byzantine-frac", "byzantine-fraction")])
def test_an_unknown_key_suggests_the_nearest_one(key, suggestion):
    from simulations.config import ExperimentConfig

    for build in (lambda: ExperimentConfig.from_mapping({key: 1}), lambda: load_config(None, [f"{key}=1"]),
                  lambda: ExperimentConfig(**{"data": {}, key: 1})):
        with pytest.raises(ConfigError) as info:
            build()
        message = str(info.value)
        assert f"unknown config key {key!r}; did you mean {suggestion!r}?" in message
        assert "weight-decay" not in message  # not every key


def test_an_unknown_key_far_from_every_key_lists_them():
    from simulations.config import ExperimentConfig

    with pytest.raises(ConfigError, match=r"^unknown config key 'zzzzzz'; known keys: alpha, batch-size, "):
        ExperimentConfig.from_mapping({"zzzzzz": 1})
