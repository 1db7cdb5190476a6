"""Progress of a long operation: a bar on a terminal, structured log lines otherwise.

Cron mail and Kubernetes logs cannot show a bar, so off a terminal the same progress goes out
as a ``progress`` log event at most every ``log_every_seconds``.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

import structlog
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = structlog.get_logger(__name__)


class ProgressReporter:
    """Counts done and failed items of one operation and shows them as it goes.

    ``failed_as`` names the items that did not make it, on the bar and in the log lines
    (``"invalid"`` for the rows of a snapshot read).
    """

    def __init__(
        self,
        description: str,
        total: int | None,
        *,
        stream: TextIO | None = None,
        log_every_seconds: float = 10.0,
        failed_as: str = "failed",
    ) -> None:
        out = stream or sys.stderr
        self.description = description
        self.failed_as = failed_as
        self.total = total
        self.done = 0
        self.failed = 0
        self._log_every = log_every_seconds
        self._last_log = time.monotonic()
        self._started = time.monotonic()
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        if out.isatty():
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(f"{{task.fields[failed]}} {failed_as}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=out),
                transient=False,
            )

    def __enter__(self) -> ProgressReporter:
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, failed=0)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
        else:
            self._log()

    def advance(self, *, ok: bool = True) -> None:
        """Count one finished item."""
        self.done += 1
        if not ok:
            self.failed += 1
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=1, failed=self.failed)
        elif time.monotonic() - self._last_log >= self._log_every:
            self._log()

    def update(self, done: int, failed: int) -> None:
        """Set the counts at once (for work counted elsewhere, in bulk)."""
        self.done, self.failed = done, failed
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done, failed=failed)
        elif time.monotonic() - self._last_log >= self._log_every:
            self._log()

    def _log(self) -> None:
        self._last_log = time.monotonic()
        elapsed = self._last_log - self._started
        log.info(
            "progress",
            operation=self.description,
            done=self.done,
            total=self.total,
            **{self.failed_as: self.failed},
            per_second=round(self.done / elapsed, 1) if elapsed > 0 else None,
        )
