"""The spectral rules over matrices read in pieces (``merge_rows``, as model directories are merged):
the published whole-matrix algorithms (full SVDs in float64) to rounding, from pieces of rows of a
tall matrix or of columns of a wide one, never a whole matrix read at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.errors import MergeOverflowError
from fedmerge.merging.registry import merge_rows
from fedmerge.merging.spectral.iso import iso_c_matrix, iso_cts_matrix
from fedmerge.merging.spectral.tsv import tsv_compress_matrix, tsv_merge_matrix_reference

REFERENCES = {"tsv": lambda mats, p: tsv_merge_matrix_reference(mats), "tsv_compress": tsv_compress_matrix,
              "iso_c": iso_c_matrix, "iso_cts": iso_cts_matrix}
PIECE_BYTES = 4 * 4 * 40 * 32  # spectral rules read a quarter: 32 rows of a 40-column matrix per client


class Rows(dict):
    """An in-memory task vector with the reads merge_rows uses; it records every piece asked for."""

    def __init__(self, tensors, log=None):
        super().__init__(tensors)
        self.log = [] if log is None else log

    def shape(self, key):
        return tuple(self[key].shape)

    def rows(self, key, start, stop, columns=None):
        self.log.append((key, start, stop, columns))
        piece = self[key][start:stop]
        return piece if columns is None else piece[:, columns[0]:columns[1]]


def merged(method, matrices, weights=None, chunk_bytes=PIECE_BYTES, **options):
    """The merged "w" of task vectors holding ``matrices``, put together from merge_rows' pieces."""
    pieces = [(start, rows) for key, start, rows in merge_rows(method, [Rows({"w": m}) for m in matrices],
                                                                 weights, chunk_bytes=chunk_bytes, **options)]
    assert [start for start, _ in pieces] == list(np.cumsum([0] + [len(r) for _, r in pieces[:-1]]))
    return torch.cat([rows for _, rows in pieces])


def low_rank_tasks(shape, t=4, rank=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(i + 1) * (torch.randn(shape[0], rank, generator=gen, dtype=torch.float64)
                       @ torch.randn(rank, shape[1], generator=gen, dtype=torch.float64)
                       + 0.01 * torch.randn(shape, generator=gen, dtype=torch.float64)) for i in range(t)]


def relative_error(got, expected):
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("shape", [(300, 40), (24, 130), (50, 50)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_streamed_rules_equal_the_whole_matrix_algorithms(method, shape):
    mats = low_rank_tasks(shape)
    weights = [0.4, 0.3, 0.2, 0.1]
    got = merged(method, mats, weights)
    assert got.shape == shape and got.dtype == torch.float64
    assert relative_error(got, REFERENCES[method](mats, weights)) < 1e-8


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_the_pieces_change_the_result_by_rounding_only(method):
    """Gram matrices summed over other pieces add in another order (float64)."""
    mats = low_rank_tasks((300, 40))
    one_piece = merged(method, mats, chunk_bytes=10**9)
    assert relative_error(merged(method, mats, chunk_bytes=4 * 4 * 40 * 7), one_piece) < 1e-9


@pytest.mark.parametrize("shape", [(300, 40), (24, 130)], ids=["tall", "wide"])
def test_no_read_is_more_than_a_piece_and_each_sweep_reads_every_client_once(shape):
    """A tall matrix is read as pieces of rows, a wide one as pieces of its columns (the rows of its
    transpose); TSV-M goes through the inputs three times, after one row read for the dtype (float64
    pieces would take one more sweep, for their magnitude)."""
    log: list = []
    mats = [m.float() for m in low_rank_tasks(shape, t=3)]
    list(merge_rows("tsv", [Rows({"w": m}, log) for m in mats], chunk_bytes=PIECE_BYTES))
    m, n = shape
    tall_width = min(m, n)
    per_piece = PIECE_BYTES // (16 * tall_width)  # a quarter of an elementwise rule's piece
    probe, log = log[:len(mats)], log[len(mats):]
    assert probe == [("w", 0, m, (0, 1)) if m < n else ("w", 0, 1, None)] * len(mats)
    for _, start, stop, columns in log:
        if m >= n:
            assert columns is None and stop - start <= per_piece
        else:
            assert (start, stop) == (0, m) and columns[1] - columns[0] <= per_piece
    height = max(m, n)
    pieces_per_sweep = -(-height // per_piece)
    assert len(log) == 3 * pieces_per_sweep * len(mats)


def test_tsv_of_duplicated_zero_and_low_rank_tasks_is_the_published_one():
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(300, 40, generator=gen, dtype=torch.float64) for _ in range(2))
    rank3 = torch.randn(300, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 40, generator=gen,
                                                                                   dtype=torch.float64)
    for mats in ([a, a, b, b], [a, torch.zeros_like(a), b, rank3], [rank3, 2 * rank3], [a], [a.T, a.T, b.T]):
        assert relative_error(merged("tsv", mats), tsv_merge_matrix_reference(mats)) < 1e-9
    zeros = [torch.zeros(300, 40, dtype=torch.float64)] * 3
    for method in REFERENCES:
        assert torch.equal(merged(method, zeros), zeros[0])


def test_iso_c_of_a_rank_deficient_sum_is_the_partial_isometry_on_its_range():
    """The whole-matrix path completes the zero singular directions arbitrarily (LAPACK's choice); the
    streamed one leaves them out: σ̄ P_r Q_rᵀ, here from numpy's SVD."""
    mats = low_rank_tasks((300, 40), t=2, rank=3)
    mats = [m - 0.01 * torch.randn(m.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            for m in mats]  # exactly rank 3 each: the sum has rank 6 < 40
    mats = [torch.from_numpy(np.linalg.svd(m.numpy(), full_matrices=False)[0][:, :3]
                             @ np.diag([3.0, 2.0, 1.0]) @ np.linalg.svd(m.numpy(), full_matrices=False)[2][:3])
            for m in mats]
    u, s, vh = np.linalg.svd(sum(m.numpy() for m in mats), full_matrices=False)
    rank = int((s > 1e-6 * s[0]).sum())
    assert rank == 6
    expected = s.mean() * u[:, :rank] @ vh[:rank]
    np.testing.assert_allclose(merged("iso_c", mats).numpy(), expected, atol=1e-9 * np.abs(expected).max())


def test_a_result_beyond_float32_is_one_overflow_error_naming_the_tensor():
    big = torch.zeros(300, 40)
    big[:, 0] = 1e38  # finite float32 entries whose four rank-1 projections add up beyond its range
    with pytest.raises(MergeOverflowError, match="tsv_compress: merged tensor 'w' is not finite"):
        merged("tsv_compress", [big, big, big, big])


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_streamed_rules_create_their_tensors_on_their_inputs_device(method):
    """Every tensor made without naming a device lands on ``meta`` here: a streamed rule that made
    one without following its pieces' device (as a merge on the GPU needs) would fail or differ."""
    mats = [m.float() for m in low_rank_tasks((300, 40))] + [low_rank_tasks((24, 130))[0].float()]
    tall, wide = mats[:4], [mats[4]] * 4
    expected = [merged(method, tall), merged(method, wide)]
    with torch.device("meta"):
        got = [merged(method, tall), merged(method, wide)]
    for g, e in zip(got, expected):
        assert g.device.type == "cpu"
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(300, 40), (24, 130), (1, 50), (50, 1)], ids=["tall", "wide", "row", "column"])
def test_iso_cts_with_an_empty_common_space_or_one_task_is_the_published_one(shape):
    """A small common-space fraction leaves no common directions (c = r − sT = 0), as does one task
    of a matrix with one row or column."""
    mats = low_rank_tasks(shape)
    for tasks, fraction in ((mats, 0.0), (mats[:1], 0.8)):
        expected = iso_cts_matrix(tasks, [1 / len(tasks)] * len(tasks), fraction)
        got = merged("iso_cts", tasks, common_space_fraction=fraction)
        assert relative_error(got, expected) < 1e-8, (len(tasks), fraction)


@pytest.mark.parametrize("method", ["tsv", "iso_cts"])
def test_clients_closer_than_the_cut_off_count_as_duplicates_on_both_sides(method):
    """The published algorithm jumps between exact duplicates and clients 1e-7 apart (its polar
    factors keep every direction above rounding); pieces of rows resolve no better than σ ≈ 1e-6 ·
    σ_max, and drop the same directions from the left and the right bases: the duplicates' result."""
    gen = torch.Generator().manual_seed(2)
    a, b, noise = (torch.randn(300, 40, generator=gen, dtype=torch.float64) for _ in range(3))
    close = [a, a + 1e-7 * noise, b, b + 1e-7 * noise]
    duplicates = REFERENCES[method]([a, a, b, b], [0.25] * 4)
    assert relative_error(REFERENCES[method](close, [0.25] * 4), duplicates) > 0.1  # the jump
    assert relative_error(merged(method, close), duplicates) < 1e-5


@pytest.mark.parametrize("scale", [1e200, 1e-170])
@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_float64_values_of_extreme_magnitude_are_merged_at_unit_scale(method, scale):
    """Their squares would leave float64's range (Gram matrices overflow, or underflow to zero)."""
    mats = low_rank_tasks((300, 40))
    expected = REFERENCES[method](mats, [0.25] * 4)
    got = merged(method, [m * scale for m in mats])
    assert torch.isfinite(got).all() and relative_error(got / scale, expected) < 1e-8
