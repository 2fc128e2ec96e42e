"""Spectral merging rules: they work on the singular vectors of per-layer task matrices."""

from fedmerge.merging.spectral.iso import iso_c, iso_cts
from fedmerge.merging.spectral.linalg import polar_factor, top_singular_triplets
from fedmerge.merging.spectral.tsv import (
    CompressionReport, interference, singular_task_interference, tsv, tsv_compress, tsv_compress_storage,
    tsv_merge_matrix, tsv_merge_matrix_reference,
)

__all__ = [
    "CompressionReport", "interference", "iso_c", "iso_cts", "polar_factor", "singular_task_interference",
    "top_singular_triplets", "tsv", "tsv_compress", "tsv_compress_storage", "tsv_merge_matrix",
    "tsv_merge_matrix_reference",
]
