"""``amberflo-sync history``: recent runs as a table readable in 100 columns, or JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from sync.history import render_history
from sync.state import StateStore

FAILURES = "/var/lib/amberflo-sync/failures/20261127T062443Z-abcb15.jsonl"
MASS_EXIT = (
    "this run would exit 30 of 40 known users (75%, more than safety.max_exit_fraction=50%); "
    "is the snapshot empty or truncated? Nothing was sent."
)
RUNS: list[dict[str, Any]] = [
    {
        "run_id": "20261127T052443Z-abcb14",
        "kind": "adopt",
        "mode": "adopt",
        "started_at": "2026-11-27T05:24:43+00:00",
        "finished_at": "2026-11-27T05:24:44.500000+00:00",
        "exit_code": 0,
        "counts": {"in_snapshot": 39, "invalid": 3, "adopted": 37},
    },
    {
        "run_id": "20261127T062443Z-abcb15",
        "kind": "sync",
        "mode": "run",
        "started_at": "2026-11-27T06:24:43+00:00",
        "finished_at": "2026-11-27T06:27:43+00:00",
        "exit_code": 3,
        "interrupted": False,
        "counts": {
            "added": 2,
            "changed": 15,
            "exited": 1,
            "to_send": 18,
            "delivered": 16,
            "failed": 2,
        },
        "failure_file": FAILURES,
    },
    {
        "run_id": "20261127T072443Z-abcb16",
        "kind": "sync",
        "mode": "run",
        "started_at": "2026-11-27T07:24:43+00:00",
        "finished_at": "2026-11-27T07:24:44+00:00",
        "exit_code": 1,
        "error": MASS_EXIT,
    },
    {
        "run_id": "20261127T082443Z-abcb17",
        "kind": "sync",
        "mode": "run",
        "started_at": "2026-11-27T08:24:43+00:00",
        "finished_at": "2026-11-27T08:24:44+00:00",
        "exit_code": 0,
        "counts": {"added": 0, "changed": 0, "exited": 0, "to_send": 0, "delivered": 0},
    },
    {
        "run_id": "20261127T092443Z-abcb18",
        "kind": "sync",
        "mode": "full",
        "started_at": "2026-11-27T09:24:43+00:00",
        "finished_at": "2026-11-27T12:54:43+00:00",
        "exit_code": 3,
        "interrupted": True,
        "counts": {
            "added": 120000,
            "changed": 150000,
            "exited": 10000,
            "to_send": 280000,
            "delivered": 123456,
            "failed": 0,
        },
    },
]


def rendered(runs: list[dict[str, Any]], width: int = 100) -> list[str]:
    console = Console(record=True, width=width, color_system=None)
    render_history(runs, console)
    return console.export_text().splitlines()


def test_the_table_fits_100_columns_and_keeps_every_fact() -> None:
    """No line is wider than 100; each run shows start, id suffix, mode, duration, exit and
    counts, and failure files and errors appear in full as numbered notes."""
    lines = rendered(RUNS)

    assert max(len(line) for line in lines) <= 100
    rows = [line.split() for line in lines if line.startswith("2026-")]
    assert [row[:6] for row in rows] == [
        ["2026-11-27", "05:24:43", "abcb14", "adopt", "1.5s", "0"],
        ["2026-11-27", "06:24:43", "abcb15", "run", "3.0m", "3"],
        ["2026-11-27", "07:24:43", "abcb16", "run", "1.0s", "1"],
        ["2026-11-27", "08:24:43", "abcb17", "run", "1.0s", "0"],
        ["2026-11-27", "09:24:43", "abcb18", "full", "3.5h", "3"],
    ]
    assert [" ".join(row[5:]) for row in rows] == [
        "0 ok 37 adopted",
        "3 partial +2 ~15 -1: 16 sent, 2 failed [1]",
        "1 fatal [2]",
        "0 ok nothing to send",
        "3 stopped +120000 ~150000 -10000: 123456 sent",
    ]
    assert f"[1] abcb15: failed items in {FAILURES}" in lines
    notes = " ".join(lines[lines.index(f"[1] abcb15: failed items in {FAILURES}") + 1 :])
    assert " ".join(f"[2] abcb16: {MASS_EXIT}".split()) == " ".join(notes.split())


def test_entries_missing_fields_still_render() -> None:
    """A torn or older entry shows '?' where a field is missing instead of failing."""
    (row,) = [line for line in rendered([{"run_id": "legacy"}]) if "legacy" in line]

    assert row.split() == ["?", "legacy", "?", "?", "?"]


def test_no_runs_says_so() -> None:
    """An empty history is one plain sentence."""
    assert rendered([]) == ["No runs recorded yet."]


def test_the_command_prints_json_lines_and_the_table(tmp_path: Path) -> None:
    """history --json prints the recorded runs, newest last, one JSON object a line; --limit
    keeps the newest; the table names every run."""
    store = StateStore(tmp_path / "state")
    for entry in RUNS:
        store.record_run(entry)
    config = tmp_path / "sync.toml"
    config.write_text('[state]\ndir = "state"\n')
    env = {"PATH": os.environ["PATH"], "COLUMNS": "100"}

    def history(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sync", "history", "--config", str(config), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

    as_json = history("--json", "--limit", "3")
    table = history()

    assert [json.loads(line) for line in as_json.stdout.splitlines()] == RUNS[-3:]
    for entry in RUNS:
        assert entry["run_id"][-6:] in table.stdout
