"""Offline merging of checkpoints people already have (``fedmerge merge``), without Flower.

``merge_checkpoints(base, models, method, ...)`` forms τ_i = θ_i − θ0 and merges them with any
rule of :mod:`fedmerge.merging`, then writes θ0 + λ·τ_merged as safetensors (atomically). Memory is
bounded by tensors, not by models: checkpoints are read one tensor at a time and the task vectors
are lazy (:mod:`fedmerge.io.checkpoint`), and every rule works key by key, so what is held is the
merged result plus one tensor per client. Measured peaks are in ``docs/performance.md``. Each τ_i is
formed in float32 for half-precision tensors and kept in the checkpoint's dtype; the output keeps
every tensor's dtype; integer buffers are copied from the base. The models must match the base
tensor for tensor (names, shapes, dtypes); anything else is a :class:`CheckpointError` naming the
file and the tensor.

A base that is a Hub id or model directory merges whole Hugging Face models of any architecture
into a ``from_pretrained`` directory (:func:`merge_models`): sharded inputs and outputs, one tensor
at a time from reading to writing, so memory is bounded by the largest tensor, not the model; CLIP
bases merge their image encoders (:func:`merge_pretrained`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedmerge.errors import CheckpointError, MergeOverflowError
from fedmerge.io.atomic import check_output, staged_directory, writing
from fedmerge.io.checkpoint import Checkpoint, LazyTaskVector, check_compatible
from fedmerge.io.hub import is_pretrained_source, resolve
from fedmerge.io.sharded import BIN_INDEX, SAFETENSORS_INDEX, ModelWeights, ShardedWriter, parse_size
from fedmerge.io.pages import large_buffers_mapped, release_free_heap
from fedmerge.io.state import all_finite, save_state
from fedmerge.merging import METHODS, merge, merge_device
from fedmerge.merging.registry import merge_rows
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
    model_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge fine-tuned checkpoints into θ0 + scale·τ_merged and write it to ``out`` (safetensors).

    A ``base`` that is a Hugging Face Hub id or model directory merges whole models into a new
    directory ``out`` (:func:`merge_models`, which takes ``model_options``: ``dtype``,
    ``max_shard_size``, ``embeddings``), or CLIP image encoders for a CLIP base (:func:`merge_pretrained`).
    ``on_read`` is called once per tensor read from disk (a progress hook; a rule that reads a tensor
    in several sweeps, as the spectral rules over model directories do, counts each). ``device``: where the
    rule computes (``"auto"``: the GPU when there is one), tensor by tensor as they are read; the
    result is written from the CPU. Returns a summary:
    method, scale, number of models, merged and copied tensor names.
    """
    _check_method(method, options)
    if device is not None:
        merge_device(device)  # a device this machine lacks fails before anything is read
    if model_options and not is_pretrained_source(base):
        raise CheckpointError(f"{', '.join(sorted(model_options))} apply to model directories and Hub ids, "
                              f"not to the checkpoint file {base}")
    if is_pretrained_source(base):  # Hub id or save_pretrained directory
        if _model_config(resolve(base)).get("model_type") in CLIP_MODEL_TYPES:  # CLIP: its image encoder
            if model_options:
                raise CheckpointError(f"{', '.join(sorted(model_options))} do not apply to CLIP image encoders, "
                                      "which are written as a CLIPVisionModelWithProjection directory")
            return merge_pretrained(str(base), [str(m) for m in models], method, out, scale=scale, options=options,
                                    weights=weights, overwrite=overwrite, device=device)
        return merge_models(base, models, method, out, scale=scale, options=options, weights=weights,
                            overwrite=overwrite, on_read=on_read, device=device, **(model_options or {}))
    out = Path(out)
    if not models:
        raise CheckpointError("no fine-tuned models given")
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: the output must be a .safetensors file")
    inputs = [Path(p) for p in (base, *models)]
    if any(out.resolve() == p.resolve() for p in inputs):
        raise CheckpointError(f"{out}: the output would overwrite one of the input checkpoints")
    check_output(out, directory=False, overwrite=overwrite)
    theta0 = Checkpoint(base, _trimming_heap(on_read))
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


EMBEDDING_POLICIES = ("error", "base")
MERGE_PIECE_BYTES = 16 * 2**20  # float32 per client per piece of an elementwise rule (docs/performance.md)
CLIP_MODEL_TYPES = ("clip", "clip_vision_model")
OUTPUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def merge_models(
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
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    embeddings: str = "error",
) -> dict[str, Any]:
    """θ0 + λ·merge(τ_i) over Hugging Face models of any architecture, written as a directory that
    ``from_pretrained`` loads as it is.

    ``base`` and ``models`` are model directories or Hub ids already in the local cache, their
    weights in any layout :class:`~fedmerge.io.sharded.ModelWeights` reads. Memory is bounded by
    tensors, not by the model: tensors are read, merged and written one at a time, by the eight
    elementwise rules a few rows at a time, and by the spectral rules from pieces of rows (or
    columns) in a few sweeps (:func:`~fedmerge.merging.registry.merge_rows`); τ_i, the
    merge and θ0 + λ·τ in float32, rounded once to the output dtype (``dtype``: the base's per tensor
    unless given). The output holds sharded safetensors of at most
    ``max_shard_size`` with their index, and every other file of the base's directory (config,
    generation config, tokenizer), the config's dtype updated; it appears whole or not at all.

    The models must have the base's architecture and tensors. Tensors that differ in their first
    dimension only (a vocabulary with added tokens) are an error naming them unless ``embeddings``
    is ``"base"``: then the rows a model shares with the base are merged, rows beyond the base's
    vocabulary are dropped (the base's vocabulary and tokenizer are kept), and a model with fewer
    rows contributes a zero update to the rows it lacks (which averaging rules count).
    """
    _check_method(method, options)
    if device is not None:
        merge_device(device)
    if embeddings not in EMBEDDING_POLICIES:
        raise CheckpointError(f"embeddings must be one of {', '.join(EMBEDDING_POLICIES)}, got {embeddings!r}")
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    shard_bytes = parse_size(max_shard_size)
    if not models:
        raise CheckpointError("no fine-tuned models given")
    out = Path(out)
    check_output(out, directory=True, resume=overwrite)
    base_dir = resolve(base)
    model_dirs = [resolve(m) for m in models]
    if any(out.resolve() == d.resolve() for d in (base_dir, *model_dirs)):
        raise CheckpointError(f"{out}: the output would overwrite one of the input models")
    base_config = _model_config(base_dir)
    for d in model_dirs:
        _check_architecture(base_dir, base_config, d, _model_config(d))
    theta0 = ModelWeights(base_dir, _trimming_heap(on_read))
    tuned = [ModelWeights(d, on_read, keep_last=False) for d in model_dirs]
    for model in tuned:
        _check_tensors(theta0, model, embeddings)
    float_keys = [k for k in theta0.meta if theta0.is_float(k)]
    if not float_keys:
        raise CheckpointError(f"{base_dir}: holds no floating-point tensors to merge")
    target = OUTPUT_DTYPES[dtype] if dtype else None
    entries = [(k, shape, target if target is not None and theta0.is_float(k) else meta_dtype)
               for k, (shape, meta_dtype) in theta0.meta.items() if meta_dtype is not None]
    if len(entries) != len(theta0.meta):
        unknown = next(k for k, (_, d) in theta0.meta.items() if d is None)
        raise CheckpointError(f"{base_dir}: tensor {unknown!r} has a dtype fedmerge cannot write")
    task_vectors = [_Float32TaskVector(theta0, m, float_keys) for m in tuned]
    # the spectral rules' float64 temporaries of several sizes would otherwise stay in the heap
    mapped = large_buffers_mapped() if METHODS[method].streamed is not None else contextlib.nullcontext()
    with staged_directory(out, replace=overwrite) as staging, torch.no_grad(), mapped:
        _copy_model_files(base_dir, staging, dtype)
        merged = merge_rows(method, task_vectors, weights, chunk_bytes=MERGE_PIECE_BYTES, device=device,
                            **dict(options or {}))
        out_dtypes = {key: out_dtype for key, _, out_dtype in entries}
        with ShardedWriter(staging, entries, shard_bytes) as writer:
            for key in theta0.meta:
                if not theta0.is_float(key):
                    writer.write(key, theta0[key])
                    continue
                shape = theta0.meta[key][0]
                while True:  # pieces of rows (elementwise and spectral rules), else the whole tensor at once
                    merged_key, start, tau = next(merged)
                    assert merged_key == key
                    stop = start + len(tau) if tau.dim() else 0
                    for first, rows in _pieces_of_rows(tau, start, MERGE_PIECE_BYTES):
                        theta_rows = theta0.rows(key, first, first + len(rows)) if rows.dim() else theta0[key]
                        # θ0 + λτ in float32 (apply), rounded once: to the base's dtype, or from float32 to another
                        if out_dtypes[key] != theta_rows.dtype:
                            theta_rows = theta_rows.float()
                        piece = apply({key: theta_rows}, {key: rows}, scale)[key].to(out_dtypes[key])
                        writer.write(key, _checked(piece, key, scale), first)
                        del rows, theta_rows, piece
                    del tau
                    if not shape or stop >= shape[0]:
                        release_free_heap()  # the tensor is written: hand its freed pages back
                        break
    return {"method": method, "scale": scale, "models": len(tuned), "merged": float_keys,
            "copied": [k for k in theta0.meta if k not in float_keys], "out": str(out)}


def _trimming_heap(on_read: Callable[[], None] | None) -> Callable[[], None]:
    """The hook a base's reads call: the base is read once per tensor name and pass, the moment to
    hand the heap's freed pages back; then the caller's ``on_read``, if any."""
    def on_base_read() -> None:
        release_free_heap()
        if on_read is not None:
            on_read()

    return on_base_read


def _pieces_of_rows(tensor: Tensor, start: int, nbytes: int) -> Iterator[tuple[int, Tensor]]:
    """(first row, rows) of a merged ``tensor`` that starts at row ``start``, about ``nbytes`` of
    float32 at a time: θ0 + λτ is formed and written a piece at a time even where a rule gave a
    whole tensor (a wide matrix's spectral merge), so it costs pieces, not copies of the tensor."""
    if not tensor.dim():
        yield start, tensor
        return
    step = max(1, nbytes // (4 * max(1, math.prod(tensor.shape[1:]))))
    for first in range(0, max(1, len(tensor)), step):  # an empty tensor is written too
        yield start + first, tensor[first:first + step]


def _checked(tensor: Tensor, key: str, scale: float) -> Tensor:
    """``tensor`` if it stayed finite when rounded to its output dtype."""
    if not all_finite(tensor):
        raise MergeOverflowError(f"tensor {key!r}: θ0 + {scale:g}·τ leaves the range of {tensor.dtype}")
    return tensor


class _Float32TaskVector(Mapping[str, Tensor]):
    """τ = θ_i − θ0 in float32 per access (half-precision inputs are not rounded back), over the
    base's rows: a model's rows beyond the base's vocabulary are dropped, missing ones are zero."""

    def __init__(self, base: ModelWeights, finetuned: ModelWeights, keys: Sequence[str]):
        self.base, self.finetuned, self.keys_ = base, finetuned, list(keys)

    def __getitem__(self, key: str) -> Tensor:
        shape = self.shape(key)
        if shape:
            return self.rows(key, 0, shape[0])
        return self.finetuned[key].to(torch.float32, copy=True).sub_(self.base[key])  # a 0-d tensor

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.meta[key][0]

    def rows(self, key: str, start: int, stop: int, columns: tuple[int, int] | None = None) -> Tensor:
        """Rows ``start:stop`` of τ, or of its ``columns``, read as such from both models (zero
        where the model lacks the rows)."""
        b = self.base.rows(key, start, stop, columns)
        tau = torch.zeros(b.shape, dtype=torch.float32)
        have = max(0, min(stop, self.finetuned.meta[key][0][0]) - start)
        if have:
            tau[:have] = self.finetuned.rows(key, start, start + have, columns)
            tau[:have] -= b[:have]
        return tau

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def _model_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / 'config.json'}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory / 'config.json'}: not a JSON object")
    return config


def _check_architecture(base_dir: Path, base: Mapping[str, Any], model_dir: Path, model: Mapping[str, Any]) -> None:
    """One ``model_type``; beyond it the tensors decide (a fine-tune saved without ``architectures``,
    or under another head class with the same tensors, merges)."""
    if model.get("model_type") != base.get("model_type"):
        raise CheckpointError(f"{model_dir}: model_type {model.get('model_type')!r} differs from the base's "
                              f"{base.get('model_type')!r} ({base_dir}); models of one architecture only")


def _check_tensors(base: ModelWeights, model: ModelWeights, embeddings: str) -> None:
    """The model's tensors are the base's, shape for shape; see :func:`merge_models` for vocabularies."""
    missing = [k for k in base.meta if k not in model.meta]
    extra = [k for k in model.meta if k not in base.meta]
    if missing or extra:
        names = f"missing {missing[:3]}" if missing else f"not in the base: {extra[:3]}"
        raise CheckpointError(f"{model.path}: its tensors are not the base's ({names}; {len(missing)} missing, "
                              f"{len(extra)} extra): a different architecture?")
    differ = [(k, shape, model.meta[k][0]) for k, (shape, _) in base.meta.items() if model.meta[k][0] != shape]
    vocabulary = [d for d in differ if len(d[1]) == len(d[2]) >= 1 and d[1][1:] == d[2][1:]]
    if len(vocabulary) != len(differ):
        key, shape, other = next(d for d in differ if d not in vocabulary)
        raise CheckpointError(f"{model.path}: tensor {key!r} has shape {other}, the base's {shape}: a different "
                              "architecture?")
    if vocabulary and embeddings != "base":
        listed = ", ".join(f"{k} {other} (base {shape})" for k, shape, other in vocabulary)
        raise CheckpointError(f"{model.path}: its vocabulary differs from the base's: {listed}; merge the rows "
                              "they share and keep the base's vocabulary with embeddings = \"base\"")
    for key, _, _ in vocabulary:
        if not base.is_float(key):
            raise CheckpointError(f"{model.path}: tensor {key!r} differs in shape and is not floating-point")


def _copy_model_files(base_dir: Path, out: Path, dtype: str | None) -> None:
    """Every file of the base's directory but its weights (config, generation config, tokenizer),
    the config's dtype set to ``dtype`` when one is given."""
    for source in sorted(base_dir.iterdir()):
        if not source.is_file() or source.name.startswith(".") or source.name.endswith(_WEIGHT_SUFFIXES) \
                or source.name in (SAFETENSORS_INDEX, BIN_INDEX):
            continue
        if source.name == "config.json" and dtype is not None:
            config = _model_config(base_dir)
            config["torch_dtype"] = dtype  # transformers 4's name
            if "dtype" in config:  # and transformers 5's
                config["dtype"] = dtype
            (out / source.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(source, out / source.name)
