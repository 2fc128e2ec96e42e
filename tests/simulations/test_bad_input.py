"""Bad input, tried systematically on every CLI command and on the Python API.

Every case must end in exactly one clear ``error:`` line naming the problem, exit code 2, no
traceback and nothing written. ``test_cli.py``/``test_config.py`` hold the first examples; this
module sweeps the categories (wrong types, zero/negative values, unknown keys, empty lists,
absurd sizes, missing/truncated/non-safetensors/pickle checkpoints, mismatched architectures,
NaN/Inf tensors). The same checks below the CLI live with their packages:
``tests/merging/test_validation.py`` (task vectors given to ``merge``) and ``tests/io/test_state.py``
(``load_state``).
"""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fedmerge import ConfigError, MergeError
from simulations.cli import app
from simulations.config import DEFAULT_PRESET, ExperimentConfig, read_toml

runner = CliRunner()


def assert_one_clear_error(result, needle: str, *, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1, result.output
    squeeze = lambda text: "".join(text.split())
    assert squeeze(needle) in squeeze(result.output), result.output


def fast(cache_dir: str) -> list[str]:
    return ["--set", "num-clients=3", "--set", "engine='inprocess'", "--set", "pretrain-steps=20",
            "--set", "local-steps=[5, 10, 15]", "--set", f"cache-dir='{cache_dir}'", "-q"]


# -- configs: the same malformed values through `fedmerge run --set` and the Python API -------------

BAD_CONFIGS = [
    # wrong types
    ("seed='x'", "seed must be an integer"),
    ("timeout='soon'", "timeout must be a number"),
    ("client-cpus=1.5", "client-cpus must be an integer"),
    ("lr=[0.1, 'x', 0.1]", "lr must be a number"),
    ("strategies=3", "strategies must be a list of names, got 3"),
    ("method-options=3", "method-options must be a table"),
    ("method-options={fedgma=3}", "method-options.fedgma must be a table"),
    ("byzantine-fraction='half'", "byzantine-fraction must be a number"),
    ("byzantine-mode=3", "byzantine-mode must be a string"),
    ("max-update-norm='big'", "max-update-norm must be a number"),
    # zero and negative values
    ("timeout=0", "timeout must lie in (0, 10000000], got 0"),
    ("timeout=-1", "timeout must lie in (0, 10000000], got -1"),
    ("client-cpus=0", "client-cpus must be an integer >= 1, got 0"),
    ("client-gpus=-0.5", "client-gpus must be >= 0"),
    ("pretrain-steps=-5", "pretrain-steps must be an integer >= 1, got -5"),
    ("pretrain-lr=0", "pretrain-lr must lie in (0, 10], got 0"),
    ("min-clients=0", "min-clients must be an integer >= 1, got 0"),
    ("min-clients=99", "min-clients must lie in [1, num-clients="),
    ("batch-size=0", "batch-size must be an integer >= 1"),
    ("weight-decay=-1", "weight-decay must lie in [0, 100], got -1"),
    ("max-update-norm=-1", "max-update-norm must be >= 0"),
    ("merge-device='tpu'", "merge-device 'tpu' is not a device"),
    ("merge-device='meta'", "merge-device 'meta' is not supported"),
    ("byzantine-fraction=-0.1", "byzantine-fraction must lie in [0, 1)"),
    ("byzantine-fraction=1", "byzantine-fraction must lie in [0, 1)"),
    ("byzantine-std=-1", "byzantine-std must lie in [0, 1000000], got -1"),
    ("byzantine-scale=inf", "byzantine-scale must be a finite number"),
    ("byzantine-mode='flip'", "byzantine-mode='flip' is not known"),
    # unknown keys
    ("num_clients=3", "unknown config key 'num_clients'"),
    ("Alpha=0.5", "unknown config key 'Alpha'"),
    # empty lists
    ("local-steps=[]", "local-steps has 0 entries but num-clients is 3"),
    ("strategies=[]", "strategies must be a non-empty list"),
    ("strategies=''", "strategies must be a non-empty list"),
    # absurd sizes
    ("num-clients=1000000000", "num-clients"),
    ("local-steps=[5, 10, 100000000000000000000]", "local-steps must be at most 10,000,000"),
    ("pretrain-steps=1e12", "pretrain-steps must be at most 10,000,000"),
    # seeds that numpy, torch or Flower's 64-bit messages refuse (directly or as derived client seeds)
    ("seed=-1", "seed must be an integer in [0, 4294967295], got -1"),
    ("seed=4611686018427387904", "seed must be an integer in [0, 4294967295], got 4611686018427387904"),
    # non-finite and absurd numbers: refused before any training, not after it
    ("lr=inf", "lr must be a finite number, got inf"),
    ("lr=nan", "lr must be a finite number, got nan"),
    ("lr=1e308", "lr must lie in (0, 10], got 1e+308"),
    ("lr='0.01:1e308'", "lr must lie in (0, 10], got 1e+308"),
    ("lr=[0.1, 11, 0.1]", "lr must lie in (0, 10], got 11.0"),
    ("weight-decay=inf", "weight-decay must be a finite number, got inf"),
    ("weight-decay=1e308", "weight-decay must lie in [0, 100], got 1e+308"),
    ("pretrain-lr=1e308", "pretrain-lr must lie in (0, 10], got 1e+308"),
    ("alpha=1e308", "alpha must lie in (0, 1000000], got 1e+308"),
    ("scale=1e308", "scale must lie in [-1000000, 1000000]"),
    ("scale={fedavg=-1e9}", "scale.fedavg must lie in [-1000000, 1000000]"),
    ("byzantine-scale=1e308", "byzantine-scale must lie in [-1000000, 1000000], got 1e+308"),
    ("byzantine-std=1e308", "byzantine-std must lie in [0, 1000000], got 1e+308"),
    ("timeout=1e308", "timeout must lie in (0, 10000000], got 1e+308"),
    # a run name is one directory under runs/, never a path
    ("name='../../x'", "name must be a plain name for a directory under runs/"),
    ("name='/tmp/x'", "name must be a plain name"),
    ("name='a/b'", "name must be a plain name"),
    ("name='..'", "name must be a plain name"),
    ("name=''", "name must be a plain name"),
    # no honest client left
    ("byzantine-fraction=0.9", "byzantine-fraction=0.9 makes all num-clients=3 clients attackers"),
    ("byzantine-fraction=0.7", "keep at least one honest client: byzantine-fraction <= 0.666666"),
    # a run name is at most 200 bytes of printable characters
    ("name='" + "é" * 101 + "'", "name must be a plain name for a directory under runs/: at most 200 bytes in UTF-8"),
    ('name="a\\nb"', "control characters or line breaks, and not '.' or '..', got 'a\\nb'"),
    ('name="\\u001b[31mred"', "control characters or line breaks, and not '.' or '..', got '\\x1b[31mred'"),
    # one client: too few for the default min-clients
    ("num-clients=1", "num-clients=1 is fewer than min-clients=2"),
    # a per-client option without an upper bound
    ("method-options={cclip={rho=inf}}", "method-options.cclip.rho must be a finite number >= 0.0, got inf"),
]


def _value(text: str):
    from simulations.config import parse_override

    return parse_override(text)


@pytest.mark.parametrize("override,needle", BAD_CONFIGS)
def test_bad_config_via_the_cli(tmp_path, cache_dir, override, needle):
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", *fast(cache_dir), "--set", override, "--out", str(out)])
    assert_one_clear_error(result, needle)
    assert not out.exists()


@pytest.mark.parametrize("override,needle", BAD_CONFIGS)
def test_bad_config_via_the_python_api(override, needle):
    key, value = _value(override)
    values = {**read_toml(DEFAULT_PRESET), "num-clients": 3, "local-steps": [5, 10, 15], key: value}
    with pytest.raises((ConfigError, MergeError)) as info:
        ExperimentConfig.from_mapping(values)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("machine,override,needle", [
    ((2, 0), "client-cpus=64", "client-cpus=64 is more than the 2 CPUs of this machine"),
    ((2, 0), "client-gpus=0.5", "client-gpus=0.5 but no CUDA GPU is visible on this machine; use client-gpus = 0"),
    ((16, 2), "client-gpus=3", "client-gpus=3 but only 2 CUDA GPUs are visible"),
    ((16, 2), "client-gpus=1.5", "client-gpus=1.5: Ray gives a client a share of one GPU or whole GPUs"),
])
def test_client_resources_beyond_the_machine_via_the_cli(tmp_path, cache_dir, monkeypatch, machine, override, needle):
    import simulations.config

    monkeypatch.setattr(simulations.config, "machine_resources", lambda: machine)
    out = tmp_path / "out"
    args = ["run", *fast(cache_dir), "--set", "engine='ray'", "--set", override, "--out", str(out)]
    assert_one_clear_error(runner.invoke(app, args), needle)
    assert not out.exists()


def test_client_resources_are_checked_against_this_machine_only_for_a_local_ray(monkeypatch, small_config):
    import simulations.config
    import simulations.experiment

    monkeypatch.setattr(simulations.config, "machine_resources", lambda: (4, 1))
    check = simulations.config.check_resources
    check(4, 0.5)
    check(1, 1)  # what the machine has is accepted
    # a config is valid wherever it goes (a deployed ServerApp, a cluster): the machine is checked
    # where a local Ray simulation starts
    config = small_config.replace(engine="ray", **{"client-cpus": 64})
    assert config.run.client_cpus == 64
    started = []
    monkeypatch.setattr(simulations.experiment, "run_isolated", lambda *a: started.append(a))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="client-cpus=64 is more than the 4 CPUs"):
        simulations.experiment.run_engine(lambda *a: None, config)
    assert not started
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster: its nodes' resources, not this machine's
    simulations.experiment.run_engine(lambda *a: None, config)
    assert len(started) == 1


@pytest.mark.parametrize("text,needle", [
    ("num-clients = 3\nbogus = 1\n", "unknown config key 'bogus'"),
    ("num-clients = 'three'\n", "num-clients must be an integer"),
    ("[alpha]\nx = 1\n", "alpha must be a number"),
    ("\x00\x01binary", "not valid TOML"),
])
def test_bad_preset_files(tmp_path, text, needle):
    preset = tmp_path / "preset.toml"
    preset.write_text(text)
    result = runner.invoke(app, ["run", str(preset), "--out", str(tmp_path / "out")])
    assert_one_clear_error(result, needle)
    assert not (tmp_path / "out").exists()


# -- the other commands ---------------------------------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["sweep", "{tmp}/missing.toml"], "missing.toml"),
    (["sweep", "{tmp}/broken.toml"], "not valid TOML"),
    (["equivalence", "--set", "bogus=1"], "unknown config key 'bogus'"),
    (["equivalence", "--set", "alpha=-1"], "alpha must be > 0, got -1"),
    (["equivalence", "--engine", "spark"], "spark"),
    (["equivalence", "--engine", 'inprocess"\nname = "../x'], "engine"),  # a value, never TOML text
    (["run", "--set", "lr=0.5\nseed=3"], "--set takes one key=value at a time"),
])
def test_bad_input_to_other_commands(tmp_path, args, needle):
    (tmp_path / "broken.toml").write_text("grid = [")
    out = tmp_path / "out"
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args] + ["--out", str(out), "-q"])
    assert_one_clear_error(result, needle)
    assert not out.exists()


# -- checkpoints: `fedmerge merge` and fedmerge.load_state ------------------------------------------

BASE = {"fc.weight": torch.zeros(4, 3), "fc.bias": torch.zeros(4)}


@pytest.fixture
def ckpts(tmp_path, write_unreadable_checkpoints):
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file(BASE, str(d / "base.safetensors"))
    for i in range(2):
        save_file({k: v + i + 1 for k, v in BASE.items()}, str(d / f"ft{i}.safetensors"))
    write_unreadable_checkpoints(d, d / "ft0.safetensors")
    save_file({"fc.weight": torch.zeros(5, 3), "fc.bias": torch.zeros(5)}, str(d / "wide.safetensors"))
    save_file({"fc.weight": torch.zeros(4, 3)}, str(d / "missing_key.safetensors"))
    save_file({**BASE, "extra": torch.zeros(1)}, str(d / "extra_key.safetensors"))
    save_file({k: v.half() for k, v in BASE.items()}, str(d / "half.safetensors"))
    for name, bad in (("nan", float("nan")), ("inf", float("inf"))):
        t = {k: v.clone() for k, v in BASE.items()}
        t["fc.bias"][1] = bad
        save_file(t, str(d / f"{name}.safetensors"))
    return d


@pytest.mark.parametrize("model,needle", [
    ("nope.safetensors", "no such file"),
    ("truncated.safetensors", "truncated.safetensors"),
    ("empty.safetensors", "empty.safetensors"),
    ("text.safetensors", "text.safetensors"),
    ("notes.txt", "notes.txt"),
    ("evil.pt", "evil.pt"),
    ("evil.safetensors", "evil.safetensors"),
    ("wide.safetensors", "has shape"),
    ("missing_key.safetensors", "'fc.bias' of the base model is missing"),
    ("extra_key.safetensors", "'extra' is not in the base model"),
    ("half.safetensors", "float16"),
    ("nan.safetensors", "contains NaN or Inf"),
    ("inf.safetensors", "contains NaN or Inf"),
])
def test_bad_checkpoints_to_fedmerge_merge(ckpts, capsys, model, needle):
    out = ckpts / "merged.safetensors"
    result = runner.invoke(app, ["merge", "--base", str(ckpts / "base.safetensors"), "--models",
                                 str(ckpts / "ft1.safetensors"), "--models", str(ckpts / model),
                                 "--method", "fedavg", "--out", str(out), "-q"])
    assert_one_clear_error(result, needle)
    assert "pwned" not in result.output and "pwned" not in capsys.readouterr().out  # no pickle code ran
    assert not out.exists() and not list(ckpts.glob(".merged*"))


@pytest.mark.parametrize("args,needle", [
    (["--method", "nope"], "unknown merging method 'nope'"),
    (["--method", "fedgma", "--option", "rho=2"], "rho"),
    (["--method", "fedgma", "--option", "bogus=1"], "bogus"),
    (["--method", "fedgma", "--option", "rho"], "rho"),
    (["--method", "fedavg", "--scale", "nan"], "scale"),
    (["--method", "fedavg", "--option", "weights=[1, 2]"], "fedavg: unknown option 'weights'"),
    (["--method", "fedavg", "--option", "method=x"], "fedavg: unknown option 'method'"),
    (["--method", "fedavg", "--option", "task_vectors=1"], "fedavg: unknown option 'task_vectors'"),
    (["--method", "fednova", "--option", f"local_steps=[1{'0' * 400}, 1]"], "local_steps"),
])
def test_bad_merge_options(ckpts, args, needle):
    out = ckpts / "merged.safetensors"
    result = runner.invoke(app, ["merge", "--base", str(ckpts / "base.safetensors"), "--models",
                                 str(ckpts / "ft0.safetensors"), "--models", str(ckpts / "ft1.safetensors"),
                                 "--out", str(out), "-q", *args])
    assert_one_clear_error(result, needle)
    assert not out.exists()


def test_a_local_steps_spread_beyond_any_number_of_steps_is_one_line_via_the_cli(tmp_path, cache_dir):
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", *fast(cache_dir), "--set", "local-steps=5", "--set", "local-steps-spread=1e300",
                                 "--out", str(out)])
    assert_one_clear_error(result, "local-steps-spread must lie in [1, 10,000,000] (the longest client's local steps "
                                   "over the shortest's), got 1e+300")
    assert not out.exists()
