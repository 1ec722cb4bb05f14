"""A progress bar for long work (``-p``), drawn with rich on standard error."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Protocol


class ProgressFn(Protocol):
    def __call__(self, done: int, total: int) -> None: ...


@contextlib.contextmanager
def progress_bar(*, enabled: bool, label: str) -> Iterator[ProgressFn | None]:
    """Yield a ``progress(done, total)`` callable, or None when disabled."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                  transient=False) as bar:
        task = bar.add_task(label, total=None)
        lock = threading.Lock()

        def update(done: int, total: int) -> None:
            with lock:
                bar.update(task, completed=done, total=max(total, 1))

        yield update
