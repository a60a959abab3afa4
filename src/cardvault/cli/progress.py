"""Progress bars for the long commands (``scan``, ``audit verify``, ``list --all``): on
stderr, on a terminal only, gone when the work ends; never in output or in a pipe."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["byte_progress", "count_progress"]


@contextmanager
def byte_progress(
    console: Console, description: str, total: int, *, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """A bar over ``total`` bytes (done, rate, time left), shown on ``console`` when it is
    a terminal and ``enabled``; yields the function to call with each piece's size."""
    show = enabled and console.is_terminal
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not show,
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


@contextmanager
def count_progress(
    console: Console, description: str, *, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """A counter of items of unknown total (the count and the time taken), shown on
    ``console`` when it is a terminal and ``enabled``; yields the function to call with
    each batch's size."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.completed:,.0f}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )
    with progress:
        task = progress.add_task(description, total=None)
        yield lambda n: progress.advance(task, n)
