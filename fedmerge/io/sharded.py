"""Hugging Face model weights at any scale: read from every layout a model directory uses, one
tensor at a time, and written as sharded safetensors, one tensor at a time.

:class:`ModelWeights` reads ``model.safetensors.index.json`` with its shards, a single
``model.safetensors``, ``pytorch_model.bin.index.json`` with its shards (loaded weights-only,
memory-mapped) or a single ``pytorch_model.bin``, or one checkpoint file; it has the interface of
:class:`~fedmerge.io.checkpoint.Checkpoint` (``meta``, ``is_float``, one tensor per ``[name]``).

:class:`ShardedWriter` writes what ``save_pretrained`` writes: shards of at most ``max_shard_size``
bytes named ``model-00001-of-00003.safetensors`` with ``model.safetensors.index.json`` (one
``model.safetensors`` when everything fits one shard). safetensors' own writer builds a whole file
in memory; here each file's header is laid out up front from the names, shapes and dtypes, and the
tensors are appended as they come, so writing holds no more than the tensor being written.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch
from torch import Tensor

from fedmerge.errors import CheckpointError
from fedmerge.io.checkpoint import Checkpoint

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}

Entry = tuple[str, tuple[int, ...], torch.dtype]
"""A tensor to write: (name, shape, dtype)."""


def weight_files(directory: Path) -> list[Path]:
    """The files holding a model directory's weights, in the order its index lists them."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = list(dict.fromkeys(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index}: not a readable index ({type(exc).__name__}: {exc})") from None
            bad = [n for n in names if not isinstance(n, str) or Path(n).name != n]
            if bad:
                raise CheckpointError(f"{index}: names a shard outside its directory: {bad[0]!r}")
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard {missing[0]} is missing ({len(missing)} of {len(names)})")
            return [directory / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return [directory / single]
    raise CheckpointError(f"{directory}: holds no model weights (model.safetensors, {SAFETENSORS_INDEX}, "
                          f"pytorch_model.bin or {BIN_INDEX})")


class ModelWeights:
    """A model's weights on disk (a model directory in any layout, or one file), read one tensor at a
    time: names, shapes and dtypes without loading anything (see :class:`Checkpoint`). With
    ``keep_last`` (a base, whose tensor every client's τ reads) the tensor read last is kept, one
    for the whole model."""

    def __init__(self, path: str | os.PathLike, on_read: Callable[[], None] | None = None, *,
                 keep_last: bool = True):
        self.path = Path(path)
        files = weight_files(self.path) if self.path.is_dir() else [self.path]
        self._where: dict[str, Checkpoint] = {}
        self._current: Checkpoint | None = None  # the shard read last: the only one keeping a tensor
        self.meta: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
        for file in files:
            shard = Checkpoint(file, on_read, keep_last=keep_last)
            for key, meta in shard.meta.items():
                if key in self._where:
                    raise CheckpointError(f"{self.path}: tensor {key!r} is in two shards, "
                                          f"{self._where[key].path.name} and {file.name}")
                self._where[key], self.meta[key] = shard, meta

    def is_float(self, key: str) -> bool:
        dtype = self.meta[key][1]
        return dtype is not None and dtype.is_floating_point

    def rows(self, key: str, start: int, stop: int, columns: tuple[int, int] | None = None) -> Tensor:
        """Rows ``start:stop`` of tensor ``key``, or of its ``columns`` (see :meth:`Checkpoint.rows`)."""
        return self._shard(key).rows(key, start, stop, columns)

    def __getitem__(self, key: str) -> Tensor:
        return self._shard(key)[key]

    def _shard(self, key: str) -> Checkpoint:
        """The shard holding ``key``; the shard read before it drops what it kept."""
        shard = self._where[key]
        if self._current is not None and self._current is not shard:
            self._current.forget()
        self._current = shard
        return shard


def plan_shards(entries: Sequence[Entry], max_shard_size: int) -> list[list[Entry]]:
    """``entries`` in order, cut into shards of at most ``max_shard_size`` bytes (a tensor larger than
    that gets a shard of its own), as ``save_pretrained`` cuts them."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = _nbytes(entry)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _nbytes(entry: Entry) -> int:
    _, shape, dtype = entry
    return int(torch.Size(shape).numel()) * dtype.itemsize


def shard_names(count: int) -> list[str]:
    return ["model.safetensors"] if count == 1 else [
        f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedWriter:
    """Writes the tensors ``entries`` (in that order, one :meth:`write` each) into ``directory`` as
    sharded safetensors with an index; :meth:`close` checks that every one was written."""

    def __init__(self, directory: Path, entries: Sequence[Entry], max_shard_size: int):
        if sys.byteorder != "little":
            raise CheckpointError("writing safetensors needs a little-endian machine")
        for name, _, dtype in entries:
            if dtype not in _DTYPE_NAMES:
                raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors here")
        self.directory = directory
        shards = plan_shards(entries, max_shard_size)
        names = shard_names(len(shards))
        self._queue = [(entry, name) for shard, name in zip(shards, names) for entry in shard]
        self._shards = dict(zip(names, shards))
        self._next = 0
        self._rows = 0  # of the tensor being written, when it comes in pieces
        self._file: BinaryIO | None = None
        self._file_name = ""
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(_nbytes(e) for e in entries)},
                     "weight_map": {entry[0]: name for entry, name in self._queue}}
            (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def write(self, name: str, tensor: Tensor, start: int = 0) -> None:
        """Append tensor ``name``, the next one planned, with its planned dtype: whole, or its rows
        from ``start`` on (the rows written so far), piece by piece until every row is in."""
        if self._next >= len(self._queue):
            raise CheckpointError(f"tensor {name!r} was not planned for this model")
        (expected, shape, dtype), file_name = self._queue[self._next]
        whole = start == 0 and self._rows == 0 and tuple(tensor.shape) == shape
        piece = (len(shape) >= 1 and tensor.dim() == len(shape) and tuple(tensor.shape[1:]) == shape[1:]
                 and start == self._rows and start + tensor.shape[0] <= shape[0])
        if name != expected or tensor.dtype != dtype or not (whole or piece):
            raise CheckpointError(f"tensor {name!r} {tuple(tensor.shape)} {tensor.dtype} from row {start} written "
                                  f"where {expected!r} {shape} {dtype} from row {self._rows} was planned")
        if file_name != self._file_name:
            self._open(file_name)
        assert self._file is not None
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            self._file.write(data.reshape(-1).view(torch.uint8).numpy().data)
        self._rows = shape[0] if whole and shape else start + (tensor.shape[0] if shape else 0)
        if whole or self._rows == shape[0]:
            self._next, self._rows = self._next + 1, 0

    def _open(self, file_name: str) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self._shards[file_name]:
            nbytes = _nbytes((name, shape, dtype))
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._file = (self.directory / file_name).open("wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file_name = file_name

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._next != len(self._queue):
            raise CheckpointError(f"{len(self._queue) - self._next} planned tensors were not written, "
                                  f"the first {self._queue[self._next][0][0]!r}")

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        elif self._file is not None:
            self._file.close()


def parse_size(text: str | int) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB`` or a number of bytes (``save_pretrained``'s units:
    GB = 10⁹, GiB = 2³⁰)."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
        if not match:
            raise CheckpointError(f"max-shard-size {text!r} is not a size like 5GB, 500MB or 2GiB")
        unit = (match.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        size = int(float(match.group(1)) * scale)
    if size <= 0:
        raise CheckpointError(f"max-shard-size must be positive, got {text!r}")
    return size
