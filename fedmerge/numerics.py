"""Scaling by powers of two: the one way fedmerge keeps sums, norms and products inside the float range.

Multiplying by 2^k changes only the exponent of a float, so it is exact as long as the result stays
within the dtype's range. Code that would overflow (or underflow) computes with values scaled by
2^-e, where 2^e is the power of two just above the largest magnitude (:func:`unit_exponent`), and
scales the result back by 2^e.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def largest_magnitude(values: Iterable[float | Tensor]) -> float:
    """max |v| over numbers and over every entry of tensors (tensors without entries are skipped);
    0.0 when there is nothing."""
    largest = 0.0
    for v in values:
        if torch.is_tensor(v):
            if v.numel():
                largest = max(largest, float(v.detach().abs().max()))
        else:
            largest = max(largest, abs(float(v)))
    return largest


def unit_exponent(values: Iterable[float | Tensor]) -> int:
    """The e with 2^(e-1) ≤ max |v| < 2^e (0 when every value is 0): 2^-e · v then lies in (-1, 1)
    for every v, and the largest magnitude in [0.5, 1)."""
    return math.frexp(largest_magnitude(values))[1]


_UNSCALED_WITHIN = 32  # layers whose largest |entry| lies in [2^-32, 2^32] are merged as they are


def balancing_exponent(tensors: Iterable[float | Tensor]) -> int:
    """The e by which a layer, whose tasks' tensors (or their largest magnitudes) are ``tensors``,
    is scaled, as 2^-e, before a rule that is homogeneous (merge(c·Δ) = c·merge(Δ)) merges it, and
    its result scaled back by 2^e.

    0 within [2^-32, 2^32], where singular values, their squares and Gram matrices stay well inside
    float32's range, so ordinary task vectors are merged exactly as they are; elsewhere the power of
    two that brings the largest entry to [0.5, 1). Powers of two scale without rounding, so a result
    is non-finite only where the merged values themselves leave the dtype's range.
    """
    largest = largest_magnitude(tensors)
    if largest == 0 or 2.0**-_UNSCALED_WITHIN <= largest <= 2.0**_UNSCALED_WITHIN:
        return 0
    return unit_exponent([largest])


def scaled_to_unit(values: Sequence[float]) -> list[float]:
    """``values`` · 2^-e with e = :func:`unit_exponent` of them: exact, and the largest magnitude in
    [0.5, 1), so that sums and ratios neither overflow nor underflow."""
    exponent = unit_exponent(values)
    return [math.ldexp(v, -exponent) for v in values]


def times_power_of_two(x: Tensor, exponent: int) -> Tensor:
    """x · 2^exponent: exact unless it leaves x's range, multiplied in steps whose factors x's dtype holds."""
    limit = math.frexp(torch.finfo(x.dtype).max)[1] - 2  # 126 for float32, 1022 for float64
    while exponent:
        step = max(-limit, min(limit, exponent))
        x = x * 2.0**step
        exponent -= step
    return x
