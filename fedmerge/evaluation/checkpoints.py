"""Scoring existing CLIP checkpoints on the image-task benchmark (``fedmerge evaluate``): the papers'
table of zero-shot, fine-tuned and merged models, without fine-tuning anything."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmerge.data.image_tasks import ImageSplit, clip_transform, load_task
from fedmerge.errors import ConfigError
from fedmerge.evaluation.scores import Evaluator, normalized_accuracy
from fedmerge.merging import merge
from fedmerge.models.clip import build_classifier, encoder_state, preprocessing, zero_shot_head
from fedmerge.models.registry import device_for
from fedmerge.task_vector import TaskVector, apply


def task_test_splits(base: str, tasks: Sequence[str], cache_dir: str | os.PathLike | None = None,
                     max_examples: int = 0, workers: int = 0) -> list:
    """Each task's test split with CLIP preprocessing and its zero-shot head from ``base``."""
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
