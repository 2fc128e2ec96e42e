"""CLIP image encoders with frozen zero-shot heads, through Hugging Face ``transformers``.

The benchmark of both papers behind fedmerge: a CLIP ViT (``openai/clip-vit-base-patch32``) whose
*image encoder* is fine-tuned per task and merged, while every task keeps a frozen zero-shot
classification head built from CLIP text embeddings of its class names × prompt templates.

* The merged weights are the image encoder's: the tensors named ``vision_model.*`` and
  ``visual_projection.weight``, the same names in ``CLIPModel``, ``CLIPVisionModelWithProjection`` and
  ``CLIPVisionModel`` checkpoints, so any of them can be a base or a fine-tuned model.
* A model is named ``clip:SOURCE`` in fedmerge's model registry, SOURCE a Hub id
  (``openai/clip-vit-base-patch32``) or a local ``save_pretrained`` directory.
* Heads are computed once per (model, class names, templates) and cached as safetensors.
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
from fedmerge.io.hub import read_state, resolve, transformers_module
from fedmerge.io.state import read_cache_entry, write_cache_entry

ENCODER_PREFIXES = ("vision_model.", "visual_projection.")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
            raise ConfigError("a CLIP classifier needs a task head: use a task dataset (fedmerge.data.image_tasks)")
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

    Cached in ``cache_dir/heads/KEY.safetensors`` (verified when read), KEY a digest of the model id,
    class names and templates (each template a format string with ``{c}`` for the class name)."""
    path = None
    if cache_dir:
        path = Path(cache_dir) / "heads" / f"{head_key(source, classnames, templates)}.safetensors"
        if (head := read_cache_entry(path, lambda tensors, _: tensors["head"])) is not None:
            return head
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
        write_cache_entry({"head": head}, path)
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
