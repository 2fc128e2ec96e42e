"""Returning memory to the system while merging large checkpoints (Linux/glibc; elsewhere nothing).

Two needs (measurements in ``docs/performance.md``, "Offline merge memory"):

* A memory-mapped ``.pt`` state dict keeps every page it has touched resident until unmapped:
  :func:`drop_pages` drops a tensor's pages once it has been copied out (``madvise(MADV_DONTNEED)``),
  only from a private file mapping none of whose pages was ever written (torch byte-swaps big-endian
  files in place; such a page is the only copy of its data), found by address in ``/proc/self/smaps``.
* glibc keeps the pages of freed same-sized tensors: :func:`release_free_heap` trims the heap, and
  :func:`large_buffers_mapped` keeps buffers of a megabyte or more out of it (glibc otherwise raises
  that threshold to 32 MB as buffers are freed, and a merge's piece-sized temporaries of several
  sizes then stay in the heap, fragmented, while a tensor is merged).

Every step is best effort. Without ``/proc/self/smaps``, ``madvise`` or ``malloc_trim`` (macOS,
Windows, a sandbox), or on any error, nothing is dropped and the merge goes on: it can cost memory,
never a result.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

_MADV_DONTNEED = 4  # Linux
SMAPS = "/proc/self/smaps"


def _libc_function(name: str, argtypes: list, restype: Any) -> Callable[..., Any] | None:
    """The C library's ``name`` with its signature, or None where there is none (not glibc/Linux)."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


_MALLOC_TRIM = _libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
_MALLOPT = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_BUFFER = 1 << 20
DYNAMIC_THRESHOLD_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
_MADVISE = _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@contextmanager
def large_buffers_mapped() -> Iterator[None]:
    """Within, every buffer of ``LARGE_BUFFER`` bytes or more is its own memory mapping, handed back
    to the system when freed (glibc's ``mallopt(M_MMAP_THRESHOLD)``); after, the threshold is glibc's
    largest dynamic one (``DYNAMIC_THRESHOLD_MAX``), where a process that frees large buffers
    soon has it anyway. Costs a page fault per page of each such allocation: worth it for the
    spectral rules' float64 temporaries of several sizes, not for the elementwise rules' pieces."""
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, LARGE_BUFFER)
    try:
        yield
    finally:
        if _MALLOPT is not None:
            _MALLOPT(_M_MMAP_THRESHOLD, DYNAMIC_THRESHOLD_MAX)


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def clean_file_mapping(tensors: Iterable[Tensor], inode: int) -> tuple[int, int] | None:
    """The address range (start, end) of the private file mapping holding ``tensors`` when dropping
    its pages loses nothing; None when it cannot be told (no smaps, no madvise, a written page)."""
    address = next((t.data_ptr() for t in tensors if t.layout == torch.strided and t.numel()), None)
    if address is None or _MADVISE is None:
        return None
    try:
        with open(SMAPS) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    found: tuple[int, int] | None = None
    written = 0
    try:
        for line in lines:
            fields = line.split()
            if not fields:
                continue
            if not fields[0].endswith(":"):  # a mapping's header: range, perms, offset, dev, inode, path
                if found is not None:
                    break
                start, end = (int(x, 16) for x in fields[0].split("-"))
                # st_dev is not compared: btrfs reports per-subvolume devices there
                if start <= address < end and len(fields) > 4 and int(fields[4]) == inode:
                    found = (start, end)
            elif found is not None and fields[0] in ("Private_Dirty:", "Anonymous:"):
                written += int(fields[1])
    except (ValueError, IndexError):  # a format this parser does not know: drop nothing
        return None
    return found if written == 0 else None


def drop_pages(tensor: Tensor, mapped: tuple[int, int] | None) -> None:
    """Drop the whole pages under ``tensor`` from the resident set, only within ``mapped`` (see
    :func:`clean_file_mapping`): the file still holds every byte, the next read faults them back in."""
    if mapped is None or _MADVISE is None or tensor.numel() == 0 or tensor.layout != torch.strided:
        return
    first = tensor.data_ptr()
    last = first + tensor.element_size() * (1 + sum((n - 1) * abs(st) for n, st in zip(tensor.shape, tensor.stride())))
    start, end = mapped
    lo = max(start, first - first % _PAGE_SIZE)
    hi = min(end, -(-last // _PAGE_SIZE) * _PAGE_SIZE)
    if lo < hi:
        _MADVISE(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)  # a failure only costs memory
