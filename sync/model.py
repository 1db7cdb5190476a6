"""The plain data that passes between the pure core, delivery, state and reports.

These types hold no behaviour beyond trivial derived values, so every module may import them
without pulling in another module's dependencies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

ChangeKind = Literal["added", "changed", "exited"]
KeyKind = Literal["audience", "trait"]
WriteMode = Literal["merge", "replace"]


@dataclass(frozen=True, slots=True)
class CustomerRecord:
    """One customer as this job wants it in Amberflo.

    ``traits`` holds every managed key that has a value, already formatted for the wire.
    ``removed_traits`` holds managed keys that are now absent: merge mode deletes them from the
    customer's existing traits, and leaves every key this job does not manage alone.
    ``name`` is ``None`` when the source has no name: delivery then keeps the name Amberflo
    already has, else uses the id.
    """

    customer_id: str
    name: str | None = None
    email: str | None = None
    traits: Mapping[str, str] = field(default_factory=dict)
    removed_traits: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What Amberflo made of one item (a customer or a meter record)."""

    ref: str
    ok: bool
    status: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class KeyStats:
    """Per managed key: members now, entering and exiting (audiences), changed values (traits)."""

    key: str
    kind: KeyKind
    members: int = 0
    entered: int = 0
    exited: int = 0
    changed: int = 0


@dataclass(frozen=True, slots=True)
class UserChange:
    """A before -> after sample of one user, values as they go on the wire (None = absent).

    The mappings hold ``name``, ``email`` and every managed key that differs.
    """

    customer_id: str
    kind: ChangeKind
    before: Mapping[str, str | None]
    after: Mapping[str, str | None]


@dataclass(frozen=True, slots=True)
class DiffSummary:
    """Counts of one diff. ``added + changed + exited + unchanged`` covers every known user."""

    in_snapshot: int
    invalid: Mapping[str, int]
    added: int
    changed: int
    exited: int
    unchanged: int
    to_send: int
    keys: tuple[KeyStats, ...] = ()
    new_keys: tuple[str, ...] = ()
    samples: tuple[UserChange, ...] = ()


@dataclass(frozen=True, slots=True)
class DeliverySummary:
    """What delivery achieved: acknowledged and failed items, and where the failures are."""

    delivered: int
    failed: int
    failure_file: str | None = None
    interrupted: bool = False
    stopped_reason: str | None = None
