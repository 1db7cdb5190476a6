"""The state store: what Amberflo acknowledged, per user, kept atomic, versioned and locked.

Only ``sync.pipeline`` commits state; the CLI reads it (``history``, ``state show|info|reset``).
The folder layout is described in ``sync.state._layout``, the commit protocol in
``sync.state._store``.

:class:`StateStore` and its frames need pandas and pyarrow, which take about half a second to
import; they are loaded on first use, so that commands touching only the run logs
(:class:`RunLogs`: ``events``, ``history``) start without them.
"""

from typing import TYPE_CHECKING, Any

from sync.state._jsonl import JsonlLog
from sync.state._logs import LogKind, RunLogs
from sync.state._manifest import FORMAT_VERSION

if TYPE_CHECKING:
    from sync.state._store import StateInfo, StateStore, StoredState

__all__ = [
    "FORMAT_VERSION",
    "JsonlLog",
    "LogKind",
    "RunLogs",
    "StateInfo",
    "StateStore",
    "StoredState",
]

_STORE_NAMES = frozenset({"StateInfo", "StateStore", "StoredState"})


def __getattr__(name: str) -> Any:
    if name in _STORE_NAMES:
        from sync.state import _store  # noqa: PLC0415 - pandas and pyarrow load here, on first use

        return getattr(_store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
