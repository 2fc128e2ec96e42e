"""One-shot merging rules: one verb, one registry.

``merge(method, task_vectors, weights=None, *, device=None, **options)`` returns the merged task
vector τ_merged (not yet scaled by λ, not yet added to θ0; use :func:`fedmerge.apply`), computed on
the task vectors' device or on ``device`` ("auto": the GPU when there is one). ``METHODS`` holds one
:class:`MergeMethod` per rule, with its options, natural scale, citation and formula; ``fedmerge
methods`` prints them and the README's table is generated from them.

Modules by family: ``linear`` (Task Arithmetic, FedAvg, FedNova, FedGMA, CCLIP), ``order`` (median,
trimmed mean), ``ties``, ``spectral`` (TSV-Merge, TSV-Compress, Iso-C, Iso-CTS). Every rule
validates its inputs up front and raises :class:`~fedmerge.errors.MergeError` naming the client and
tensor at fault. Inputs are never mutated; each output tensor keeps its input dtype (half precision
is computed in float32, SVDs in float64).
"""

from fedmerge.merging import linear, order, spectral, ties  # noqa: F401  (each registers its rules)
from fedmerge.merging.linear import linear_combination
from fedmerge.merging.registry import (
    MERGE_DEVICES, METHODS, MergeMethod, Option, WholeVectorStatistics, merge, merge_device, merge_each,
    method_from_function, rule,
)
from fedmerge.merging.validation import (
    TaskVectors, normalised_weights, validate_task_vector, validate_task_vectors,
)

__all__ = [
    "MERGE_DEVICES", "METHODS", "MergeMethod", "Option", "TaskVectors", "WholeVectorStatistics", "linear_combination",
    "merge", "merge_device", "merge_each", "method_from_function", "normalised_weights", "rule",
    "validate_task_vector", "validate_task_vectors",
]
