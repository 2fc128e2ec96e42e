"""The terminal: the one place consoles and progress bars are built, for runs, sweeps and merges.

User text (config values, paths, error messages, plugin names) reaches the terminal as written:
consoles built here never read rich markup or emoji codes in the strings they print, so ``[/]`` or
``[grid]`` in a message is text, not a tag. Styled labels are :class:`rich.text.Text` spans
(:func:`labelled`), never markup strings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.text import Text
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
    TimeRemainingColumn,
)


def terminal(stderr: bool = False) -> Console:
    """A console that prints strings literally (no markup, no emoji codes) and never breaks a line of
    text (an error or a path stays one line to copy); tables still fit the terminal."""
    return Console(stderr=stderr, markup=False, emoji=False, soft_wrap=True)


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless n is 1: "1 model", "3 models"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def labelled(label: str, style: str, text: str) -> Text:
    """``label`` in ``style``, then ``text`` as written (``labelled("error:", "bold red", str(exc))``)."""
    return Text.assemble((label, style), " ", text)


def progress_bar(console: Console | None = None, *, enabled: bool = True, unit: str | None = None,
                 transient: bool = False) -> Progress:
    """A rich progress display on stderr: spinner, description, bar, count, elapsed and remaining time.

    ``unit`` shows an open-ended count ("123 tensors read") instead of n/N; ``enabled=False``, or
    a console that is not a terminal (a pipe, a log file), gives a display that prints nothing."""
    count: ProgressColumn = (MofNCompleteColumn() if unit is None
                             else TextColumn(f"{{task.completed}} {unit}", markup=False))
    console = console or terminal(stderr=True)
    eta = [TimeRemainingColumn()] if unit is None else []
    return Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(), count,
                    TimeElapsedColumn(), *eta, console=console, disable=not enabled or not console.is_terminal,
                    transient=transient)


class RunProgress:
    """Stages of a run (pre-training, clients n/N, merging, evaluating); silent when disabled."""

    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self._progress = progress_bar(console) if enabled else None
        self._task: Any = None

    def __enter__(self) -> RunProgress:
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish_task()
        if self._progress:
            self._progress.stop()

    def _finish_task(self) -> None:
        if self._progress is not None and self._task is not None:
            task = self._progress.tasks[-1]
            self._progress.update(self._task, total=task.total or 1, completed=task.total or 1)
        self._task = None

    def stage(self, description: str, total: int | None = None) -> None:
        """Close the current stage and open the next; ``total`` counts its steps (None: one step)."""
        self._finish_task()
        if self._progress is not None:
            self._task = self._progress.add_task(description, total=total or 1, completed=0)

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, steps)

    def apply(self, kind: str, payload: tuple) -> None:
        """Replay an event that a :class:`ForwardedProgress` posted."""
        if kind == "stage":
            self.stage(*payload)
        elif kind == "advance":
            self.advance(*payload)


class ForwardedProgress(RunProgress):
    """A :class:`RunProgress` for work in another process: each call is posted as an event, for
    :meth:`RunProgress.apply` on the side that owns the display."""

    def __init__(self, post: Callable[..., None]) -> None:
        super().__init__(enabled=False)
        self._post = post

    def stage(self, description: str, total: int | None = None) -> None:
        self._post("stage", description, total)

    def advance(self, steps: int = 1) -> None:
        self._post("advance", steps)
