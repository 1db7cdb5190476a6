"""The state store: what Amberflo acknowledged, per user, kept atomic, versioned and locked.

Only ``sync.pipeline`` commits state; the CLI reads it (``history``, ``state show|info|reset``).
The folder layout is described in ``sync.state._layout``, the commit protocol in
``sync.state._store``.

:class:`StateStore` and its frames need pandas and pyarrow, which take about half a second to
import; they are loaded on first use, so that commands touching only the run logs
(:class:`RunLogs`: ``events``, ``history``) start without them.
"""

import importlib
from typing import TYPE_CHECKING, Any

from sync.state._jsonl import JsonlLog
from sync.state._logs import LogKind, RunLogs
from sync.state._manifest import FORMAT_VERSION

if TYPE_CHECKING:
    from sync.state._lazy import LazyState
    from sync.state._store import StateInfo, StateStore, StoredState

__all__ = [
    "FORMAT_VERSION",
    "JsonlLog",
    "LazyState",
    "LogKind",
    "RunLogs",
    "StateInfo",
    "StateStore",
    "StoredState",
]

# Loaded on first use: the modules that define them import pandas and pyarrow.
_LAZY_NAMES = {
    "LazyState": "sync.state._lazy",
    "StateInfo": "sync.state._store",
    "StateStore": "sync.state._store",
    "StoredState": "sync.state._store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
