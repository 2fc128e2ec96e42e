"""Bad task vectors through the merge API: one MergeError naming the client and tensor, never a
silent non-finite result."""

from __future__ import annotations

import pytest
import torch

from fedmerge import MergeError, merge


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_merge_api_rejects_non_finite_task_vectors_naming_the_client(bad):
    taus = [{"w": torch.ones(3)}, {"w": torch.tensor([1.0, bad, 1.0])}]
    with pytest.raises(MergeError, match="client 1, tensor 'w': contains NaN or Inf"):
        merge("fedavg", taus)


def test_finite_check_is_exact_where_a_sum_would_mislead():
    # +Inf and −Inf cancel to NaN in a sum; finite values may overflow one: neither may fool the check
    with pytest.raises(MergeError, match="contains NaN or Inf"):
        merge("fedavg", [{"w": torch.ones(2)}, {"w": torch.tensor([float("inf"), -float("inf")])}])
    huge = {"w": torch.tensor([3e38, 3e38])}  # finite, but their float32 sum is Inf
    assert torch.equal(merge("median", [huge, huge, huge])["w"], huge["w"])
    big_half = {"w": torch.full((4,), 60000.0, dtype=torch.float16)}  # a float16 sum would overflow; ours is float32
    assert torch.equal(merge("median", [big_half] * 3)["w"], big_half["w"])


@pytest.mark.parametrize("taus,needle", [
    ([], "no task vectors"),
    ([{"w": torch.ones(3)}, {"w": torch.ones(4)}], "shape"),
    ([{"w": torch.ones(3)}, {"v": torch.ones(3)}], "w"),
])
def test_merge_api_rejects_mismatched_task_vectors(taus, needle):
    with pytest.raises(MergeError, match=needle):
        merge("median", taus)


TWO = [{"w": torch.ones(2)}, {"w": torch.full((2,), 3.0)}]


@pytest.mark.parametrize("call,needle", [
    (lambda: merge("fednova", TWO, local_steps=[10**400, 1]), "local_steps[0] (client 0) must be a finite positive"),
    (lambda: merge("fednova", TWO, local_steps=[1, -10**400]), "local_steps[1] (client 1) must be a finite positive"),
    (lambda: merge("fedavg", TWO, weights=[10**400, 1]), "weights[0] (client 0) must be a finite non-negative"),
    (lambda: merge("fednova", TWO, local_steps=["1", 1]), "local_steps[0] (client 0) must be a number, got '1'"),
    (lambda: merge("fednova", TWO, local_steps=[1, True]), "local_steps[1] (client 1) must be a number, got True"),
    (lambda: merge("fedavg", TWO, weights=[False, 1]), "weights[0] (client 0) must be a number, got False"),
    (lambda: merge("fedavg", TWO, weights=[1, b"2"]), "weights[1] (client 1) must be a number, got b'2'"),
])
def test_per_client_values_too_large_for_a_float_or_not_numbers_are_merge_errors_naming_the_option(call, needle):
    with pytest.raises(MergeError) as info:
        call()
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_per_client_integers_within_float_range_are_numbers():
    # integers (Python's, and beyond 2^53) are numbers like any other: p = (1, 3) / 4, K = (2, 2)
    out = merge("fednova", TWO, weights=[1, 3], local_steps=[2, 2])
    assert out["w"].tolist() == [2.5, 2.5]
    big = merge("fedavg", TWO, weights=[2**1000, 2**1000 * 3])
    assert big["w"].tolist() == [2.5, 2.5]
