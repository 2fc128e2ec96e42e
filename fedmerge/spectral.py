"""Spectral merging: methods that work on the singular vectors of per-layer task matrices.

TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025): for each 2-D tensor keep every task's top k = max(1, ⌊min(m,n)/T⌋) singular triplets,
concatenate them, replace the stacked left and right bases by their orthogonal polar factors and
rebuild U⊥ diag(σ) V⊥ᵀ. Other tensors (biases, norms, conv kernels) get the weighted mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedmerge.merging import TaskVectors, linear_combination, register


def polar_factor(x: Tensor) -> Tensor:
    """The orthogonal polar factor P Qᵀ of x = P D Qᵀ: the nearest matrix with orthonormal columns."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def tsv_merge_matrix(matrices: Sequence[Tensor]) -> Tensor:
    """TSV-M for one layer: top k = max(1, ⌊min(m,n)/T⌋) triplets per task, orthogonalised bases."""
    t = len(matrices)
    rows, cols = matrices[0].shape
    k = max(1, min(rows, cols) // t)
    u, s, vh = torch.linalg.svd(torch.stack([m.double() for m in matrices]), full_matrices=False)
    u_cat = u[:, :, :k].permute(1, 0, 2).reshape(rows, t * k)
    s_cat = s[:, :k].reshape(t * k)
    v_cat = vh[:, :k, :].permute(2, 0, 1).reshape(cols, t * k)
    return (polar_factor(u_cat) * s_cat) @ polar_factor(v_cat).T


@register("tsv", natural_scale="sum")
def tsv(task_vectors: TaskVectors, p: Sequence[float]) -> dict[str, Tensor]:
    """TSV-Merge: per 2-D tensor U⊥ diag(σ) V⊥ᵀ of the tasks' top singular triplets; other tensors Σ p_i τ_i."""
    first = task_vectors[0]
    out = linear_combination(task_vectors, p, keys=[k for k, v in first.items() if v.dim() != 2])
    for key, ref in first.items():
        if ref.dim() == 2:
            out[key] = tsv_merge_matrix([tv[key] for tv in task_vectors]).to(ref.dtype)
    return {key: out[key] for key in first}
