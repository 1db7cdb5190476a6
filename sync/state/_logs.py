"""``RunLogs``: the state folder's JSON Lines logs (``runs.jsonl``, failures, dead letters).

Apart from :class:`~sync.state.StateStore` because the events command writes only these logs,
and they need nothing of pandas or pyarrow: loading those would cost the command about half a
second of start-up for every file it forwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from sync.state._jsonl import JsonlLog, append_durably, read_lines
from sync.state._layout import RUNS_FILE, check_run_id

LogKind = Literal["failures", "dead-letter"]
_LOG_KINDS: tuple[LogKind, ...] = ("failures", "dead-letter")


class RunLogs:
    """The logs under one state folder. Appends are durable; reading never creates a file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def run_log(self, run_id: str, kind: LogKind) -> JsonlLog:
        """The run's ``failures`` or ``dead-letter`` JSON Lines log (created on first write)."""
        if kind not in _LOG_KINDS:
            raise ValueError(f"unknown run log kind {kind!r}; expected one of {_LOG_KINDS}")
        return JsonlLog(self.directory / kind / f"{check_run_id(run_id)}.jsonl")

    def record_run(self, entry: Mapping[str, Any]) -> None:
        """Append one finished run to ``runs.jsonl``, durably."""
        append_durably(self.directory / RUNS_FILE, entry)

    def runs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Finished runs from ``runs.jsonl``, newest last; at most the last ``limit``.

        A torn last line (a crash while appending) is skipped.
        """
        records = read_lines(self.directory / RUNS_FILE)
        if limit is None:
            return records
        return records[-limit:] if limit > 0 else []
