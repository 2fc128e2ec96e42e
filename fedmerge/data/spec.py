"""The data spec: every setting that determines every split of a federation."""

from __future__ import annotations

from dataclasses import dataclass

TRANSFORM_KINDS = ("permutation", "rotation", "flip", "inversion")


@dataclass(frozen=True)
class DataSpec:
    """Everything that determines every split: two equal specs give identical data."""

    num_clients: int
    partition: str = "iid"
    alpha: float = 0.5
    classes_per_client: int = 2
    seed: int = 0
    dataset: str = "digits"
    pretrain_fraction: float = 0.1
    test_fraction: float = 0.2
    local_test_fraction: float = 0.2
    local_val_fraction: float = 0.1
    shards_per_client: int = 2
    sizes: float | tuple[int, ...] = 1.0
    transforms: tuple[str, ...] = TRANSFORM_KINDS
    tasks: tuple[str, ...] = ()  # one image task per client (fedmerge.image_tasks); replaces dataset/partition
    encoder: str = ""  # under tasks: the CLIP model whose heads and preprocessing the tasks use
    cache_dir: str = ""  # under tasks: where zero-shot heads are cached

    def __post_init__(self) -> None:  # lists arrive from configs and messages; keep the spec hashable
        if isinstance(self.sizes, (list, tuple)):
            object.__setattr__(self, "sizes", tuple(int(v) for v in self.sizes))
        if isinstance(self.transforms, (list, tuple)):
            object.__setattr__(self, "transforms", tuple(self.transforms))
        if isinstance(self.tasks, (list, tuple)):
            object.__setattr__(self, "tasks", tuple(self.tasks))
