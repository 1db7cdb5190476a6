"""Messages paired with what they map to, parsed and mapped in worker processes when it pays.

Forwarding a large NDJSON file is mostly parsing lines, mapping them (:func:`map_message`) and
serializing meter records: pure work on a block of bytes, and more than one Python process can
do at the pace the delivery threads send. Worker processes take NDJSON blocks
(:class:`~sync.event_input.NdjsonBlock`) and hand back, per message, its line, its text and
its mapping (a meter record already serialized). This process reads the blocks, keeps a few in
flight, and yields the results in input order, so everything downstream (identify windows,
dead letters, counts) sees exactly the stream one process would make.

Workers are forked before any thread starts (the caller opens the pool first), ignore SIGINT
and SIGTERM (the parent decides when to stop; they hold nothing that could be lost) and exit
when the parent is gone. Documents (JSON arrays, envelopes) are rare and stay in this process.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from types import TracebackType
from typing import Final, NamedTuple, Self, TypeAlias

import orjson

from sync.event_input import NdjsonBlock, RawEvent, events_of_block
from sync.events import Mapped, MeterEvent, Rejected, map_message

__all__ = ["EncodedMeter", "MappingPool", "mapped_events"]

_PARENT_CHECK_SECONDS: Final = 1.0
_STOP_SIGNALS: Final = frozenset({signal.SIGINT, signal.SIGTERM})


class EncodedMeter(NamedTuple):
    """A meter record a worker serialized: :meth:`MeterEvent.as_json`'s bytes, kept as they are."""

    encoded: bytes

    def as_json(self) -> bytes:
        """The record as compact UTF-8 JSON, as sent."""
        return self.encoded

    def as_record(self) -> dict[str, object]:
        """The record as a mapping (for printing; sending uses :meth:`as_json`)."""
        record: dict[str, object] = orjson.loads(self.encoded)
        return record


Paired: TypeAlias = tuple[RawEvent, "Mapped | EncodedMeter"]


class _MappedBlock(NamedTuple):
    """A block's messages, column by column: a tuple per message would cost more to ship."""

    source: str
    lines: list[int]
    raws: list[str]
    # A meter record serialized (bytes), or the mapping as map_message made it.
    results: list[bytes | Mapped]


def map_block(block: NdjsonBlock) -> _MappedBlock:
    """Parse and map every message of ``block`` (runs in a worker process)."""
    lines: list[int] = []
    raws: list[str] = []
    results: list[bytes | Mapped] = []
    for event in events_of_block(block):
        mapped = _mapping(event)
        lines.append(event.line)
        raws.append(event.raw)
        if isinstance(mapped, MeterEvent):
            try:
                results.append(mapped.as_json())
            except ValueError:
                # Not serializable (a lone surrogate): shipped as it is, so that delivery
                # refuses it with the same reason as when mapping in one process.
                results.append(mapped)
        else:
            results.append(mapped)
    return _MappedBlock(block.source, lines, raws, results)


def _mapping(event: RawEvent) -> Mapped:
    if event.error is not None:
        return Rejected(event.error)
    return map_message(event.message)


def mapped_events(
    units: Iterable[RawEvent | NdjsonBlock], pool: MappingPool | None = None
) -> Iterator[Paired]:
    """Every message of ``units`` with its mapping, in order; a message that could not be read
    is paired with :class:`~sync.events.Rejected` and its reading error.

    Without a ``pool`` everything is done here; with one, NDJSON blocks are mapped by its
    workers, a few blocks ahead of the consumer.
    """
    if pool is None:
        for unit in units:
            if isinstance(unit, NdjsonBlock):
                for event in events_of_block(unit):
                    yield event, _mapping(event)
            else:
                yield unit, _mapping(unit)
        return
    yield from pool.map(units)


class MappingPool:
    """Worker processes that map NDJSON blocks; a context manager (the workers end with it)."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        # Stop signals are held back (not lost) while forking: a worker is born with them
        # blocked, so none can reach it before it has set them aside.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            # Fork: the workers start at once with everything this process imported, and
            # nothing runs in this process but the caller's thread when they are made.
            self._executor = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_start_worker,
                initargs=(os.getpid(),),
            )
            # The executor forks on first use: do it now, before the caller starts threads.
            self._executor.submit(int).result()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def map(self, units: Iterable[RawEvent | NdjsonBlock]) -> Iterator[Paired]:
        """Every message of ``units`` with its mapping, in input order."""
        # Two blocks a worker: one being mapped, one queued, so no worker waits for this
        # process; more would only hold memory.
        depth = 2 * self.workers
        queue: deque[Future[_MappedBlock] | RawEvent] = deque()
        try:
            for unit in units:
                if isinstance(unit, NdjsonBlock):
                    queue.append(self._executor.submit(map_block, unit))
                else:
                    queue.append(unit)
                while len(queue) > depth:
                    yield from _results(queue.popleft())
            while queue:
                yield from _results(queue.popleft())
        finally:
            for item in queue:
                if isinstance(item, Future):
                    item.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _results(item: Future[_MappedBlock] | RawEvent) -> Iterator[Paired]:
    if isinstance(item, RawEvent):
        yield item, _mapping(item)
        return
    block = item.result()
    source = block.source
    for line, raw, result in zip(block.lines, block.raws, block.results, strict=True):
        event = RawEvent(source, line, raw, None)
        yield event, (EncodedMeter(result) if type(result) is bytes else result)  # type: ignore[misc]


def _start_worker(parent: int) -> None:
    """Set up a worker: deaf to the signals its parent handles, gone when its parent is."""
    for stop_signal in _STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def watch() -> None:
        # A parent that exits at once (a second Ctrl-C, a crash) cannot shut the pool down;
        # a worker waiting for its next block would then wait forever.
        while os.getppid() == parent:
            threading.Event().wait(_PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
