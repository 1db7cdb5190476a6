"""The fault decision: what, if anything, goes wrong with one API request.

The decision is taken before the request is looked at, so a faulted request changes nothing.
"""

from __future__ import annotations

import enum
import random
import threading
from dataclasses import dataclass
from typing import Any

from sync.emulator._options import FaultSettings

SERVER_ERROR_STATUSES = (500, 502, 503)


class Fault(enum.Enum):
    """A fault injected in place of the real answer."""

    DROP = "drop"  # close the connection without any response
    THROTTLE = "429"
    SERVER_ERROR = "5xx"
    DOWN = "fail_all"


@dataclass(frozen=True)
class Decision:
    """The fate of one request: an optional fault, the status it answers with, and a delay."""

    fault: Fault | None = None
    status: int | None = None
    delay_s: float = 0.0
    retry_after: float = 0.0


NO_FAULT = Decision()


def decide(settings: FaultSettings, rng: random.Random) -> Decision:
    """Draw the fate of one request.

    Each rate gets its own draw (drop, then 429, then 5xx), taken only when the rate is
    non-zero, so a seeded generator replays the same faults for the same settings and order
    of requests.
    """
    delay_s = settings.latency_ms / 1000
    if settings.fail_all:
        return Decision(Fault.DOWN, 500, delay_s)
    if settings.rate_drop > 0 and rng.random() < settings.rate_drop:
        return Decision(Fault.DROP, None, delay_s)
    if settings.rate_429 > 0 and rng.random() < settings.rate_429:
        return Decision(Fault.THROTTLE, 429, delay_s, settings.retry_after)
    if settings.rate_5xx > 0 and rng.random() < settings.rate_5xx:
        return Decision(Fault.SERVER_ERROR, rng.choice(SERVER_ERROR_STATUSES), delay_s)
    return Decision(None, None, delay_s)


class FaultState:
    """The current fault settings and the seeded generator, safe to change from any thread."""

    def __init__(self, settings: FaultSettings, seed: int | None) -> None:
        self._lock = threading.Lock()
        self._initial = settings
        self._seed = seed
        self._settings = settings
        self._rng = random.Random(seed)  # noqa: S311 - fault draws, not secrets

    def decide(self) -> Decision:
        """The fate of the next API request."""
        with self._lock:
            return decide(self._settings, self._rng)

    def settings(self) -> FaultSettings:
        """The settings in force."""
        with self._lock:
            return self._settings

    def update(self, **changes: Any) -> FaultSettings:
        """Change some settings (same names as :class:`FaultSettings`); returns the new ones."""
        with self._lock:
            self._settings = self._settings.changed(**changes)
            return self._settings

    def reset(self) -> None:
        """Back to the start-up settings, with the generator re-seeded."""
        with self._lock:
            self._settings = self._initial
            self._rng = random.Random(self._seed)  # noqa: S311 - fault draws, not secrets
