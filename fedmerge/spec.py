"""Typed, validated settings: the base of every spec (data, training, pre-training, attacks, config).

A :class:`Spec` is a frozen pydantic model whose fields are written with hyphens in configs, TOML
and Flower messages (``num_clients`` is ``num-clients``). It is validated once, when it is built;
any bad value is one :class:`~fedmerge.errors.ConfigError` line naming the key and the value.
The annotated types below (``Int``, ``Float``, ``Positive``, ``Fraction``, ...) carry the checks
and their wording, so every spec says "must be > 0, got -1" the same way. Every ``Float`` is finite;
the named ranges (``Seed``, ``LearningRate``, ...) hold what the code downstream can use, with room
to spare for any real experiment.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, TypeAdapter, ValidationError

from fedmerge.errors import ConfigError

S = TypeVar("S", bound="Spec")


def hyphenate(name: str) -> str:
    return name.replace("_", "-")


class Spec(BaseModel):
    """A frozen, validated group of settings with hyphenated keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=hyphenate, populate_by_name=True,
                              validate_default=True, arbitrary_types_allowed=True)

    def __init__(self, **values: Any) -> None:
        """Validate ``values`` (hyphenated or underscored keys); a bad one is one ``ConfigError`` line."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise config_error(exc, type(self).key_name) from None

    @classmethod
    def key_name(cls, location: tuple[str, ...]) -> str:
        """The key users write for a field at ``location`` (hyphenated names, outermost first)."""
        return ".".join(location)

    @classmethod
    def build(cls: type[S], values: Mapping[str, Any]) -> S:
        """The spec from a mapping of hyphenated (or underscored) keys."""
        return cls(**dict(values))

    @classmethod
    def from_config(cls: type[S], config: Mapping[str, Any]) -> S:
        """The spec from the keys it knows in a flat config (a Flower message's); others are ignored."""
        known = {f.alias or name for name, f in cls.model_fields.items()}
        return cls.build({k: v for k, v in config.items() if k in known})

    def to_config(self) -> dict[str, Any]:
        """``{"local-steps": 10, ...}``: hyphenated keys, tuples as lists (what configs and messages hold)."""
        return {hyphenate(k): _plain(v) for k, v in self.model_dump().items()}

    def replace(self: S, **changes: Any) -> S:
        """A validated copy with some fields changed (underscored names)."""
        return type(self).build({**self.model_dump(), **changes})


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_CHOICE = "choose from "


class SpecError(ConfigError):
    """A bad setting: ``key`` (hyphenated; None for a sentence about several keys) and what is wrong."""

    def __init__(self, key: str | None, detail: str, joiner: str = " ", location: tuple[str, ...] = ()) -> None:
        self.key, self.detail, self.joiner, self.location = key, detail, joiner, location
        super().__init__(f"{key}{joiner}{detail}" if key else detail)

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuilt from its own arguments: an error raised in another process (Ray's workers send
        theirs back by pickle) arrives as the same ``SpecError``."""
        return type(self), (self.key, self.detail, self.joiner, self.location), self.__dict__


def config_error(exc: ValidationError, rename: Callable[[tuple[str, ...]], str] = ".".join) -> SpecError:
    """The first problem of a pydantic error as one line: ``key must be ..., got value``.

    ``rename`` maps the error's location (hyphenated field names, outermost first) to the key users
    write; validators raise ``"!sentence"`` for a whole sentence of their own (cross-field checks)."""
    error = exc.errors()[0]
    loc = tuple(hyphenate(str(part)) for part in error["loc"] if not isinstance(part, int))
    inner = error.get("ctx", {}).get("error")
    if isinstance(inner, SpecError):  # raised by a nested spec: its field lies one level down
        loc = (*loc, *inner.location) if inner.key else ()
        return SpecError(rename(loc) if loc else None, inner.detail, inner.joiner, loc)
    key = rename(loc) if loc else None
    message = error["msg"].removeprefix("Value error, ")
    if message.startswith("!"):
        return SpecError(None, message[1:])
    if message.startswith(_CHOICE):
        return SpecError(key, f"{error.get('input')!r} is not known; {message}", joiner="=", location=loc)
    if error["type"] == "extra_forbidden":
        return SpecError(None, f"unknown config key {'.'.join(loc)!r}")
    if error["type"] == "missing":
        return SpecError(key, "is required", location=loc)
    return SpecError(key, f"{message}, got {error.get('input')!r}", location=loc)


# -- value types ------------------------------------------------------------------------------


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number")
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return float(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _boolean(value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"  # flat run configs may carry booleans as strings
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def check(predicate: Callable[[Any], bool], message: str) -> AfterValidator:
    """A validator raising ``message`` (e.g. "must be > 0") when ``predicate`` fails."""

    def validate(value: Any) -> Any:
        if not predicate(value):
            raise ValueError(message)
        return value

    return AfterValidator(validate)


Int = Annotated[int, BeforeValidator(_integer)]
Float = Annotated[float, BeforeValidator(_number)]
Str = Annotated[str, BeforeValidator(_text)]
Bool = Annotated[bool, BeforeValidator(_boolean)]
PositiveInt = Annotated[Int, check(lambda v: v >= 1, "must be an integer >= 1")]
NonNegativeInt = Annotated[Int, check(lambda v: v >= 0, "must be an integer >= 0")]
Positive = Annotated[Float, check(lambda v: v > 0, "must be > 0")]
NonNegative = Annotated[Float, check(lambda v: v >= 0, "must be >= 0")]
Fraction = Annotated[Float, check(lambda v: 0 < v < 1, "must lie strictly between 0 and 1")]


def _shown(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else repr(number)


def within(low: float, high: float, *, open_low: bool = False) -> AfterValidator:
    """A validator for ``low <= v <= high`` (``low < v`` when ``open_low``): "must lie in (0, 10]"."""
    interval = f"{'(' if open_low else '['}{_shown(low)}, {_shown(high)}]"
    return check(lambda v: (low < v if open_low else low <= v) and v <= high, f"must lie in {interval}")


# Ray resources of one task: a share of a CPU or whole CPUs, and of GPUs; the bounds only catch typos.
TaskCPUs = Annotated[Float, within(0, 1024, open_low=True)]
TaskGPUs = Annotated[Float, within(0, 64)]

# Seeds: numpy's SeedSequence takes integers >= 0 and torch's manual_seed at most 2**64 - 1; clients
# shuffle with seed * 100_003 + partition_id * 7_919 + 1 (fedmerge.train.local.client_seed), and
# Flower's messages carry signed 64-bit integers. Seeds up to 2**32 - 1 (numpy's classic range) keep
# every derived seed below 2**63 for up to a billion clients.
MAX_SEED = 2**32 - 1
Seed = Annotated[Int, check(lambda v: 0 <= v <= MAX_SEED, f"must be an integer in [0, {MAX_SEED}]")]
# Optimizer settings: a step larger than 10 times the gradient, or weight decay above 100, diverges on
# every model here (and on any published recipe); such values are typos, not experiments.
LearningRate = Annotated[Float, within(0, 10, open_low=True)]
WeightDecay = Annotated[Float, within(0, 100)]
# A Dirichlet concentration of 1e6 already splits labels evenly to three digits; near float's limit
# numpy's Dirichlet draws collapse to zeros. (A value <= 0 reads "must be > 0", as for any Positive.)
Concentration = Annotated[Positive, within(0, 1e6, open_low=True)]
# Factors applied to weights (λ, the scale attack) and noise added to them: large enough to break any
# model, small enough that float32 weights stay finite.
MAX_FACTOR = 1e6
Factor = Annotated[Float, within(-MAX_FACTOR, MAX_FACTOR)]
Noise = Annotated[Float, within(0, MAX_FACTOR)]
# Waits: Python's thread waits refuse more than threading.TIMEOUT_MAX (about 292 years on Linux, far
# less elsewhere); ten million seconds is 115 days.
Seconds = Annotated[Float, within(0, 1e7, open_low=True)]


def conform(kind: Any, value: Any) -> Any:
    """``value`` checked as the annotated type ``kind`` (one of the above); a bad one raises
    ``ValueError("must ...")`` with the type's wording, for values that sit inside lists or ranges."""
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


def known(check_name: Callable[[str], Any]) -> Callable[[str], str]:
    """A validator asking ``check_name`` (a registry's ``check``, say) about a name; the
    ``ConfigError`` it raises is passed on as a whole sentence (see :func:`config_error`)."""

    def validate(value: str) -> str:
        try:
            check_name(value)
        except ConfigError as exc:
            raise ValueError(f"!{exc}") from None
        return value

    return validate


def one_of(choices: tuple[str, ...]) -> AfterValidator:
    """A validator for a name among ``choices`` ("key='x' is not known; choose from a, b")."""
    return check(lambda v: v in choices, f"{_CHOICE}{', '.join(choices)}")


def names(value: Any) -> tuple[str, ...]:
    """A list of names from a list or a comma-separated string (flat run configs)."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of names")
    return tuple(value)


Names = Annotated[tuple[str, ...], BeforeValidator(names)]
