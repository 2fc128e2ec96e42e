"""``merge_each`` merges one tensor at a time and gives what ``merge`` gives, for every rule,
including those whose result for a tensor depends on the whole task vectors (CCLIP, TIES)."""

from __future__ import annotations

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


def test_merge_each_reads_one_tensor_per_client_at_a_time():
    from collections.abc import Mapping

    live: list[int] = []

    class Counting(Mapping):
        def __init__(self, tensors):
            self.tensors = tensors

        def __getitem__(self, key):
            live.append(key)
            return self.tensors[key]

        def __iter__(self):
            return iter(self.tensors)

        def __len__(self):
            return len(self.tensors)

    taus = task_vectors()
    stream = merge_each("fedavg", [Counting(t) for t in taus])
    key, _ = next(stream)
    assert key == "embed.weight" and set(live) == {"embed.weight"}  # nothing beyond the first tensor read yet
