"""Sweeps: spec validation, the tidy CSV and plots, the task-vector cache, and resuming."""

from __future__ import annotations

import csv
import json
import logging
import shutil

import pytest

from fedmerge import ConfigError, FederationError
from simulations import sweep as sweep_module
from simulations.sweep import SWEEPS_DIR, SweepSpec, run_sweep


@pytest.fixture
def spec_file(tmp_path, cache_dir, write_tiny_sweep_spec):
    def write(strategies='["fedavg", "median"]'):
        return write_tiny_sweep_spec(tmp_path / "spec.toml", f"{cache_dir}/sweep", strategies)
    return write


def count_training(monkeypatch):
    calls = []
    import fedmerge.train.local as local

    original = local._fine_tune
    monkeypatch.setattr(local, "_fine_tune", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.slow  # 2 cells, matplotlib
def test_sweep_writes_tidy_csv_and_plot(spec_file, tmp_path, monkeypatch):
    trained = count_training(monkeypatch)
    out = run_sweep(SweepSpec.load(spec_file()), tmp_path / "out", progress=False)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * 2  # cells × strategies
    assert {r["strategy"] for r in rows} == {"fedavg", "median"} and {r["alpha"] for r in rows} == {"0.3", "3.0"}
    assert all(0 <= float(r["accuracy"]) <= 1 and r["label_skew"] for r in rows)
    assert (out / "accuracy-vs-alpha.png").stat().st_size > 10_000
    assert len(trained) == 2 * 3  # every client of every cell trained once


def test_adding_a_strategy_retrains_nothing(spec_file, tmp_path, monkeypatch):
    run_sweep(SweepSpec.load(spec_file()), tmp_path / "out", progress=False)
    trained = count_training(monkeypatch)
    out = run_sweep(SweepSpec.load(spec_file('["fedavg", "median", "tsv"]')), tmp_path / "out", progress=False)
    assert trained == []  # every client task vector came from the cache
    assert {r["strategy"] for r in csv.DictReader((out / "results.csv").open())} == {"fedavg", "median", "tsv"}


def test_interrupted_sweep_resumes_where_it_stopped(spec_file, tmp_path, monkeypatch):
    real, ran = sweep_module.run_experiment, []

    def flaky(config, out=None, **kw):
        ran.append(config.data.alpha)
        if len(ran) == 2:
            raise KeyboardInterrupt
        return real(config, out, **kw)

    monkeypatch.setattr(sweep_module, "run_experiment", flaky)  # the name the sweep calls
    with pytest.raises(KeyboardInterrupt):
        run_sweep(SweepSpec.load(spec_file()), tmp_path / "out", progress=False)
    assert len(list((tmp_path / "out" / "cells").iterdir())) == 1  # the finished cell, nothing half-written
    ran.clear()
    run_sweep(SweepSpec.load(spec_file()), tmp_path / "out", progress=False)
    assert ran == [3.0]  # only the cell that had not finished ran again


def test_shipped_specs_are_valid():
    for name in ("data-heterogeneity.toml", "training-heterogeneity.toml"):
        spec = SweepSpec.load(name)
        assert len(list(spec.cells())) >= 15 and spec.base["engine"] == "inprocess"
    assert (SWEEPS_DIR / "data-heterogeneity.toml").is_file()


@pytest.mark.parametrize("body,needle", [
    ("[grid]\n", "must list at least one config key"),
    ("[grid]\nalpha = []\n", "grid.alpha must be a non-empty list"),
    ("seeds = [1.5]\n[grid]\nalpha = [1.0]\n", "seeds must be a non-empty list of integers"),
    ("colour = 1\n[grid]\nalpha = [1.0]\n", "unknown sweep key 'colour'"),
    ("[grid]\nalpha = [1.0, -1.0]\n", "alpha must be > 0"),
])
def test_bad_specs(tmp_path, body, needle):
    (tmp_path / "s.toml").write_text(body)
    with pytest.raises(ConfigError, match=needle):
        SweepSpec.load(tmp_path / "s.toml")


def test_cell_ids_change_with_the_config(spec_file):
    a = [c.id for c in SweepSpec.load(spec_file()).cells()]
    b = [c.id for c in SweepSpec.load(spec_file('["fedavg"]')).cells()]
    assert len(set(a)) == 2 and not set(a) & set(b)
    assert sweep_module.CSV_COLUMNS[0] == "seed"


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, write_tiny_sweep_spec):
    """A finished two-cell sweep (its spec, its directory) that tests copy and then damage."""
    root = tmp_path_factory.mktemp("finished-sweep")
    spec = write_tiny_sweep_spec(root / "spec.toml", root / "cache")
    run_sweep(SweepSpec.load(spec), root / "out", progress=False)
    return spec, root / "out"


def _edit(key_path, change):
    """Text of results.json with the entry at ``key_path`` passed to ``change(parent, key)``."""
    def edit(results):
        *parents, last = key_path
        node = results
        for k in parents:
            node = node[k]
        change(node, last)
        return json.dumps(results)
    return edit


def _drop(key_path):
    return _edit(key_path, lambda node, key: node.pop(key))


def _set(key_path, value):
    return _edit(key_path, lambda node, key: node.__setitem__(key, value))


DAMAGED_RESULTS = {
    "invalid JSON": lambda text: "{not json",
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "not an object": lambda text: "[1, 2]",
    "no strategies": lambda text: _drop(["strategies"])(json.loads(text)),
    "no base accuracy": lambda text: _drop(["base", "accuracy"])(json.loads(text)),
    "a strategy missing": lambda text: _drop(["strategies", "median"])(json.loads(text)),
    "accuracy as text": lambda text: _set(["strategies", "fedavg", "accuracy"], "0.9")(json.loads(text)),
    "clients not a list": lambda text: _set(["clients"], {"0": 1})(json.loads(text)),
    "no clients": lambda text: _set(["clients"], [])(json.loads(text)),
    "NaN accuracy": lambda text: text.replace('"accuracy": ', '"accuracy": NaN, "x": ', 1),
    "not UTF-8": lambda text: "\udcff",
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_RESULTS))
def test_resume_reruns_a_cell_whose_results_are_damaged(finished_sweep, tmp_path, monkeypatch, capsys, damage):
    spec_path, finished = finished_sweep
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    cells = sorted((out / "cells").iterdir())
    results_file = cells[0] / "results.json"
    text = DAMAGED_RESULTS[damage](results_file.read_text())
    results_file.write_bytes(text.encode("utf-8", "surrogateescape"))
    real, ran = sweep_module.run_experiment, []
    monkeypatch.setattr(sweep_module, "run_experiment", lambda config, out=None, **kw: ran.append(out.name) or
                        real(config, out, **kw))
    capsys.readouterr()
    run_sweep(SweepSpec.load(spec_path), out, progress=False)
    assert ran == [cells[0].name]  # that cell, and only that one, ran again
    told = capsys.readouterr().err
    assert told.count(cells[0].name) == 1 and cells[1].name not in told
    assert (out / "results.csv").read_bytes() == (finished / "results.csv").read_bytes()
    assert json.loads(results_file.read_text())["strategies"].keys() == {"fedavg", "median"}


def test_resume_reruns_a_cell_directory_without_results(finished_sweep, tmp_path, monkeypatch):
    spec_path, finished = finished_sweep
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    cell = sorted((out / "cells").iterdir())[1]
    (cell / "results.json").unlink()
    run_sweep(SweepSpec.load(spec_path), out, progress=False)
    assert (out / "results.csv").read_bytes() == (finished / "results.csv").read_bytes()


def test_a_cell_that_raises_is_tried_again_then_recorded_and_the_sweep_goes_on(finished_sweep, tmp_path, monkeypatch):
    spec_path, finished = finished_sweep
    out = tmp_path / "out"
    real, calls = sweep_module.run_experiment, []
    bad = sorted(c.id for c in SweepSpec.load(spec_path).cells())[0]

    def flaky(config, out=None, **kw):
        calls.append(out.name)
        if out.name == bad:
            logging.getLogger("fedmerge").warning("client 3 diverged")
            raise RuntimeError("a worker ran out of memory")
        return real(config, out, **kw)

    monkeypatch.setattr(sweep_module, "run_experiment", flaky)
    with pytest.raises(FederationError, match="1 of 2 cells failed twice"):
        run_sweep(SweepSpec.load(spec_path), out, progress=False)
    assert calls.count(bad) == 2 and len(calls) == 3  # tried once more, the other cell ran once
    failure = json.loads((out / "failures.json").read_text())
    assert list(failure) == [bad] and failure[bad]["error"] == "RuntimeError: a worker ran out of memory"
    assert [line.split(" ", 2)[2] for line in failure[bad]["log"]] == ["WARNING fedmerge: client 3 diverged"]
    with (out / "results.csv").open() as fh:  # the other cell's rows, as in the finished sweep
        assert {r["cell"] for r in csv.DictReader(fh)} == {c.id for c in SweepSpec.load(spec_path).cells()} - {bad}
    monkeypatch.setattr(sweep_module, "run_experiment", real)
    run_sweep(SweepSpec.load(spec_path), out, progress=False)  # resuming runs the failed cell only
    assert not (out / "failures.json").exists()
    assert (out / "results.csv").read_bytes() == (finished / "results.csv").read_bytes()


@pytest.mark.ray
def test_a_parallel_sweep_on_ray_writes_what_the_sequential_one_does(finished_sweep, tmp_path):
    spec_path, finished = finished_sweep
    out = run_sweep(SweepSpec.load(spec_path), tmp_path / "out", progress=False, workers=2)
    assert (out / "results.csv").read_bytes() == (finished / "results.csv").read_bytes()
    for cell in SweepSpec.load(spec_path).cells():
        for name in ("base.safetensors", "merged/fedavg.safetensors", "merged/median.safetensors"):
            a, b = out / "cells" / cell.id / name, finished / "cells" / cell.id / name
            assert a.read_bytes() == b.read_bytes(), (cell.id, name)
        assert (out / "cells" / cell.id / "log.txt").is_file()  # written by the driver, from the worker's lines


def test_a_cells_warnings_go_to_its_log_not_between_the_progress_lines(finished_sweep, tmp_path, monkeypatch,
                                                                       capsys):
    import logging

    spec_path, _ = finished_sweep
    real = sweep_module.run_experiment

    def warning_run(config, out=None, **kw):
        logging.getLogger("flwr").warning("Client node 7 (partition 2) left out: no reply before the timeout")
        logging.getLogger("fedmerge.io.state").warning("cache entry x.safetensors: damaged; discarded")
        return real(config, out, **kw)

    class Spy(logging.Handler):  # stands for the console handlers: it must hear nothing of the cells
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.heard = []

        def emit(self, record):
            self.heard.append(record.getMessage())

    spy = Spy()
    root, flower = logging.getLogger(), logging.getLogger("flwr")
    monkeypatch.setattr(root, "handlers", [*root.handlers, spy])
    monkeypatch.setattr(flower, "handlers", [*flower.handlers, spy])
    before = (list(root.handlers), list(flower.handlers))
    monkeypatch.setattr(sweep_module, "run_experiment", warning_run)
    out = run_sweep(SweepSpec.load(spec_path), tmp_path / "out", progress=False)
    assert spy.heard == []
    for cell in SweepSpec.load(spec_path).cells():
        log = (out / "cells" / cell.id / "log.txt").read_text().splitlines()
        assert len(log) == 2 and "WARNING flwr: Client node 7 (partition 2) left out" in log[0]
        assert "WARNING fedmerge.io.state: cache entry x.safetensors" in log[1]
    assert (list(root.handlers), list(flower.handlers)) == before  # every handler is back after the sweep
    logging.getLogger("flwr").warning("after the sweep")
    assert "after the sweep" in spy.heard


def test_a_sweep_whose_every_cell_fails_is_one_error_and_a_csv_header(finished_sweep, tmp_path, monkeypatch):
    spec_path, _ = finished_sweep
    calls = []

    def failing(config, out=None, **kw):
        calls.append(out.name)
        raise ConfigError("partition 'flaky' cannot split these labels")  # the same input fails the same way

    monkeypatch.setattr(sweep_module, "run_experiment", failing)
    with pytest.raises(FederationError, match="2 of 2 cells failed"):
        run_sweep(SweepSpec.load(spec_path), tmp_path / "out", progress=False)
    assert len(calls) == 2  # a ConfigError is not tried a second time
    assert (tmp_path / "out" / "results.csv").read_text().count("\n") == 1
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize("text,needle", [('seeds = [0, 0]\n[grid]\nalpha = [0.3]\n', "seeds lists a seed twice"),
                                         ('[grid]\nalpha = [0.3, 0.3]\n', "grid.alpha lists a value twice")])
def test_a_spec_listing_a_seed_or_value_twice_is_refused(tmp_path, text, needle):
    spec = tmp_path / "spec.toml"
    spec.write_text(f'name = "dup"\n{text}')
    with pytest.raises(ConfigError, match=needle):
        SweepSpec.load(spec)


@pytest.mark.parametrize("cell_cpus,threads", [(1.0, 1), (0.5, 1), (2.0, 2)])
def test_a_cell_runs_on_as_many_torch_threads_as_it_has_whole_cpus(finished_sweep, tmp_path, monkeypatch,
                                                                    cell_cpus, threads):
    import torch

    spec_path, _ = finished_sweep
    real, seen = sweep_module.run_experiment, []

    def counting(config, out=None, **kw):
        seen.append(torch.get_num_threads())
        return real(config, out, **kw)

    monkeypatch.setattr(sweep_module, "run_experiment", counting)
    before = torch.get_num_threads()
    run_sweep(SweepSpec.load(spec_path).with_resources(cell_cpus), tmp_path / "out", progress=False)
    assert seen == [threads, threads] and torch.get_num_threads() == before


FLAKY_PARTITION = '''
import logging
from pathlib import Path

import numpy as np

from fedmerge import ConfigError
from fedmerge.data import partitioner


@partitioner("flaky")
def flaky(labels, spec):
    """IID shares that fail as the cell's alpha says: 0.3 on its first try only, 3.0 with a
    ConfigError, 10.0 always."""
    tries = Path(__file__).parent / f"tries-{spec.alpha}"
    with tries.open("a") as fh:
        fh.write("x")
    logging.getLogger("fedmerge").warning("splitting for alpha %s", spec.alpha)
    if spec.alpha == 3.0:
        raise ConfigError("flaky cannot split for alpha 3.0")
    if spec.alpha == 10.0 or tries.read_text() == "x":
        raise RuntimeError(f"flaky failed for alpha {spec.alpha}")
    return np.array_split(np.random.default_rng(spec.seed).permutation(len(labels)), spec.num_clients)
'''


@pytest.mark.ray
def test_a_parallel_sweep_retries_a_failing_cell_once_records_its_log_and_never_retries_a_config_error(
        tmp_path, cache_dir):
    (tmp_path / "flaky.py").write_text(FLAKY_PARTITION)
    spec = write_tiny_sweep_spec_with(tmp_path, cache_dir, 'plugins = ["flaky.py"]', 'partition = "flaky"',
                                      grid="alpha = [0.3, 3.0, 10.0]")
    with pytest.raises(FederationError, match="2 of 3 cells failed"):
        run_sweep(SweepSpec.load(spec), tmp_path / "out", progress=False, workers=2)
    tries = {alpha: (tmp_path / f"tries-{alpha}").read_text().count("x") for alpha in ("0.3", "3.0", "10.0")}
    assert tries == {"0.3": 2, "3.0": 1, "10.0": 2}  # retried once; a ConfigError not at all
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())
    by_alpha = {cell_id.split("alpha=")[1].split("-seed")[0]: entry for cell_id, entry in failures.items()}
    assert by_alpha["3.0"]["error"] == "ConfigError: flaky cannot split for alpha 3.0"
    assert by_alpha["10.0"]["error"] == "RuntimeError: flaky failed for alpha 10.0"
    assert any("splitting for alpha 10.0" in line for line in by_alpha["10.0"]["log"])  # the worker's log came back
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert {r["alpha"] for r in rows} == {"0.3"}  # the cell that passed on its second try


def write_tiny_sweep_spec_with(tmp_path, cache_dir, *lines, grid):
    spec = tmp_path / "spec.toml"
    top, settings = [line for line in lines if line.startswith("plugins")], [
        line for line in lines if not line.startswith("plugins")]
    spec.write_text("\n".join(['name = "flaky"', "seeds = [0]", *top, "[set]", "num-clients = 3", "local-steps = 5",
                               "pretrain-steps = 20", 'strategies = ["fedavg"]', f'cache-dir = "{cache_dir}"',
                               *settings, "[grid]", grid]) + "\n")
    return spec
