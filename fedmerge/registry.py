"""Named registries: the extension points for merging rules, datasets, partitioners and models.

A :class:`Registry` maps a name to an entry and is the one place that says "unknown name". Users add
entries from their own packages through a Python entry-point group (``fedmerge.methods``,
``fedmerge.datasets``, ``fedmerge.partitioners``, ``fedmerge.models``), read the first time a
registry is asked for a name, or from a file (:func:`load_plugin_file`) whose code registers them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from fedmerge.errors import ConfigError, FedmergeError, PluginError

T = TypeVar("T")


_ALL: list[Registry[Any]] = []  # every registry, so that a failed plugin file can be undone in all


class Registry(Generic[T]):
    """Entries of one kind by name, with entry-point plugins and one "unknown name" error.

    ``adapt(name, obj)`` turns what an entry point loads (a plain function, a class, an entry) into
    an entry; ``error`` is the exception type an unknown name raises.
    """

    def __init__(self, kind: str, group: str, *, adapt: Callable[[str, object], T] | None = None,
                 error: type[FedmergeError] = ConfigError, hint: str = "") -> None:
        self.kind, self.group, self.error, self.hint = kind, group, error, hint
        self._adapt = adapt or (lambda name, obj: obj)  # type: ignore[assignment,return-value]
        self._entries: dict[str, T] = {}
        self._entry_points_loaded = False
        _ALL.append(self)
        self._loaded_from: dict[str, str] = {}  # entry-point name -> its target, once loaded

    # -- adding --------------------------------------------------------------------------------
    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a second entry of one name is an error."""
        if not isinstance(name, str) or not name:
            raise PluginError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._entries and self._entries[name] is not entry:
            raise PluginError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def add_object(self, name: str, obj: object) -> T:
        """Register what a plugin provides (adapted into an entry)."""
        return self.add(name, self._adapt(name, obj))  # type: ignore[arg-type]

    def load_entry_points(self) -> None:
        """Read the ``group`` entry points once. A plugin that fails to load, or that takes a name
        already registered (a built-in's included), is one error naming it, raised again on every
        lookup until it is fixed: a registry is never left silently partial."""
        if self._entry_points_loaded:
            return
        for ep in importlib.metadata.entry_points(group=self.group):
            if self._loaded_from.get(ep.name) == ep.value:
                continue  # loaded by an earlier pass that a later plugin interrupted
            if ep.name in self._entries:
                raise PluginError(f"plugin {ep.name!r} ({self.group} = {ep.value!r}): a {self.kind} of that "
                                  "name is already registered")
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin: whatever it raised, name it in one line
                raise PluginError(f"plugin {ep.name!r} ({self.group} = {ep.value!r}) failed to load: "
                                  f"{type(exc).__name__}: {exc}") from None
            try:
                self.add_object(ep.name, obj)
            except PluginError as exc:
                raise PluginError(f"plugin {ep.name!r} ({self.group} = {ep.value!r}): {exc}") from None
            self._loaded_from[ep.name] = ep.value
        self._entry_points_loaded = True

    # -- reading -------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        if name not in self:
            known = ", ".join(self.names())
            raise self.error(f"unknown {self.kind} {name!r}; known: {known}{self.hint}")
        return self._entries[name]

    def check(self, name: str) -> None:
        """Raise the registry's error when ``name`` is not registered."""
        self[name]

    def __contains__(self, name: object) -> bool:
        self.load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self.load_entry_points()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self.load_entry_points()
        return len(self._entries)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self)

    def items(self) -> list[tuple[str, T]]:
        return [(name, self._entries[name]) for name in self]



def load_plugin_file(path: str | os.PathLike) -> None:
    """Run a plugin file once per process: its code registers rules, datasets, partitioners or models
    with the registries' decorators (``@fedmerge.merging.rule``, ...). Errors name the file."""
    file = Path(path).expanduser()
    if not file.is_file() or file.suffix != ".py":
        raise PluginError(f"plugin {path}: no such Python file")
    resolved = file.resolve()
    name = "fedmerge_plugin_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    before = [(registry, set(registry._entries)) for registry in _ALL]
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken plugin file: name it, whatever it raised, and undo what it added
        del sys.modules[name]
        for registry, names in before:
            for added in set(registry._entries) - names:
                del registry._entries[added]
        if isinstance(exc, PluginError):
            raise PluginError(f"plugin {path}: {exc}") from None
        raise PluginError(f"plugin {path} failed to load: {type(exc).__name__}: {exc}") from None
