"""The eight vision tasks of the CLIP merging benchmark, one task per client (Flower-free).

``TASKS`` maps a task name to a loader returning its :class:`ImageTask` (class names, prompt
templates, train and test images). The eight of the papers come from Hugging Face ``datasets`` (the
copies FusionBench uses); ``folder:PATH`` is any local image folder (``PATH/train/CLASS/*.png`` and
``PATH/test/CLASS/*.png``, optional ``PATH/templates.txt`` with one ``{c}`` template per line).
Datasets are read from the local cache only (``HF_DATASETS_OFFLINE``): a missing one is one
:class:`ConfigError` line naming the dataset to fetch.

:func:`fedmerge.data.federated.load_task_suite` turns a spec's ``tasks`` into a federation: client i
trains on task i (minus a seeded validation split) and is tested on the task's test split; every
split carries its task's frozen zero-shot head (:func:`fedmerge.models.clip.zero_shot_head`).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fedmerge.errors import ConfigError

FOLDER = "folder:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Class names and templates follow mlfoundations/task_vectors (src/datasets/templates.py).
DIGITS = tuple(str(i) for i in range(10))
EUROSAT_CLASSES = (
    "annual crop land", "forest", "brushland or shrubland", "highway or road",
    "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
    "residential buildings or homes or apartments", "river", "lake or sea",
)
GTSRB_CLASSES = (
    "red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit", "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit", "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit", "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit", "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing", "red and white triangle road intersection warning",
    "white and yellow diamond priority road", "red and white upside down triangle yield right-of-way", "stop",
    "empty red and white circle", "red and white circle no truck entry", "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning", "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning", "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning", "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning", "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning", "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning", "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit", "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory", "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory", "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory", "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)
TEMPLATES = {
    "Cars": ("a photo of a {c}.", "a photo of the {c}.", "a photo of my {c}.", "i love my {c}!",
             "a photo of my dirty {c}.", "a photo of my clean {c}.", "a photo of my new {c}.", "a photo of my old {c}."),
    "DTD": ("a photo of a {c} texture.", "a photo of a {c} pattern.", "a photo of a {c} thing.",
            "a photo of a {c} object.", "a photo of the {c} texture.", "a photo of the {c} pattern.",
            "a photo of the {c} thing.", "a photo of the {c} object."),
    "EuroSAT": ("a centered satellite photo of {c}.", "a centered satellite photo of a {c}.",
                "a centered satellite photo of the {c}."),
    "GTSRB": ('a zoomed in photo of a "{c}" traffic sign.', 'a centered photo of a "{c}" traffic sign.',
              'a close up photo of a "{c}" traffic sign.'),
    "MNIST": ('a photo of the number: "{c}".',),
    "RESISC45": tuple(f"{kind} {view} of {art}{{c}}." for art in ("", "a ", "the ")
                      for kind, view in (("satellite", "imagery"), ("aerial", "imagery"), ("satellite", "photo"),
                                         ("aerial", "photo"), ("satellite", "view"), ("aerial", "view"))),
    "SUN397": ("a photo of a {c}.", "a photo of the {c}."),
    "SVHN": ('a photo of the number: "{c}".',),
}
# name: (Hugging Face dataset, config, train split, test split, class names or None for the dataset's)
HF_DATASETS: dict[str, tuple[str, str | None, str, str, tuple[str, ...] | None]] = {
    "Cars": ("tanganke/stanford_cars", None, "train", "test", None),
    "DTD": ("tanganke/dtd", None, "train", "test", None),
    "EuroSAT": ("tanganke/eurosat", None, "train", "test", EUROSAT_CLASSES),
    "GTSRB": ("tanganke/gtsrb", None, "train", "test", GTSRB_CLASSES),
    "MNIST": ("ylecun/mnist", None, "train", "test", DIGITS),
    "RESISC45": ("tanganke/resisc45", None, "train", "test", None),
    "SUN397": ("tanganke/sun397", None, "train", "test", None),
    "SVHN": ("ufldl-stanford/svhn", "cropped_digits", "train", "test", DIGITS),
}
EIGHT_TASKS = ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN")


@dataclass(frozen=True)
class ImageSource:
    """Images and labels of one split, read lazily: ``image(i)`` is a PIL image, ``labels`` all labels."""

    ident: str  # what the images are, for cache keys: dataset and split, or a folder
    labels: np.ndarray
    image: Callable[[int], Any]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ImageTask:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    train: ImageSource
    test: ImageSource


def _clean(name: str) -> str:
    return name.replace("_", " ").replace("/", " ").strip()


def _hf_task(name: str) -> ImageTask:
    repo, subset, train_split, test_split, classes = HF_DATASETS[name]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets  # Hugging Face datasets (pyarrow, pandas) takes a while to import: only when used

    try:
        datasets.disable_progress_bars()
        splits = {s: datasets.load_dataset(repo, subset, split=s) for s in (train_split, test_split)}
    except Exception as exc:
        hint = f"datasets.load_dataset({repo!r}{', ' + repr(subset) if subset else ''})"
        raise ConfigError(f"task {name}: dataset {repo!r} is not in the local Hugging Face cache ({type(exc).__name__}); "
                          f"fetch it where there is network with `python -c \"import datasets; {hint}\"`") from None
    train, test = splits[train_split], splits[test_split]
    image_key = next(k for k in ("image", "img", "jpg", "png") if k in train.features)
    label_key = next(k for k in ("label", "labels", "cls") if k in train.features)
    if classes is None:
        classes = tuple(_clean(c) for c in train.features[label_key].names)

    def source(ds, split: str) -> ImageSource:
        return ImageSource(f"hf:{repo}:{subset}:{split}:{ds._fingerprint}", np.asarray(ds[label_key], dtype=np.int64),
                           lambda i: ds[int(i)][image_key])

    return ImageTask(name, tuple(classes), TEMPLATES[name], source(train, train_split), source(test, test_split))


def folder_task(path: str | os.PathLike, name: str | None = None) -> ImageTask:
    """A task from ``PATH/{train,test}/CLASS/*.png`` (class names: folder names, ``_`` read as space)."""
    root = Path(path).expanduser()
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise ConfigError(f"task folder {root}: needs train/ and test/ subfolders with one folder per class")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"task folder {root}/train holds no class folders")

    def source(split: str) -> ImageSource:
        files, labels = [], []
        for k, c in enumerate(classes):
            for f in sorted((root / split / c).glob("*")) if (root / split / c).is_dir() else []:
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f)
                    labels.append(k)
        if not files:
            raise ConfigError(f"task folder {root}/{split} holds no images")
        return ImageSource(f"folder:{root.resolve()}:{split}:{len(files)}", np.asarray(labels, dtype=np.int64),
                           lambda i: Image.open(files[int(i)]))

    templates_file = root / "templates.txt"
    templates = (tuple(t for t in templates_file.read_text().splitlines() if t.strip())
                 if templates_file.is_file() else ("a photo of a {c}.",))
    return ImageTask(name or root.name, tuple(_clean(c) for c in classes), templates, source("train"), source("test"))


TASKS: dict[str, Callable[[], ImageTask]] = {name: functools.partial(_hf_task, name) for name in HF_DATASETS}


def check_task(name: str) -> None:
    if name.startswith(FOLDER):
        return
    if name not in TASKS:
        raise ConfigError(f"task {name!r} is not known; known: {', '.join(sorted(TASKS))} or folder:PATH")


def load_task(name: str) -> ImageTask:
    check_task(name)
    if name.startswith(FOLDER):
        return folder_task(name[len(FOLDER):])
    return TASKS[name]()


class ImageSplit(torch.utils.data.Dataset):
    """Rows ``index`` of an image source, preprocessed the CLIP way, with the task's frozen ``head``.

    A split the training and evaluation loops accept like :class:`fedmerge.data.Split`: ``len``,
    ``y`` (labels), ``batch(index)``, ``label_counts``; ``workers`` DataLoader processes decode images."""

    def __init__(self, source: ImageSource, index: np.ndarray, transform: Callable[[Any], Tensor],
                 head: Tensor | None, transform_id: str = "", workers: int = 0):
        self.source, self.index = source, np.asarray(index, dtype=np.int64)
        self.transform, self.head, self.transform_id, self.workers = transform, head, transform_id, workers
        self.y = torch.as_tensor(source.labels[self.index])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = self.source.image(self.index[i])
        return self.transform(image.convert("RGB")), int(self.y[i])

    def batch(self, index: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        items = [self[int(i)] for i in index]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)

    def subset(self, index) -> ImageSplit:
        return ImageSplit(self.source, self.index[np.asarray(index, dtype=np.int64)], self.transform, self.head,
                          self.transform_id, self.workers)

    def label_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.y, minlength=num_classes).tolist()

    def fingerprint(self) -> str:
        """Identifies the examples, their preprocessing and the head (task-vector cache keys)."""
        h = hashlib.sha256(f"{self.source.ident}|{self.transform_id}".encode())
        h.update(self.index.tobytes())
        if self.head is not None:
            h.update(self.head.numpy().tobytes())
        return h.hexdigest()


def clip_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable[[Any], Tensor]:
    """CLIP's preprocessing: bicubic resize of the short side, centre crop, normalise."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(mean, std),
    ])
