"""The data spec: every setting that determines every split of a federation, validated once.

Two equal specs give identical data. Checks that need only the spec (ranges, list lengths, names
known to the dataset, partitioner and task registries) run when it is built; checks that need the
dataset (enough examples for so many clients) run when the data is loaded.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, field_validator, model_validator

from fedmerge.data.datasets import DATASETS
from fedmerge.data.image_tasks import check_task
from fedmerge.data.partitioners import PARTITIONERS
from fedmerge.data.splits import MIN_CLIENT_EXAMPLES
from fedmerge.data.transforms import TRANSFORM_KINDS
from fedmerge.spec import Concentration, Fraction, Names, PositiveInt, Seed, Spec, Str, known


def _sizes(value: Any) -> float | tuple[int, ...]:
    """A power-law exponent >= 0, or per-client sizes (a list, or "a,b,c" from flat configs)."""
    if isinstance(value, str) and "," in value:
        value = [v.strip() for v in value.split(",")]
    if isinstance(value, (list, tuple)):
        sizes = tuple(_whole(float(v) if isinstance(v, str) and _is_number(v) else v) for v in value)
        if min(sizes, default=0) < MIN_CLIENT_EXAMPLES:
            raise ValueError(f"must each be >= {MIN_CLIENT_EXAMPLES} (a client needs a train and a test split)")
        return sizes
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError("must be a list of per-client sizes or a power-law exponent >= 0")
    return float(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ValueError("must be a list of per-client sizes (integers) or a power-law exponent >= 0")
    return int(value)


class DataSpec(Spec):
    """Everything that determines every split. ``encoder`` and ``cache_dir`` are set by the
    experiment under ``tasks`` (the CLIP model whose heads and preprocessing the tasks use)."""

    num_clients: PositiveInt = 8
    partition: Str = "dirichlet"
    alpha: Concentration = 0.5
    classes_per_client: PositiveInt = 2
    seed: Seed = 0
    dataset: Str = "digits"
    pretrain_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.2
    local_test_fraction: Fraction = 0.2
    local_val_fraction: Fraction = 0.1
    shards_per_client: PositiveInt = 2
    sizes: Annotated[float | tuple[int, ...], BeforeValidator(_sizes)] = 1.0
    transforms: Names = TRANSFORM_KINDS
    tasks: Names = ()
    encoder: Str = ""
    cache_dir: Str = ""

    _check_partition = field_validator("partition")(known(PARTITIONERS.check))
    _check_dataset = field_validator("dataset")(known(DATASETS.check))

    @field_validator("transforms")
    @classmethod
    def _check_transforms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must name at least one transform")
        unknown = [t for t in value if t not in TRANSFORM_KINDS]
        if unknown:
            raise ValueError(f"!transforms: {unknown[0]!r} is not known; known: {', '.join(TRANSFORM_KINDS)}")
        return value

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for task in value:
            known(check_task)(task)
        return value

    @model_validator(mode="after")
    def _check_together(self) -> DataSpec:
        if isinstance(self.sizes, tuple) and len(self.sizes) != self.num_clients:
            raise ValueError(f"!sizes has {len(self.sizes)} entries but num-clients is {self.num_clients}")
        if self.tasks and len(self.tasks) != self.num_clients:
            raise ValueError(f"!tasks lists {len(self.tasks)} tasks but num-clients is {self.num_clients}; "
                             "each client fine-tunes one task")
        if self.local_test_fraction + self.local_val_fraction >= 0.9:
            raise ValueError("!local-test-fraction + local-val-fraction must leave at least 10% to local training")
        if self.pretrain_fraction + self.test_fraction >= 0.9:
            raise ValueError("!pretrain-fraction + test-fraction must leave at least 10% of the data to the clients")
        return self
