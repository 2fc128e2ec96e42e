"""State dicts on disk: safetensors (written atomically) and weights-only PyTorch files."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedmerge.errors import CheckpointError
from fedmerge.io.atomic import atomic_path


def save_state(tensors: Mapping[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (and string metadata) as safetensors atomically: never a half-written file."""
    bad = [k for k, v in tensors.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{path}: entry {bad[0]!r} is not a tensor ({type(tensors[bad[0]]).__name__})")
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


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
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for bad pickles
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # torch's own message spans many lines
        raise CheckpointError(f"{path}: not a safetensors file or a weights-only PyTorch state dict ({why})") from None
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return dict(state)
