"""The state store: what Amberflo acknowledged, per user, kept atomic, versioned and locked.

Only ``sync.pipeline`` commits state; the CLI reads it (``history``, ``state show|info|reset``).
The folder layout is described in ``sync.state._layout``, the commit protocol in
``sync.state._store``.
"""

from sync.state._jsonl import JsonlLog
from sync.state._lazy import LazyState
from sync.state._manifest import FORMAT_VERSION
from sync.state._store import LogKind, StateInfo, StateStore, StoredState

__all__ = [
    "FORMAT_VERSION",
    "JsonlLog",
    "LazyState",
    "LogKind",
    "StateInfo",
    "StateStore",
    "StoredState",
]
