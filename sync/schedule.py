"""The schedule loop: ``amberflo-sync schedule --every 2h`` or ``--cron "0 */2 * * *"``.

Runs never overlap: one loop runs them one after another, and the state lock keeps out any run
started elsewhere (a locked state is logged and tried again next time). A failing run is logged,
recorded in ``runs.jsonl`` and retried at the next slot; only a configuration error stops the
loop (exit 2), because no later run could succeed either. SIGTERM/SIGINT finish the run in
flight (its acknowledged users committed, the run recorded as interrupted) and end the loop.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog
from croniter import croniter
from rich.console import Console

from sync.alerts import AlertTracker, RunOutcome
from sync.config import Settings
from sync.errors import EXIT_OK, EXIT_USAGE, SyncError, UsageError
from sync.forward import forward_events
from sync.pipeline import RunOptions, run_sync
from sync.runid import new_run_id
from sync.signals import graceful_stop

log = structlog.get_logger(__name__)

_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class Schedule:
    """When runs start: every fixed interval, or at the times of a cron expression (UTC)."""

    every: dt.timedelta | None = None
    cron: str | None = None

    @classmethod
    def parse(cls, *, every: str | None, cron: str | None) -> Schedule:
        """Build a schedule from the command line; a bad value is a :class:`UsageError`."""
        if every is not None:
            match = _INTERVAL.match(every)
            if not match or float(match.group(1)) <= 0:
                raise UsageError(
                    f"--every {every!r}: give a positive number and a unit, e.g. 90s, 30m, 2h, 1d"
                )
            seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            return cls(every=dt.timedelta(seconds=seconds))
        if cron is None or not croniter.is_valid(cron):
            raise UsageError(f'--cron {cron!r} is not a valid cron expression, e.g. "0 */2 * * *"')
        return cls(cron=cron)

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """The next start strictly after ``moment``."""
        if self.every is not None:
            return moment + self.every
        assert self.cron is not None  # parse() guarantees one of the two
        following: dt.datetime = croniter(self.cron, moment).get_next(dt.datetime)
        return following


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def run_schedule(
    settings: Settings,
    schedule: Schedule,
    *,
    console: Console,
    max_runs: int | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Run until stopped; return the process exit code (0, or 2 for a configuration error)."""
    alerts = AlertTracker(settings.alerts)
    runs = 0
    with graceful_stop() as signalled:
        stop_event = stop or signalled
        if stop is not None:
            # Either a signal or the caller's event stops the loop.
            _chain(signalled, stop)
        next_start = _now() if schedule.every is not None else schedule.next_after(_now())
        while not stop_event.is_set():
            wait = (next_start - _now()).total_seconds()
            if wait > 0:
                log.info("next_run_due", at=next_start.isoformat(), in_seconds=round(wait, 1))
                if stop_event.wait(wait):
                    break
            started = _now()
            try:
                outcome = _one_cycle(settings, console, stop_event)
            except UsageError as exc:
                log.error("schedule_stopped", reason=str(exc))
                console.print(f"amberflo-sync: error: {exc}")
                return EXIT_USAGE
            alerts.observe(outcome)
            runs += 1
            if max_runs is not None and runs >= max_runs:
                break
            next_start = schedule.next_after(started)
            if next_start <= _now():
                log.warning("run_overran_schedule", started=started.isoformat())
                next_start = _now()
    log.info("schedule_finished", runs=runs)
    return EXIT_OK


def _chain(source: threading.Event, target: threading.Event) -> None:
    def forward() -> None:
        source.wait()
        target.set()

    threading.Thread(target=forward, daemon=True, name="stop-forwarder").start()


def _one_cycle(settings: Settings, console: Console, stop: threading.Event) -> RunOutcome:
    """One scheduled run of the Engage sync, then of the events drop folder when configured."""
    run_id = new_run_id()
    outcome = RunOutcome(run_id=run_id, exit_code=EXIT_OK)
    if settings.source is not None:
        outcome = _sync_cycle(settings, console, stop, run_id)
    if settings.events.path is not None and not stop.is_set():
        events_code = _events_cycle(settings, Path(settings.events.path), stop)
        if events_code != EXIT_OK and outcome.exit_code == EXIT_OK:
            outcome = RunOutcome(run_id=run_id, exit_code=events_code)
    return outcome


def _sync_cycle(
    settings: Settings, console: Console, stop: threading.Event, run_id: str
) -> RunOutcome:
    try:
        result = run_sync(settings, RunOptions(), console=console, stop=stop, run_id=run_id)
    except UsageError:
        raise
    except SyncError as exc:
        log.error("scheduled_run_failed", run_id=run_id, reason=str(exc), exit_code=exc.exit_code)
        return RunOutcome(run_id=run_id, exit_code=exc.exit_code, error=str(exc))
    summary = result.diff.summary if result.diff is not None else None
    return RunOutcome(
        run_id=run_id,
        exit_code=result.exit_code,
        to_send=summary.to_send if summary else 0,
        in_snapshot=summary.in_snapshot if summary else 0,
        failed=result.delivery.failed if result.delivery else 0,
    )


def _events_cycle(settings: Settings, drop: Path, stop: threading.Event) -> int:
    """Forward every file in the drop folder, then move it to ``processed/<run_id>/``."""
    files = (
        sorted(path for path in drop.iterdir() if path.is_file() and not path.name.startswith("."))
        if drop.is_dir()
        else []
    )
    if not files:
        return EXIT_OK
    run_id = new_run_id()
    try:
        result = forward_events(
            settings,
            [str(path) for path in files],
            dry_run=False,
            run_id=run_id,
            out=None,
            stop=stop,
        )
    except UsageError:
        raise
    except SyncError as exc:
        log.error("scheduled_events_failed", run_id=run_id, reason=str(exc))
        return exc.exit_code
    if result.interrupted:
        # Events not yet read stay in their files for the next cycle; the ones already sent
        # will go again and Amberflo drops them as duplicates.
        return result.exit_code
    # Every event of these files is now sent, skipped or dead-lettered with its reason: the
    # files are done, and moving them keeps the next cycle from sending them again.
    done = drop / "processed" / run_id
    done.mkdir(parents=True, exist_ok=True)
    for path in files:
        path.rename(done / path.name)
    return result.exit_code
