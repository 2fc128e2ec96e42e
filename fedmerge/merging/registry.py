"""The merging-rule registry: one :class:`MergeMethod` entry says everything about a rule.

An entry holds the rule's function, its options (type, range, default, tuning values), its natural
scale, whether it uses the clients' weights, its citation and formula. The ``merge`` verb, the
Flower strategy, λ/ρ tuning, config checks, ``fedmerge methods``, offline merging, the benchmarks
and the documentation tables all read the entry; nothing else names a rule.

A rule is a function ``rule(task_vectors, weights=None, **options) -> dict[str, Tensor]``: the
clients' task vectors, their normalised weights p_i (None when uniform) and its options. Register
one with the :func:`rule` decorator, or from another package through the ``fedmerge.methods``
entry-point group (a plain function is enough; metadata is read from the decorator, or from the
attributes ``natural_scale``, ``options``, ``citation``, ``formula``, ``uses_weights`` if present).
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

from pydantic import AfterValidator

import torch
from torch import Tensor

from fedmerge.errors import MergeError, PluginError
from fedmerge.merging.streaming import StreamedRule, TaskMatrices
from fedmerge.merging.validation import TaskVectors, normalised_weights, per_client_values, validate_task_vectors
from fedmerge.numerics import balancing_exponent, largest_magnitude, times_power_of_two
from fedmerge.registry import Registry
from fedmerge.spec import Str
from fedmerge.task_vector import NORM_CHUNK, TaskVector, require_finite

RuleFunction = Callable[..., dict[str, Tensor]]
Grid = Sequence[Any] | Callable[[TaskVectors], Sequence[Any]]
NATURAL_SCALES = ("mean", "sum")


@dataclass(frozen=True)
class Option:
    """One option of a rule: its default, type, allowed range and the values tuning tries.

    ``default=None`` means "derived from the inputs" (``help`` says how). A ``per_client`` option
    holds one positive number per client and is supplied by the federation (the reply metric of the
    same name, hyphenated: ``local_steps`` → ``local-steps``), never set in a config.
    ``grid`` (a sequence, or a function of the task vectors) lists the values tuning searches
    jointly with λ when the user has not fixed the option.
    """

    name: str
    default: Any = None
    kind: type = float
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    required: bool = False
    per_client: bool = False
    grid: Grid | None = None
    help: str = ""

    @property
    def metric_key(self) -> str:
        """The reply-metric / config spelling of the option (hyphenated)."""
        return self.name.replace("_", "-")

    def interval(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"

    def requirement(self) -> str:
        """What a number must be: ``lie in [0.0, 1.0]``, or ``be a finite number >= 0.0`` where one
        side is unbounded (values are finite, whatever the bounds)."""
        what = "an integer" if self.kind is int else "a finite number"
        if math.isinf(self.low) and math.isinf(self.high):
            return f"be {what}"
        if math.isinf(self.high):
            return f"be {what} {'>' if self.low_open else '>='} {self.low}"
        if math.isinf(self.low):
            return f"be {what} {'<' if self.high_open else '<='} {self.high}"
        return f"lie in {self.interval()}"

    def check(self, method: str, value: Any, num_clients: int) -> Any:
        """The value, converted and range-checked, or a ``MergeError`` naming method, option and value."""
        if self.per_client:
            return per_client_values(self.name, value, num_clients, positive=True)
        if value is None and not self.required and self.default is None:
            return None  # derived from the inputs
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergeError(f"{method}: {self.name} must be true or false, got {value!r}")
            return value
        if self.kind in (int, float):
            what = "an integer" if self.kind is int else "a number"
            try:
                if isinstance(value, (bool, str)):
                    raise TypeError
                number = float(value)
                if self.kind is int and not number.is_integer():
                    raise ValueError
                number = self.kind(number)
            except (TypeError, ValueError, OverflowError):
                raise MergeError(f"{method}: {self.name} must be {what}, got {value!r}") from None
            inside = ((self.low < number if self.low_open else self.low <= number)
                      and (number < self.high if self.high_open else number <= self.high))
            if not inside or not math.isfinite(number):
                raise MergeError(f"{method}: {self.name} must {self.requirement()}, got {number}")
            return number
        if not isinstance(value, self.kind):
            what = "a string" if self.kind is str else self.kind.__name__
            raise MergeError(f"{method}: {self.name} must be {what}, got {value!r}")
        return value

    def tuning_values(self, task_vectors: TaskVectors) -> list[Any]:
        """The values tuning tries, or [] when the option is not tuned."""
        if self.grid is None:
            return []
        values = self.grid(task_vectors) if callable(self.grid) else self.grid
        return list(values)

    def describe(self) -> str:
        """``name=default`` with its range, for tables."""
        if self.per_client:
            return f"{self.name} (per client)"
        numeric = isinstance(self.default, (int, float)) and not isinstance(self.default, bool)
        default = ("required" if self.required else "derived" if self.default is None
                   else f"{self.default:g}" if numeric else repr(self.default))
        bounds = "" if (math.isinf(self.low) and math.isinf(self.high)) else f" in {self.interval()}"
        return f"{self.name}={default}{bounds}"


@dataclass(frozen=True)
class WholeVectorStatistics:
    """Values a rule computes over each client's whole task vector before it merges (CCLIP's clip
    factors, TIES's trim thresholds). ``compute(task_vectors, p, **options)`` returns them as the
    rule's keyword arguments ``names``; given them, the rule's result for one tensor needs only that
    tensor's inputs, which is what lets :func:`merge_each` merge one tensor at a time."""

    names: tuple[str, ...]
    compute: Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merging rule and every fact the rest of fedmerge needs about it."""

    name: str
    function: RuleFunction
    natural_scale: str = "mean"
    options: tuple[Option, ...] = ()
    uses_weights: bool = True
    citation: str = ""
    formula: str = ""
    summary: str = field(default="")
    statistics: WholeVectorStatistics | None = None
    elementwise: bool = False  # each merged entry depends on the clients' same entry alone (and statistics)
    streamed: StreamedRule | None = None  # the rule on one matrix read in pieces of rows (merge_rows)

    def __post_init__(self) -> None:
        if self.natural_scale not in NATURAL_SCALES:
            raise PluginError(f"merging rule {self.name!r}: natural_scale must be 'mean' or 'sum', "
                              f"got {self.natural_scale!r}")
        if not callable(self.function):
            raise PluginError(f"merging rule {self.name!r} is not callable")
        if not self.summary:
            doc = inspect.getdoc(self.function) or ""
            object.__setattr__(self, "summary", doc.strip().splitlines()[0] if doc.strip() else self.name)

    # -- options -------------------------------------------------------------------------------
    def option(self, name: str) -> Option:
        for opt in self.options:
            if opt.name == name:
                return opt
        raise MergeError(f"{self.name}: unknown option {name!r} (options: {', '.join(self.settable) or 'none'})")

    @property
    def option_names(self) -> list[str]:
        return [o.name for o in self.options]

    @property
    def per_client(self) -> frozenset[str]:
        """Options with one value per client, supplied by the federation (FedNova's ``local_steps``)."""
        return frozenset(o.name for o in self.options if o.per_client)

    @property
    def required(self) -> frozenset[str]:
        return frozenset(o.name for o in self.options if o.required)

    @property
    def settable(self) -> list[str]:
        """Options a user sets in a config (every option but the per-client ones)."""
        return [o.name for o in self.options if not o.per_client]

    def check_options(self, options: Mapping[str, Any], num_clients: int) -> dict[str, Any]:
        """Options converted and checked: unknown, missing and out-of-range ones are ``MergeError``."""
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            known = ", ".join(sorted(self.option_names)) or "none"
            raise MergeError(f"{self.name}: unknown option {unknown[0]!r} (options: {known})")
        missing = sorted(self.required - set(options))
        if missing:
            raise MergeError(f"{self.name}: required option {missing[0]!r} is missing")
        return {k: self.option(k).check(self.name, v, num_clients) for k, v in options.items()}

    def tuning_grid(self, task_vectors: TaskVectors, fixed: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Option sets tuning tries with λ: every combination of the tuned options' values that the
        user did not fix; ``[{}]`` when none is tuned."""
        fixed = fixed or {}
        axes = [(o.name, o.tuning_values(task_vectors)) for o in self.options if o.name not in fixed]
        axes = [(name, values) for name, values in axes if values]
        if not axes:
            return [{}]
        names = [name for name, _ in axes]
        return [dict(zip(names, combo)) for combo in itertools.product(*(values for _, values in axes))]

    # -- merging -------------------------------------------------------------------------------
    def __call__(self, task_vectors: TaskVectors, weights: Sequence[float] | None = None, *,
                 statistics: Mapping[str, Any] | None = None, **options: Any) -> dict[str, Tensor]:
        """Validate, then merge: see :func:`merge`. Tensors without entries merge to tensors without
        entries; the rule never sees them. ``statistics``: the rule's whole-vector statistics,
        computed beforehand (see :class:`WholeVectorStatistics`)."""
        shapes = validate_task_vectors(task_vectors)
        n = len(task_vectors)
        p = None if weights is None else normalised_weights(weights, n)
        checked = {**self.check_options(options, n), **(statistics or {})}
        empty = [key for key, shape in shapes.items() if shape.numel() == 0]
        if not empty:
            merged = self.function(list(task_vectors), p, **checked)
        else:
            rest = [key for key in shapes if key not in empty]
            merged = self.function([_Subset(tv, rest) for tv in task_vectors], p, **checked) if rest else {}
            if isinstance(merged, Mapping):
                merged = {**merged, **{key: task_vectors[0][key].new_empty(shapes[key]) for key in empty}}
        _check_output(self.name, merged, shapes)
        return merged


class _Subset(Mapping[str, Tensor]):
    """The tensors ``keys`` of a task vector, read from it on access (lazy task vectors stay lazy)."""

    def __init__(self, task_vector: Mapping[str, Tensor], keys: Sequence[str]) -> None:
        self._task_vector, self._keys = task_vector, list(keys)
        self._key_set = frozenset(keys)

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._task_vector[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _check_output(method: str, merged: Any, shapes: Mapping[str, Any]) -> None:
    """A rule's result holds a floating tensor of the input's shape for every name, all finite (an
    overflow is a ``MergeOverflowError`` naming the dtype, never a silent inf)."""
    if not isinstance(merged, Mapping) or set(merged) != set(shapes):
        raise MergeError(f"{method}: the rule returned {type(merged).__name__} without the task vectors' tensors")
    for key, t in merged.items():
        if not torch.is_tensor(t) or not t.is_floating_point() or t.shape != shapes[key]:
            what = f"{t.dtype} {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__
            raise MergeError(f"{method}: merged tensor {key!r} is {what}, not a floating tensor of shape "
                             f"{tuple(shapes[key])}")
        wider = "float32" if t.element_size() < 4 else "float64" if t.element_size() < 8 else None
        remedy = (f"merge {wider} copies of the task vectors" if wider
                  else "the task vectors' values are too large for this rule")
        require_finite(t, f"{method}: merged tensor {key!r}", remedy)


def _adapt(name: str, obj: object) -> MergeMethod:
    """An entry-point object as a rule: a :class:`MergeMethod`, or a plain function (metadata from the
    :func:`rule` decorator or the function's attributes, options from its keyword parameters)."""
    if isinstance(obj, MergeMethod):
        return obj if obj.name == name else replace(obj, name=name)
    if not callable(obj):
        raise PluginError(f"merging rule {name!r} must be a function or a MergeMethod, got {type(obj).__name__}")
    declared = getattr(obj, "__fedmerge_rule__", None)
    if isinstance(declared, MergeMethod):
        return replace(declared, name=name)
    return method_from_function(
        name, obj, natural_scale=getattr(obj, "natural_scale", "mean"), options=getattr(obj, "options", None),
        uses_weights=getattr(obj, "uses_weights", True), citation=getattr(obj, "citation", ""),
        formula=getattr(obj, "formula", ""))


def method_from_function(name: str, function: RuleFunction, *, natural_scale: str = "mean",
                         options: Sequence[Option] | None = None, uses_weights: bool = True,
                         citation: str = "", formula: str = "",
                         statistics: WholeVectorStatistics | None = None, elementwise: bool = False,
                         streamed: StreamedRule | None = None) -> MergeMethod:
    """A rule entry for ``function``; options not declared are read from its keyword parameters
    (except those that take its whole-vector ``statistics``)."""
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        raise PluginError(f"merging rule {name!r}: its signature cannot be read") from None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise PluginError(f"merging rule {name!r} must take (task_vectors, weights=None, **options)")
    declared = {o.name: o for o in (options or ())}
    internal = set(statistics.names) if statistics else set()
    for p in params[2:]:
        if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD:
            if p.name in declared or p.name in internal:
                continue
            if p.default is inspect.Parameter.empty:
                declared[p.name] = Option(p.name, required=True)
            else:
                kind = type(p.default) if isinstance(p.default, (bool, int, float, str)) else float
                declared[p.name] = Option(p.name, default=p.default, kind=kind)
    for p in params[2:]:  # one default per option: the declared one must be the function's
        option = declared.get(p.name)
        if option is not None and p.default is not inspect.Parameter.empty and option.default != p.default:
            raise PluginError(f"merging rule {name!r}: option {p.name!r} declares default {option.default!r} "
                              f"but the function's is {p.default!r}")
    return MergeMethod(name, function, natural_scale=natural_scale, options=tuple(declared.values()),
                       uses_weights=uses_weights, citation=citation, formula=formula, statistics=statistics,
                       elementwise=elementwise, streamed=streamed)


METHODS: Registry[MergeMethod] = Registry("merging method", "fedmerge.methods", adapt=_adapt, error=MergeError)


def rule(name: str | None = None, *, natural_scale: str = "mean", options: Sequence[Option] = (),
         uses_weights: bool = True, citation: str = "", formula: str = "",
         statistics: WholeVectorStatistics | None = None, elementwise: bool = False,
         streamed: StreamedRule | None = None, register: bool = True) -> Callable[[RuleFunction], RuleFunction]:
    """Declare ``function`` a merging rule (and add it to ``METHODS`` unless ``register=False``,
    for a function exported through an entry point, which names it). A rule whose result for one
    tensor depends on the clients' whole task vectors declares those ``statistics``; without them,
    a tensor's result must depend on that tensor's inputs alone (as :func:`merge_each` assumes). An
    ``elementwise`` rule's every merged entry depends on the clients' same entry alone (given its
    statistics), so :func:`merge_rows` may merge a tensor a few rows at a time. A ``streamed`` form
    merges one 2-D tensor read in pieces of rows (:class:`~fedmerge.merging.streaming.TaskMatrices`),
    which :func:`merge_rows` uses for matrices."""

    def deco(function: RuleFunction) -> RuleFunction:
        method = method_from_function(name or function.__name__, function, natural_scale=natural_scale,
                                      options=options, uses_weights=uses_weights, citation=citation,
                                      formula=formula, statistics=statistics, elementwise=elementwise,
                                      streamed=streamed)
        function.__fedmerge_rule__ = method  # type: ignore[attr-defined]
        if register:
            METHODS.add(method.name, method)
        return function

    return deco


def merge(method: str, task_vectors: TaskVectors, weights: Sequence[float] | None = None, *,
          device: str | torch.device | None = None, **options: Any) -> dict[str, Tensor]:
    """Merge task vectors with a registered rule: the merged task vector (not scaled by λ, not
    added to θ0; see :func:`fedmerge.apply`). ``weights`` are the clients' weights (normalised to
    p_i; uniform when omitted); ``options`` the rule's. Raises :class:`MergeError` naming the client
    and tensor at fault, for unknown rules and options, and for non-finite results.

    Every rule computes on the device its task vectors are on. ``device`` (``"auto"``: the GPU when
    there is one; see :func:`merge_device`) moves them there first, and the merged tensors come back
    to the inputs' device."""
    if device is None:
        return METHODS[method](task_vectors, weights, **options)
    target = merge_device(device)
    home = next((t.device for tv in task_vectors for t in tv.values()), target)
    merged = METHODS[method]([on_device(tv, target) for tv in task_vectors], weights, **options)
    return {key: value.to(home) for key, value in merged.items()}


def merge_each(method: str, task_vectors: TaskVectors, weights: Sequence[float] | None = None, *,
               device: str | torch.device | None = None, **options: Any) -> Iterator[tuple[str, Tensor]]:
    """``merge(method, ...)`` one tensor at a time, in the first task vector's order: pairs (name,
    merged tensor). Each client's tensor of a name is read once (lazy task vectors compute it from
    disk) and the rule merges those, so merging a model far larger than memory holds one tensor per
    client and the rule's own at a time. Rules with whole-vector statistics (CCLIP's norms, TIES's
    thresholds) compute them first from the task vectors themselves (CCLIP one pass, TIES two)."""
    for key, _, merged in _merged_pieces(method, task_vectors, weights, device, options, chunk_bytes=None):
        yield key, merged


def merge_rows(method: str, task_vectors: Sequence[Any], weights: Sequence[float] | None = None, *,
               chunk_bytes: int, device: str | torch.device | None = None,
               **options: Any) -> Iterator[tuple[str, int, Tensor]]:
    """:func:`merge_each` in pieces: (name, first row, merged rows), over lazy task vectors that also
    give a tensor's ``shape(name)`` without reading it and its ``rows(name, start, stop)`` (as
    ``fedmerge.offline``'s over model directories do). An elementwise rule merges each
    tensor ``chunk_bytes`` of float32 per client at a time, read as rows from every client, and its
    statistics go through pieces too (:class:`_RowPieces`), so its memory is bounded by pieces, not
    by the largest tensor: bit for bit what :func:`merge_each` gives, outside overflow rescue (a piece
    whose sums overflow is redone in float64 alone). A rule with a ``streamed`` form merges each 2-D
    tensor from pieces of rows (of columns, for a wide one: ``rows(name, start, stop, (a, b))``) in a
    few sweeps, yielding pieces of rows (a wide tensor whole, from its columns): the same algorithm
    as the whole-matrix one within rounding (:mod:`fedmerge.merging.spectral.streamed` says where they
    differ). Other rules and tensors merge whole (first row 0)."""
    return _merged_pieces(method, task_vectors, weights, device, options, chunk_bytes=chunk_bytes)


def _merged_pieces(method: str, task_vectors: Sequence[Any], weights: Sequence[float] | None,
                   device: str | torch.device | None, options: dict[str, Any],
                   chunk_bytes: int | None) -> Iterator[tuple[str, int, Tensor]]:
    """(name, first row, merged rows) for :func:`merge_each` (``chunk_bytes`` None: whole tensors)
    and :func:`merge_rows` (pieces of rows for elementwise rules, streamed matrices for others)."""
    entry = METHODS[method]
    n = len(task_vectors)
    p = None if weights is None else normalised_weights(weights, n)
    checked = entry.check_options(options, n)
    target = None if device is None else merge_device(device)
    in_rows = chunk_bytes is not None and entry.elementwise
    statistics = {}
    if entry.statistics:  # pieces of rows add up as whole tensors do (piece_rows)
        views = [_RowPieces(tv, chunk_bytes) if in_rows else tv for tv in task_vectors]  # type: ignore[arg-type]
        statistics = entry.statistics.compute([v if target is None else _OnDevice(v, target) for v in views],
                                              p, **checked)
    for key in list(task_vectors[0]):
        shape = task_vectors[0].shape(key) if chunk_bytes is not None else ()
        if entry.streamed is not None and len(shape) == 2 and math.prod(shape):
            assert chunk_bytes is not None
            matrix = _streamed_matrix(entry, key, tuple(shape), task_vectors, p, checked, target, chunk_bytes)
            for start, rows in matrix:
                yield key, start, rows
            continue
        shape = shape if in_rows else ()
        step = max(1, chunk_bytes // (4 * max(1, math.prod(shape[1:])))) if shape else 1  # type: ignore[operator]
        for start in range(0, max(1, shape[0]), step) if shape else (0,):
            # each client's tensor, or piece, read once, where it is
            pieces = [tv.rows(key, start, min(start + step, shape[0])) if shape else tv[key] for tv in task_vectors]
            home = pieces[0].device
            merged = entry([{key: t if target is None else t.to(target)} for t in pieces], p,
                           statistics=statistics, **checked)[key]
            del pieces
            yield key, start, merged if target is None else merged.to(home)


def _streamed_matrix(entry: MergeMethod, key: str, shape: tuple[int, int], task_vectors: Sequence[Any],
                     p: Sequence[float] | None, options: dict[str, Any], target: torch.device | None,
                     chunk_bytes: int) -> Iterator[tuple[int, Tensor]]:
    """One 2-D tensor merged by ``entry.streamed`` from pieces of every client's rows (a wide
    tensor's columns, seen as the rows of its transpose), ``chunk_bytes`` / 4 of float32 per client
    at a time, as (first row, merged rows) in the clients' dtype; a wide tensor's merged columns are
    gathered and given whole."""
    m, n = shape
    wide = m < n
    origin: dict[str, Any] = {}  # the clients' device and dtype, which the result is given in
    exponent = 0  # float64 pieces of extreme magnitude are merged at unit scale, 2^-exponent

    def read(start: int, stop: int) -> list[Tensor]:
        pieces = [tv.rows(key, 0, m, (start, stop)).mT if wide else tv.rows(key, start, stop) for tv in task_vectors]
        origin.setdefault("device", pieces[0].device)
        origin.setdefault("dtype", pieces[0].dtype)
        pieces = [times_power_of_two(t, -exponent) for t in pieces] if exponent else pieces
        return pieces if target is None else [t.to(target) for t in pieces]

    tall = (n, m) if wide else (m, n)
    # A quarter of an elementwise rule's piece: the spectral rules hold several float64 copies of one
    per_piece = max(1, chunk_bytes // (4 * 4 * tall[1]))
    matrices = TaskMatrices(tall, len(task_vectors), read, rows_per_piece=per_piece, transposed=wide)
    assert entry.streamed is not None
    if read(0, 1)[0].dtype == torch.float64:  # squares of float32 values never leave float64's range
        exponent = balancing_exponent([largest_magnitude(pieces) for _, pieces in matrices.sweep()])
    whole: Tensor | None = None
    for start, rows in entry.streamed(matrices, p, **options):  # every spectral rule is homogeneous
        rows = times_power_of_two(rows, exponent).to(**origin)
        require_finite(rows, f"{entry.name}: merged tensor {key!r}",
                       "the task vectors' values are too large for this rule")
        if not wide:
            yield start, rows
            continue
        if whole is None:
            whole = torch.empty(shape, **origin)
        whole[:, start:start + len(rows)] = rows.mT
    if whole is not None:
        yield 0, whole


def piece_rows(shape: tuple[int, ...], chunk_bytes: int) -> int:
    """Rows per piece of a tensor of ``shape``: about ``chunk_bytes`` of float32, in whole blocks of
    ``NORM_CHUNK`` entries, so that a norm summed piece by piece adds the same float64 chunks in the
    same order as over the whole tensor (CCLIP's factors come out the same to the bit)."""
    if not shape:
        return 1
    row = max(1, math.prod(shape[1:]))
    block = math.lcm(row, NORM_CHUNK) // row  # rows of a whole number of norm chunks
    return block * max(1, chunk_bytes // (4 * row * block))


class _RowPieces(Mapping[str, Tensor]):
    """A lazy task vector seen as its pieces of rows (:func:`piece_rows`), in order: what whole-vector
    statistics (norms, magnitude histograms) go through without holding a whole tensor."""

    def __init__(self, task_vector: Any, chunk_bytes: int):
        self._task_vector = task_vector
        self._pieces: dict[str, tuple[str, int, int]] = {}
        for key in task_vector:
            shape = task_vector.shape(key)
            if not shape:
                self._pieces[key] = (key, -1, -1)
                continue
            step = piece_rows(shape, chunk_bytes)
            for start in range(0, max(1, shape[0]), step):
                self._pieces[f"{key}[{start}:]"] = (key, start, min(start + step, shape[0]))

    def __getitem__(self, name: str) -> Tensor:
        key, start, stop = self._pieces[name]
        return self._task_vector[key] if start < 0 else self._task_vector.rows(key, start, stop)

    def __iter__(self) -> Iterator[str]:
        return iter(self._pieces)

    def __len__(self) -> int:
        return len(self._pieces)


MERGE_DEVICES = "auto, cpu, cuda, cuda:N or mps"


def merge_device(name: str | torch.device, *, here: bool = True) -> torch.device:
    """The device ``name`` stands for: ``auto`` is the first GPU when torch sees one, else the CPU.
    A name torch does not know, or (with ``here``) a device this machine lacks, is a
    :class:`MergeError`; without ``here`` only the name is checked (a config read on one machine
    may merge on another)."""
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda") if here and torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise MergeError(f"merge-device {name!r} is not a device; use {MERGE_DEVICES}") from None
    available: dict[str, Callable[[], bool]] = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                                               "mps": torch.backends.mps.is_available}
    if device.type not in available:
        raise MergeError(f"merge-device {str(name)!r} is not supported; use {MERGE_DEVICES}")
    cuda_index_missing = device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()
    missing = not available[device.type]() or cuda_index_missing
    if here and missing:
        raise MergeError(f"merge-device {str(name)!r} is not available on this machine")
    return device


def _device_name(value: str) -> str:
    try:
        merge_device(value, here=False)  # whether this machine has it is checked where the merge runs
    except MergeError as exc:
        raise ValueError(f"!{exc}") from None
    return value


DeviceName = Annotated[Str, AfterValidator(_device_name)]
"""A merge-device setting (config, recipe): a device name torch knows, or ``auto``."""


def on_device(task_vector: Mapping[str, Tensor], device: torch.device) -> Mapping[str, Tensor]:
    """``task_vector`` on ``device``: copied there at once when it is held in memory, else (a lazy
    mapping that reads checkpoints tensor by tensor) a view that moves each tensor as it is read."""
    if not isinstance(task_vector, (dict, TaskVector)):
        return _OnDevice(task_vector, device)
    if all(t.device == device for t in task_vector.values()):
        return task_vector
    return {key: value.to(device) for key, value in task_vector.items()}


class _OnDevice(Mapping[str, Tensor]):
    """A view of a mapping of tensors that moves each one to ``device`` when it is read."""

    def __init__(self, tensors: Mapping[str, Tensor], device: torch.device):
        self._tensors, self._device = tensors, device

    def __getitem__(self, key: str) -> Tensor:
        return self._tensors[key].to(self._device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def uniform_if_none(p: Sequence[float] | None, n: int) -> Sequence[float]:
    """The weights a rule received, or the uniform p_i = 1/n when it received None."""
    return [1.0 / n] * n if p is None else p
