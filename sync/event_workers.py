"""Large NDJSON inputs forwarded by worker processes: mapped, and their meter records sent.

Forwarding a large file is mostly parsing lines, mapping them (:func:`map_message`),
serializing and sending meter records: more than one Python process can do at the pace the
emulator or Amberflo takes them. Worker processes each take an NDJSON block
(:class:`~sync.event_input.NdjsonBlock`), map it, send its meter records with
:func:`~sync.deliver.deliver_meter_records` (batching, retries, 400 isolation: the same code as
one process uses) and hand back what is left for this process: the other messages (identify
calls, skipped and rejected ones) with their line and text, and the meter records' outcome
(how many, and each failure with its line and text, for the dead letters).

This process reads the blocks, keeps two a worker in flight and yields the results in input
order. Identify calls stay here: their windows keep one order for one customer's writes.
Documents (JSON arrays, envelopes) are rare and are mapped here too.

Workers are forked before any thread starts but the stop watcher of ``sync.signals``, which
holds no lock but the log's (taken across the fork by ``sync.logs``); they ignore SIGINT
and SIGTERM (the parent decides when to stop: a block given to a worker is always finished and
accounted for) and exit when the parent is gone.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Final, NamedTuple, Self, TypeAlias

from sync.amberflo import AmberfloClient
from sync.deliver import RetryPolicy, deliver_meter_records
from sync.errors import AuthError, SourceError
from sync.event_input import NdjsonBlock, RawEvent, events_of_block
from sync.events import Mapped, MeterEvent, Rejected, map_message
from sync.model import Outcome

__all__ = ["EventWorkers", "MeterDelivery", "SentMeters", "WorkerItem", "mapped_events"]

_PARENT_CHECK_SECONDS: Final = 1.0
_STOP_SIGNALS: Final = frozenset({signal.SIGINT, signal.SIGTERM})

Paired: TypeAlias = tuple[RawEvent, Mapped]


@dataclass(frozen=True)
class MeterDelivery:
    """How a worker sends meter records: its own client, like this process's."""

    api_key: str = field(repr=False)
    base_url: str
    ingest_url: str | None
    timeout: float
    concurrency: int
    policy: RetryPolicy


class SentMeters(NamedTuple):
    """The meter records of one block, sent by a worker: how many, and those that failed."""

    records: int
    failures: list[tuple[RawEvent, Outcome]]


WorkerItem: TypeAlias = Paired | SentMeters


def mapped_events(units: Iterable[RawEvent | NdjsonBlock]) -> Iterator[Paired]:
    """Every message of ``units`` with its mapping, in order, all in this process; a message
    that could not be read is paired with :class:`~sync.events.Rejected` and its error."""
    for unit in units:
        if isinstance(unit, NdjsonBlock):
            for event in events_of_block(unit):
                yield event, _mapping(event)
        else:
            yield unit, _mapping(unit)


def _mapping(event: RawEvent) -> Mapped:
    if event.error is not None:
        return Rejected(event.error)
    return map_message(event.message)


class _ForwardedBlock(NamedTuple):
    """What a worker hands back of one block (only what this process still needs)."""

    source: str
    # The messages that are not meter records: line, text, mapping.
    kept: list[tuple[int, str, Mapped]]
    meters: int
    failures: list[tuple[int, str, Outcome]]
    # An AuthError, as its parts: it does not pickle whole (keyword-only arguments).
    auth_error: tuple[str, int, str] | None = None


class EventWorkers:
    """Worker processes that forward NDJSON blocks; a context manager (the workers end with it).

    ``delivery.concurrency`` is shared among the workers, so no more requests are in flight at
    once than one process would make.
    """

    def __init__(self, workers: int, delivery: MeterDelivery) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.stopped_early = False
        shared = replace(delivery, concurrency=max(1, delivery.concurrency // workers))
        # Stop signals are held back (not lost) while forking: a worker is born with them
        # blocked, so none can reach it before it has set them aside.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        # What this process holds now (the imported modules, mostly) lives as long as it does:
        # out of the collector's sight, the workers' collections neither walk it nor write to
        # its pages, which they would otherwise copy (the gc module's advice before a fork).
        gc.freeze()
        try:
            # Fork: the workers start at once with everything this process imported, and
            # nothing runs in this process but the caller's thread (and the stop watcher, idle
            # in a read) when they are made.
            self._executor = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_start_worker,
                initargs=(os.getpid(), shared),
            )
            # The executor forks on first use: do it now, before the caller starts threads.
            self._executor.submit(int).result()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def forward(
        self, units: Iterable[RawEvent | NdjsonBlock], stop: Callable[[], bool] | None = None
    ) -> Iterator[WorkerItem]:
        """Forward ``units``: messages left for this process with their mapping, and for each
        block its meter records' outcome, in input order.

        Once ``stop()`` is true no further unit is taken; the blocks already given to workers
        are finished and yielded, and :attr:`stopped_early` tells whether any unit was left.
        """
        # Two blocks a worker: one being forwarded, one queued, so no worker waits for this
        # process; more would only hold memory.
        depth = 2 * self.workers
        queue: deque[Future[_ForwardedBlock] | RawEvent] = deque()
        source = iter(units)
        broken: SourceError | None = None
        try:
            for unit in source:
                if isinstance(unit, NdjsonBlock):
                    queue.append(self._executor.submit(_forward_block, unit))
                else:
                    queue.append(unit)
                while len(queue) > depth:
                    yield from _results(queue.popleft())
                if stop is not None and stop():
                    self.stopped_early = next(source, None) is not None
                    break
        except SourceError as exc:
            # The blocks before the break were sent or are being sent: account for them first.
            broken = exc
        while queue:
            yield from _results(queue.popleft())
        if broken is not None:
            raise broken

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _results(item: Future[_ForwardedBlock] | RawEvent) -> Iterator[WorkerItem]:
    if isinstance(item, RawEvent):
        yield item, _mapping(item)
        return
    block = item.result()
    if block.auth_error is not None:
        message, status, endpoint = block.auth_error
        raise AuthError(message, status=status, endpoint=endpoint)
    source = block.source
    for line, raw, mapped in block.kept:
        yield RawEvent(source, line, raw, None), mapped
    failures = [
        (RawEvent(source, line, raw, None), outcome) for line, raw, outcome in block.failures
    ]
    yield SentMeters(block.meters, failures)


# -- in the worker processes ---------------------------------------------------------------


class _Worker(NamedTuple):
    client: AmberfloClient
    delivery: MeterDelivery


_worker: _Worker | None = None  # set once, when the worker process starts


def _start_worker(parent: int, delivery: MeterDelivery) -> None:
    """Set up a worker: its client, deaf to the signals its parent handles, gone when its
    parent is."""
    global _worker  # noqa: PLW0603 - one client for the worker's whole life
    for stop_signal in _STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    client = AmberfloClient(
        api_key=delivery.api_key,
        base_url=delivery.base_url,
        ingest_url=delivery.ingest_url,
        timeout=delivery.timeout,
        max_connections=delivery.concurrency,
    )
    _worker = _Worker(client, delivery)

    def watch() -> None:
        # A parent that exits at once (a second Ctrl-C, a crash) cannot shut the pool down;
        # a worker waiting for its next block would then wait forever.
        while os.getppid() == parent:
            threading.Event().wait(_PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _forward_block(block: NdjsonBlock) -> _ForwardedBlock:
    """Map ``block`` and send its meter records (runs in a worker process)."""
    if _worker is None:
        raise RuntimeError("_forward_block runs in a started worker process only")
    client, delivery = _worker
    lines: list[int] = []
    raws: list[str] = []
    kept: list[tuple[int, str, Mapped]] = []

    def records() -> Iterator[tuple[str, MeterEvent]]:
        # Pulled by delivery as it has room for another batch: the block is mapped while
        # its first batches are on the wire, not before.
        for event in events_of_block(block):
            mapped = _mapping(event)
            if isinstance(mapped, MeterEvent):
                # The ref is the record's place in lines and raws, to find it if it fails.
                ref = str(len(lines))
                lines.append(event.line)
                raws.append(event.raw)
                yield ref, mapped
            else:
                kept.append((event.line, event.raw, mapped))

    failures: list[tuple[int, str, Outcome]] = []

    def on_outcome(ref: str, outcome: Outcome) -> None:
        if not outcome.ok:
            index = int(ref)
            failures.append((lines[index], raws[index], outcome))

    try:
        deliver_meter_records(
            client,
            records(),
            concurrency=delivery.concurrency,
            policy=delivery.policy,
            on_outcome=on_outcome,
            log_summary=False,
        )
    except AuthError as exc:
        return _ForwardedBlock(block.source, kept, 0, [], (str(exc), exc.status, exc.endpoint))
    return _ForwardedBlock(block.source, kept, len(lines), failures)
