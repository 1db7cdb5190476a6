"""Rendering of ``runs.jsonl`` for ``amberflo-sync history`` (pure: entries in, table out).

Each entry is one finished run as the pipeline, the events path or ``state adopt`` recorded it
(``run_id``, ``kind``, ``mode``, ``started_at``, ``finished_at``, ``exit_code``, ``counts``,
``interrupted``, ``failure_file`` / ``dead_letter_file``, ``error``). Entries written by older
versions or cut short by a crash may lack any of these: every field is optional here.

The table fits 100 columns: the run id starts with the run's UTC start time
(``20261127T052443Z-3fa9c1``), so a row shows the time once, readably, and the id's suffix;
failure files and errors, too long for a column, follow the table as numbered notes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

_EXIT_MEANING = {0: "ok", 1: "fatal", 2: "usage", 3: "partial", 4: "locked", 130: "killed"}
# Outcome counts in the order a reader wants them, with the words they are shown as.
_OUTCOMES = (
    ("delivered", "sent"),
    ("sent", "sent"),
    ("adopted", "adopted"),
    ("failed", "failed"),
    ("dead_lettered", "dead-lettered"),
)


def _started(entry: Mapping[str, Any]) -> str:
    try:
        started = dt.datetime.fromisoformat(str(entry["started_at"]))
    except (KeyError, ValueError):
        return "?"
    return f"{started.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S}"


def _suffix(entry: Mapping[str, Any]) -> str:
    run_id = str(entry.get("run_id", "?"))
    # new_run_id() makes "<UTC start>-<6 hex>"; anything else is shown whole.
    head, _, tail = run_id.rpartition("-")
    return tail if head and len(tail) == 6 else run_id


def _duration(entry: Mapping[str, Any]) -> str:
    try:
        started = dt.datetime.fromisoformat(str(entry["started_at"]))
        finished = dt.datetime.fromisoformat(str(entry["finished_at"]))
    except (KeyError, ValueError):
        return "?"
    seconds = (finished - started).total_seconds()
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _status(entry: Mapping[str, Any]) -> str:
    code = entry.get("exit_code")
    if not isinstance(code, int):
        return "?"
    if entry.get("interrupted"):
        return f"{code} stopped"
    return f"{code} {_EXIT_MEANING.get(code, '')}".rstrip()


def _counts(entry: Mapping[str, Any]) -> str:
    """``+added ~changed -exited: N sent, M failed`` (the parts the entry has)."""
    counts = entry.get("counts")
    if not isinstance(counts, Mapping):
        return ""
    if counts.get("to_send") == 0:
        return "nothing to send"
    changes = " ".join(
        f"{sign}{counts[name]}"
        for name, sign in (("added", "+"), ("changed", "~"), ("exited", "-"))
        if isinstance(counts.get(name), int)
    )
    outcomes = ", ".join(
        f"{counts[name]} {word}"
        for name, word in _OUTCOMES
        if counts.get(name) or (name == "delivered" and name in counts)
    )
    return f"{changes}: {outcomes}" if changes and outcomes else changes or outcomes


def _note(entry: Mapping[str, Any]) -> str | None:
    """What a reader should look at next: the failure or dead-letter file, else the error."""
    path = entry.get("failure_file") or entry.get("dead_letter_file")
    if path:
        return f"failed items in {path}"
    error = entry.get("error")
    return str(error) if error else None


def render_history(runs: Sequence[Mapping[str, Any]], console: Console) -> None:
    """Print one row per run, newest last, then the notes the rows point to.

    Failure files and errors are too long for a column, so a row shows ``[n]`` and note ``n``
    follows the table in full.
    """
    if not runs:
        console.print("No runs recorded yet.")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("started (UTC)", no_wrap=True)
    table.add_column("run", no_wrap=True)
    table.add_column("mode", no_wrap=True)
    table.add_column("took", justify="right", no_wrap=True)
    table.add_column("exit", no_wrap=True)
    table.add_column("users: +added ~changed -exited")
    table.add_column("see", no_wrap=True)
    notes: list[str] = []
    for entry in runs:
        note = _note(entry)
        if note is not None:
            notes.append(f"[{len(notes) + 1}] {_suffix(entry)}: {note}")
        table.add_row(
            _started(entry),
            _suffix(entry),
            str(entry.get("mode") or entry.get("kind") or "?"),
            _duration(entry),
            _status(entry),
            _counts(entry),
            f"[{len(notes)}]" if note is not None else "",
        )
    console.print(table, markup=False)
    for line in notes:
        console.print(line, markup=False, highlight=False)
