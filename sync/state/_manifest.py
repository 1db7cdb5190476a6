"""``manifest.json``: the commit point of a state folder, and its format version.

A commit is durable once the manifest naming its ``state.parquet`` (by size and sha256) is in
place. Loading refuses a manifest it does not understand rather than guessing: an unknown
``format_version`` is either a newer amberflo-sync (upgrade) or not ours (reset).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sync.errors import StateError
from sync.state._layout import way_out

FORMAT_VERSION = 1

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Manifest:
    """What the last commit wrote.

    ``state_bytes`` lets a truncated file be caught before it is hashed; ``checkpoint_seq`` is
    the highest checkpoint folded into this commit (later ones are still pending).
    """

    last_run: str | None
    audience_keys: tuple[str, ...]
    trait_keys: tuple[str, ...]
    row_count: int
    content_hash: str
    state_bytes: int
    checkpoint_seq: int
    updated_at: str
    format_version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        """The manifest as written to disk (UTF-8 JSON, stable key order, trailing newline)."""
        body = {
            "format_version": self.format_version,
            "last_run": self.last_run,
            "audience_keys": list(self.audience_keys),
            "trait_keys": list(self.trait_keys),
            "row_count": self.row_count,
            "content_hash": self.content_hash,
            "state_bytes": self.state_bytes,
            "checkpoint_seq": self.checkpoint_seq,
            "updated_at": self.updated_at,
        }
        return (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode()


def now_utc() -> str:
    """The current UTC time as ISO 8601 with seconds, as stored in ``updated_at``."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def parse_manifest(data: bytes, path: Path) -> Manifest:
    """Read a manifest written by :meth:`Manifest.to_json`; anything else is a ``StateError``."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"{path} is not valid JSON ({exc}). {way_out(path.parent)}") from exc
    if not isinstance(body, dict):
        raise StateError(f"{path} is not a JSON object. {way_out(path.parent)}")
    version = body.get("format_version")
    if version != FORMAT_VERSION:
        raise StateError(_version_problem(version, path))
    return Manifest(
        format_version=FORMAT_VERSION,
        last_run=None if body.get("last_run") is None else _field(body, "last_run", str, path),
        audience_keys=_keys(body, "audience_keys", path),
        trait_keys=_keys(body, "trait_keys", path),
        row_count=_count(body, "row_count", path),
        content_hash=_field(body, "content_hash", str, path),
        state_bytes=_count(body, "state_bytes", path),
        checkpoint_seq=_count(body, "checkpoint_seq", path),
        updated_at=_field(body, "updated_at", str, path),
    )


def _version_problem(version: object, path: Path) -> str:
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        return (
            f"{path} has format_version {version}, written by a newer amberflo-sync; this one "
            f"reads version {FORMAT_VERSION}. Upgrade amberflo-sync, or: {way_out(path.parent)}"
        )
    return (
        f"{path} has an unknown format_version {version!r} (this amberflo-sync reads "
        f"{FORMAT_VERSION}). {way_out(path.parent)}"
    )


def _field(body: dict[str, Any], name: str, kind: type[_T], path: Path) -> _T:
    value = body.get(name)
    if isinstance(value, kind):
        return value
    raise StateError(
        f"{path}: field {name!r} is missing or not a {kind.__name__}. {way_out(path.parent)}"
    )


def _count(body: dict[str, Any], name: str, path: Path) -> int:
    value = _field(body, name, int, path)
    if isinstance(value, bool) or value < 0:
        raise StateError(
            f"{path}: field {name!r} must be a count, not {value!r}. {way_out(path.parent)}"
        )
    return value


def _keys(body: dict[str, Any], name: str, path: Path) -> tuple[str, ...]:
    value = _field(body, name, list, path)
    if not all(isinstance(key, str) for key in value):
        raise StateError(f"{path}: field {name!r} must list strings. {way_out(path.parent)}")
    return tuple(value)
