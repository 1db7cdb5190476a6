"""One run of ``amberflo-sync events``: read, map, deliver, dead-letter, account.

::

    sources -> event_input (RawEvent) -> events.map_message
            -> page/screen/track: one stream of meter records -> deliver_meter_records
            -> identify: windows of up to 1000 calls -> deliver_customers
            -> dead-letter file for what was malformed, rejected or refused by Amberflo

Every message read ends in exactly one place, so ``read = sent + skipped + dead_lettered``:
``sent`` (Amberflo acknowledged it), ``skipped`` (group, alias, ``integrations`` off; counted by
reason) or ``dead_lettered`` (with its reason and raw text in ``dead-letter/<run_id>.jsonl``,
ready to fix and replay). ``failed`` is the part of ``dead_lettered`` that Amberflo refused or
that delivery gave up on.

Inputs of 2 MiB or more (files, not standard input) are forwarded with worker processes
(:mod:`sync.event_workers`, ``[events] workers``): each maps an NDJSON block and sends its meter
records itself, and hands back the rest (identify calls, skipped and rejected messages, failed
records) in input order, so the accounting below is the same either way.

Meter records flow as one stream: :func:`~sync.deliver.deliver_meter_records` pulls them as it
has room for another batch in flight, so the input is read and mapped (on this thread) while
earlier batches are on the wire (pipelined from this thread too), and sends never wait for a
window to fill or drain. Memory stays bounded: only the records of the batches in flight and the one
being filled are held. Identify calls go in windows; within a window, calls for the same user
are folded into one upsert, applied in order, so two concurrent merges of one customer cannot
overwrite each other. A full window is delivered before reading goes on, which keeps the
customer writes of later windows after those of earlier ones.

A dry run needs no API key, opens no connection and writes nothing under the state folder: it
prints each record it would send as one JSON line (``{"ingest": {...}}`` as each meter record
is mapped, ``{"customer": {...}}`` when its window is delivered) and then the counts
(``{"dry_run": {...}}``). Its exit code is the one a real run would have for the same input
(3 when something would be dead-lettered), so a dry run can gate a pipeline.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol, TextIO, TypeAlias

import structlog

from sync.amberflo import AmberfloClient
from sync.config import Settings
from sync.deliver import CustomerWriter, RetryPolicy, deliver_customers, deliver_meter_records
from sync.errors import EXIT_OK, EXIT_PARTIAL, SourceError, SyncError
from sync.event_input import STDIN, RawEvent, read_units, resolve_sources
from sync.event_workers import EventWorkers, MeterDelivery, SentMeters, WorkerItem, mapped_events
from sync.events import MeterEvent, Rejected, Skipped
from sync.logs import bind_run
from sync.model import CustomerRecord, Outcome, WriteMode
from sync.progress import ProgressReporter
from sync.state import RunLogs

__all__ = ["WINDOW", "EventsRunResult", "forward_events"]

log = structlog.get_logger(__name__)

WINDOW: Final = 1000
"""Identify calls gathered before their customer upserts are delivered."""

STOPPED_REASON: Final = "not sent: the run was stopped before this event was delivered"

# Messages between two progress updates: often enough for the eye, rare enough to cost nothing.
_PROGRESS_EVERY: Final = 5000

# Below this much input (a couple of read blocks) worker processes cost more than they save.
_WORKERS_MIN_BYTES: Final = 2 << 20


@dataclass(frozen=True, slots=True)
class EventsRunResult:
    """What one events run did. ``read == sent + skipped_total + dead_lettered``.

    In a dry run ``sent`` counts the records that would have been sent.
    """

    run_id: str
    read: int
    sent: int
    skipped: Mapping[str, int]
    dead_lettered: int
    failed: int
    dead_letter_file: str | None
    exit_code: int
    dry_run: bool = False
    interrupted: bool = False

    @property
    def skipped_total(self) -> int:
        """Skipped messages, whatever the reason."""
        return sum(self.skipped.values())

    def counts(self) -> dict[str, Any]:
        """The counts as one JSON-ready mapping (for logs, ``runs.jsonl`` and dry runs)."""
        return {
            "read": self.read,
            "sent": self.sent,
            "skipped": self.skipped_total,
            "skipped_by_reason": dict(self.skipped),
            "dead_lettered": self.dead_lettered,
            "failed": self.failed,
        }


def forward_events(
    settings: Settings,
    sources: Sequence[str],
    *,
    dry_run: bool,
    run_id: str,
    out: TextIO | None,
    stop: threading.Event | None = None,
) -> EventsRunResult:
    """Forward the Segment messages of ``sources`` (paths, folders or ``-``) to Amberflo.

    Raises :class:`~sync.errors.SourceError` when a source cannot be read (paths are checked
    before anything is sent), :class:`~sync.errors.ConfigError` when a real run has no API key,
    and :class:`~sync.errors.AuthError` when Amberflo rejects the key. Setting ``stop`` ends the
    run after the messages in flight: the rest of their window is dead-lettered as not sent and
    no further message is read.
    """
    bind_run(run_id, command="events")
    started = datetime.now(UTC)
    if dry_run:
        events = mapped_events(read_units(sources))
        sink = _DryRun(out, settings.amberflo.write_mode)
        result = _forward(events, sink, _LogOnlyDeadLetters(), run_id, stop=stop, dry_run=True)
        sink.print_counts(result)
        _log_finished(result)
        return result

    api_key = settings.api_key_value  # a ConfigError naming the fix before anything is read
    logs = RunLogs(settings.state.dir)
    try:
        result = _send(settings, sources, api_key=api_key, logs=logs, run_id=run_id, stop=stop)
    except SyncError as exc:
        logs.record_run(_run_entry(run_id, started, exc.exit_code, error=str(exc)))
        raise
    logs.record_run(_run_entry(run_id, started, result.exit_code, result=result))
    _log_finished(result)
    return result


def _send(
    settings: Settings,
    sources: Sequence[str],
    *,
    api_key: str,
    logs: RunLogs,
    run_id: str,
    stop: threading.Event | None,
) -> EventsRunResult:
    paths = resolve_sources(sources)
    policy = RetryPolicy(
        attempts=settings.amberflo.max_attempts, deadline=settings.amberflo.retry_deadline_seconds
    )
    concurrency = settings.amberflo.concurrency
    delivery = MeterDelivery(
        api_key=api_key,
        base_url=settings.base_url,
        ingest_url=settings.ingest_url,
        timeout=settings.amberflo.timeout_seconds,
        concurrency=concurrency,
        policy=policy,
    )
    with (
        _event_workers(paths, settings.events.workers, delivery) as workers,
        AmberfloClient(
            api_key=api_key,
            base_url=settings.base_url,
            ingest_url=settings.ingest_url,
            timeout=settings.amberflo.timeout_seconds,
            max_connections=concurrency,
        ) as client,
        logs.run_log(run_id, "dead-letter") as dead_letters,
        ProgressReporter("forwarding events", None) as progress,
    ):
        sender = _Sender(
            client,
            CustomerWriter(client, mode=settings.amberflo.write_mode, policy=policy),
            policy=policy,
            concurrency=concurrency,
            mode=settings.amberflo.write_mode,
            stop=stop,
        )
        if workers is None:
            return _forward(
                mapped_events(read_units(paths)),
                sender,
                dead_letters,
                run_id,
                stop=stop,
                progress=progress,
            )
        stopping = stop.is_set if stop is not None else None
        items = workers.forward(read_units(paths), stop=stopping)
        # The workers honour the stop themselves: every block they were given is accounted for.
        return _forward(
            items,
            sender,
            dead_letters,
            run_id,
            stop=None,
            stopped=lambda: workers.stopped_early,
            progress=progress,
        )


def _event_workers(
    paths: Sequence[str], workers: int, delivery: MeterDelivery
) -> EventWorkers | nullcontext[None]:
    """Worker processes when the input is large enough to pay for them.

    Opened before the client and its delivery threads, so that the workers are forked from a
    process with no thread but the idle stop watcher. Standard input stays here: its size is
    not known up front.
    """
    if workers < 1 or STDIN in paths:
        return nullcontext()
    size = sum(Path(path).stat().st_size for path in paths)
    if size < _WORKERS_MIN_BYTES:
        return nullcontext()
    pool = EventWorkers(workers, delivery)
    log.info("event_workers_started", workers=workers, input_bytes=size)
    return pool


# -- the run --------------------------------------------------------------------------------


class _DeadLetters(Protocol):
    """Where dead letters go: the run's JSONL log, or (dry run) nowhere but the log."""

    @property
    def count(self) -> int: ...

    @property
    def path(self) -> Any: ...

    def write(self, obj: Mapping[str, Any]) -> None: ...


class _LogOnlyDeadLetters:
    """A dry run's dead letters: counted and logged, never written."""

    path = None

    def __init__(self) -> None:
        self.count = 0

    def write(self, obj: Mapping[str, Any]) -> None:
        self.count += 1


@dataclass(slots=True)
class _Tally:
    read: int = 0
    sent: int = 0
    failed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


class _Ledger:
    """Where every message ends: counted, and dead-lettered with its reason when it must be."""

    def __init__(self, dead_letters: _DeadLetters, *, dry_run: bool) -> None:
        self.tally = _Tally()
        self._dead_letters = dead_letters
        # A dry run writes no dead-letter file, so its log line must not claim one.
        self._log_event = "event_rejected" if dry_run else "event_dead_lettered"

    def dead_letter(self, event: RawEvent, reason: str) -> None:
        log.warning(self._log_event, source=event.source, line=event.line, reason=reason)
        self._dead_letters.write(
            {"source": event.source, "line": event.line, "reason": reason, "raw": event.raw}
        )

    def delivered(self, event: RawEvent) -> None:
        self.tally.sent += 1

    def failed(self, event: RawEvent, reason: str) -> None:
        self.tally.failed += 1
        self.dead_letter(event, reason)

    def sent_by_worker(self, sent: SentMeters) -> None:
        """A block's meter records, sent by a worker: counted, the failed ones dead-lettered."""
        self.tally.read += sent.records
        self.tally.sent += sent.records - len(sent.failures)
        for event, outcome in sent.failures:
            _settle(event, outcome, self.delivered, self.failed)


# Identify calls of one window by customer id: the folded record and the events it came from.
_CustomerWindow: TypeAlias = dict[str, tuple[CustomerRecord, list[RawEvent]]]


class _Sink(Protocol):
    """Delivers meter records and customer windows, calling ``delivered`` or ``failed`` once
    for each of their events."""

    @property
    def mode(self) -> WriteMode: ...

    def meters(
        self,
        stream: Iterator[tuple[RawEvent, MeterEvent]],
        delivered: Callable[[RawEvent], None],
        failed: Callable[[RawEvent, str], None],
    ) -> None:
        """Deliver every meter record of ``stream``, pulling it as delivery has room."""

    def customers(
        self,
        window: _CustomerWindow,
        delivered: Callable[[RawEvent], None],
        failed: Callable[[RawEvent, str], None],
    ) -> None:
        """Upsert the customers of one window."""


def _forward(
    events: Iterator[WorkerItem],
    sink: _Sink,
    dead_letters: _DeadLetters,
    run_id: str,
    *,
    stop: threading.Event | None,
    dry_run: bool = False,
    stopped: Callable[[], bool] | None = None,
    progress: ProgressReporter | None = None,
) -> EventsRunResult:
    """Route every item of ``events`` and account for it. ``stop`` is checked after each item;
    ``stopped`` says, at the end, whether ``events`` stopped before its end by itself."""
    ledger = _Ledger(dead_letters, dry_run=dry_run)
    tally, delivered, failed = ledger.tally, ledger.delivered, ledger.failed
    if progress is not None:
        events = _shown(events, progress, tally, dead_letters)

    customers: _CustomerWindow = {}
    source_error: SourceError | None = None
    finished = False

    def meters() -> Generator[tuple[RawEvent, MeterEvent], None, None]:
        """Route every event; meter records are yielded, the rest handled here."""
        nonlocal customers, source_error, finished
        size = 0  # identify calls in the window, folded or not
        try:
            for item in events:
                if isinstance(item, SentMeters):  # a block's records, sent by a worker
                    ledger.sent_by_worker(item)
                    continue
                event, mapped = item
                tally.read += 1
                if isinstance(mapped, MeterEvent):
                    yield event, mapped
                elif isinstance(mapped, Rejected):
                    ledger.dead_letter(event, mapped.reason)
                elif isinstance(mapped, Skipped):
                    tally.skipped[mapped.reason] += 1
                else:
                    _gather(customers, event, mapped.customer, sink.mode)
                    size += 1
                    if size >= WINDOW:
                        sink.customers(customers, delivered, failed)
                        customers, size = {}, 0
                if stop is not None and stop.is_set():
                    return
        except SourceError as exc:
            # Deliver what was read before the source broke, then fail the run.
            source_error = exc
        finished = True

    stream = meters()
    try:
        sink.meters(stream, delivered, failed)
    finally:
        stream.close()  # a stop may leave it unfinished: close the input now, not at collection
    sink.customers(customers, delivered, failed)
    if source_error is not None:
        raise source_error

    interrupted = not finished or (stopped is not None and stopped())
    return _result(run_id, tally, dead_letters, interrupted=interrupted, dry_run=dry_run)


def _shown(
    items: Iterator[WorkerItem], progress: ProgressReporter, tally: _Tally, dead: _DeadLetters
) -> Iterator[WorkerItem]:
    """``items`` as they are, the counts shown every few thousand messages (a bar or a log)."""
    shown = 0
    for item in items:
        yield item
        if tally.read - shown >= _PROGRESS_EVERY:
            shown = tally.read
            progress.update(tally.read, dead.count)
    progress.update(tally.read, dead.count)


def _result(
    run_id: str, tally: _Tally, dead_letters: _DeadLetters, *, interrupted: bool, dry_run: bool
) -> EventsRunResult:
    dead_lettered = dead_letters.count
    path = dead_letters.path if dead_lettered else None
    return EventsRunResult(
        run_id=run_id,
        read=tally.read,
        sent=tally.sent,
        skipped=dict(sorted(tally.skipped.items())),
        dead_lettered=dead_lettered,
        failed=tally.failed,
        dead_letter_file=str(path) if path is not None else None,
        exit_code=EXIT_PARTIAL if dead_lettered or interrupted else EXIT_OK,
        dry_run=dry_run,
        interrupted=interrupted,
    )


def _gather(
    window: _CustomerWindow, event: RawEvent, record: CustomerRecord, mode: WriteMode
) -> None:
    """Add an identify call to its window, folded into the user's earlier calls there."""
    held = window.get(record.customer_id)
    if held is None:
        window[record.customer_id] = (record, [event])
    else:
        earlier, sources = held
        sources.append(event)
        window[record.customer_id] = (_fold(earlier, record, mode), sources)


def _fold(earlier: CustomerRecord, later: CustomerRecord, mode: WriteMode) -> CustomerRecord:
    """One upsert with the effect of upserting ``earlier`` then ``later``."""
    if mode == "replace":
        return later  # a replace writes the whole customer: the last one wins
    return replace(
        later,
        name=later.name or earlier.name,
        email=later.email or earlier.email,
        traits={**earlier.traits, **later.traits},
    )


# -- sinks ----------------------------------------------------------------------------------


class _Sender:
    """Delivers to Amberflo: meter records in batches, customer windows as upserts."""

    def __init__(
        self,
        client: AmberfloClient,
        writer: CustomerWriter,
        *,
        policy: RetryPolicy,
        concurrency: int,
        mode: WriteMode,
        stop: threading.Event | None,
    ) -> None:
        self._client = client
        self._writer = writer
        self._policy = policy
        self._concurrency = concurrency
        self._stop = stop
        self.mode = mode

    def meters(
        self,
        stream: Iterator[tuple[RawEvent, MeterEvent]],
        delivered: Callable[[RawEvent], None],
        failed: Callable[[RawEvent, str], None],
    ) -> None:
        # The events whose records were pulled and not yet settled, by ref. Refs count the
        # records, so they are unique even when two events share a messageId.
        unsettled: dict[str, RawEvent] = {}

        def records() -> Iterator[tuple[str, MeterEvent]]:
            for number, (event, meter) in enumerate(stream):
                ref = str(number)
                unsettled[ref] = event
                yield ref, meter

        def on_meter(ref: str, outcome: Outcome) -> None:
            _settle(unsettled.pop(ref), outcome, delivered, failed)

        deliver_meter_records(
            self._client,
            records(),
            concurrency=self._concurrency,
            policy=self._policy,
            on_outcome=on_meter,
            stop=self._stop,
        )
        # Whatever a stop left unsent is dead-lettered, so every event read is accounted for.
        for event in unsettled.values():
            failed(event, STOPPED_REASON)

    def customers(
        self,
        window: _CustomerWindow,
        delivered: Callable[[RawEvent], None],
        failed: Callable[[RawEvent, str], None],
    ) -> None:
        if not window:
            return
        unsettled = dict(window)

        def on_customer(record: CustomerRecord, outcome: Outcome) -> None:
            for event in unsettled.pop(record.customer_id)[1]:
                _settle(event, outcome, delivered, failed)

        deliver_customers(
            self._writer,
            (record for record, _ in window.values()),
            concurrency=self._concurrency,
            on_outcome=on_customer,
            stop=self._stop,
        )
        for _, events in unsettled.values():
            for event in events:
                failed(event, STOPPED_REASON)


def _settle(
    event: RawEvent,
    outcome: Outcome,
    delivered: Callable[[RawEvent], None],
    failed: Callable[[RawEvent, str], None],
) -> None:
    if outcome.ok:
        delivered(event)
    else:
        # The status says whether Amberflo answered (and how) or the record never left.
        status = f" (HTTP {outcome.status})" if outcome.status is not None else ""
        failed(event, f"not delivered{status}: {outcome.reason or 'no reason given'}")


class _DryRun:
    """Prints what a window would send, one JSON line a record, and counts it as sent."""

    def __init__(self, out: TextIO | None, mode: WriteMode) -> None:
        self._out = out
        self.mode = mode

    def meters(
        self,
        stream: Iterator[tuple[RawEvent, MeterEvent]],
        delivered: Callable[[RawEvent], None],
        failed: Callable[[RawEvent, str], None],
    ) -> None:
        for event, meter in stream:
            self._print({"ingest": meter.as_record()})
            delivered(event)

    def customers(
        self,
        window: _CustomerWindow,
        delivered: Callable[[RawEvent], None],
        failed: Callable[[RawEvent, str], None],
    ) -> None:
        for record, events in window.values():
            self._print({"customer": _customer_view(record)})
            for event in events:
                delivered(event)

    def print_counts(self, result: EventsRunResult) -> None:
        counts = result.counts()
        counts["would_send"] = counts.pop("sent")
        del counts["failed"]  # nothing was sent, so nothing failed
        self._print({"dry_run": counts})

    def _print(self, obj: Mapping[str, Any]) -> None:
        if self._out is not None:
            self._out.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n")


def _customer_view(record: CustomerRecord) -> dict[str, Any]:
    """The fields an identify sets; merge mode keeps whatever else Amberflo holds."""
    view: dict[str, Any] = {"customerId": record.customer_id}
    if record.name:
        view["customerName"] = record.name
    if record.email:
        view["customerEmail"] = record.email
    view["traits"] = dict(record.traits)
    return view


# -- accounting -----------------------------------------------------------------------------


def _run_entry(
    run_id: str,
    started: datetime,
    exit_code: int,
    *,
    result: EventsRunResult | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "run_id": run_id,
        "kind": "events",
        "mode": "events",
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "exit_code": exit_code,
    }
    if result is not None:
        entry["interrupted"] = result.interrupted
        entry["counts"] = result.counts()
        entry["dead_letter_file"] = result.dead_letter_file
    if error is not None:
        entry["error"] = error
    return entry


def _log_finished(result: EventsRunResult) -> None:
    log.info(
        "events_run_finished",
        dry_run=result.dry_run,
        exit_code=result.exit_code,
        interrupted=result.interrupted,
        dead_letter_file=result.dead_letter_file,
        **result.counts(),
    )
