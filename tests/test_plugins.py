"""Plugins: a rule, a dataset, a partitioner and a model from outside fedmerge work everywhere a
built-in one does (run, tuning, merge, methods, sweeps), from a file or an entry point."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fedmerge
from fedmerge import merge
from fedmerge.data import DATASETS, PARTITIONERS
from fedmerge.errors import ConfigError as ConfigErrorType
from fedmerge.errors import PluginError
from fedmerge.io import load_state, save_state
from fedmerge.merging import METHODS
from fedmerge.models import MODELS
from simulations.cli import app

REGISTRIES = (METHODS, DATASETS, PARTITIONERS, MODELS)

PLUGIN = textwrap.dedent('''
    import torch
    from torch import nn

    from fedmerge.data import Dataset, Split, dataset, partitioner
    from fedmerge.merging import Option, rule
    from fedmerge.models import model


    @rule("sign_mean", natural_scale="mean", citation="a test rule",
          options=[Option("tau", default=0.0, low=0.0, grid=(0.0, 0.001))])
    def sign_mean(task_vectors, weights=None, *, tau=0.0):
        """The uniform mean with entries of magnitude below tau zeroed."""
        out = {}
        for key in task_vectors[0]:
            mean = sum(tv[key] for tv in task_vectors) / len(task_vectors)
            out[key] = torch.where(mean.abs() < tau, torch.zeros_like(mean), mean)
        return out


    @dataset("blobs")
    def blobs():
        gen = torch.Generator().manual_seed(0)
        y = torch.arange(600) % 3
        x = torch.randn(600, 1, 4, 4, generator=gen) * 0.5 + y.view(-1, 1, 1, 1).float()
        return Dataset("blobs", Split(x, y), 3)


    @partitioner("by_label")
    def by_label(labels, spec):
        """Label-sorted rows cut into one contiguous block per client: pure label skew."""
        import numpy as np

        return np.array_split(labels.argsort(kind="stable"), spec.num_clients)


    @model("tiny")
    def tiny(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, num_classes))
''')


@pytest.fixture(autouse=True)
def isolated_registries():
    """Plugins register into process-wide registries: restore them after each test."""
    saved = [(r, dict(r._entries), r._entry_points_loaded) for r in REGISTRIES]
    yield
    for registry, entries, loaded in saved:
        registry._entries.clear()
        registry._entries.update(entries)
        registry._entry_points_loaded = loaded


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "my_plugin.py"
    path.write_text(PLUGIN)
    return path


def install_entry_points(where, monkeypatch, name: str, entry_points: str) -> None:
    """An installed distribution named ``name`` with these entry points, as pip would leave it."""
    dist = where / f"{name.replace('-', '_')}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(entry_points)
    monkeypatch.syspath_prepend(str(where))


def numpy_sign_mean(task_vectors, tau):
    out = {}
    for key in task_vectors[0]:
        mean = np.mean([tv[key].double().numpy() for tv in task_vectors], axis=0)
        out[key] = np.where(np.abs(mean) < tau, 0.0, mean)
    return out


def test_a_plugin_file_adds_a_rule_dataset_partitioner_and_model_to_a_run(plugin_file, tmp_path, cache_dir):
    from simulations.config import load_config
    from simulations.experiment import run_experiment

    config = load_config(None, [
        'engine="inprocess"', "num-clients=3", 'dataset="blobs"', 'partition="by_label"', 'model="tiny"',
        'strategies=["fedavg", "sign_mean"]', 'scale={fedavg=1.0, sign_mean="tune"}', "local-steps=10",
        "pretrain-steps=20", f'cache-dir="{cache_dir}"', "min-clients=3",
    ], plugins=[plugin_file])
    output = run_experiment(config, tmp_path / "run", progress=False)
    tuning = output.results["strategies"]["sign_mean"]["tuning"]
    assert {o["tau"] for o in tuning["grid"]["options"]} == {0.0, 0.001}  # the plugin's grid was searched
    taus = [output.task_vectors[i] for i in sorted(output.task_vectors)]
    expected = numpy_sign_mean(taus, tuning["options"]["tau"])
    for key, value in output.merged["sign_mean"].items():
        np.testing.assert_allclose(value.double().numpy(), expected[key], atol=1e-6)
    assert output.results["measures"]["data"]["label_skew"] > 0.4  # by_label: label-sorted blocks (IID: ~0.05)
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["config"]["plugins"] == [str(plugin_file.resolve())]


def test_cli_methods_and_offline_merge_take_plugins(plugin_file, tmp_path):
    runner = CliRunner()
    listed = runner.invoke(app, ["methods", "--plugin", str(plugin_file)], terminal_width=250)
    assert listed.exit_code == 0 and "sign_mean" in listed.output and "a test rule" in listed.output
    base = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    models = [{"w": torch.full((3, 2), v), "b": torch.tensor([v, 0.1 * v])} for v in (0.5, 1.0, 3.0)]
    save_state(base, tmp_path / "base.safetensors")
    files = []
    for i, m in enumerate(models):
        save_state(m, tmp_path / f"m{i}.safetensors")
        files.append(str(tmp_path / f"m{i}.safetensors"))
    out = tmp_path / "merged.safetensors"
    result = runner.invoke(app, ["merge", "--plugin", str(plugin_file), "--base", str(tmp_path / "base.safetensors"),
                                 "--models", *files, "--method", "sign_mean", "--option", "tau=1.0", "--out", str(out),
                                 "-q"])
    assert result.exit_code == 0, result.output
    merged = load_state(out)
    torch.testing.assert_close(merged["w"], torch.full((3, 2), 1.5))  # mean 1.5 survives tau = 1
    torch.testing.assert_close(merged["b"], torch.tensor([1.5, 0.0]))  # |0.15| < tau: zeroed

def test_a_sweep_names_its_plugins(plugin_file, tmp_path, cache_dir):
    from simulations.sweep import SweepSpec, run_sweep

    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(f'''
        name = "plugin-sweep"
        plugins = ["{plugin_file.name}"]
        seeds = [0]
        [set]
        strategies = ["sign_mean"]
        dataset = "blobs"
        partition = "iid"
        num-clients = 2
        min-clients = 2
        local-steps = 5
        pretrain-steps = 10
        cache-dir = "{cache_dir}"
        [grid]
        partition = ["iid", "by_label"]
    '''))
    out = run_sweep(SweepSpec.load(spec), tmp_path / "sweep", progress=False)
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",sign_mean," in r for r in rows[1:])


def test_an_entry_point_rule_is_a_plain_function(tmp_path, monkeypatch):
    (tmp_path / "outside_rules.py").write_text(textwrap.dedent('''
        def scaled_mean(task_vectors, weights=None, factor=1.0):
            n = len(task_vectors)
            p = weights or [1.0 / n] * n
            return {k: factor * sum(w * tv[k] for w, tv in zip(p, task_vectors)) for k in task_vectors[0]}
        scaled_mean.natural_scale = "mean"
    '''))
    install_entry_points(tmp_path, monkeypatch, "outside-rules",
                         "[fedmerge.methods]\nscaled_mean = outside_rules:scaled_mean\n")
    METHODS._entry_points_loaded = False
    tvs = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -2.0])}]
    torch.testing.assert_close(merge("scaled_mean", tvs, factor=2.0)["w"], torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(merge("scaled_mean", tvs, [3, 1])["w"], torch.tensor([1.5, 1.0]))
    entry = METHODS["scaled_mean"]
    assert entry.natural_scale == "mean" and entry.option("factor").default == 1.0
    with pytest.raises(Exception, match="factor must be a number"):
        merge("scaled_mean", tvs, factor="big")


def test_broken_plugins_are_one_clear_error(tmp_path, monkeypatch):
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_here\n")
    result = CliRunner().invoke(app, ["methods", "--plugin", str(broken)])
    assert result.exit_code == 2
    assert "broken.py failed to load: ModuleNotFoundError" in " ".join(result.output.split()).replace("/ ", "/")
    assert "Traceback" not in result.output
    install_entry_points(tmp_path, monkeypatch, "bad", "[fedmerge.partitioners]\nnope = missing_module:split\n")
    PARTITIONERS._entry_points_loaded = False
    with pytest.raises(PluginError, match="plugin 'nope' .*fedmerge.partitioners.* failed to load"):
        PARTITIONERS["iid"]
    assert "nope" not in sys.modules


@pytest.mark.ray
def test_plugins_reach_clients_in_ray_actors(plugin_file, tmp_path, cache_dir):
    """Clients on Ray run in other processes: they load the experiment's plugin files themselves,
    and give the same task vectors as in-process clients."""
    from simulations.config import load_config
    from simulations.experiment import run_experiment

    overrides = ['engine="inprocess"', "num-clients=2", 'dataset="blobs"', 'partition="by_label"', 'model="tiny"',
                 'strategies=["sign_mean"]', "local-steps=5", "pretrain-steps=10", f'cache-dir="{cache_dir}"']
    inprocess = run_experiment(load_config(None, overrides, plugins=[plugin_file]), progress=False)
    on_ray = run_experiment(load_config(None, [*overrides, 'engine="ray"'], plugins=[plugin_file]), progress=False)
    assert on_ray.results["timing"]["engine"] == "ray" and not on_ray.results["failures"]
    for key, value in inprocess.merged["sign_mean"].items():
        assert torch.equal(value, on_ray.merged["sign_mean"][key]), key


def test_plugin_rule_options_keep_their_types_and_their_one_default():
    from fedmerge.merging import Option, rule

    @rule("typed_rule")
    def typed_rule(task_vectors, weights=None, *, normalize: bool = False, mode: str = "a", steps: int = 3):
        return {k: task_vectors[0][k] * (steps if normalize else 1) for k in task_vectors[0]}

    tvs = [{"w": torch.ones(2)}]
    assert [o.describe() for o in METHODS["typed_rule"].options] == ["normalize=False", "mode='a'", "steps=3"]
    torch.testing.assert_close(merge("typed_rule", tvs, normalize=True, mode="b", steps=2)["w"], torch.full((2,), 2.0))
    for bad, needle in (({"normalize": 1}, "true or false"), ({"mode": 3}, "a string"), ({"steps": 2.7}, "integer")):
        with pytest.raises(Exception, match=f"typed_rule: {next(iter(bad))} must be .*{needle}"):
            merge("typed_rule", tvs, **bad)
    with pytest.raises(PluginError, match="declares default 0.5 but the function's is 0.0"):
        @rule("two_defaults", options=[Option("tau", default=0.5)])
        def two_defaults(task_vectors, weights=None, *, tau=0.0):
            return dict(task_vectors[0])


def test_rule_outputs_are_checked_and_required_options_are_asked_for_before_training():
    from fedmerge.errors import MergeError
    from fedmerge.merging import rule
    from simulations.config import ExperimentConfig
    from strategies import OneShotMerge

    @rule("bad_output")
    def bad_output(task_vectors, weights=None):
        return {k: [0.0] for k in task_vectors[0]}

    @rule("needs_tau")
    def needs_tau(task_vectors, weights=None, *, tau):
        return dict(task_vectors[0])

    with pytest.raises(MergeError, match="merged tensor 'w' is list, not a floating tensor of shape"):
        merge("bad_output", [{"w": torch.ones(2)}])
    with pytest.raises(ConfigErrorType, match="needs_tau needs option 'tau'"):
        ExperimentConfig(strategies=["needs_tau"])
    with pytest.raises(MergeError, match="required option 'tau' is missing"):
        OneShotMerge(["needs_tau"])


def test_entry_points_never_leave_a_registry_partial_nor_shadow_a_builtin(tmp_path, monkeypatch):
    (tmp_path / "ep_rules.py").write_text("def epmean(task_vectors, weights=None):\n    return dict(task_vectors[0])\n")
    install_entry_points(tmp_path, monkeypatch, "ep-rules",
                         "[fedmerge.methods]\nbroken = no_such_module:x\nepmean = ep_rules:epmean\n")
    METHODS._entry_points_loaded = False
    for _ in range(2):  # the failure is reported on every lookup, not once and then forgotten
        with pytest.raises(PluginError, match="plugin 'broken'"):
            METHODS["epmean"]
    (tmp_path / "other").mkdir()
    install_entry_points(tmp_path / "other", monkeypatch, "clash", "[fedmerge.datasets]\ndigits = clash:load\n")
    DATASETS._entry_points_loaded = False
    with pytest.raises(PluginError, match="plugin 'digits'.*already registered"):
        DATASETS["digits"]


def test_a_plugin_file_that_fails_halfway_registers_nothing(tmp_path):
    half = tmp_path / "half.py"
    half.write_text(textwrap.dedent('''
        from fedmerge.merging import rule

        @rule("first_ok")
        def first_ok(task_vectors, weights=None):
            return dict(task_vectors[0])

        raise RuntimeError("second half broken")
    '''))
    for _ in range(2):  # fixing nothing and trying again gives the same one error, not "registered twice"
        with pytest.raises(PluginError, match="half.py failed to load: RuntimeError: second half broken"):
            fedmerge.load_plugin_file(half)
        assert "first_ok" not in METHODS
