"""Matrices read in pieces of rows: what a rule that merges matrices larger than memory sees.

:func:`~fedmerge.merging.registry.merge_rows` hands a rule that declares a ``streamed`` form (the
spectral rules, :mod:`fedmerge.merging.spectral.streamed`) each 2-D tensor as :class:`TaskMatrices`
and writes what it yields, so neither side holds a whole matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import Tensor

RowPieces = Iterator[tuple[int, Tensor]]
"""Pieces of rows of a merged matrix, in order: (first row, rows)."""


@dataclass(frozen=True)
class TaskMatrices:
    """The T task matrices of one 2-D tensor, seen tall (m ≥ n: a wide tensor is seen transposed),
    read as pieces of rows on demand.

    ``read(start, stop)`` gives rows ``start:stop`` of every task's matrix; :meth:`sweep` goes through
    them ``rows_per_piece`` at a time, and every sweep reads the inputs once more. ``transposed``:
    the tensor is wide and these are its transposes (for a rule that is not symmetric in the two)."""

    shape: tuple[int, int]
    num_tasks: int
    read: Callable[[int, int], Sequence[Tensor]]
    rows_per_piece: int
    transposed: bool = False

    def sweep(self) -> Iterator[tuple[int, list[Tensor]]]:
        """(first row, [each task's rows]) over the whole height."""
        m = self.shape[0]
        for start in range(0, m, self.rows_per_piece):
            yield start, list(self.read(start, min(start + self.rows_per_piece, m)))


StreamedRule = Callable[..., RowPieces]
"""A rule's form over one 2-D tensor's :class:`TaskMatrices`: ``(matrices, p, **options)`` → the
merged matrix (tall view) as pieces of rows. It must be homogeneous of degree 1 (merging c·A gives
c times the result): float64 pieces of extreme magnitude are handed in scaled by a power of two."""
