"""CLIP image encoders with frozen zero-shot heads, through Hugging Face ``transformers`` (Flower-free).

The benchmark of both papers behind fedmerge: a CLIP ViT (``openai/clip-vit-base-patch32``) whose
*image encoder* is fine-tuned per task and merged, while every task keeps a frozen zero-shot
classification head built from CLIP text embeddings of its class names × prompt templates.

* The merged weights are the image encoder's: the tensors named ``vision_model.*`` and
  ``visual_projection.weight``, the same names in ``CLIPModel``, ``CLIPVisionModelWithProjection`` and
  ``CLIPVisionModel`` checkpoints, so any of them can be a base or a fine-tuned model.
* A model is named ``clip:SOURCE`` in fedmerge's model registry, SOURCE a Hub id
  (``openai/clip-vit-base-patch32``) or a local ``save_pretrained`` directory.
* Heads are computed once per (model, class names, templates) and cached as safetensors.
* Nothing here downloads unless the Hugging Face Hub is online (``HF_HUB_OFFLINE`` unset or 0):
  a model missing from the local cache is one :class:`CheckpointError` line naming what to fetch.

``transformers`` is imported lazily: the digits path never needs it (``pip install 'fedmerge[clip]'``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedmerge.errors import CheckpointError, ConfigError
from fedmerge.task_vector import load_state, save_state

ENCODER_PREFIXES = ("vision_model.", "visual_projection.")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HUB_FILES = ["*.json", "*.txt", "*.safetensors"]


def transformers_module():
    """``transformers``, or one clear line saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("CLIP models need Hugging Face transformers: pip install 'fedmerge[clip]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(source: str) -> bool:
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
    if _looks_like_path(text):
        raise CheckpointError(f"{text}: no such model directory (and not a Hub id like openai/clip-vit-base-patch32)")
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        return Path(snapshot_download(text, allow_patterns=_HUB_FILES, local_files_only=offline))
    except Exception as exc:  # not cached, no network, unknown repo: one line saying what to fetch
        why = "it is not in the local Hugging Face cache and the Hub is offline" if offline else f"{type(exc).__name__}"
        raise CheckpointError(
            f"model {text!r} cannot be loaded ({why}); fetch it where there is network with "
            f"`hf download {text}` (into ~/.cache/huggingface, or set HF_HOME) or pass a local save_pretrained directory"
        ) from None


def read_state(directory: Path) -> dict[str, Tensor]:
    """Every tensor of a Hugging Face checkpoint directory (safetensors, sharded or not; else a .bin)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        bins = sorted(directory.glob("pytorch_model*.bin"))
        if not bins:
            raise CheckpointError(f"{directory}: holds no model weights (*.safetensors or pytorch_model.bin)")
        state = {}
        for f in bins:
            state.update(load_state(f))
        return state
    from safetensors import safe_open

    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            state.update({k: fh.get_tensor(k) for k in fh.keys()})
    return state


def encoder_state(source: str | os.PathLike, base: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The image encoder's floating-point tensors of a CLIP checkpoint (Hub id or directory).

    A ``CLIPVisionModel`` checkpoint has no ``visual_projection``; with ``base`` given it takes the
    base's (the projection was then not fine-tuned, its task vector is zero)."""
    directory = resolve(source)
    state = {k: v for k, v in read_state(directory).items()
             if k.startswith(ENCODER_PREFIXES) and v.is_floating_point()}
    if not any(k.startswith("vision_model.") for k in state):
        raise CheckpointError(f"{source}: not a CLIP checkpoint (no vision_model.* tensors)")
    if base is not None:
        for k, v in base.items():
            if k.startswith("visual_projection.") and k not in state:
                state[k] = v.clone()
    return state


def vision_config(source: str | os.PathLike):
    """The vision config of a CLIP checkpoint, its ``projection_dim`` that of the joint embedding."""
    tf = transformers_module()
    directory = resolve(source)
    try:
        config = tf.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"{source}: unreadable config.json ({exc})") from None
    if hasattr(config, "vision_config"):
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        return vision
    if getattr(config, "model_type", "") != "clip_vision_model":
        raise CheckpointError(f"{source}: not a CLIP model (model_type={getattr(config, 'model_type', '?')!r})")
    return config


class ClipClassifier(nn.Module):
    """A CLIP image encoder whose logits come from a head passed at call time.

    ``forward(x, head)`` = 100·normalize(encoder(x)) · headᵀ with ``head`` (classes × d) the task's
    frozen zero-shot head (logit scale included). The state dict holds only the encoder
    (``vision_model.*``, ``visual_projection.weight``): heads never enter task vectors or merging."""

    def __init__(self, config):
        super().__init__()
        tf = transformers_module()
        model = tf.CLIPVisionModelWithProjection(config)
        self.config = config
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection

    def embed(self, pixel_values: Tensor) -> Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        emb = self.visual_projection(pooled)
        return emb / emb.norm(dim=-1, keepdim=True)

    def forward(self, pixel_values: Tensor, head: Tensor | None = None) -> Tensor:
        if head is None:
            raise ConfigError("a CLIP classifier needs a task head: use a task dataset (fedmerge.image_tasks)")
        return self.embed(pixel_values) @ head.to(pixel_values.device).T


def build_classifier(source: str, state: Mapping[str, Tensor] | None = None) -> ClipClassifier:
    model = ClipClassifier(vision_config(source))
    if state is not None:
        model.load_state_dict(dict(state))
    return model


def save_pretrained(state: Mapping[str, Tensor], like: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write an image encoder as a ``CLIPVisionModelWithProjection`` ``save_pretrained`` directory."""
    tf = transformers_module()
    model = tf.CLIPVisionModelWithProjection(vision_config(like))
    missing, unexpected = model.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise CheckpointError(f"{out}: the weights do not fit the architecture of {like} "
                              f"(missing {missing[:1]}, unexpected {unexpected[:1]})")
    out = Path(out)
    model.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------
# Zero-shot heads
# ------------------------------------------------------------------------------------------------


def head_from_text_embeddings(embeddings: Tensor, logit_scale: float = 100.0) -> Tensor:
    """The zero-shot head (classes × d) from text embeddings (classes × templates × d).

    Each template's embedding is normalised, the templates averaged, the mean normalised again and
    multiplied by CLIP's logit scale (``mlfoundations/task_vectors``' ``build_classification_head``)."""
    if embeddings.dim() != 3:
        raise ValueError("text embeddings must be classes × templates × d")
    emb = embeddings / embeddings.norm(dim=-1, keepdim=True)
    emb = emb.mean(dim=1)
    return (emb / emb.norm(dim=-1, keepdim=True) * logit_scale).float().contiguous()


def head_key(source: str, classnames: Sequence[str], templates: Sequence[str]) -> str:
    text = json.dumps({"format": 1, "model": str(source), "classnames": list(classnames),
                       "templates": list(templates)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@torch.no_grad()
def zero_shot_head(source: str, classnames: Sequence[str], templates: Sequence[str],
                   cache_dir: str | os.PathLike | None = None) -> Tensor:
    """The frozen head of one task, from the full CLIP model (text tower and tokenizer) at ``source``.

    Cached in ``cache_dir/heads/KEY.safetensors``, KEY a digest of the model id, class names and
    templates (each template a format string with ``{c}`` for the class name)."""
    path = None
    if cache_dir:
        path = Path(cache_dir) / "heads" / f"{head_key(source, classnames, templates)}.safetensors"
        if path.is_file():
            return load_state(path)["head"]
    tf = transformers_module()
    directory = resolve(source)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = tf.CLIPModel.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"{source}: zero-shot heads need the full CLIP model with its text encoder and "
                              f"tokenizer, e.g. openai/clip-vit-base-patch32 ({type(exc).__name__})") from None
    model.eval()
    texts = [t.format(c=c) for c in classnames for t in templates]
    feats = []
    for start in range(0, len(texts), 256):
        tokens = tokenizer(texts[start:start + 256], padding=True, truncation=True, return_tensors="pt")
        out = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        feats.append(model.text_projection(out.pooler_output))
    emb = torch.cat(feats).reshape(len(classnames), len(templates), -1)
    head = head_from_text_embeddings(emb, float(model.logit_scale.exp()))
    if path is not None:
        save_state({"head": head}, path)
    return head


def preprocessing(source: str | os.PathLike) -> dict[str, Any]:
    """CLIP's image preprocessing for ``source``: size, mean and std (from preprocessor_config.json)."""
    directory = resolve(source)
    size = int(vision_config(source).image_size)
    mean, std = CLIP_MEAN, CLIP_STD
    pre = directory / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return {"size": size, "mean": tuple(mean), "std": tuple(std)}


# ------------------------------------------------------------------------------------------------
# Offline: merge and score checkpoints that already exist (Hub ids or save_pretrained directories)
# ------------------------------------------------------------------------------------------------


def is_pretrained_source(source: str | os.PathLike) -> bool:
    """A ``save_pretrained`` directory or something shaped like a Hub id (``org/name``), not a file."""
    path = Path(str(source)).expanduser()
    return path.is_dir() or (not path.exists() and not _looks_like_path(str(source)))


def merge_pretrained(base: str, models: Sequence[str], method: str, out: str | os.PathLike, *, scale: float = 1.0,
                     options: Mapping[str, Any] | None = None, weights: Sequence[float] | None = None,
                     overwrite: bool = False) -> dict[str, Any]:
    """θ0 + λ·merge(τ_i) over CLIP image encoders, written as a ``save_pretrained`` directory ``out``."""
    from fedmerge.merging import METHODS, merge
    from fedmerge.task_vector import TaskVector, apply

    if method not in METHODS:
        from fedmerge.errors import MergeError

        raise MergeError(f"unknown merging method {method!r}; known: {', '.join(sorted(METHODS))}")
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out} already exists; choose a new directory (or allow overwriting)")
    theta0 = encoder_state(base)
    taus = [TaskVector.between(theta0, encoder_state(m, base=theta0)) for m in models]
    merged = merge(method, taus, weights, **dict(options or {}))
    save_pretrained(apply(theta0, merged, scale), base, out)
    return {"method": method, "scale": scale, "models": len(taus), "merged": sorted(merged), "copied": [],
            "out": str(out)}


def task_test_splits(base: str, tasks: Sequence[str], cache_dir: str | os.PathLike | None = None,
                     max_examples: int = 0, workers: int = 0) -> list:
    """Each task's test split with CLIP preprocessing and its zero-shot head from ``base``."""
    import numpy as np

    from fedmerge.image_tasks import ImageSplit, clip_transform, load_task

    pre = preprocessing(base)
    transform = clip_transform(pre["size"], pre["mean"], pre["std"])
    splits = []
    for name in tasks:
        task = load_task(name)
        head = zero_shot_head(base, task.classnames, task.templates, cache_dir)
        n = len(task.test) if not max_examples else min(max_examples, len(task.test))
        splits.append(ImageSplit(task.test, np.arange(n), transform, head, workers=workers))
    return splits


def evaluate_checkpoints(base: str, models: Sequence[str], tasks: Sequence[str], *,
                         methods: Sequence[str] = ("task_arithmetic", "tsv"), scales: Mapping[str, float] | None = None,
                         options: Mapping[str, Mapping[str, Any]] | None = None,
                         merged: Mapping[str, str] | None = None, cache_dir: str | os.PathLike | None = None,
                         max_examples: int = 0, workers: int = 0, on_row=None) -> dict[str, Any]:
    """The papers' table from existing checkpoints: accuracy on every task's test split of the zero-shot
    base, each fine-tuned model on its own task, every merge of them (and any ``merged`` model given),
    with normalized accuracy acc(merged, t)/acc(fine-tuned_t, t) (TSV paper, Eq. 9).

    ``models[i]`` is the model fine-tuned on ``tasks[i]``. Returns ``{"tasks", "rows": {name: {"scale",
    "accuracies", "accuracy", "normalized_accuracies", "normalized_accuracy"}}}`` (fractions in [0, 1])."""
    from fedmerge.evaluation import Evaluator, normalized_accuracy
    from fedmerge.merging import merge
    from fedmerge.models import device_for
    from fedmerge.task_vector import TaskVector, apply

    if len(models) != len(tasks):
        raise ConfigError(f"{len(models)} fine-tuned models for {len(tasks)} tasks; give one model per task, in order")
    splits = task_test_splits(base, tasks, cache_dir, max_examples, workers)
    theta0 = encoder_state(base)
    evaluator = Evaluator(build_classifier(base).to(device_for("clip:" + base)))
    rows: dict[str, dict[str, Any]] = {}

    def add(name: str, accs: list[float], scale: float | None, own: list[float] | None) -> None:
        rows[name] = {"scale": scale, "accuracies": accs, "accuracy": sum(accs) / len(accs)}
        if own is not None:
            rows[name]["normalized_accuracies"] = [a / o if o > 0 else float("nan") for a, o in zip(accs, own)]
            rows[name]["normalized_accuracy"] = normalized_accuracy(accs, own)
        if on_row:
            on_row(name)

    finetuned = [encoder_state(m, base=theta0) for m in models]
    own = [evaluator.accuracy(state, split) for state, split in zip(finetuned, splits)]
    add("fine-tuned", own, None, own)
    add("zero-shot", evaluator.accuracies(theta0, splits), None, own)
    taus = [TaskVector.between(theta0, state) for state in finetuned]
    del finetuned
    for method in methods:
        scale = float((scales or {}).get(method, 1.0))
        tau = merge(method, taus, **dict((options or {}).get(method, {})))
        add(method, evaluator.accuracies(apply(theta0, tau, scale), splits), scale, own)
    for name, source in (merged or {}).items():
        add(name, evaluator.accuracies(encoder_state(source, base=theta0), splits), None, own)
    return {"base": str(base), "models": [str(m) for m in models], "tasks": list(tasks), "rows": rows}
