"""Progress bars for the long commands (``scan``, ``audit verify``): on stderr, on a
terminal only, gone when the work ends; never in ``--json`` output or in a pipe."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["byte_progress"]


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
