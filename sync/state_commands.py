"""The read-only and maintenance state commands: ``state show``, ``state info``, ``state reset``.

``state adopt`` records a snapshot as acknowledged, so it lives with the runs in
:mod:`sync.pipeline`, the one module that commits state. ``show`` and ``info`` take no lock:
like a dry run they read the state as of the last atomic commit (plus pending checkpoints), so
they work beside a running sync. A damaged state is a :class:`~sync.errors.StateError` naming
the file and the way out (exit 1); ``reset`` reads nothing, so it is that way out.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sync.config import Settings
from sync.errors import EXIT_OK, EXIT_USAGE, FatalError
from sync.pipeline import confirm, require_answer
from sync.state import StateInfo, StateStore


def show_user(settings: Settings, user_id: str, *, as_json: bool, console: Console) -> int:
    """Print the stored record of one user; ``FatalError`` (exit 1) when the state lacks it.

    The record is what Amberflo last acknowledged for the user: its managed keys with their
    values as sent (``"false"`` for an audience it left), name, email, and the run that last
    delivered it.
    """
    row = StateStore(settings.state.dir).show(user_id)
    if row is None:
        raise FatalError(
            f"user {user_id!r} is not in the state at {settings.state.dir}: no run has "
            "delivered it (ids are case-sensitive)"
        )
    if as_json:
        console.print_json(json.dumps(row, sort_keys=True))
        return EXIT_OK
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("customer", _text(row["customer_id"]))
    table.add_row("name", _text(row["name"]))
    table.add_row("email", _text(row["email"]))
    where = "committed" if row["committed"] else "pending checkpoint (not yet committed)"
    table.add_row("last run", f"{_text(row['last_run'])}  [dim]({where})[/dim]")
    keys: dict[str, str] = row["keys"]
    for number, (key, value) in enumerate(keys.items()):
        table.add_row("keys" if number == 0 else "", _text(f"{key} = {value}"))
    if not keys:
        table.add_row("keys", "(none)")
    console.print(table)
    return EXIT_OK


def reset_state(settings: Settings, *, yes: bool, console: Console) -> int:
    """Move the state into a timestamped backup so the next run is an initial full sync.

    Asks first unless ``yes`` (refused without a terminal). Works on a damaged state: it moves
    the files without reading them. Run history and failure files stay.
    """
    require_answer("state reset", yes=yes)
    store = StateStore(settings.state.dir)
    with store.lock():
        if not yes and not confirm(
            console, f"Forget the state in {settings.state.dir} (a backup is kept)?"
        ):
            console.print("Nothing changed.")
            return EXIT_USAGE
        backup = store.reset()
    if backup is None:
        console.print(f"No state in {settings.state.dir}; nothing to reset.", markup=False)
    else:
        console.print(
            f"State moved to {backup}; the next run is an initial full sync.", markup=False
        )
    return EXIT_OK


def state_info(settings: Settings, *, as_json: bool, console: Console) -> int:
    """Print format version, users, managed keys, last run and size on disk."""
    info = StateStore(settings.state.dir).info()
    if as_json:
        console.print_json(json.dumps(info_document(info), sort_keys=True))
        return EXIT_OK
    if not info.exists and not info.checkpoints_pending:
        console.print(
            f"No state in {info.directory}: the next run is an initial full sync.", markup=False
        )
        return EXIT_OK
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("state", _text(info.directory))
    table.add_row("format version", str(info.format_version))
    table.add_row("users", f"{info.users:,}")
    table.add_row("last run", f"{_text(info.last_run)} (committed {_text(info.updated_at)})")
    table.add_row("audiences", _keys(info.audience_keys))
    table.add_row("traits", _keys(info.trait_keys))
    table.add_row(
        "size on disk",
        f"{_size(info.bytes_on_disk)} (users table {_size(info.state_bytes)})",
    )
    if info.checkpoints_pending:
        table.add_row(
            "pending",
            f"{info.checkpoints_pending} checkpoints, {info.pending_rows:,} rows "
            "(a run is going on, or stopped before its commit; the next run folds them in)",
        )
    console.print(table)
    return EXIT_OK


def info_document(info: StateInfo) -> dict[str, Any]:
    """``state info --json``: the :class:`StateInfo` fields as JSON values."""
    return {
        "directory": str(info.directory),
        "exists": info.exists,
        "format_version": info.format_version,
        "users": info.users,
        "audience_keys": list(info.audience_keys),
        "trait_keys": list(info.trait_keys),
        "last_run": info.last_run,
        "updated_at": info.updated_at,
        "state_bytes": info.state_bytes,
        "bytes_on_disk": info.bytes_on_disk,
        "checkpoints_pending": info.checkpoints_pending,
        "pending_rows": info.pending_rows,
    }


def _text(value: object) -> str:
    """A stored value for a table cell: ``-`` for none, markup characters kept literal."""
    return "-" if value is None else escape(str(value))


def _keys(keys: tuple[str, ...]) -> str:
    return f"{len(keys)}: {', '.join(keys)}" if keys else "0"


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
