"""Rendering of ``runs.jsonl`` for ``amberflo-sync history`` (pure: entries in, table out)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

_EXIT_MEANING = {0: "ok", 1: "fatal", 2: "usage", 3: "partial", 4: "locked", 130: "interrupted"}


def _duration(entry: Mapping[str, Any]) -> str:
    try:
        started = dt.datetime.fromisoformat(str(entry["started_at"]))
        finished = dt.datetime.fromisoformat(str(entry["finished_at"]))
    except (KeyError, ValueError):
        return "?"
    seconds = (finished - started).total_seconds()
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def _counts(entry: Mapping[str, Any]) -> str:
    counts = entry.get("counts") or {}
    if not isinstance(counts, Mapping):
        return ""
    order = ("to_send", "delivered", "failed", "added", "changed", "exited", "sent", "skipped")
    return " ".join(f"{name}={counts[name]}" for name in order if counts.get(name))


def render_history(runs: Sequence[Mapping[str, Any]], console: Console) -> None:
    """Print one row per run, newest last, as a table that reads well without colour."""
    if not runs:
        console.print("No runs recorded yet.")
        return
    table = Table(title="amberflo-sync runs", show_lines=False)
    for column in ("run", "kind", "mode", "started (UTC)", "took", "counts", "exit", "file"):
        table.add_column(column)
    for entry in runs:
        code = entry.get("exit_code")
        status = f"{code} {_EXIT_MEANING.get(code, '')}" if isinstance(code, int) else "?"
        if entry.get("interrupted"):
            status += " (interrupted)"
        table.add_row(
            str(entry.get("run_id", "?")),
            str(entry.get("kind", "sync")),
            str(entry.get("mode", "")),
            str(entry.get("started_at", ""))[:19],
            _duration(entry),
            _counts(entry),
            status,
            str(entry.get("failure_file") or entry.get("dead_letter_file") or ""),
        )
    console.print(table)
