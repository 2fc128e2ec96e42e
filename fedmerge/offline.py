"""Offline merging of checkpoints people already have (``fedmerge merge``), without Flower.

``merge_checkpoints(base, models, method, ...)`` forms τ_i = θ_i − θ0 and merges them with any
method of :mod:`fedmerge.merging`, then writes θ0 + λ·τ_merged as safetensors (atomically).

Memory: safetensors tensors are read one at a time, each through its own short-lived ``safe_open``
handle (a long-lived memory map keeps every page read in the resident set), PyTorch state dicts are
memory-mapped once and each tensor is copied out and its pages dropped from the mapping (``madvise``,
Linux, unless torch wrote into the mapping at load; elsewhere they stay resident: 10 model sizes
instead of 1.2 for fedavg below), and the task vectors are *lazy* mappings that read one tensor of
θ_i and θ0 when a merging rule asks for it. Every rule works key by key, so what is held is the
merged result plus one tensor per client, and safetensors' writer builds the output's bytes in memory. Each
checkpoint keeps the tensor it read last, so where a pass goes key by key through the clients (the
validation, every rule's merge, θ0 + λτ) the base is read once per key, not once per client; cclip
and TIES also walk each client's whole τ for its norm or threshold (TIES twice), re-reading the base. The
C heap is trimmed at each read of the base, so glibc's free pages do not pile up: measured on 8
checkpoints of 100M parameters, fedavg peaks 1.25-1.37 model sizes above the imports, median 1.4
(``python -m benchmarks --only offline``). A checkpoint replaced
or rewritten on disk mid-merge is noticed (device, inode, size, mtime, checked after each safetensors
read and before each read of a memory-mapped ``.pt`` state dict; the tensor kept from the last read
is not re-checked) and stops the merge before anything
is written; a ``.pt`` file truncated in place between that check and the access is not caught (and a
``.pt`` replaced by rename stops the merge too, although its mapping still holds the original).
Each τ_i is formed in float32 for half-precision tensors and kept in the checkpoint's dtype (as
:meth:`TaskVector.between` does); the output keeps every tensor's dtype. Integer buffers are copied
from the base. The models must match the base tensor for tensor (names, shapes, dtypes); anything else
is a :class:`CheckpointError` naming the file and the tensor.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedmerge.errors import CheckpointError, MergeError
from fedmerge.merging import METHODS, merge
from fedmerge.task_vector import apply, compute_dtype, load_state, save_state

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Checkpoint:
    """A state dict on disk, read one tensor at a time: names, shapes and dtypes without loading it."""

    def __init__(self, path: str | os.PathLike, on_read: Callable[[], None] | None = None):
        self.path = Path(path)
        self.on_read = on_read or (lambda: None)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        self._state: dict[str, Tensor] | None = None
        self._last: tuple[str, Tensor] | None = None  # the tensor read last, for the next client's τ
        self._mapped: tuple[int, int] | None = None  # where a .pt file is mapped, if its pages may be dropped
        self._identity = _file_identity(self.path)
        if self.path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(self.path), framework="pt") as handle:
                    self.meta = {k: _slice_meta(handle, k) for k in handle.keys()}
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{self.path}: not a readable safetensors file ({exc})") from None
        else:
            self._state = load_state(self.path, mmap=True)
            self.meta = {k: (tuple(v.shape), v.dtype) for k, v in self._state.items()}
            self._mapped = _clean_file_mapping(self._state.values(), self._identity[1])

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
        self._last = (key, tensor)
        return tensor

    def _read(self, key: str) -> Tensor:
        self.on_read()
        if self._state is not None:  # memory-mapped once: a truncation in place would fault, so check
            self._check_unchanged()
            mapped = self._state[key]
            if self._mapped is None:
                return mapped
            # The pages a mapped tensor touches stay resident until unmapped (8 checkpoints of 100M
            # parameters: every checkpoint whole). Copied out, its pages are dropped from the mapping;
            # the next read of them faults them back in from the page cache.
            tensor = mapped.clone()
            _drop_mapped_pages(mapped, self._mapped)
            return tensor
        from safetensors import SafetensorError, safe_open

        # A handle per read: safe_open memory-maps the file, and a long-lived mapping keeps every page
        # read so far in the resident set (8 checkpoints of 100M parameters: 12 model sizes). Reopening
        # by name must have found the file that was checked, not one written over it since: checked
        # after the read, so a replacement between the check and the open cannot slip through.
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                tensor = handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            self._check_unchanged()
            raise CheckpointError(f"{self.path}: reading tensor {key!r} failed ({exc})") from None
        self._check_unchanged()
        return tensor

    def _check_unchanged(self) -> None:
        if _file_identity(self.path) != self._identity:
            raise CheckpointError(f"{self.path}: changed on disk during the merge; nothing was written")


def _release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    glibc serves the merge's many same-sized tensors from its heap once one has been freed, and keeps
    what they leave free resident: peak RSS of fedavg over 8 checkpoints of 100M parameters moved
    between 1.7 and 2.2 model sizes with the pass it peaked in. Trimming once per tensor name and pass
    (at each read of the base) holds it near what is live (1.2-1.4), costing about the time saved by
    not re-reading the base per client. Dask's workers trim the same way.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _libc_function(name: str, argtypes: list, restype: Any) -> Callable[..., Any] | None:
    """The C library's ``name`` with its signature, or None where there is none (not glibc/Linux)."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


_MALLOC_TRIM = _libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
_MADVISE = _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4  # Linux


def _clean_file_mapping(tensors: Iterable[Tensor], inode: int) -> tuple[int, int] | None:
    """Where the memory-mapped ``tensors`` live, as (start, end), if dropping pages there loses nothing.

    The mapping is found by address in /proc/self/smaps (the one holding the first tensor's bytes, with
    the file's inode; st_dev is not compared, as btrfs reports per-subvolume devices there). torch maps
    the file private and writable; a page ever written (torch byte-swaps files saved on big-endian
    machines in place) is the only copy of what it holds, so a mapping with any written page, or no
    smaps to tell (not Linux), gives [] and nothing is ever dropped.
    """
    address = next((t.data_ptr() for t in tensors if t.layout == torch.strided and t.numel()), None)
    if address is None or _MADVISE is None:
        return []
    try:
        with open("/proc/self/smaps") as smaps:
            lines = smaps.read().splitlines()
    except OSError:
        return []
    found: tuple[int, int] | None = None
    written = 0
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        if not fields[0].endswith(":"):  # a mapping's header: address range, perms, offset, dev, inode, path
            if found is not None:
                break
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end and int(fields[4]) == inode:
                found = (start, end)
        elif found is not None and fields[0] in ("Private_Dirty:", "Anonymous:"):
            written += int(fields[1])
    return found if written == 0 else None


def _drop_mapped_pages(tensor: Tensor, mapped: tuple[int, int]) -> None:
    """Drop the whole pages under ``tensor`` from this process's resident set (``madvise
    MADV_DONTNEED``), only within ``mapped``: a private file mapping none of whose pages was ever
    written (see :func:`_clean_file_mapping`), so the file still holds every byte and the next read
    faults them back in; heap memory is never touched. Mapped tensors must never be written: reads
    hand out copies."""
    if tensor.numel() == 0 or tensor.layout != torch.strided:
        return
    first = tensor.data_ptr()
    last = first + tensor.element_size() * (1 + sum((n - 1) * abs(st) for n, st in zip(tensor.shape, tensor.stride())))
    start, end = mapped
    lo = max(start, first - first % _PAGE_SIZE)
    hi = min(end, -(-last // _PAGE_SIZE) * _PAGE_SIZE)
    if lo < hi:
        _MADVISE(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


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


def merge_checkpoints(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    method: str,
    out: str | os.PathLike,
    *,
    scale: float = 1.0,
    options: Mapping[str, Any] | None = None,
    weights: Sequence[float] | None = None,
    overwrite: bool = False,
    on_read: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Merge fine-tuned checkpoints into θ0 + scale·τ_merged and write it to ``out`` (safetensors).

    A ``base`` that is a Hugging Face Hub id or ``save_pretrained`` directory merges CLIP image
    encoders instead (:func:`fedmerge.clip.merge_pretrained`) and ``out`` is a new directory.
    ``on_read`` is called once per tensor read from disk (a progress hook). Returns a summary:
    method, scale, number of models, merged and copied tensor names.
    """
    from fedmerge.clip import is_pretrained_source

    if is_pretrained_source(base):  # Hub id or save_pretrained directory: a CLIP image encoder
        from fedmerge.clip import merge_pretrained

        return merge_pretrained(str(base), [str(m) for m in models], method, out, scale=scale, options=options,
                                weights=weights, overwrite=overwrite)
    out = Path(out)
    if method not in METHODS:
        raise MergeError(f"unknown merging method {method!r}; known: {', '.join(sorted(METHODS))}")
    if not models:
        raise CheckpointError("no fine-tuned models given")
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: the output must be a .safetensors file")
    inputs = [Path(p) for p in (base, *models)]
    if any(out.resolve() == p.resolve() for p in inputs):
        raise CheckpointError(f"{out}: the output would overwrite one of the input checkpoints")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose a new file (or allow overwriting)")
    # The base is read once per tensor name and pass: the moment to hand freed memory back.
    theta0 = Checkpoint(base, lambda: (_release_free_heap(), on_read and on_read()))
    tuned = [Checkpoint(p, on_read) for p in models]
    for model in tuned:
        check_compatible(theta0, model)
    float_keys = [k for k in theta0.meta if theta0.is_float(k)]
    if not float_keys:
        raise CheckpointError(f"{theta0.path}: holds no floating-point tensors to merge")
    task_vectors = [LazyTaskVector(theta0, m, float_keys) for m in tuned]
    with torch.no_grad():
        merged = merge(method, task_vectors, weights, **dict(options or {}))
        result: dict[str, Tensor] = {}
        for key in theta0.meta:  # θ0 + λ·τ one tensor at a time, releasing τ_merged as we go
            result[key] = apply({key: theta0[key]}, {key: merged.pop(key)} if key in merged else {}, scale)[key]
    save_state(result, out)
    return {"method": method, "scale": scale, "models": len(tuned), "merged": float_keys,
            "copied": [k for k in theta0.meta if k not in float_keys], "out": str(out)}
