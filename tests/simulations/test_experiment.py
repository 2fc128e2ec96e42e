"""End to end: the in-process and Ray engines, the FedAvg = Task Arithmetic equivalence, results."""

from __future__ import annotations

import json

import pytest
import torch

from fedmerge import apply, merge
from fedmerge.data import load_federated
from fedmerge.train.local import local_update
from fedmerge.train import pretrained_base
from simulations.config import load_config
from simulations.experiment import run_experiment


def individually_fine_tuned(config):
    """Each client's τ_i computed without Flower: the definition that the round must reproduce."""
    data = load_federated(config.data_spec())
    base, _ = pretrained_base(config.pretrain, config.model, config.seed, data, config.cache_path())
    updates = [local_update(config.model, base, data.clients[i], plan, config.seed, data.input_shape,
                            data.num_classes) for i, plan in enumerate(config.client_plans())]
    return base, updates


def test_inprocess_run_reports_every_measure(small_config):
    out = run_experiment(small_config, progress=False)
    r = out.results
    assert set(r["strategies"]) == set(small_config.strategies)
    assert [c["local_steps"] for c in r["clients"]] == [5, 10, 15, 20]
    for c in r["clients"]:
        assert 0 <= c["accuracy"] <= 1 and c["accuracy"] == pytest.approx(c["reported_accuracy"])
        assert c["num_examples"] > 0 and c["task_vector_norm"] > 0
    for s in r["strategies"].values():
        assert 0 <= s["accuracy"] <= 1 and 0 <= s["client_accuracy"] <= 1 and s["normalized_accuracy"] > 0
        assert len(s["client_accuracies"]) == small_config.num_clients
    assert 0 <= r["base"]["accuracy"] <= 1 and r["failures"] == []
    assert {"pretrain", "clients", "merging", "evaluation", "total"} <= set(r["timing"])
    # the in-process engine runs clients one after another, so their own seconds fit in its client phase
    assert all(c["train_seconds"] > 0 for c in r["clients"])
    assert sum(c["train_seconds"] for c in r["clients"]) <= r["timing"]["clients"]


@pytest.mark.parametrize("seed,n,steps", [(0, 3, [4, 9, 2]), (5, 5, [7, 7, 7, 7, 7])])
def test_one_shot_fedavg_through_flower_is_task_arithmetic_on_individual_task_vectors(small_config, seed, n, steps):
    config = small_config.replace(**{"seed": seed, "num-clients": n, "local-steps": steps,
                                     "strategies": ["fedavg", "task_arithmetic", "fednova"]})
    out = run_experiment(config, progress=False)
    base, updates = individually_fine_tuned(config)
    taus = [u.task_vector for u in updates]
    weights = [u.num_examples for u in updates]
    for i, tau in enumerate(taus):  # clients trained exactly as they would alone
        assert all(torch.equal(tau[k], out.task_vectors[i][k]) for k in tau)
    p = [w / sum(weights) for w in weights]
    expected = {k: sum(pi * t[k] for pi, t in zip(p, taus)) for k in taus[0]}
    for k in expected:
        torch.testing.assert_close(out.merged["fedavg"][k], expected[k], atol=1e-6, rtol=0)
    # FedNova through Flower: (Σ_j p_j K_j) Σ_i p_i τ_i / K_i with the steps each client trained
    tau_eff = sum(pi * k for pi, k in zip(p, steps))
    nova = {k: sum(tau_eff * pi / ki * t[k] for pi, ki, t in zip(p, steps, taus)) for k in taus[0]}
    for k in nova:
        torch.testing.assert_close(out.merged["fednova"][k], nova[k], atol=1e-6, rtol=0)
    # θ0 + (1/N) Σ τ_i (Task Arithmetic, λ = η/N) is one-shot FedAvg with uniform p and η = 1
    ta = apply(base, out.merged["task_arithmetic"], 1.0 / n)
    uniform = apply(base, merge("fedavg", taus), 1.0)
    for k in ta:
        torch.testing.assert_close(ta[k], uniform[k], atol=1e-6, rtol=0)


def test_results_directory_repeats_the_run(small_config, tmp_path):
    out = tmp_path / "run"
    first = run_experiment(small_config, out, progress=False)
    assert {p.name for p in out.iterdir()} == {"results.json", "results.csv", "config.toml", "base.safetensors",
                                               "merged"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"] == small_config.to_dict()
    again = run_experiment(load_config(out / "config.toml"), progress=False)
    for m, merged in first.merged.items():
        assert all(torch.equal(merged[k], again.merged[m][k]) for k in merged)
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0] == "row,scale,accuracy,client_accuracy,normalized_accuracy" and len(rows) == 3 + 5


@pytest.mark.slow  # the 8-client default preset
def test_default_preset_merges_beat_the_base(cache_dir):
    config = load_config(None, ["engine=inprocess", f"cache-dir={cache_dir!r}".replace("'", '"')])
    r = run_experiment(config, progress=False).results
    best = max(s["accuracy"] for s in r["strategies"].values())
    assert best > r["base"]["accuracy"] + 0.05


@pytest.mark.ray
def test_ray_engine_gives_the_same_merged_weights(small_config):
    inproc = run_experiment(small_config, progress=False)
    ray = run_experiment(small_config.replace(engine="ray"), progress=False)
    assert ray.results["timing"]["engine"] == "ray"
    for m, merged in inproc.merged.items():
        for k in merged:
            assert torch.equal(merged[k], ray.merged[m][k]), (m, k)
