"""Where results go: every output path that cannot be written is refused before any work (exit 2,
one line), what fails at write time is one line with exit 1 and leaves nothing behind, default run
directories never collide, and results get the permissions the umask gives any new file."""

from __future__ import annotations

import datetime as dt
import errno
import os
import stat

import pytest
from typer.testing import CliRunner

import simulations.experiment as experiment
import simulations.results as results
from simulations.cli import app

runner = CliRunner()
UNWRITABLE_FILESYSTEM = "/sys"  # sysfs: not even root may create entries at its top


def fast(cache_dir: str) -> list[str]:
    return ["-q", "--set", "num-clients=3", "--set", "engine='inprocess'", "--set", "pretrain-steps=20",
            "--set", "local-steps=5", "--set", "strategies=['fedavg']", "--set", f"cache-dir='{cache_dir}'"]


@pytest.fixture
def no_work(monkeypatch):
    """Any run that starts fails the test: the output must be refused before it."""
    def run_experiment(*args, **kwargs):
        raise AssertionError("the run started before its output was checked")

    monkeypatch.setattr(experiment, "run_experiment", run_experiment)


def one_error_line(result, *needles: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def bad_outputs(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    return {
        "under a file": (a_file / "run", "is a file"),
        "a file": (a_file, "not a directory"),
        "a dangling symbolic link": (tmp_path / "dangling", "symbolic link to nothing"),
        "under a dangling symbolic link": (tmp_path / "dangling" / "run", "symbolic link to nothing"),
        "a non-empty directory": (tmp_path / "full", "not empty"),
        "a read-only filesystem": (f"{UNWRITABLE_FILESYSTEM}/fedmerge-run", "cannot write in"),
    }


@pytest.mark.parametrize("case", ["under a file", "a file", "a dangling symbolic link",
                                  "under a dangling symbolic link", "a non-empty directory", "a read-only filesystem"])
def test_run_refuses_an_output_it_cannot_write_before_any_work(tmp_path, cache_dir, no_work, case):
    out, needle = bad_outputs(tmp_path)[case]
    result = runner.invoke(app, ["run", *fast(cache_dir), "--out", str(out)])
    assert result.exit_code == 2
    one_error_line(result, "--out", str(out), needle)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_run_refuses_a_directory_without_write_permission(tmp_path, cache_dir, no_work):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = runner.invoke(app, ["run", *fast(cache_dir), "--out", str(locked / "run")])
    assert result.exit_code == 2
    one_error_line(result, "cannot write in")


def test_a_write_that_fails_is_one_line_with_exit_1_and_leaves_nothing(tmp_path, cache_dir, monkeypatch):
    def disk_full(tensors, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(results, "save_state", disk_full)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", *fast(cache_dir)])
    assert result.exit_code == 1
    one_error_line(result, "could not write", "No space left on device")
    assert list((tmp_path / "runs").iterdir()) == []  # neither the reserved directory nor a staging one


@pytest.fixture
def one_second(monkeypatch, tmp_path):
    """The clock stopped at 2026-01-02 03:04:05, and the working directory a fresh one."""
    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(results.dt, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)


def test_runs_started_in_the_same_second_get_their_own_directories(one_second):
    with results.results_directory(None, "x") as a, results.results_directory(None, "x") as b:
        with results.results_directory(None, "x") as c:
            assert [p.name for p in (a, b, c)] == ["x-20260102-030405", "x-20260102-030405-2", "x-20260102-030405-3"]
            assert all(p.is_dir() for p in (a, b, c))
    with pytest.raises(KeyboardInterrupt), results.results_directory(None, "y") as d:
        raise KeyboardInterrupt  # a run interrupted before it wrote anything leaves no directory
    assert not d.exists() and a.is_dir()


def test_two_default_runs_in_the_same_second_both_write_their_results(tmp_path, cache_dir, one_second):
    for _ in range(2):
        result = runner.invoke(app, ["run", *fast(cache_dir)])
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["default-20260102-030405",
                                                                      "default-20260102-030405-2"]


def test_results_get_the_permissions_of_any_new_file(tmp_path, cache_dir):
    before = os.umask(0o027)
    try:
        result = runner.invoke(app, ["run", *fast(cache_dir), "--out", str(tmp_path / "run")])
    finally:
        os.umask(before)
    assert result.exit_code == 0, result.output
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [tmp_path / "run", *(tmp_path / "run").rglob("*")]}
    assert {"run/results.json", "run/base.safetensors", "run/merged/fedavg.safetensors"} <= set(modes)
    for name, mode in modes.items():
        expected = 0o750 if (tmp_path / name).is_dir() else 0o640
        assert mode == expected, (name, oct(mode))


def test_sweep_refuses_a_directory_it_cannot_write_before_any_cell(tmp_path, no_work):
    spec = tmp_path / "spec.toml"
    spec.write_text('name = "s"\nseeds = [0]\n[grid]\nalpha = [0.3, 3.0]\n')
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, needle in ((a_file, "not a directory"), (a_file / "sweep", "is a file"),
                        (f"{UNWRITABLE_FILESYSTEM}/fedmerge-sweep", "cannot write in")):
        result = runner.invoke(app, ["sweep", str(spec), "-q", "--out", str(out)])
        assert result.exit_code == 2
        one_error_line(result, "sweep directory", needle)


@pytest.mark.parametrize("case", ["a directory", "a read-only filesystem", "under a file"])
def test_merge_refuses_an_output_it_cannot_write_before_reading_any_checkpoint(tmp_path, case, monkeypatch):
    import fedmerge.offline as offline

    def no_reading(*args, **kwargs):
        raise AssertionError("a checkpoint was read before the output was checked")

    monkeypatch.setattr(offline, "Checkpoint", no_reading)
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "file").write_text("x")
    out, needle = {"a directory": (tmp_path / "dir.safetensors", "is a directory"),
                   "a read-only filesystem": (f"{UNWRITABLE_FILESYSTEM}/merged.safetensors", "cannot write in"),
                   "under a file": (tmp_path / "file" / "merged.safetensors", "is a file")}[case]
    result = runner.invoke(app, ["merge", "-q", "--base", "b.safetensors", "--models", "m.safetensors",
                                 "--method", "fedavg", "--out", str(out), "--force"])
    assert result.exit_code == 2
    one_error_line(result, str(out), needle)


def test_a_file_size_limit_at_write_time_is_one_line_with_exit_1_and_leaves_nothing(tmp_path):
    """A real failed write (the kernel refuses to grow files past RLIMIT_FSIZE, as a full disk
    refuses any write), not a mocked one: safetensors reports it in its own exception type."""
    import resource
    import subprocess
    import sys

    limit = 16 * 1024  # smaller than the default model's base, larger than the small files

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "FEDMERGE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", "from simulations.cli import main; main()", "run",
                           *fast(str(tmp_path / "cache")), "--out", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, preexec_fn=limited, timeout=600)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "File too large" in errors[0] and "run" in errors[0]
    assert "could not write cache entry" in proc.stderr  # the cache failed first: a warning, not the end
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]  # no staging directory left


def test_a_cache_that_cannot_be_written_costs_only_the_cache(small_config, monkeypatch, caplog):
    import fedmerge.io.state as state
    from simulations.experiment import run_experiment

    def disk_full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(state, "save_verified", disk_full)
    out = run_experiment(small_config.replace(strategies=["fedavg"], seed=11, **{"cache-task-vectors": True}),
                         progress=False)
    assert not out.results["failures"] and sorted(out.task_vectors) == [0, 1, 2, 3]
    assert "could not write cache entry" in caplog.text and "No space left on device" in caplog.text


def test_run_refuses_a_symbolic_link_to_a_directory_before_any_work(tmp_path, cache_dir, no_work):
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    result = runner.invoke(app, ["run", *fast(cache_dir), "--out", str(tmp_path / "link")])
    assert result.exit_code == 2
    one_error_line(result, "is a symbolic link")


@pytest.mark.parametrize("name", ["x/../../../escaped-sweep", "../escaped", "/tmp/escaped"])
def test_a_sweep_name_cannot_leave_the_runs_directory(tmp_path, monkeypatch, no_work, name):
    spec = tmp_path / "spec.toml"
    spec.write_text(f'name = "{name}"\nseeds = [0]\n[grid]\nalpha = [0.3, 3.0]\n')
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["sweep", str(spec), "-q"])
    assert result.exit_code == 2
    one_error_line(result, "name must be a plain name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]


def test_evaluate_refuses_an_output_it_cannot_write_before_any_work(tmp_path, monkeypatch):
    import fedmerge.evaluation.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "evaluate_checkpoints", lambda *a, **k: pytest.fail("evaluated first"))
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["evaluate", "--base", "b", "--tasks", "MNIST", "--models", "m", "--methods", "tsv",
                                 "--out", str(tmp_path / "file" / "table.json")])
    assert result.exit_code == 2
    one_error_line(result, "is a file")
