"""State dicts on disk: safetensors (written atomically) and weights-only PyTorch files, and verified
cache entries: safetensors files that carry a digest of their own content, checked on every read."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedmerge.errors import CheckpointError
from fedmerge.io.atomic import atomic_path

log = logging.getLogger(__name__)
T = TypeVar("T")
DIGEST_KEY = "fedmerge.sha256"  # metadata entry of a verified file: sha256 of its tensors and other metadata


def save_state(tensors: Mapping[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (and string metadata) as safetensors atomically: never a half-written file."""
    bad = [k for k, v in tensors.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{path}: entry {bad[0]!r} is not a tensor ({type(tensors[bad[0]]).__name__})")
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as exc:  # its I/O failures (a full disk, a file size limit) are OSErrors
            raise _as_os_error(exc, path) from None


def _as_os_error(exc: SafetensorError, path: str | os.PathLike) -> OSError:
    """safetensors reports a failed write as ``... I/O error: File too large (os error 27)``."""
    found = re.search(r"I/O error: (.*) \(os error (\d+)\)", str(exc))
    if found:
        return OSError(int(found.group(2)), found.group(1), str(path))
    return OSError(f"{path}: {exc}")


def load_state(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Tensor]:
    """Read a safetensors file, or a PyTorch state dict with ``weights_only=True`` (never pickle code).

    ``mmap=True`` memory-maps a PyTorch (zip-format) file, so tensors are read only when touched."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on its way to failing
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for bad pickles
        raise CheckpointError(f"{path}: {_unloadable(exc)}") from None
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return dict(state)


def _unloadable(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one plain line (torch's own message
    spans many lines, carries terminal colour codes and speaks of its loading options)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        return ("not a weights-only checkpoint: it pickles Python objects besides tensors, which fedmerge never "
                "unpickles; where you trust the file, convert it once with "
                "safetensors.torch.save_file(torch.load(PATH, weights_only=False), 'model.safetensors')")
    if "_use_new_zipfile_serialization" in text or "zip" in text.lower():
        return ("not a safetensors file or a weights-only PyTorch state dict in torch.save's zip format "
                "(re-save it with torch.save or safetensors.torch.save_file)")
    why = (text.strip().splitlines() or [type(exc).__name__])[0]
    return f"not a safetensors file or a weights-only PyTorch state dict ({why})"


def all_finite(t: Tensor) -> bool:
    """Whether every entry is finite: the sum is (NaN and ±Inf propagate), or, if the sum of finite
    values overflowed, the elementwise check says so. One pass without a mask."""
    total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all())


def non_finite_tensor(tensors: Mapping[str, Tensor]) -> str | None:
    """The name of the first floating tensor holding NaN or Inf, or None when all are finite."""
    return next((k for k, t in tensors.items() if t.is_floating_point() and not all_finite(t)), None)


def hash_tensor(h: hashlib._Hash, t: Tensor) -> None:
    """Feed one tensor's dtype, shape and bytes into ``h``."""
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def state_digest(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """sha256 over the tensors in name order (name, dtype, shape, bytes) and the other metadata."""
    h = hashlib.sha256(json.dumps({k: v for k, v in (metadata or {}).items() if k != DIGEST_KEY},
                                  sort_keys=True).encode())
    for name in sorted(tensors):
        h.update(f"{len(name)}:{name}".encode())
        hash_tensor(h, tensors[name])
    return h.hexdigest()


def save_verified(tensors: Mapping[str, Tensor], path: str | os.PathLike,
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors atomically with their digest in the metadata, for ``load_verified``. Refuses
    non-finite values: a verified file never holds them."""
    if (bad := non_finite_tensor(tensors)) is not None:
        raise CheckpointError(f"{path}: tensor {bad!r} contains NaN or Inf; not written")
    meta = {**(metadata or {}), DIGEST_KEY: state_digest(tensors, metadata)}
    save_state(tensors, path, metadata=meta)


def load_verified(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata written by ``save_verified``, or a CheckpointError saying why not:
    unreadable, no digest (written otherwise), a digest that does not match, or non-finite values."""
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    stored = metadata.pop(DIGEST_KEY, None)
    if stored is None:
        raise CheckpointError(f"{path}: carries no checksum")
    if state_digest(tensors, metadata) != stored:
        raise CheckpointError(f"{path}: content does not match its checksum")
    if (bad := non_finite_tensor(tensors)) is not None:
        raise CheckpointError(f"{path}: tensor {bad!r} contains NaN or Inf")
    return tensors, metadata


def write_cache_entry(tensors: Mapping[str, Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """Save a cache entry (see :func:`save_verified`). A cache only saves work: a write that fails
    (a full disk, a read-only cache directory) is named in a warning and the run goes on without it."""
    try:
        save_verified(tensors, path, metadata)
    except OSError as exc:
        log.warning("could not write cache entry %s (%s); going on without it", path, exc.strerror or exc)


def read_or_compute(path: Path | None, read: Callable[[Path], T | None], compute: Callable[[], T]) -> T:
    """The cache entry at ``path`` as ``read`` gives it, else ``compute()`` (which writes it), with the
    entry's lock held: processes and threads that need one entry at once (parallel sweep cells
    sharing a client or a base) compute it once, the others wait and read it. ``path`` None: no cache."""
    if path is None:
        return compute()
    if (hit := read(path)) is not None:
        return hit
    with cache_entry_lock(path):
        if (hit := read(path)) is not None:  # computed while this one waited
            return hit
        return compute()


@contextlib.contextmanager
def cache_entry_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on the cache entry at ``path``: ``flock`` on a file named by a hash of the
    entry's resolved path in a per-user directory under the system's temporary directory (so the
    cache holds only entries), held per open file, so between threads too. Lock files stay: removing
    one while another process waits on it would let a third take a different lock. Where none can be
    made (no ``fcntl``, no writable temporary directory), nothing is locked: duplicate work at worst."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    locks = Path(tempfile.gettempdir()) / f"fedmerge-locks-{os.getuid()}"
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    try:
        locks.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


def read_cache_entry(path: str | os.PathLike, use: Callable[[dict[str, Tensor], dict[str, str]], T]) -> T | None:
    """``use(tensors, metadata)`` of the verified cache entry at ``path``, or None when there is none to
    use: an entry that fails verification, or that ``use`` rejects (it raises KeyError, ValueError or
    RuntimeError, e.g. a state dict that no longer fits the model), is named in a warning and deleted,
    so the caller recomputes and rewrites it."""
    path = Path(path)
    if not path.is_file():
        if path.exists() or path.is_symlink():  # a directory, a link to nothing, a device: not ours to read
            log.warning("cache entry %s is not a file; removed, recomputing it", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        return None
    try:
        tensors, metadata = load_verified(path)
        try:
            return use(tensors, metadata)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: does not fit ({type(exc).__name__}: {exc})") from None
    except CheckpointError as exc:
        log.warning("cache entry %s; discarded, recomputing it", exc)
        Path(path).unlink(missing_ok=True)
        return None
