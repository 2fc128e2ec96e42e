"""Task vectors: fine-tuned weights minus pre-trained weights, with arithmetic that reads like math.

A task vector holds only the floating-point tensors of a ``state_dict``. Integer buffers (BatchNorm's
``num_batches_tracked``) stay with the base model and are never merged. Following
``mlfoundations/task_vectors``, ``TaskVector`` supports ``+``, ``-``, negation and scalar ``*``, and
``apply_to(base, scale)`` gives θ0 + scale · τ.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from fedmerge.errors import MergeError, MergeOverflowError
from fedmerge.io.state import all_finite, load_state, save_state
from fedmerge.numerics import times_power_of_two, unit_exponent

StateDict = Mapping[str, Tensor]


def floating_items(state: StateDict) -> dict[str, Tensor]:
    """The floating-point tensors of a state dict: the part that task vectors and merging touch."""
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision tensors are combined in float32 and written back in their own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def require_finite(t: Tensor, what: str, remedy: str) -> None:
    """A ``MergeOverflowError`` unless every entry of the result ``t`` is finite.

    Merging and :func:`apply` receive finite values only, so a non-finite result means its values
    left the range of its dtype; the message says which dtype, and ``remedy`` what to do about it.
    """
    if not all_finite(t):
        name = str(t.dtype).removeprefix("torch.")
        raise MergeOverflowError(f"{what} is not finite: its values exceed the range of {name} "
                                 f"(±{torch.finfo(t.dtype).max:.4g}); {remedy}")


class TaskVector(Mapping[str, Tensor]):
    """An immutable mapping from parameter name to the difference θ_i − θ0 for that parameter."""

    __slots__ = ("_tensors",)

    def __init__(self, tensors: Mapping[str, Tensor]):
        bad = [k for k, v in tensors.items() if not (torch.is_tensor(v) and v.is_floating_point())]
        if bad:
            raise MergeError(f"task vector entry {bad[0]!r} is not a floating-point tensor")
        self._tensors = dict(tensors)

    @classmethod
    def between(cls, base: StateDict, finetuned: StateDict) -> TaskVector:
        """τ = finetuned − base over the floating-point tensors of ``base``."""
        base_f = floating_items(base)
        missing = sorted(set(base_f) - set(finetuned))
        if missing:
            raise MergeError(f"fine-tuned weights lack tensor {missing[0]!r} of the base model")
        out = {}
        for k, b in base_f.items():
            f = finetuned[k]
            if f.shape != b.shape:
                raise MergeError(f"tensor {k!r}: fine-tuned shape {tuple(f.shape)} != base {tuple(b.shape)}")
            dt = compute_dtype(b.dtype)
            out[k] = (f.detach().to(dt) - b.detach().to(dt)).to(b.dtype)
        return cls(out)

    # Mapping protocol -------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"TaskVector({len(self)} tensors, {self.numel()} values, norm={self.norm():.4g})"

    # Arithmetic -------------------------------------------------------------------------------
    def _zip(self, other: Mapping[str, Tensor], op) -> TaskVector:
        if set(other) != set(self._tensors):
            raise MergeError("task vectors have different tensor names")
        return TaskVector({k: op(v, other[k]) for k, v in self._tensors.items()})

    def __add__(self, other: Mapping[str, Tensor]) -> TaskVector:
        return self._zip(other, torch.add)

    def __radd__(self, other):  # lets sum([tv1, tv2]) work
        return self if other == 0 else self.__add__(other)

    def __sub__(self, other: Mapping[str, Tensor]) -> TaskVector:
        return self._zip(other, torch.sub)

    def __neg__(self) -> TaskVector:
        return TaskVector({k: -v for k, v in self._tensors.items()})

    def __mul__(self, scalar: float) -> TaskVector:
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return TaskVector({k: v * scalar for k, v in self._tensors.items()})

    __rmul__ = __mul__

    # Measures ---------------------------------------------------------------------------------
    def numel(self) -> int:
        return sum(v.numel() for v in self._tensors.values())

    def norm(self) -> float:
        """L2 norm over every entry of every tensor (float64 accumulation)."""
        return l2_norm(self._tensors)

    def flatten(self) -> Tensor:
        """All entries as one 1-D float tensor, in key order."""
        return torch.cat([v.reshape(-1).float() for v in self._tensors.values()])

    def apply_to(self, base: StateDict, scale: float = 1.0) -> dict[str, Tensor]:
        """θ0 + scale · τ; see :func:`apply`."""
        return apply(base, self, scale)

    # Files ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        save_state(self._tensors, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskVector:
        return cls(floating_items(load_state(path)))


NORM_CHUNK = 1 << 16  # entries per float64 dot product in l2_norm: 512 KB, stays in cache


def l2_norm(tensors: Mapping[str, Tensor]) -> float:
    """‖τ‖₂ over every entry of every tensor, accumulated in float64: the one norm of a task vector.

    Dot products of float64 copies of 64k-entry chunks: float64 accuracy and range at a fraction
    of the cost of squaring float64 copies (measurements: ``docs/performance.md``).
    Where the squares leave float64's range (entries beyond ~1e154 or all below ~1e-154), the entries
    are scaled by the power of two just above the largest |entry| first and the norm scaled back;
    ``inf`` only for a norm beyond float64's range.
    """
    total = _sum_of_squares(tensors, 0)
    if total == 0 or math.isinf(total):
        exponent = unit_exponent(tensors.values())
        if exponent:
            try:
                return math.ldexp(math.sqrt(_sum_of_squares(tensors, -exponent)), exponent)
            except OverflowError:  # the norm itself lies beyond float64's range
                return math.inf
    return math.sqrt(total)


def _sum_of_squares(tensors: Mapping[str, Tensor], exponent: int) -> float:
    """Σ (2^exponent · entry)² over every entry, in float64."""
    total = 0.0
    for t in tensors.values():
        for chunk in t.detach().reshape(-1).split(NORM_CHUNK):
            chunk = chunk.double()
            chunk = times_power_of_two(chunk, exponent)
            total += float(torch.dot(chunk, chunk))
    return total


def apply(base: StateDict, merged: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """θ0 + scale · merged, as a new state dict; tensors absent from ``merged`` are copied from base.

    Computed in the compute dtype, and in float64 (scaled by powers of two where float64's range
    does not suffice) for the entries where scale · merged leaves that range. A tensor whose result
    leaves its own dtype's range is a ``MergeOverflowError`` naming it and the scale."""
    if not math.isfinite(scale):
        raise MergeError(f"scale must be finite, got {scale}")
    unknown = sorted(set(merged) - set(base))
    if unknown:
        raise MergeError(f"merged tensor {unknown[0]!r} is not in the base model")
    out: dict[str, Tensor] = {}
    for k, b in base.items():
        if k in merged:
            m = merged[k]
            if m.shape != b.shape:
                raise MergeError(f"tensor {k!r}: merged shape {tuple(m.shape)} != base {tuple(b.shape)}")
            dt = compute_dtype(b.dtype)
            if abs(scale) <= torch.finfo(dt).max:
                t = b.to(dt) + scale * m.to(dt)
                if not all_finite(t):  # λ·τ may leave the range where θ0 + λ·τ does not
                    t = torch.where(t.isfinite(), t, _wide_axpy(b, m, scale).to(dt))
            else:
                t = _wide_axpy(b, m, scale)
            out[k] = t.to(b.dtype)
            require_finite(out[k], f"θ0 + λ·τ_merged with λ = {scale:g}, tensor {k!r},", "use a smaller scale λ")
        else:
            out[k] = b.clone()
    return out


def _wide_axpy(b: Tensor, m: Tensor, scale: float) -> Tensor:
    """b + scale · m in float64, as 2^e (b 2^-e + (scale 2^-s)(m 2^-t) 2^(s+t-e)) where the plain
    float64 one overflows: 2^s, 2^t, 2^e the powers of two just above |scale|, max |m| and both terms."""
    b64, m64 = b.double(), m.double()
    out = b64 + scale * m64
    if all_finite(out):
        return out
    s, t = unit_exponent([scale]), unit_exponent([m64])
    e = max(unit_exponent([b64]), s + t)
    term = times_power_of_two(times_power_of_two(m64, -t) * math.ldexp(scale, -s), s + t - e)
    return times_power_of_two(times_power_of_two(b64, -e) + term, e)
