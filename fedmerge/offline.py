"""Offline merging of checkpoints people already have (``fedmerge merge``), without Flower.

``merge_checkpoints(base, models, method, ...)`` forms τ_i = θ_i − θ0 and merges them with any
rule of :mod:`fedmerge.merging`, then writes θ0 + λ·τ_merged as safetensors (atomically). Memory is
bounded by tensors, not by models: checkpoints are read one tensor at a time and the task vectors
are lazy (:mod:`fedmerge.io.checkpoint`), and every rule works key by key, so what is held is the
merged result plus one tensor per client. Measured peaks are in ``docs/performance.md``. Each τ_i is
formed in float32 for half-precision tensors and kept in the checkpoint's dtype; the output keeps
every tensor's dtype; integer buffers are copied from the base. The models must match the base
tensor for tensor (names, shapes, dtypes); anything else is a :class:`CheckpointError` naming the
file and the tensor. A base that is a Hub id or ``save_pretrained`` directory merges CLIP image
encoders (:func:`merge_pretrained`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedmerge.errors import CheckpointError
from fedmerge.io.atomic import check_output, writing
from fedmerge.io.checkpoint import Checkpoint, LazyTaskVector, check_compatible
from fedmerge.io.hub import is_pretrained_source
from fedmerge.io.pages import release_free_heap
from fedmerge.io.state import save_state
from fedmerge.merging import METHODS, merge, merge_device
from fedmerge.models.clip import encoder_state, save_pretrained
from fedmerge.task_vector import TaskVector, apply


def _check_method(method: str, options: Mapping[str, Any] | None) -> None:
    """A known rule and option names it has, before any checkpoint is read (``weights`` or
    ``method`` given as options would otherwise clash with ``merge``'s own arguments)."""
    METHODS.check(method)
    for key in options or {}:
        METHODS[method].option(key)


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
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Merge fine-tuned checkpoints into θ0 + scale·τ_merged and write it to ``out`` (safetensors).

    A ``base`` that is a Hugging Face Hub id or ``save_pretrained`` directory merges CLIP image
    encoders instead (:func:`merge_pretrained`) and ``out`` is a new directory.
    ``on_read`` is called once per tensor read from disk (a progress hook). ``device``: where the
    rule computes (``"auto"``: the GPU when there is one), tensor by tensor as they are read; the
    result is written from the CPU. Returns a summary:
    method, scale, number of models, merged and copied tensor names.
    """
    _check_method(method, options)
    if device is not None:
        merge_device(device)  # a device this machine lacks fails before anything is read
    if is_pretrained_source(base):  # Hub id or save_pretrained directory: a CLIP image encoder
        return merge_pretrained(str(base), [str(m) for m in models], method, out, scale=scale, options=options,
                                weights=weights, overwrite=overwrite, device=device)
    out = Path(out)
    if not models:
        raise CheckpointError("no fine-tuned models given")
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: the output must be a .safetensors file")
    inputs = [Path(p) for p in (base, *models)]
    if any(out.resolve() == p.resolve() for p in inputs):
        raise CheckpointError(f"{out}: the output would overwrite one of the input checkpoints")
    check_output(out, directory=False, overwrite=overwrite)
    # The base is read once per tensor name and pass: the moment to hand freed memory back.
    def on_base_read() -> None:  # the base is read once per tensor name and pass: trim the heap there
        release_free_heap()
        if on_read is not None:
            on_read()

    theta0 = Checkpoint(base, on_base_read)
    tuned = [Checkpoint(p, on_read) for p in models]
    for model in tuned:
        check_compatible(theta0, model)
    float_keys = [k for k in theta0.meta if theta0.is_float(k)]
    if not float_keys:
        raise CheckpointError(f"{theta0.path}: holds no floating-point tensors to merge")
    task_vectors = [LazyTaskVector(theta0, m, float_keys) for m in tuned]
    with torch.no_grad():
        merged = merge(method, task_vectors, weights, device=device, **dict(options or {}))
        result: dict[str, Tensor] = {}
        for key in theta0.meta:  # θ0 + λ·τ one tensor at a time, releasing τ_merged as we go
            result[key] = apply({key: theta0[key]}, {key: merged.pop(key)} if key in merged else {}, scale)[key]
    with writing(out):
        save_state(result, out)
    return {"method": method, "scale": scale, "models": len(tuned), "merged": float_keys,
            "copied": [k for k in theta0.meta if k not in float_keys], "out": str(out)}


def merge_pretrained(base: str, models: Sequence[str], method: str, out: str | os.PathLike, *, scale: float = 1.0,
                     options: Mapping[str, Any] | None = None, weights: Sequence[float] | None = None,
                     overwrite: bool = False, device: str | torch.device | None = None) -> dict[str, Any]:
    """θ0 + λ·merge(τ_i) over CLIP image encoders, written as a ``save_pretrained`` directory ``out``."""
    _check_method(method, options)
    out = Path(out)
    check_output(out, directory=True, resume=overwrite)
    theta0 = encoder_state(base)
    taus = [TaskVector.between(theta0, encoder_state(m, base=theta0)) for m in models]
    merged = merge(method, taus, weights, device=device, **dict(options or {}))
    with writing(out):
        save_pretrained(apply(theta0, merged, scale), base, out)
    return {"method": method, "scale": scale, "models": len(taus), "merged": sorted(merged), "copied": [],
            "out": str(out)}
