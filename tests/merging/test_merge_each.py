"""``merge_each`` merges one tensor at a time and gives what ``merge`` gives, for every rule,
including those whose result for a tensor depends on the whole task vectors (CCLIP, TIES)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from fedmerge import METHODS, merge
from fedmerge.merging import merge_each

SPECTRAL = {"tsv", "tsv_compress", "iso_c", "iso_cts"}


def task_vectors(n: int = 4) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    shapes = {"embed.weight": (50, 16), "layer.0.weight": (16, 16), "layer.0.bias": (16,),
              "layer.1.weight": (16, 16), "head.weight": (10, 16), "scale": ()}
    # clients of unequal size, so that CCLIP clips some and TIES's thresholds differ per client
    return [{k: (i + 1) * torch.randn(s, generator=gen) for k, s in shapes.items()} for i in range(n)]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merge_each_gives_what_merge_gives(method):
    taus = task_vectors()
    options = {"local_steps": [1.0, 2.0, 3.0, 5.0]} if method == "fednova" else {}
    weights = [0.4, 0.3, 0.2, 0.1]
    expected = merge(method, taus, weights, **options)
    got = dict(merge_each(method, taus, weights, **options))
    assert list(got) == list(taus[0])  # in the task vectors' order
    for key in expected:
        if method in SPECTRAL:  # same algorithm, batched over same-shape layers or not
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_ties_and_cclip_use_statistics_of_the_whole_task_vectors():
    """Merged tensor by tensor without them, both would give other results: the test above is not
    passing because the statistics make no difference."""
    taus = task_vectors()
    for method, options in (("ties", {"k": 0.2}), ("cclip", {})):
        per_tensor = {key: merge(method, [{key: tv[key]} for tv in taus], **options)[key] for key in taus[0]}
        whole = merge(method, taus, **options)
        assert any(not torch.equal(per_tensor[k], whole[k]) for k in whole), method


class Counting(Mapping):
    """A task vector that counts its reads, as a lazy one computes each read from disk."""

    def __init__(self, tensors, reads):
        self.tensors, self.reads = tensors, reads

    def __getitem__(self, key):
        self.reads.append(key)
        return self.tensors[key]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


@pytest.mark.parametrize("method,passes", [("fedavg", 1), ("median", 1), ("tsv", 1), ("cclip", 2), ("ties", 3)])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_merge_each_reads_each_clients_tensor_once_per_pass_and_only_as_it_goes(method, passes, device):
    """Whole-vector statistics cost their passes (CCLIP's norms one, TIES's thresholds two); the merge
    itself reads each client's tensor once, and nothing of the next name before it yields."""
    taus = task_vectors()
    reads: list[list[str]] = [[] for _ in taus]
    stream = merge_each(method, [Counting(t, r) for t, r in zip(taus, reads)], device=device)
    key, _ = next(stream)
    names = list(taus[0])
    before = [list(r) for r in reads]
    for r in before:  # statistics read everything; the merge so far only the first name
        assert r[(passes - 1) * len(names):] == [names[0]]
    for _ in stream:
        pass
    for r in reads:
        assert sorted(r) == sorted(names * passes)


class Rows(dict):
    """An in-memory task vector with the row reads merge_rows uses."""

    def shape(self, key):
        return tuple(self[key].shape)

    def rows(self, key, start, stop):
        return self[key][start:stop]


def row_task_vectors(n: int = 3) -> list[Rows]:
    gen = torch.Generator().manual_seed(5)
    shapes = {"big": (1000, 256), "odd": (37, 300), "bias": (300,), "scale": ()}
    return [Rows({k: (i + 1) * torch.randn(s, generator=gen) for k, s in shapes.items()}) for i in range(n)]


def test_norms_over_pieces_of_rows_are_the_norms_of_whole_tensors_to_the_bit():
    from fedmerge.merging.registry import _RowPieces, piece_rows
    from fedmerge.task_vector import l2_norm

    tv = row_task_vectors(1)[0]
    chunk = 4 * 256 * 256  # pieces of 256 rows of "big": four pieces
    assert piece_rows((1000, 256), chunk) == 256 and len([k for k in _RowPieces(tv, chunk) if "big" in k]) == 4
    assert l2_norm(_RowPieces(tv, chunk)) == l2_norm(tv)


@pytest.mark.parametrize("method", sorted(m for m, e in METHODS.items() if e.elementwise))
def test_merge_rows_in_small_pieces_gives_what_merge_gives(method):
    from fedmerge.merging.registry import merge_rows

    taus = row_task_vectors()
    options = {"local_steps": [1.0, 2.0, 3.0]} if method == "fednova" else {}
    expected = merge(method, taus, [0.5, 0.3, 0.2], **options)
    got: dict[str, list[torch.Tensor]] = {}
    for key, start, piece in merge_rows(method, taus, [0.5, 0.3, 0.2], chunk_bytes=4 * 256 * 100, **options):
        assert start == sum(len(p) for p in got.get(key, [])) if piece.dim() else start == 0
        got.setdefault(key, []).append(piece)
    assert len(got["big"]) > 1
    for key, value in expected.items():
        whole = torch.cat(got[key]) if value.dim() else got[key][0]
        torch.testing.assert_close(whole, value, rtol=0, atol=0)
