"""Checkpoints read one tensor at a time, and task vectors formed lazily from them.

:class:`Checkpoint` gives names, shapes and dtypes without loading a file, and one tensor per
access: safetensors through a short-lived ``safe_open`` handle per read, PyTorch state dicts
memory-mapped once (their pages dropped once copied out, see :mod:`fedmerge.io.pages`). It keeps the
tensor read last, so a pass that goes key by key through the clients reads the base once per key. A
file replaced or rewritten on disk mid-merge is noticed (device, inode, size, mtime) and stops the
merge. :class:`LazyTaskVector` is τ = θ_i − θ0 computed per access, so a rule holds one tensor per
client at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from fedmerge.errors import CheckpointError
from fedmerge.io.pages import clean_file_mapping, drop_pages
from fedmerge.io.state import all_finite, load_state
from fedmerge.task_vector import compute_dtype

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Checkpoint:
    """A state dict on disk, read one tensor at a time: names, shapes and dtypes without loading it."""

    def __init__(self, path: str | os.PathLike, on_read: Callable[[], None] | None = None, *,
                 keep_last: bool = True):
        self.path = Path(path)
        self.on_read = on_read or (lambda: None)
        self.keep_last = keep_last  # a base's tensor is read by every client's τ; a model's only by its own
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        self._state: dict[str, Tensor] | None = None
        self._last: tuple[str, Tensor] | None = None  # the tensor read last, for the next client's τ
        self._last_piece: tuple[tuple[Any, ...], Tensor] | None = None  # the same for a piece of rows
        self._mapped: tuple[int, int] | None = None  # where a .pt file is mapped, if its pages may be dropped
        self._identity = _file_identity(self.path)
        if self.path.suffix == ".safetensors":
            try:
                with safe_open(str(self.path), framework="pt") as handle:
                    self.meta = {k: _slice_meta(handle, k) for k in handle.keys()}
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{self.path}: not a readable safetensors file ({exc})") from None
        else:
            self._state = load_state(self.path, mmap=True)
            self.meta = {k: (tuple(v.shape), v.dtype) for k, v in self._state.items()}
            self._mapped = clean_file_mapping(self._state.values(), self._identity[1])

    def is_float(self, key: str) -> bool:
        dtype = self.meta[key][1]
        return dtype is not None and dtype.is_floating_point

    def __getitem__(self, key: str) -> Tensor:
        """The tensor ``key``. Rules go key by key through the clients, and every client's τ needs
        the base's tensor: the one read last is kept, so the base is read once per key, not per client."""
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        self._last = None
        tensor = self._read(key)
        if self.keep_last:
            self._last = (key, tensor)
        return tensor

    def rows(self, key: str, start: int, stop: int, columns: tuple[int, int] | None = None) -> Tensor:
        """Rows ``start:stop`` of tensor ``key`` (its first dimension), read without the rest, so a
        rule whose every entry depends on that entry alone can merge a tensor larger than memory.
        ``columns`` (a, b): only those columns of the rows (a spectral rule reads a wide matrix's
        columns, its tall side)."""
        index = (slice(start, stop),) if columns is None else (slice(start, stop), slice(*columns))
        if self._last is not None and self._last[0] == key:
            return self._last[1][index]
        if self._last_piece is not None and self._last_piece[0] == (key, start, stop, columns):
            return self._last_piece[1]  # the base's piece: every client's τ needs it, then θ0 + λτ
        piece = self._read(key, index)
        if self.keep_last:
            self._last_piece = ((key, start, stop, columns), piece)
        return piece

    def forget(self) -> None:
        """Drop the tensor (or piece) kept from the last read (its memory goes when no one else holds it)."""
        self._last = None
        self._last_piece = None

    def _read(self, key: str, rows: tuple[slice, ...] | None = None) -> Tensor:
        """Tensor ``key``, or the piece ``rows`` indexes, from disk, checked finite. Progress counts
        tensors, not pieces."""
        if rows is None or all(part.start == 0 for part in rows):
            self.on_read()
        if self._state is not None:  # memory-mapped once: a truncation in place would fault, so check
            self._check_unchanged()
            mapped = self._state[key] if rows is None else self._state[key][rows]
            if self._mapped is None:
                tensor = mapped
            else:
                # copied out (a piece of columns too, contiguous), so that its pages can leave the resident set
                tensor = mapped.clone(memory_format=torch.contiguous_format)
                drop_pages(mapped, self._mapped)
        else:
            # A handle per read: a long-lived safetensors mapping keeps every page read in the resident
            # set. The file is checked after the read, so a replacement before the open cannot slip by.
            try:
                with safe_open(str(self.path), framework="pt") as handle:
                    tensor = handle.get_tensor(key) if rows is None else handle.get_slice(key)[rows]
            except (SafetensorError, OSError) as exc:
                self._check_unchanged()
                raise CheckpointError(f"{self.path}: reading tensor {key!r} failed ({exc})") from None
            self._check_unchanged()
        if tensor.is_floating_point() and not all_finite(tensor):  # named here, where the file is known
            raise CheckpointError(f"{self.path}: tensor {key!r} contains NaN or Inf")
        return tensor

    def _check_unchanged(self) -> None:
        if _file_identity(self.path) != self._identity:
            raise CheckpointError(f"{self.path}: changed on disk during the merge; nothing was written")


def _file_identity(path: Path) -> tuple[int, ...]:
    """What tells one file from another written in its place: device, inode, size, modification time."""
    try:
        st = path.stat()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _slice_meta(handle: Any, key: str) -> tuple[tuple[int, ...], torch.dtype | None]:
    sl = handle.get_slice(key)
    return tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype())


class LazyTaskVector(Mapping[str, Tensor]):
    """τ = θ_i − θ0 over the floating-point tensors of the base, computed one tensor per access."""

    def __init__(self, base: Checkpoint, finetuned: Checkpoint, keys: Sequence[str]):
        self.base, self.finetuned, self.keys_ = base, finetuned, list(keys)

    def __getitem__(self, key: str) -> Tensor:
        b, f = self.base[key], self.finetuned[key]
        dt = compute_dtype(b.dtype)
        return (f.to(dt) - b.to(dt)).to(b.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def check_compatible(base: Checkpoint, model: Checkpoint) -> None:
    """Same tensor names, shapes and dtypes as the base; a ``CheckpointError`` names the first difference."""
    missing = [k for k in base.meta if k not in model.meta]
    if missing:
        raise CheckpointError(f"{model.path}: tensor {missing[0]!r} of the base model is missing "
                              f"({len(missing)} missing; a different architecture?)")
    extra = [k for k in model.meta if k not in base.meta]
    if extra:
        raise CheckpointError(f"{model.path}: tensor {extra[0]!r} is not in the base model "
                              f"({len(extra)} extra; a different architecture?)")
    for key, (shape, dtype) in base.meta.items():
        other_shape, other_dtype = model.meta[key]
        if other_shape != shape:
            raise CheckpointError(f"{model.path}: tensor {key!r} has shape {other_shape}, the base has {shape} "
                                  "(a different architecture?)")
        if other_dtype != dtype:
            raise CheckpointError(f"{model.path}: tensor {key!r} is {other_dtype}, the base is {dtype}; "
                                  "convert the checkpoints to one dtype first")
