"""Alerts on a change of state, not on every run.

The scheduler feeds each run's outcome to :class:`AlertTracker`, which remembers whether runs
were healthy and fires once when runs start failing, once when they recover, and once when the
share of rejected users or the volume of changes jumps past its threshold (and again only after
it has come back under).

- *Failing* means exit 1 (fatal) or 2, or a run in which every user to send failed (Amberflo
  down: exit 3 with nothing delivered). Any other exit 3 (partial: some users failed, retried
  next time) is a working run, judged by its rejected share instead. Exit 4 (another run held
  the lock) says nothing about health and changes nothing.
- *Rejected share*: failed users / users to send, against ``alerts.max_failed_fraction``.
- *Change volume*: known users whose record changes or exits / users in the snapshot, against
  ``alerts.max_change_fraction``. New users are growth rather than churn (and a first sync is
  all new users), so they do not count; a snapshot whose ids changed format shows up as exits.

An alert is a JSON document POSTed to ``alerts.webhook_url`` and/or
given on standard input to ``alerts.command``; a failing alert is logged and never fails a run.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from sync.config import AlertSettings, child_environment
from sync.errors import EXIT_LOCKED, EXIT_OK, EXIT_PARTIAL

log = structlog.get_logger(__name__)

AlertKind = Literal["failing", "recovered", "rejections_high", "changes_high"]


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What the scheduler knows of one finished run."""

    run_id: str
    exit_code: int
    error: str | None = None
    to_send: int = 0
    in_snapshot: int = 0
    failed: int = 0
    changed: int = 0


@dataclass(slots=True)
class AlertTracker:
    """Turns a stream of run outcomes into alerts on transitions."""

    settings: AlertSettings
    failing: bool = False
    raised: set[str] = field(default_factory=set)

    def observe(self, outcome: RunOutcome) -> list[AlertKind]:
        """Record one run; return the alerts it triggers (and send them)."""
        alerts: list[AlertKind] = []
        if outcome.exit_code == EXIT_LOCKED:
            return alerts
        nothing_went = outcome.to_send > 0 and outcome.failed >= outcome.to_send
        now_failing = outcome.exit_code not in (EXIT_OK, EXIT_PARTIAL) or nothing_went
        if now_failing and not self.failing:
            alerts.append("failing")
        elif self.failing and not now_failing:
            alerts.append("recovered")
        self.failing = now_failing
        if not now_failing:
            rejected = outcome.failed / outcome.to_send if outcome.to_send else 0.0
            changed = outcome.changed / outcome.in_snapshot if outcome.in_snapshot else 0.0
            alerts += self._threshold(
                "rejections_high", rejected, self.settings.max_failed_fraction
            )
            alerts += self._threshold("changes_high", changed, self.settings.max_change_fraction)
        for kind in alerts:
            send_alert(self.settings, kind, outcome)
        return alerts

    def _threshold(self, kind: AlertKind, value: float, limit: float) -> list[AlertKind]:
        if value > limit and kind not in self.raised:
            self.raised.add(kind)
            return [kind]
        if value <= limit:
            self.raised.discard(kind)
        return []


def alert_document(kind: AlertKind, outcome: RunOutcome) -> dict[str, Any]:
    """The JSON body of an alert."""
    return {
        "source": "amberflo-sync",
        "alert": kind,
        "run_id": outcome.run_id,
        "exit_code": outcome.exit_code,
        "error": outcome.error,
        "to_send": outcome.to_send,
        "failed": outcome.failed,
        "in_snapshot": outcome.in_snapshot,
        "changed": outcome.changed,
    }


def send_alert(settings: AlertSettings, kind: AlertKind, outcome: RunOutcome) -> None:
    """Deliver one alert to the configured webhook and command; log, never raise."""
    document = alert_document(kind, outcome)
    log.warning("alert", **{k: v for k, v in document.items() if k != "source"})
    body = json.dumps(document).encode()
    if settings.webhook_url:
        _post(settings.webhook_url, body)
    if settings.command:
        _run(settings.command, body, document)


def _post(url: str, body: bytes) -> None:
    if not url.startswith(("http://", "https://")):
        log.error("alert_failed", reason="alerts.webhook_url must be http(s)")
        return
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            response.read()
    except OSError as exc:
        log.error("alert_failed", target="webhook", reason=str(exc))


def _run(command: str, body: bytes, document: Mapping[str, Any]) -> None:
    env_extra = {"AMBERFLO_SYNC_ALERT": str(document["alert"])}
    try:
        subprocess.run(  # noqa: S603 - the operator's own configured command
            shlex.split(command),
            input=body,
            timeout=30,
            check=True,
            env={**child_environment(), **env_extra},
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("alert_failed", target="command", reason=str(exc))
