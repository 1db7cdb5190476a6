"""The emulator's start-up options and its run-time fault settings, both validated."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from sync.errors import ConfigError

PutMissing = Literal["create", "error"]

_RATES = ("rate_429", "rate_5xx", "rate_drop")
_NON_NEGATIVE = ("retry_after", "latency_ms")


@dataclass(frozen=True)
class FaultSettings:
    """What goes wrong, and how often, for every API request (never for ``/_emulator/``).

    Rates are probabilities in [0, 1], drawn independently in the order drop, 429, 5xx, so
    ``rate_429=1`` fails every request that is not dropped. ``fail_all`` answers every API
    request with 500 ("Amberflo is down"). ``latency_ms`` delays every API request, faulted or
    not. ``retry_after`` is the ``Retry-After`` header of a 429, in seconds.
    ``reject_customers`` are customer ids whose ``POST``/``PUT /customers`` is answered
    ``400 {"message": ...}`` every time, as Amberflo answers a customer it will not take: a
    permanent failure of one customer among many (any iterable of ids is kept as a frozenset).
    """

    rate_429: float = 0.0
    retry_after: float = 1.0
    rate_5xx: float = 0.0
    rate_drop: float = 0.0
    latency_ms: float = 0.0
    fail_all: bool = False
    reject_customers: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in _RATES:
            value = _number(name, getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"emulator option {name}={value} must be between 0 and 1")
        for name in _NON_NEGATIVE:
            value = _number(name, getattr(self, name))
            if value < 0:
                raise ConfigError(f"emulator option {name}={value} must be 0 or more")
        if not isinstance(self.fail_all, bool):
            raise ConfigError(f"emulator option fail_all={self.fail_all!r} must be true or false")
        # Frozen: the normalised set replaces whatever iterable (a JSON list) was given.
        object.__setattr__(
            self, "reject_customers", _ids("reject_customers", self.reject_customers)
        )

    def changed(self, **changes: Any) -> FaultSettings:
        """A copy with ``changes`` applied; unknown names or bad values raise ``ConfigError``."""
        unknown = sorted(set(changes) - FAULT_NAMES)
        if unknown:
            raise ConfigError(
                f"unknown emulator fault setting(s) {', '.join(unknown)}; "
                f"use one of {', '.join(sorted(FAULT_NAMES))}"
            )
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-ready values (``reject_customers`` as a sorted list)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["reject_customers"] = sorted(self.reject_customers)
        return values


FAULT_NAMES = frozenset(f.name for f in fields(FaultSettings))


@dataclass(frozen=True)
class EmulatorOptions:
    """How to start the emulator. Every field is checked on construction (``ConfigError``).

    ``port=0`` picks a free port. ``api_keys=None`` accepts any non-empty ``x-api-key``;
    a set restricts it to those keys. ``put_missing`` says what ``PUT /customers`` does for an
    unknown customer: ``create`` it (the Segment destination docs imply PUT upserts) or answer
    ``404``. The fault fields are the starting :class:`FaultSettings`; ``seed`` makes the fault
    draws reproducible for a given order of requests.
    """

    host: str = "127.0.0.1"
    port: int = 8484
    api_keys: frozenset[str] | None = None
    put_missing: PutMissing = "create"
    rate_429: float = 0.0
    retry_after: float = 1.0
    rate_5xx: float = 0.0
    rate_drop: float = 0.0
    latency_ms: float = 0.0
    fail_all: bool = False
    reject_customers: frozenset[str] = frozenset()
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"emulator port {self.port!r} must be 0 (any free port) to 65535")
        if self.put_missing not in ("create", "error"):
            raise ConfigError(
                f"emulator put_missing={self.put_missing!r} must be 'create' or 'error'"
            )
        if self.api_keys is not None and not all(
            isinstance(key, str) and key for key in self.api_keys
        ):
            raise ConfigError("emulator api_keys must be non-empty strings")
        self.faults()  # validates the fault fields

    def faults(self) -> FaultSettings:
        """The fault settings these options start with.

        The options carry every fault field under the same name (so the CLI and tests pass
        them flat); they are copied by name, so a new fault is declared in two places, not three.
        """
        return FaultSettings(
            **{field.name: getattr(self, field.name) for field in fields(FaultSettings)}
        )


def _number(name: str, value: object) -> float:
    # bool is an int subclass; "rate_429=True" is a mistake, not a rate of 1.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"emulator option {name}={value!r} must be a finite number")
    return float(value)


def _ids(name: str, value: object) -> frozenset[str]:
    # A lone string is an iterable of characters: refuse it rather than reject "a", "b", ...
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError(f"emulator option {name}={value!r} must be a list of customer ids")
    ids = frozenset(value)
    if not all(isinstance(item, str) and item for item in ids):
        raise ConfigError(f"emulator option {name} must hold non-empty customer id strings")
    return ids
