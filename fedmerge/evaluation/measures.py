"""Measures of heterogeneity: of the clients' data, of their task vectors, of their training.

* Data: each client's label distribution and the label skew, the mean total-variation distance
  ½‖q_i − q‖₁ between a client's label distribution q_i and the pool's q (0 for IID, → 1 when every
  client holds one class of many).
* Task vectors: norms and their spread (coefficient of variation), the pairwise cosine similarity
  matrix, and the Singular Task Interference of the TSV paper per layer and in total.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fedmerge.data.federated import FederatedData
from fedmerge.merging.spectral.tsv import interference
from fedmerge.task_vector import l2_norm


def label_distributions(data: FederatedData) -> list[list[float]]:
    """q_i: the fraction of each label among client i's examples (train, validation and test)."""
    out = []
    for c in data.clients:
        counts = torch.tensor(c.train.label_counts(data.num_classes), dtype=torch.float64)
        counts += torch.tensor(c.val.label_counts(data.num_classes), dtype=torch.float64)
        counts += torch.tensor(c.test.label_counts(data.num_classes), dtype=torch.float64)
        out.append((counts / counts.sum()).tolist())
    return out


def total_variation(p: Sequence[float], q: Sequence[float]) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def label_skew(distributions: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Mean total-variation distance of the clients' label distributions to ``reference``."""
    return sum(total_variation(d, reference) for d in distributions) / len(distributions)


def data_measures(data: FederatedData) -> dict[str, Any]:
    pool = torch.tensor(data.pool_label_counts, dtype=torch.float64)
    reference = (pool / pool.sum()).tolist()
    dists = label_distributions(data)
    return {
        "label_distributions": dists,
        "pool_label_distribution": reference,
        "label_skew": label_skew(dists, reference),
        "client_sizes": [len(c.train) + len(c.val) + len(c.test) for c in data.clients],
    }


def cosine_matrix(task_vectors: Sequence[Mapping[str, Tensor]]) -> list[list[float]]:
    """cos(τ_i, τ_j) over all entries, accumulated tensor by tensor in float64."""
    n = len(task_vectors)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for key in task_vectors[0]:
        flat = torch.stack([tv[key].reshape(-1).double() for tv in task_vectors])
        gram += flat @ flat.T
    norms = gram.diagonal().sqrt().clamp_min(1e-300)
    return (gram / norms[:, None] / norms[None, :]).tolist()


def task_vector_measures(task_vectors: Sequence[Mapping[str, Tensor]]) -> dict[str, Any]:
    """Norms, cosines and interference of the task vectors, taken over their tensors in name order:
    the same numbers to the last digit whether the task vectors come from training (the model's
    order) or from a cache file (safetensors sorts names)."""
    task_vectors = [{key: tv[key] for key in sorted(tv)} for tv in task_vectors]
    norms = [l2_norm(tv) for tv in task_vectors]
    mean = sum(norms) / len(norms)
    std = math.sqrt(sum((x - mean) ** 2 for x in norms) / len(norms))
    cos = cosine_matrix(task_vectors)
    n = len(task_vectors)
    off_diagonal = [cos[i][j] for i in range(n) for j in range(n) if i != j]
    per_layer, total = interference(task_vectors)
    return {
        "norms": norms,
        "norm_mean": mean,
        "norm_cv": std / mean if mean > 0 else 0.0,
        "cosine": cos,
        "mean_cosine": sum(off_diagonal) / len(off_diagonal) if off_diagonal else 1.0,
        "interference": per_layer,
        "interference_total": total,
    }
