"""Heterogeneity measures on hand-made inputs."""

from __future__ import annotations

import pytest
import torch

from fedmerge.data import DataSpec, load_federated
from fedmerge.evaluation.measures import cosine_matrix, data_measures, label_skew, task_vector_measures, total_variation


def test_total_variation_and_label_skew_by_hand():
    assert total_variation([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert label_skew([[1, 0], [0, 1]], [0.5, 0.5]) == pytest.approx(0.5)
    assert label_skew([[0.5, 0.5]] * 3, [0.5, 0.5]) == 0


def test_label_skew_orders_partitions():
    iid = data_measures(load_federated(DataSpec(num_clients=5, partition="iid")))
    skewed = data_measures(load_federated(DataSpec(num_clients=5, partition="dirichlet", alpha=0.05)))
    assert iid["label_skew"] < 0.15 < skewed["label_skew"]
    assert all(sum(d) == pytest.approx(1) for d in skewed["label_distributions"])


def test_cosine_matrix_by_hand():
    a = {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}
    c = {"w": torch.tensor([-2.0, 0.0]), "b": torch.tensor([0.0])}
    cos = cosine_matrix([a, b, c])
    assert cos[0][1] == pytest.approx(2 ** -0.5) and cos[0][2] == pytest.approx(-1) and cos[1][1] == pytest.approx(1)


def test_orthogonal_task_matrices_have_zero_interference_and_collinear_do_not():
    e = torch.eye(4)
    ortho = [{"w": torch.outer(e[i], e[i]) * (i + 1)} for i in range(4)]
    m = task_vector_measures(ortho)
    assert m["interference_total"] == pytest.approx(0, abs=1e-9)
    assert m["mean_cosine"] == pytest.approx(0)
    same = [{"w": torch.outer(e[0], e[1]) * s} for s in (1.0, 2.0)]
    assert task_vector_measures(same)["interference_total"] > 1


def test_norm_spread():
    m = task_vector_measures([{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.0, 1.0])}])
    assert m["norms"] == pytest.approx([5, 1]) and m["norm_mean"] == pytest.approx(3)
    assert m["norm_cv"] == pytest.approx(2 / 3)


def test_measures_do_not_depend_on_the_order_of_tensor_names():
    """A cached task vector comes back with its names sorted (safetensors), a trained one in the
    model's order: the sweep's CSV must read the same to the last digit either way."""
    g = torch.Generator().manual_seed(3)
    names = [f"layer{i}.weight" for i in range(12)][::-1]  # not in sorted order
    tvs = [{k: torch.randn(17, 13, generator=g) * 10 ** (i % 5) for i, k in enumerate(names)} for _ in range(3)]
    reordered = [{k: tv[k] for k in sorted(tv)} for tv in tvs]
    a, b = task_vector_measures(tvs), task_vector_measures(reordered)
    for key in ("norms", "norm_cv", "mean_cosine", "interference_total"):
        assert a[key] == b[key], key
