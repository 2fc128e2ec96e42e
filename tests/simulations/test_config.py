"""Config loading, overrides, per-client plans, and one clear error per bad value."""

from __future__ import annotations

import pytest

from fedmerge import ConfigError
from simulations.config import DEFAULT_PRESET, ExperimentConfig, load_config, parse_override, read_toml, write_toml


def test_default_preset_is_the_schemas_defaults():
    config = load_config()
    assert config == ExperimentConfig()  # one set of defaults: the preset only names the run
    assert config.num_clients == 8 and config.data.partition == "dirichlet" and config.data.alpha == 0.5
    assert config.strategies == ("fedavg", "fednova", "median", "tsv")
    steps = [p.local_steps for p in config.client_plans()]
    assert len(set(steps)) > 1 and all(20 <= s <= 100 for s in steps)  # heterogeneous local steps


def test_overrides_are_parsed_as_toml_values():
    assert parse_override("alpha=0.1") == ("alpha", 0.1)
    assert parse_override("local-steps=[1, 2]") == ("local-steps", [1, 2])
    assert parse_override("partition=iid") == ("partition", "iid")
    config = load_config(None, ["num-clients=3", "local-steps=[5, 6, 7]", "partition=iid"])
    assert [p.local_steps for p in config.client_plans()] == [5, 6, 7]


def test_ranges_are_drawn_from_the_seed():
    a = ExperimentConfig(num_clients=6, local_steps="10:20", seed=1).client_plans()
    b = ExperimentConfig(num_clients=6, local_steps="10:20", seed=1).client_plans()
    c = ExperimentConfig(num_clients=6, local_steps="10:20", seed=2).client_plans()
    assert a == b and a != c
    assert all(10 <= p.local_steps <= 20 for p in a)


def test_flat_comma_lists_from_flower_run_config():
    config = ExperimentConfig.from_mapping({"num-clients": 3, "local-steps": "4,5,6", "strategies": "fedavg,tsv",
                                            "optimizer": "sgd,adam,sgd"})
    assert [p.local_steps for p in config.client_plans()] == [4, 5, 6]
    assert [p.optimizer for p in config.client_plans()] == ["sgd", "adam", "sgd"]
    assert config.strategies == ("fedavg", "tsv")
    flat = ExperimentConfig.from_mapping({"strategies": "fedavg,tsv", "scale": "fedavg=1,tsv=0.25"})
    assert flat.merging.scale == {"fedavg": 1.0, "tsv": 0.25}


def test_scale_per_method():
    config = ExperimentConfig(strategies=("fedavg", "tsv"), scale={"tsv": 0.25, "median": 3.0})
    assert config.scale_of("fedavg") == 1.0 and config.scale_of("tsv") == 0.25
    assert config.merging.scale == {"fedavg": 1.0, "tsv": 0.25}  # unused methods' entries are dropped


def test_effective_config_round_trips_through_toml(tmp_path):
    config = load_config(None, ["method-options={fedgma={rho=0.3}}", "strategies=['fedgma', 'tsv']"])
    write_toml(config, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == config


@pytest.mark.parametrize("values,needle", [
    ({"bogus": 1}, "unknown config key 'bogus'"),
    ({"alpha": 0}, "alpha must be > 0, got 0"),
    ({"alpha": -1.0}, "alpha must be > 0, got -1.0"),
    ({"alpha": "high"}, "alpha must be a number, got 'high'"),
    ({"num-clients": 0}, "num-clients must be an integer >= 1, got 0"),
    ({"num-clients": 2.5}, "num-clients must be an integer"),
    ({"local-steps": 0}, "local-steps must be an integer >= 1, got 0"),
    ({"local-steps": [1, 2]}, "local-steps has 2 entries but num-clients is 8"),
    ({"local-steps": "20:10"}, "MIN > MAX"),
    ({"local-steps": "a:b"}, "'a' is not a number"),
    ({"lr": -0.1}, r"lr must lie in \(0, 10\], got -0.1"),
    ({"optimizer": "rmsprop"}, "optimizer='rmsprop'"),
    ({"strategies": ["fedavg", "nope"]}, "strategies='nope' is not known"),
    ({"strategies": []}, "non-empty list"),
    ({"strategies": ["fedavg", "fedavg"]}, "lists a method twice"),
    ({"scale": {"tvs": 1.0}}, "scale='tvs' is not known"),
    ({"scale": float("inf")}, "scale must be a finite number"),
    ({"method-options": {"fedgma": {"bogus": 1}}}, "method-options.fedgma.bogus is not an option"),
    ({"method-options": {"fednova": {"local_steps": [1]}}}, "method-options.fednova.local_steps"),
    ({"engine": "spark"}, "engine='spark'"),
    ({"partition": "byzantine"}, "unknown partition 'byzantine'; known: "),
    ({"min-clients": 9}, r"min-clients must lie in \[1, num-clients=8\]"),
    ({"model": "gpt"}, "model='gpt'"),
    ({"weighting": "loss"}, "weighting='loss'"),
])
def test_bad_values_name_the_key(values, needle):
    with pytest.raises(ConfigError, match=needle):
        ExperimentConfig.from_mapping({**read_toml(DEFAULT_PRESET), **values})


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such preset file"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("num-clients = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(None, ["alpha"])


def test_method_option_values_are_checked_before_any_training():
    with pytest.raises(ConfigError, match=r"^method-options.fedgma.rho must lie in \[0.0, 1.0\], got 2.0$"):
        ExperimentConfig(strategies=("fedgma",), method_options={"fedgma": {"rho": 2.0}})


def test_warmup_longer_than_training_is_refused():
    with pytest.raises(ConfigError, match="warmup-steps=30 must be smaller than local-steps=20"):
        ExperimentConfig(local_steps=20, warmup_steps=30).client_plans()


def test_sections_are_the_library_specs_and_accept_nested_tables():
    from fedmerge.attacks import AttackSpec
    from fedmerge.data import DataSpec
    from fedmerge.train import PretrainSpec, TrainingSpec

    flat = ExperimentConfig.from_mapping({"alpha": 0.1, "pretrain-steps": 7, "byzantine-fraction": 0.25})
    nested = ExperimentConfig.from_mapping({"data": {"alpha": 0.1}, "pretrain": {"steps": 7},
                                            "attack": {"fraction": 0.25}})
    assert flat == nested and flat.to_dict() == nested.to_dict()
    assert isinstance(flat.data, DataSpec) and isinstance(flat.train, TrainingSpec)
    assert isinstance(flat.pretrain, PretrainSpec) and isinstance(flat.attack, AttackSpec)
    assert flat.data.alpha == 0.1 and flat.pretrain.steps == 7 and len(flat.byzantine_clients()) == 2
    with pytest.raises(ConfigError, match="pretrain-steps must be an integer >= 1, got 0"):
        ExperimentConfig.from_mapping({"pretrain": {"steps": 0}})  # named as users write it


def test_files_and_overrides_use_hyphenated_keys_only(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text("num_clients = 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'num_clients'"):
        load_config(preset)


def test_a_config_round_trips_through_its_file(tmp_path):
    config = load_config(None, ["num-clients=3", 'local-steps="5:9"', "scale={fedavg=0.5, tsv=\"tune\"}",
                                "method-options={fedgma={rho=0.3}}", 'strategies=["fedavg", "tsv", "fedgma"]'])
    write_toml(config, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == config


def test_configs_saved_before_the_transforms_rename_still_load():
    old = ExperimentConfig.from_mapping({"partition": "tasks", "task-kinds": ["rotation", "flip"]})
    assert old.data.partition == "transforms" and old.data.transforms == ("rotation", "flip")


def test_the_seed_range_keeps_every_derived_seed_valid():
    """At the largest seed, the seeds derived from it (each client's shuffling and attack noise, the
    data splits' [seed, partition] streams) are accepted by torch and numpy and fit the signed 64-bit
    integers of Flower's messages, even for a million clients; one more is refused."""
    import numpy as np
    import torch

    from fedmerge.spec import MAX_SEED
    from fedmerge.train.local import client_seed

    assert MAX_SEED == 4294967295 == np.iinfo(np.uint32).max
    config = ExperimentConfig.from_mapping({**read_toml(DEFAULT_PRESET), "seed": MAX_SEED})
    assert config.seed == MAX_SEED and len(config.client_plans()) == config.num_clients
    for pid in (0, config.num_clients - 1, 10**6):
        derived = client_seed(MAX_SEED, pid)
        assert 0 <= derived < 2**63
        torch.Generator().manual_seed(derived)
        np.random.default_rng(derived)
        np.random.default_rng([MAX_SEED, pid])
    with pytest.raises(ConfigError, match=r"^seed must be an integer in \[0, 4294967295\], got 4294967296$"):
        ExperimentConfig.from_mapping({"seed": MAX_SEED + 1})


def test_as_many_attackers_as_leave_one_honest_client():
    config = ExperimentConfig.from_mapping({"num-clients": 8, "byzantine-fraction": 0.875})
    assert len(config.byzantine_clients()) == 7
    with pytest.raises(ConfigError, match=r"^byzantine-fraction=0.9 makes all num-clients=8 clients attackers"):
        ExperimentConfig.from_mapping({"num-clients": 8, "byzantine-fraction": 0.9})
    with pytest.raises(ConfigError, match="byzantine-fraction <= 0$"):
        ExperimentConfig.from_mapping({"num-clients": 1, "min-clients": 1, "byzantine-fraction": 0.1})


@pytest.mark.parametrize("n", range(2, 13))
def test_the_byzantine_fraction_advised_for_too_many_attackers_is_accepted(n):
    import re
    from fractions import Fraction
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_mapping({"num-clients": n, "min-clients": 1, "byzantine-fraction": 0.99})
    advised = re.search(r"byzantine-fraction <= ([0-9.]+)$", str(info.value)).group(1)
    # (n − 1)/n itself, or that rounded down to six decimals: never above it, at most 1e-6 below
    assert 0 <= Fraction(n - 1, n) - Fraction(advised) < Fraction(1, 10**6)
    config = ExperimentConfig.from_mapping({"num-clients": n, "min-clients": 1, "byzantine-fraction": float(advised)})
    assert len(config.byzantine_clients()) == n - 1


def test_a_config_error_survives_pickling_as_itself():
    # errors raised in Ray's worker processes come back pickled: a SpecError must stay one
    import pickle

    from fedmerge.spec import SpecError
    with pytest.raises(SpecError) as info:
        ExperimentConfig.from_mapping({"num-clients": 0})
    for err in (info.value, SpecError(None, "a sentence of its own"), SpecError("k", "x", "=", ("a", "k"))):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is SpecError and str(back) == str(err) and back.args == err.args
        assert (back.key, back.detail, back.joiner, back.location) == (err.key, err.detail, err.joiner, err.location)
    assert str(pickle.loads(pickle.dumps(info.value))) == "num-clients must be an integer >= 1, got 0"


@pytest.mark.parametrize("name", [
    "é" * 101,  # 101 characters, 202 bytes: a directory NAME-TIME too long for file systems
    "a" * 201, "a\nb", "a\rb", "\x1b[31mred", "tab\there", "nul\x00", "a\u2028b", "\x7f",
])
def test_run_names_that_are_too_long_in_bytes_or_hold_control_characters_are_refused(name):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_mapping({"name": name})
    message = str(info.value)
    assert message.startswith("name must be a plain name for a directory under runs/: at most 200 bytes")
    assert message.count("200 bytes") == 1 and message.endswith(f", got {name!r}")
    assert "\n" not in message and "\x1b" not in message and "\r" not in message


@pytest.mark.parametrize("name", ["é" * 100, "a" * 200, "résumé-実験_1", "with space"])
def test_run_names_up_to_200_bytes_of_printable_characters_are_accepted(name):
    assert ExperimentConfig.from_mapping({"name": name}).name == name


def test_local_steps_spread_is_bounded_by_the_largest_number_of_local_steps():
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_mapping({"local-steps": 5, "local-steps-spread": 1e300})
    assert str(info.value) == ("local-steps-spread must lie in [1, 10,000,000] (the longest client's local steps "
                               "over the shortest's), got 1e+300")
    steps = [p.local_steps for p in ExperimentConfig.from_mapping(
        {"local-steps": 5, "local-steps-spread": 1e7, "num-clients": 2}).client_plans()]
    assert sorted(steps) == [1, round(5 * 1e7**0.5)]
    with pytest.raises(ConfigError) as info:  # within range, but the longest client would exceed the cap
        ExperimentConfig.from_mapping({"local-steps": 10**6, "local-steps-spread": 10**6, "num-clients": 2})
    assert str(info.value) == ("local-steps=1,000,000 with local-steps-spread=1e+06 gives the longest client "
                               "1,000,000,000 local steps, more than 10,000,000")


def test_one_client_is_refused_with_a_message_about_num_clients_unless_min_clients_allows_it():
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_mapping({"num-clients": 1})
    assert str(info.value).startswith("num-clients=1 is fewer than min-clients=2")
    assert "set min-clients = 1" in str(info.value)
    assert ExperimentConfig.from_mapping({"num-clients": 1, "min-clients": 1}).num_clients == 1


def test_method_option_without_an_upper_bound_asks_for_a_finite_number():
    with pytest.raises(ConfigError) as info:
        ExperimentConfig(strategies=("cclip",), method_options={"cclip": {"rho": float("inf")}})
    assert str(info.value) == "method-options.cclip.rho must be a finite number >= 0.0, got inf"
