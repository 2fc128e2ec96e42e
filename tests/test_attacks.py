"""Byzantine clients: which clients attack (seeded) and what each attack does to a task vector."""

from __future__ import annotations

import math

import pytest
import torch

from fedmerge.attacks import AttackSpec, attack, byzantine_clients
from fedmerge.errors import ConfigError
from fedmerge.task_vector import TaskVector


def test_byzantine_clients_are_a_seeded_ceiling_fraction():
    assert byzantine_clients(8, 0.0, 0) == []
    assert len(byzantine_clients(8, 0.25, 0)) == 2 and len(byzantine_clients(8, 0.26, 0)) == 3
    assert len(byzantine_clients(3, 0.1, 0)) == 1
    assert byzantine_clients(8, 0.5, 1) == byzantine_clients(8, 0.5, 1)
    assert len({tuple(byzantine_clients(8, 0.25, s)) for s in range(10)}) > 1
    for bad in (1.0, -0.1, float("nan"), "0.5", True):
        with pytest.raises(ConfigError, match="byzantine-fraction must (lie in|be a finite number|be a number)"):
            byzantine_clients(8, bad, 0)


def test_attacks():
    tau = {"w": torch.randn(20, 30), "b": torch.randn(30)}
    before = {k: v.clone() for k, v in tau.items()}
    norm = TaskVector(tau).norm()
    assert all(torch.equal(attack("sign-flip", tau)[k], -tau[k]) for k in tau)
    assert all(torch.equal(attack("scale", tau, scale=-3.0)[k], -3.0 * tau[k]) for k in tau)
    noisy = attack("gaussian", tau, std=2.0, seed=1)
    diffs = torch.cat([(noisy[k] - tau[k]).flatten() for k in tau])
    assert diffs.std().item() == pytest.approx(2.0, rel=0.1)
    assert all(torch.equal(noisy[k], attack("gaussian", tau, std=2.0, seed=1)[k]) for k in tau)
    rnd = attack("random", tau, seed=2)
    assert TaskVector(rnd).norm() == pytest.approx(norm, rel=1e-5)
    cos = torch.dot(TaskVector(rnd).flatten(), TaskVector(tau).flatten()) / norm**2
    assert abs(cos.item()) < 0.2  # unrelated to the honest direction
    assert all(torch.equal(tau[k], before[k]) for k in tau)  # inputs untouched
    assert all(v.dtype == tau[k].dtype for mode in ("gaussian", "random") for k, v in attack(mode, tau).items())
    with pytest.raises(ConfigError, match="byzantine-mode='flip' is not known"):
        attack("flip", tau)
    with pytest.raises(ConfigError, match="byzantine-scale must be a finite number"):
        attack("scale", tau, scale=math.inf)


@pytest.mark.parametrize("spec,message", [
    ({"scale": 1e308}, "byzantine-scale must lie in [-1000000, 1000000], got 1e+308"),
    ({"scale": -1e7}, "byzantine-scale must lie in [-1000000, 1000000], got -10000000.0"),
    ({"std": -1.0}, "byzantine-std must lie in [0, 1000000], got -1.0"),
    ({"std": 1e308}, "byzantine-std must lie in [0, 1000000], got 1e+308"),
])
def test_attack_parameters_are_checked_by_the_library_spec(spec, message):
    """The ranges a run refuses are refused by AttackSpec and attack() themselves, in the same words."""
    with pytest.raises(ConfigError) as info:
        AttackSpec(**spec)
    assert str(info.value) == message
    with pytest.raises(ConfigError) as info:
        attack("scale" if "scale" in spec else "gaussian", {"w": torch.ones(3)}, **spec)
    assert str(info.value) == message
    assert AttackSpec(scale=-1e6, std=1e6).to_config() == {"fraction": 0.0, "mode": "sign-flip", "scale": -1e6,
                                                          "std": 1e6}
