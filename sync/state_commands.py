"""The read-only and maintenance state commands: ``state show``, ``state info``, ``state reset``.

``state adopt`` records a snapshot as acknowledged, so it lives with the runs in
:mod:`sync.pipeline`, the one module that commits state.
"""

from __future__ import annotations

import dataclasses
import json

from rich.console import Console

from sync.config import Settings
from sync.errors import EXIT_FATAL, EXIT_OK
from sync.pipeline import confirm
from sync.state import StateStore


def show_user(settings: Settings, user_id: str, *, as_json: bool, console: Console) -> int:
    """Print the stored record of one user; exit 1 when the state does not know it."""
    row = StateStore(settings.state.dir).show(user_id)
    if row is None:
        console.print(f"{user_id!r} is not in the state at {settings.state.dir}")
        return EXIT_FATAL
    if as_json:
        console.print_json(json.dumps(row, sort_keys=True, default=str))
    else:
        for key, value in row.items():
            console.print(f"{key}: {value}")
    return EXIT_OK


def reset_state(settings: Settings, *, yes: bool, console: Console) -> int:
    """Move the state into a timestamped backup so the next run is an initial full sync."""
    store = StateStore(settings.state.dir)
    with store.lock():
        if not yes and not confirm(
            console, f"Forget the state in {settings.state.dir} (a backup is kept)?"
        ):
            console.print("Nothing changed.")
            return EXIT_OK
        backup = store.reset()
    if backup is None:
        console.print(f"No state in {settings.state.dir}; nothing to reset.")
    else:
        console.print(f"State moved to {backup}; the next run is an initial full sync.")
    return EXIT_OK


def state_info(settings: Settings, *, as_json: bool, console: Console) -> int:
    """Print format version, users, managed keys, last run and size on disk."""
    data = dataclasses.asdict(StateStore(settings.state.dir).info())
    if as_json:
        console.print_json(json.dumps(data, sort_keys=True, default=str))
    else:
        for key, value in data.items():
            console.print(f"{key}: {value}")
    return EXIT_OK
