"""Hugging Face checkpoints on disk: Hub ids resolved from the local cache, ``save_pretrained``
directories read tensor by tensor. Nothing downloads unless the Hub is online (``HF_HUB_OFFLINE``
unset or 0); a model missing from the cache is one :class:`CheckpointError` line naming what to fetch.

``transformers`` is an optional dependency (``pip install 'fedmerge[clip]'``), imported in one place,
:func:`transformers_module`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from torch import Tensor

from fedmerge.errors import CheckpointError, ConfigError
from fedmerge.io.sharded import ModelWeights

_HUB_FILES = ["*.json", "*.txt", "*.safetensors"]
# Repos from before safetensors (openai/clip-vit-base-patch32's main branch among them) hold only
# PyTorch pickles: fetched only where a repo has no safetensors, and read with weights_only=True.
_HUB_BIN_FILES = ["pytorch_model*.bin", "pytorch_model*.bin.index.json"]


def transformers_module() -> Any:
    """``transformers``, or one clear line saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("Hugging Face models (CLIP, tiny-lm, causal-lm) need transformers: pip install "
                          "'fedmerge[clip]' or 'fedmerge[lm]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") != 1 or os.sep != "/" and os.sep in source


def resolve(source: str | os.PathLike) -> Path:
    """The local directory of a Hub id or ``save_pretrained`` directory (from the cache when offline)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: not a Hugging Face model directory (no config.json)")
        return path
    if path.exists():
        raise CheckpointError(f"{path}: a file; expected a Hub id or a save_pretrained directory")
    if looks_like_path(text):
        raise CheckpointError(f"{text}: no such model directory (and not a Hub id like openai/clip-vit-base-patch32)")
    offline = hub_offline()
    try:
        directory = Path(snapshot_download(text, allow_patterns=_HUB_FILES, local_files_only=offline))
        if not has_weights(directory):  # no safetensors in the repo (or the cache): its .bin weights
            directory = Path(snapshot_download(text, allow_patterns=_HUB_BIN_FILES, local_files_only=offline))
        return directory
    except Exception as exc:  # not cached, no network, unknown repo: one line saying what to fetch
        why = "it is not in the local Hugging Face cache and the Hub is offline" if offline else f"{type(exc).__name__}"
        raise CheckpointError(
            f"model {text!r} cannot be loaded ({why}); fetch it where there is network with "
            f"`hf download {text}` (into ~/.cache/huggingface, or set HF_HOME) "
            "or pass a local save_pretrained directory"
        ) from None


def has_weights(directory: Path) -> bool:
    """Whether a checkpoint directory holds model weights (safetensors, or else PyTorch .bin files)."""
    return any(directory.glob("*.safetensors")) or any(directory.glob("pytorch_model*.bin"))


def read_state(directory: Path) -> dict[str, Tensor]:
    """Every tensor of a Hugging Face checkpoint directory: the files its index names, or its one
    weights file (:func:`fedmerge.io.sharded.weight_files`; other ``*.safetensors`` beside them, an
    adapter or a consolidated copy, are not the model's)."""
    weights = ModelWeights(directory, keep_last=False)
    return {key: weights[key] for key in weights.meta}


def is_pretrained_source(source: str | os.PathLike) -> bool:
    """A ``save_pretrained`` directory or something shaped like a Hub id (``org/name``), not a file."""
    path = Path(str(source)).expanduser()
    return path.is_dir() or (not path.exists() and not looks_like_path(str(source)))
