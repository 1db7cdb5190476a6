"""Run ids: sortable by time, unique enough for one state folder."""

from __future__ import annotations

import datetime as dt
import secrets


def new_run_id(now: dt.datetime | None = None) -> str:
    """Return an id like ``20261127T044648Z-3fa9c1``: UTC start time, then 6 random hex digits."""
    moment = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
