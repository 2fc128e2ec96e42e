"""Terminal progress: the one place rich progress bars are built, for runs, sweeps and merges."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
)


def progress_bar(console: Console | None = None, *, enabled: bool = True, unit: str | None = None,
                 transient: bool = False) -> Progress:
    """A rich progress display on stderr: spinner, description, bar, count and elapsed time.

    ``unit`` shows an open-ended count ("123 tensors read") instead of n/N; ``enabled=False``
    gives a display that prints nothing."""
    count: ProgressColumn = MofNCompleteColumn() if unit is None else TextColumn(f"{{task.completed}} {unit}")
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), count, TimeElapsedColumn(),
                    console=console or Console(stderr=True), disable=not enabled, transient=transient)


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
