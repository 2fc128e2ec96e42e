"""Task Arithmetic is one-shot FedAvg: Flower rounds against offline Task Arithmetic, and the lesson's CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedmerge import merge
from simulations import equivalence as eq
from simulations.cli import app


@pytest.mark.parametrize("seed,n,steps,eta", [
    (0, 2, [3, 8], 1.0),
    (3, 3, [4, 9, 2], 2.5),
    (7, 5, "2:12", 0.5),
])
def test_one_shot_fedavg_and_fednova_through_flower_are_task_arithmetic(small_config, seed, n, steps, eta):
    config = small_config.replace(**{"seed": seed, "num-clients": n, "local-steps": steps})
    report = eq.one_shot(config, eta)
    assert report["task_vector_max_abs_diff"] == 0.0  # each client trains exactly as it would alone
    names = [c["name"] for c in report["checks"]]
    assert names == ["FedAvg, uniform p_i", "FedNova, uniform p_i", "FedAvg, p_i ∝ n_i", "FedNova, p_i ∝ n_i"]
    for c in report["checks"]:
        assert c["passed"] and c["max_abs_diff"] <= 1e-6, c
        assert c["flower_accuracy"] == pytest.approx(c["offline_accuracy"], abs=1.5 / 300)
    assert eq.failures({"one_shot": report, "multi_round": {"passed": True}}) == []


def test_fednova_is_task_arithmetic_with_per_client_coefficients(small_config):
    # FedNova (Wang et al., 2020) with plain local SGD: each client's normalised update is its mean
    # step d_i = τ_i / K_i, and the server moves by τ_eff = Σ_j p_j K_j of those, averaged with p_i.
    # Written here in numpy float64 on the flattened τ_i, not with the library's coefficients.
    _, _, updates = eq.fine_tune_alone(small_config)
    taus = [u.task_vector for u in updates]
    steps = np.array([u.local_steps for u in updates], dtype=np.float64)
    sizes = np.array([u.num_examples for u in updates], dtype=np.float64)
    p = sizes / sizes.sum()
    keys = list(taus[0])
    flat = np.stack([np.concatenate([t[k].double().numpy().ravel() for k in keys]) for t in taus])  # (N, d)
    mean_steps = flat / steps[:, None]  # d_i
    expected = (p @ steps) * (p @ mean_steps)  # τ_eff · Σ_i p_i d_i
    nova = merge("fednova", taus, sizes.tolist(), local_steps=steps.astype(int).tolist())
    got = np.concatenate([nova[k].double().numpy().ravel() for k in keys])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    assert (p @ steps) * (p / steps).sum() != pytest.approx(1.0)  # unequal K: not a weighted mean of the τ_i
    # the lesson's per-client coefficients λ_i are the same numbers, and FedAvg's p_i when all K_i are equal
    lam = (p @ steps) * p / steps
    assert eq.fednova_coefficients(p.tolist(), steps.tolist(), 1.0) == pytest.approx(lam.tolist(), rel=1e-12)
    assert eq.fednova_coefficients(p.tolist(), [7] * len(p), 1.0) == pytest.approx(p.tolist(), rel=1e-12)
    np.testing.assert_allclose(lam @ flat, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


def test_multi_round_fedavg_with_one_full_batch_step_is_centralized_gradient_descent(small_config):
    report = eq.multi_round(small_config, rounds=4, local_lr=0.3)
    assert report["passed"] and len(report["per_round"]) == 5
    for r in report["per_round"]:
        assert r["max_abs_diff"] <= 1e-5
        assert r["federated_loss"] == pytest.approx(r["centralized_loss"], abs=1e-5)
    losses = [r["centralized_loss"] for r in report["per_round"]]
    assert losses[-1] < losses[0]  # it is gradient descent: the loss on all clients' data falls


def test_step_heterogeneity_shares(small_config):
    report = eq.step_heterogeneity(small_config, [5, 10, 20, 40], lr=0.02)
    clients = report["clients"]
    implicit = [c["fedavg_implicit_weight"] for c in clients]
    assert implicit == pytest.approx([5 / 75, 10 / 75, 20 / 75, 40 / 75])
    assert all(c["fednova_implicit_weight"] == pytest.approx(0.25) for c in clients)
    assert report["share_ratio"]["fedavg"] > report["share_ratio"]["fednova"]


@pytest.mark.ray
def test_one_shot_equivalence_through_the_ray_engine(small_config):
    report = eq.one_shot(small_config.replace(engine="ray"), 1.0, weightings=("uniform",))
    assert report["engine"] == "ray" and report["task_vector_max_abs_diff"] == 0.0
    assert all(c["passed"] for c in report["checks"]), report["checks"]


runner = CliRunner()


@pytest.fixture
def fast_lesson(monkeypatch, cache_dir):
    monkeypatch.setattr(eq, "ALPHAS", (1.0,))
    monkeypatch.setattr(eq, "ROUNDS", 2)
    monkeypatch.setattr(eq, "STEP_RANGE", (5, 20))
    return ["--set", "num-clients=3", "--set", "pretrain-steps=20", "--set", "local-steps=[5, 10, 15]",
            "--set", f"cache-dir='{cache_dir}'", "-q"]


@pytest.mark.slow  # the whole lesson, with figures
def test_cli_prints_the_lesson_and_writes_numbers_and_figures(tmp_path, fast_lesson):
    out = tmp_path / "lesson"
    result = runner.invoke(app, ["equivalence", *fast_lesson, "--seed", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "One-shot FedAvg" in result.output and "η/N" in result.output and "max |Δw|" in result.output
    assert {p.name for p in out.iterdir()} == {"equivalence.json", "step-heterogeneity.png", "data-heterogeneity.png"}
    report = json.loads((out / "equivalence.json").read_text())
    assert report["failures"] == [] and report["config"]["seed"] == 2
    assert all(c["passed"] for c in report["one_shot"]["checks"]) and report["multi_round"]["passed"]


@pytest.mark.slow  # the whole lesson
def test_cli_exits_non_zero_when_an_equivalence_is_violated(tmp_path, fast_lesson, monkeypatch):
    def perturbed(*args, **kwargs):  # the offline client 0 drifts by 1e-4 on one weight
        update = real(*args, **kwargs)
        if args[2].partition_id == 0:
            first = next(iter(update.task_vector))
            bumped = update.task_vector[first].clone()
            bumped.view(-1)[0] += 1e-4
            drifted = eq.TaskVector({**update.task_vector, first: bumped})
            update = type(update)(**{**update.__dict__, "task_vector": drifted})
        return update

    real = eq.local_update
    monkeypatch.setattr(eq, "local_update", perturbed)
    out = tmp_path / "lesson"
    result = runner.invoke(app, ["equivalence", *fast_lesson, "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "equivalence violated" in result.output and "FedAvg, uniform p_i" in result.output
    assert "Traceback" not in result.output
    assert (out / "equivalence.json").is_file()  # the numbers that show the violation are kept


def test_cli_bad_engine_is_one_clear_line(tmp_path, fast_lesson):
    result = runner.invoke(app, ["equivalence", *fast_lesson, "--engine", "spark", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "engine='spark'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()
