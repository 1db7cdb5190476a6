"""The schedule loop: ``amberflo-sync schedule --every 2h`` or ``--cron "0 */2 * * *"``.

Each cycle runs the Engage sync (when ``[source]`` is configured), then forwards the files of
the events drop folder (when ``[events] path`` is). Runs never overlap: one loop runs them one
after another, and the state lock keeps out any run started elsewhere (a cycle that finds the
lock taken is logged and skipped; the next slot tries again). With ``--every`` the first cycle
starts at once and each next one an interval after the previous *start*; a cycle that overruns
its slot is followed at once by the next. With ``--cron`` cycles start at the expression's
times (UTC).

A failing cycle is logged, recorded in ``runs.jsonl`` and retried at the next slot; alerts
(:mod:`sync.alerts`) say when runs start failing and when they recover. Only a configuration
error stops the loop (exit 2), because no later cycle could succeed either. SIGTERM/SIGINT
finish the run in flight (its acknowledged users committed, the run recorded as interrupted)
and end the loop with exit 0; a second signal exits at once (130), the state consistent.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from croniter import croniter
from rich.console import Console

from sync.alerts import AlertTracker, RunOutcome
from sync.config import Settings
from sync.errors import EXIT_FATAL, EXIT_LOCKED, EXIT_OK, EXIT_USAGE, SyncError, UsageError
from sync.forward import forward_events
from sync.pipeline import RunOptions, record_failed_run, run_sync
from sync.runid import new_run_id
from sync.signals import graceful_stop

log = structlog.get_logger(__name__)

_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# One kind of run within a cycle, given its run id.
_Cycle = Callable[[str], RunOutcome]


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

    def first_start(self, now: dt.datetime) -> dt.datetime:
        """When the first cycle starts: at once for ``--every``, the next cron time otherwise."""
        return now if self.every is not None else self.next_after(now)

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
    """Run cycles until stopped; return the exit code (0, or 2 for a configuration error).

    ``max_runs`` ends the loop after that many cycles; ``stop`` ends it from another thread
    (tests), as SIGTERM/SIGINT do.
    """
    if settings.source is None and settings.events.path is None:
        where = settings.config_file or "the configuration"
        raise UsageError(
            f"{where} has neither a [source] section nor an [events] path: the schedule would "
            "have nothing to run"
        )
    alerts = AlertTracker(settings.alerts)
    cycles = 0
    with graceful_stop() as signalled:
        if stop is not None:
            _chain(stop, signalled)
        next_start = schedule.first_start(_now())
        while not signalled.is_set():
            wait = (next_start - _now()).total_seconds()
            if wait > 0:
                log.info("next_run_due", at=next_start.isoformat(), in_seconds=round(wait, 1))
                if signalled.wait(wait):
                    break
            started = _now()
            try:
                outcome = _one_cycle(settings, console, signalled)
            except UsageError as exc:
                log.error("schedule_stopped", reason=str(exc))
                console.print(f"amberflo-sync: error: {exc}", markup=False)
                return EXIT_USAGE
            alerts.observe(outcome)
            cycles += 1
            if max_runs is not None and cycles >= max_runs:
                break
            next_start = schedule.next_after(started)
            if next_start <= _now() and not signalled.is_set():
                log.warning(
                    "run_overran_schedule", started=started.isoformat(), next_due=next_start
                )
                next_start = _now()
    log.info("schedule_finished", cycles=cycles, stopped=signalled.is_set())
    return EXIT_OK


def _chain(source: threading.Event, target: threading.Event) -> None:
    """Set ``target`` once ``source`` is set (a daemon thread: it never holds up exit)."""

    def forward() -> None:
        source.wait()
        target.set()

    threading.Thread(target=forward, daemon=True, name="stop-forwarder").start()


def _one_cycle(settings: Settings, console: Console, stop: threading.Event) -> RunOutcome:
    """One scheduled run of the Engage sync, then of the events drop folder when configured.

    The outcome is the sync's, unless it succeeded and the events run did not.
    """
    outcome: RunOutcome | None = None
    if settings.source is not None:
        outcome = _guarded(
            settings, "sync", lambda run_id: _sync_cycle(settings, console, stop, run_id)
        )
    if settings.events.path is not None and not stop.is_set():
        drop = Path(settings.events.path)
        events = _guarded(
            settings, "events", lambda run_id: _events_cycle(settings, drop, stop, run_id)
        )
        if outcome is None or (outcome.exit_code == EXIT_OK and events.exit_code != EXIT_OK):
            outcome = events
    assert outcome is not None  # run_schedule refuses a configuration with neither
    return outcome


def _guarded(settings: Settings, kind: str, cycle: _Cycle) -> RunOutcome:
    """Run one cycle so that no failure but a configuration error ends the loop.

    A :class:`SyncError` was recorded by the run itself; any other exception is a defect, logged
    with its traceback and recorded here, so the loop, the history and the alerts go on.
    """
    run_id = new_run_id()
    started = _now()
    try:
        outcome = cycle(run_id)
    except UsageError:
        raise
    except SyncError as exc:
        if exc.exit_code == EXIT_LOCKED:
            log.warning("scheduled_run_skipped", run_id=run_id, kind=kind, reason=str(exc))
        else:
            log.error(
                "scheduled_run_failed",
                run_id=run_id,
                kind=kind,
                reason=str(exc),
                exit_code=exc.exit_code,
            )
        return RunOutcome(run_id=run_id, exit_code=exc.exit_code, error=str(exc))
    except Exception as exc:  # a scheduler outlives one failing run, loudly (logged, recorded)
        log.exception("scheduled_run_crashed", run_id=run_id, kind=kind)
        error = f"{type(exc).__name__}: {exc}"
        record_failed_run(settings, run_id=run_id, kind=kind, started=started, error=error)
        return RunOutcome(run_id=run_id, exit_code=EXIT_FATAL, error=error)
    log.info("scheduled_run_finished", run_id=run_id, kind=kind, exit_code=outcome.exit_code)
    return outcome


def _sync_cycle(
    settings: Settings, console: Console, stop: threading.Event, run_id: str
) -> RunOutcome:
    result = run_sync(settings, RunOptions(), console=console, stop=stop, run_id=run_id)
    summary = result.diff.summary if result.diff is not None else None
    return RunOutcome(
        run_id=run_id,
        exit_code=result.exit_code,
        to_send=summary.to_send if summary else 0,
        in_snapshot=summary.in_snapshot if summary else 0,
        failed=result.delivery.failed if result.delivery else 0,
        changed=summary.changed + summary.exited if summary else 0,
    )


def _events_cycle(settings: Settings, drop: Path, stop: threading.Event, run_id: str) -> RunOutcome:
    """Forward every file in the drop folder, then move it to ``processed/<run_id>/``."""
    files = (
        sorted(path for path in drop.iterdir() if path.is_file() and not path.name.startswith("."))
        if drop.is_dir()
        else []
    )
    if not files:
        return RunOutcome(run_id=run_id, exit_code=EXIT_OK)
    result = forward_events(
        settings, [str(path) for path in files], dry_run=False, run_id=run_id, out=None, stop=stop
    )
    if not result.interrupted:
        # Every event of these files is now sent, skipped or dead-lettered with its reason: the
        # files are done, and moving them keeps the next cycle from sending them again. An
        # interrupted run leaves them: the events already sent go again and Amberflo drops
        # them as duplicates.
        done = drop / "processed" / run_id
        done.mkdir(parents=True, exist_ok=True)
        for path in files:
            path.rename(done / path.name)
    return RunOutcome(run_id=run_id, exit_code=result.exit_code)
