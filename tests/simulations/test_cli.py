"""The fedmerge command: a small run, and one clear line with exit code 2 for every bad input."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from simulations.cli import app

runner = CliRunner()


def fast(cache_dir: str) -> list[str]:
    return ["--set", "num-clients=3", "--set", "engine='inprocess'", "--set", "pretrain-steps=20",
            "--set", "local-steps=[5, 10, 15]", "--set", f"cache-dir='{cache_dir}'", "-q"]


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "run" in result.output and "methods" in result.output


def test_methods_lists_every_method():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in ("task_arithmetic", "fedavg", "fednova", "median", "tsv"):
        assert name in result.output


def test_run_writes_results_and_prints_the_table(tmp_path, cache_dir):
    result = runner.invoke(app, ["run", *fast(cache_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "results.json").is_file()
    for row in ("base (pre-trained)", "clients' own models (mean)", "fedavg", "fednova", "median", "tsv"):
        assert row in result.output


@pytest.mark.parametrize("args,needle", [
    (["--set", "bogus=1"], "unknown config key 'bogus'"),
    (["--set", "alpha=0"], "alpha must be > 0"),
    (["--set", "local-steps=0"], "local-steps must be an integer >= 1"),
    (["--set", "local-steps=[1, 2]"], "local-steps has 2 entries but num-clients is 3"),
    (["--set", "strategies=['fedavg', 'nope']"], "strategies='nope' is not known"),
    (["--set", "local-steps=5", "--set", "num-clients=1000"], "more than the digits client pool"),
    (["--set", "engine=spark"], "engine='spark'"),
    (["--set", "alpha"], "--set expects key=value"),
])
def test_bad_input_is_one_clear_line_with_exit_code_2(tmp_path, cache_dir, args, needle):
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", *fast(cache_dir), *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if "error:" in line]) == 1
    assert not out.exists()  # nothing written


def test_missing_and_broken_presets(tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "no such preset file" in result.output
    (tmp_path / "bad.toml").write_text("alpha = [")
    result = runner.invoke(app, ["run", str(tmp_path / "bad.toml")])
    assert result.exit_code == 2 and "not valid TOML" in result.output and "Traceback" not in result.output


def test_existing_output_directory_is_refused_before_any_work(tmp_path, cache_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    result = runner.invoke(app, ["run", *fast(cache_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "already exists and is not empty" in result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# -- user text is printed as written: never read as rich markup -------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["run", "--set", 'model="[/]"'], "model='[/]'"),
    (["run", "--set", "[x]"], "got '[x]'"),
    (["run", "--set", 'name="[bold]x"', "--set", "alpha=0"], "alpha must be > 0"),
    (["sweep", "/dev/null"], "[grid] must list at least one config key"),
])
def test_user_text_in_errors_is_not_markup(args, needle):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "MarkupError" not in result.output
    assert needle in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_markup_in_a_run_name_is_printed_as_written(tmp_path, cache_dir):
    result = runner.invoke(app, ["run", *fast(cache_dir), "--set", 'name="[bold red]x[link] :smile:"',
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "[bold red]x[link] :smile:" in result.output


def test_the_command_starts_without_importing_torch():
    """``fedmerge --help`` and every error before the work must not wait for torch to load."""
    import subprocess
    import sys

    code = "import simulations.cli, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sweep_ends_with_a_summary_table(tmp_path, cache_dir, write_tiny_sweep_spec):
    spec = write_tiny_sweep_spec(tmp_path / "tiny.toml", f"{cache_dir}/sweep")
    result = runner.invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "out"), "-q", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "sweep tiny: mean normalized accuracy % over seeds" in result.output
    assert "strategy \\ alpha" in result.output and "0.3" in result.output and "3.0" in result.output
    table_rows = [line for line in result.output.splitlines() if line.startswith("│ fedavg") or
                  line.startswith("│ median")]
    assert len(table_rows) == 2 and all(line.count("│") == 4 for line in table_rows)


# -- fedmerge merge: what it prints -------------------------------------------------------------------------


@pytest.fixture
def checkpoints(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3, 2)}, tmp_path / "base.safetensors")
    save_file({"w": torch.ones(3, 2)}, tmp_path / "ft-a.safetensors")
    save_file({"w": torch.tensor([[1.0, float("nan")], [0, 0], [0, 0]])}, tmp_path / "ft-nan.safetensors")
    torch.save({"w": torch.ones(3, 2), "meta": {"note": object()}}, tmp_path / "pickled.pt")
    return tmp_path


def merge_args(d, *models, out="merged.safetensors"):
    return ["merge", "--base", str(d / "base.safetensors"), "--models", *[str(d / m) for m in models],
            "--method", "fedavg", "--out", str(d / out)]


def test_merge_prints_one_line_with_the_right_plural(checkpoints):
    result = runner.invoke(app, merge_args(checkpoints, "ft-a.safetensors"))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("merged 1 model with fedavg")
    assert "1 tensor merged, 0 copied" in result.output and "" not in result.output.splitlines()


def test_existing_merge_output_points_to_force(checkpoints):
    (checkpoints / "merged.safetensors").write_bytes(b"keep")
    result = runner.invoke(app, merge_args(checkpoints, "ft-a.safetensors"))
    assert result.exit_code == 2 and "already exists" in result.output and "--force" in result.output


def test_a_non_finite_checkpoint_is_named_by_its_file(checkpoints):
    result = runner.invoke(app, merge_args(checkpoints, "ft-a.safetensors", "ft-nan.safetensors"))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "ft-nan.safetensors" in result.output and "'w'" in result.output
    assert "client 1" not in result.output


def test_a_pickled_pt_file_is_one_plain_line(checkpoints):
    result = runner.invoke(app, merge_args(checkpoints, "ft-a.safetensors", "pickled.pt"))
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "\x1b[" not in result.output and "mmap" not in result.output
    assert "pickled.pt" in lines[0] and "not a weights-only" in lines[0] and "safetensors" in lines[0]


def test_run_over_seeds_prints_mean_and_sd_per_strategy(tmp_path, cache_dir):
    import json
    import statistics

    out = tmp_path / "seeds"
    result = runner.invoke(app, ["run", *fast(cache_dir), "--set", "strategies=['fedavg', 'median']",
                                 "--seeds", "3,4,5", "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    cells = sorted((out / "cells").iterdir())
    assert [c.name.split("-")[0] for c in cells] == ["seed3", "seed4", "seed5"]
    for strategy in ("fedavg", "median"):  # recomputed from each seed's own results.json
        accs = [json.loads((c / "results.json").read_text())["strategies"][strategy]["accuracy"] for c in cells]
        expected = f"{100 * statistics.mean(accs):.2f} ± {100 * statistics.stdev(accs):.2f}"
        row = next(line for line in result.output.splitlines() if f" {strategy} " in line)
        assert expected in row, (expected, row)


@pytest.mark.parametrize("seeds,needle", [("0,0", "distinct seeds"), ("a,b", "comma-separated integers"),
                                          ("0,-1", "seed must be an integer in [0, 4294967295]")])
def test_bad_seeds(tmp_path, cache_dir, seeds, needle):
    result = runner.invoke(app, ["run", *fast(cache_dir), "--seeds", seeds, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_run_over_seeds_resumes_into_its_out_directory(tmp_path, cache_dir):
    out = tmp_path / "seeds"
    args = ["run", *fast(cache_dir), "--set", "strategies=['fedavg']", "--seeds", "0,1", "--out", str(out)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    csv_text = (out / "results.csv").read_text()
    cell = next((out / "cells").iterdir())
    import shutil

    shutil.rmtree(cell)  # as if that seed had failed or been interrupted
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (out / "results.csv").read_text() == csv_text and cell.is_dir()


def test_sweep_cell_resources_this_machine_lacks_are_refused_before_ray_starts(tmp_path, cache_dir,
                                                                               write_tiny_sweep_spec, monkeypatch):
    import simulations.config

    monkeypatch.setattr(simulations.config, "machine_resources", lambda: (2, 0))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = write_tiny_sweep_spec(tmp_path / "spec.toml", f"{cache_dir}/sweep")
    for flags, needle in ((["--cell-gpus", "1"], "cell-gpus=1 but no CUDA GPU is visible on this machine"),
                          (["--cell-cpus", "4"], "cell-cpus=4 is more than the 2 CPUs of this machine"),
                          (["--workers", "0"], "--workers must be at least 1, got 0"),
                          (["--cell-cpus", "0"], "cell-cpus must lie in (0, 1024], got 0"),
                          (["--cell-cpus", "nan"], "cell-cpus must be a finite number, got nan"),
                          (["--cell-gpus", "-1"], "cell-gpus must lie in [0, 64], got -1")):
        result = runner.invoke(app, ["sweep", str(spec), "-q", "--workers", "2", *flags, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "o" / "cells").exists() or not list((tmp_path / "o" / "cells").iterdir())
