"""Delivery to Amberflo: retry policy, customer upserts, meter-record batches, outcome accounting.

Everything here sits on :class:`~sync.amberflo.AmberfloClient` and turns its errors into one
:class:`~sync.model.Outcome` per item:

* :class:`~sync.errors.RetriableError` (429, 5xx, transport) is retried under a
  :class:`RetryPolicy`; when the policy gives up, the item fails with the last reason.
* :class:`~sync.errors.PermanentError` (other 4xx) fails the item at once. A meter batch answered
  400 is split in halves until the bad records are isolated, so one bad record does not sink the
  rest of its batch.
* :class:`~sync.errors.AuthError` is fatal: no new work starts, in-flight work finishes and is
  reported, then the error propagates.

Customer upserts run on threads with a bounded number of items in flight, so a million-record
input never becomes a million futures. Meter batches, on the direct path, go out from the
calling thread with up to ``concurrency`` requests on the wire at once (threads only for
retries). ``on_outcome`` callbacks always run on the thread that called
``deliver_*``, in completion order, so a caller can checkpoint or draw a progress bar without
locks. Setting ``stop`` starts no new item, lets in-flight ones finish and reports
``interrupted=True``.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeAlias, TypeVar, cast

import stamina
import structlog

from sync.amberflo import AmberfloClient, PendingIngest, encode_json
from sync.errors import DeliveryError, PermanentError, RetriableError
from sync.model import CustomerRecord, DeliverySummary, Outcome, WriteMode

__all__ = [
    "DEFAULT_POLICY",
    "CustomerWriter",
    "JsonRecord",
    "RetryPolicy",
    "deliver_customers",
    "deliver_meter_records",
    "read_existing_ids",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")
U = TypeVar("U")
R = TypeVar("R")

# Customer fields Amberflo stores besides id, name, email and traits. PUT replaces the whole
# customer, so merge mode carries these over or the PUT would erase them.
_KEPT_FIELDS = ("enabled", "lifecycleStage", "description", "test", "address")
# Statuses where a smaller batch can succeed: a bad record (400) or a body too large (413).
_SPLIT_STATUSES = frozenset({400, 413})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how long to retry a retriable failure.

    ``attempts`` counts every try, the first included; ``deadline`` (seconds from the first try)
    stops retrying even with attempts left. The wait before retry ``n`` is
    ``min(wait_max, wait_initial * 2 ** (n - 1) + uniform(0, jitter))``: with the defaults
    0.5 s, 1 s, 2 s ... capped at 30 s, so tries keep coming well past the 20 s Amberflo asks
    for. A ``Retry-After`` from Amberflo replaces the computed wait, capped at ``wait_max`` so a
    server cannot park the job; a retry whose wait would end past the deadline is not made.
    """

    attempts: int = 10
    deadline: float = 300.0
    wait_initial: float = 0.5
    wait_max: float = 30.0
    jitter: float = 1.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be at least 1, got {self.attempts}")
        if self.deadline <= 0:
            raise ValueError(f"RetryPolicy.deadline must be positive, got {self.deadline}")
        if min(self.wait_initial, self.wait_max, self.jitter) < 0:
            raise ValueError("RetryPolicy waits (wait_initial, wait_max, jitter) must be >= 0")

    def wait_before_retry(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based) before the next one."""
        if retry_after is not None:
            return min(max(0.0, retry_after), self.wait_max)
        # Jitter spreads the retries of concurrent workers; it is not security-relevant.
        jitter = random.uniform(0.0, self.jitter) if self.jitter else 0.0  # noqa: S311
        try:
            backoff = self.wait_initial * 2.0 ** (attempt - 1)
        except OverflowError:
            return self.wait_max
        return min(self.wait_max, backoff + jitter)

    def call(self, fn: Callable[[], T], *, failed: RetriableError | None = None) -> T:
        """Call ``fn`` until it succeeds or this policy gives up; then its last error propagates.

        Only :class:`~sync.errors.RetriableError` is retried. ``failed`` is the error of a
        first try made elsewhere (a request sent ahead, whose answer was read later): ``fn``
        then makes the retries only, and the deadline counts from now. Runs on ``stamina``, so
        ``stamina.set_testing(True)`` makes every wait zero in tests.
        """
        started = time.monotonic()
        # The first try runs outside stamina: almost every call succeeds at once, and setting
        # up a retry context costs as much CPU as a customer request's own bookkeeping.
        if failed is None:
            try:
                return fn()
            except RetriableError as exc:
                failed = exc
        decide = _RetryDecision(self, started=started)
        first: RetriableError | None = failed
        for attempt in stamina.retry_context(
            on=decide,
            attempts=self.attempts,
            timeout=self.deadline,
            # The decision hook always returns the wait itself; these only satisfy the signature.
            wait_initial=0.0,
            wait_max=self.wait_max,
            wait_jitter=0.0,
        ):
            with attempt:
                if first is not None:
                    # The first try's failure, decided and waited for like any other.
                    error, first = first, None
                    raise error
                return fn()
        raise AssertionError("stamina.retry_context ended without a result or an error")


DEFAULT_POLICY = RetryPolicy()


class _RetryDecision:
    """stamina backoff hook for one call: retry or not, and how long to wait.

    The hook makes the whole decision (error kind, attempts, deadline) rather than leaving the
    stop rule to stamina, so the ``retrying`` event is logged only when a retry really follows,
    with the wait really used.
    """

    def __init__(self, policy: RetryPolicy, *, started: float) -> None:
        self._policy = policy
        self._failures = 0
        self._started = started

    def __call__(self, exc: Exception) -> bool | float:
        self._failures += 1
        if not isinstance(exc, RetriableError):
            return False
        wait_s = self._policy.wait_before_retry(self._failures, exc.retry_after)
        elapsed = time.monotonic() - self._started
        if self._failures >= self._policy.attempts or elapsed + wait_s > self._policy.deadline:
            return False
        log.warning(
            "retrying",
            endpoint=exc.endpoint,
            status=exc.status,
            attempt=self._failures,
            wait=round(wait_s, 3),
            retry_after=exc.retry_after,
            reason=str(exc),
        )
        return wait_s


# -- customers ------------------------------------------------------------------------------


class CustomerWriter:
    """Upserts one customer at a time in the configured write mode.

    ``merge`` (default) reads the customer and writes it back with our traits merged in, keeping
    everything this job does not manage; ``replace`` PUTs our fields alone. Safe to share between
    threads: it holds no per-call state.

    ``existing_ids``, from :func:`read_existing_ids`, is every customer id Amberflo held when the
    run began. Merge mode then creates a customer missing from it at once, without reading it
    first: an initial sync costs one request per user instead of two. The outcome is the same as
    without it: a customer created by someone else since the listing makes the POST fail with
    "exists", and the writer reads it and merges as usual. Customers in the listing are still
    read right before they are written, so a change made to them during the run is kept.
    """

    def __init__(
        self,
        client: AmberfloClient,
        *,
        mode: WriteMode = "merge",
        policy: RetryPolicy = DEFAULT_POLICY,
        existing_ids: frozenset[str] | None = None,
    ) -> None:
        if mode not in ("merge", "replace"):
            raise ValueError(f"write mode must be 'merge' or 'replace', got {mode!r}")
        self._client = client
        self._mode = mode
        self._policy = policy
        self._existing_ids = existing_ids

    def upsert(self, record: CustomerRecord) -> Outcome:
        """Make Amberflo hold ``record``; the outcome says whether it does.

        :class:`~sync.errors.AuthError` propagates; every other delivery failure becomes
        ``Outcome(ok=False)``. A customer that already matches is not written and counts as
        delivered (``reason="unchanged"``).
        """
        try:
            written = self._merge(record) if self._mode == "merge" else self._replace(record)
        except DeliveryError as exc:
            # The caller reports the outcome; this adds which request failed, for debugging.
            log.debug(
                "customer_upsert_failed",
                customer_id=record.customer_id,
                endpoint=exc.endpoint,
                status=exc.status,
                reason=str(exc),
            )
            return Outcome(ref=record.customer_id, ok=False, status=exc.status, reason=str(exc))
        if not written:
            return Outcome(ref=record.customer_id, ok=True, reason="unchanged")
        return Outcome(ref=record.customer_id, ok=True, status=200)

    def _merge(self, record: CustomerRecord) -> bool:
        known_absent = (
            self._existing_ids is not None and record.customer_id not in self._existing_ids
        )
        existing = None if known_absent else self._get(record.customer_id)
        if existing is None:
            try:
                self._policy.call(lambda: self._client.create_customer(new_customer(record)))
            except PermanentError as exc:
                if not _already_exists(exc):
                    raise
                # Created between our GET and POST, or by our own POST whose answer was lost.
                existing = self._get(record.customer_id)
                if existing is None:
                    raise
            else:
                return True
        body = merged_customer(existing, record)
        if body == _writable_view(existing):
            return False
        self._policy.call(lambda: self._client.replace_customer(body))
        return True

    def _replace(self, record: CustomerRecord) -> bool:
        body = new_customer(record)
        try:
            self._policy.call(lambda: self._client.replace_customer(body))
        except PermanentError as exc:
            if exc.status != 404:
                raise
        else:
            return True
        try:
            self._policy.call(lambda: self._client.create_customer(body))
        except PermanentError as exc:
            if not _already_exists(exc):
                raise
            # Someone created it between our PUT and POST: the PUT now finds it.
            self._policy.call(lambda: self._client.replace_customer(body))
        return True

    def _get(self, customer_id: str) -> dict[str, Any] | None:
        return self._policy.call(lambda: self._client.get_customer(customer_id))


def new_customer(record: CustomerRecord) -> dict[str, Any]:
    """The body that creates ``record`` (or replaces it in ``replace`` mode): our fields alone."""
    body: dict[str, Any] = {
        "customerId": record.customer_id,
        "customerName": record.name or record.customer_id,
    }
    if record.email:
        body["customerEmail"] = record.email
    body["traits"] = dict(record.traits)
    return body


def merged_customer(existing: Mapping[str, Any], record: CustomerRecord) -> dict[str, Any]:
    """The full customer to PUT in merge mode: ``existing`` with ``record`` applied.

    Traits: the existing ones minus ``record.removed_traits``, then ``record.traits`` over them,
    so traits this job does not manage (``stripeId``...) survive. Name: ours, else the existing
    one, else the id. Email: ours, else the existing one. Other writable fields are carried over
    because PUT replaces the whole customer.
    """
    body: dict[str, Any] = {
        "customerId": record.customer_id,
        "customerName": record.name or existing.get("customerName") or record.customer_id,
    }
    email = record.email or existing.get("customerEmail")
    if email:
        body["customerEmail"] = email
    for field in _KEPT_FIELDS:
        if existing.get(field) is not None:
            body[field] = existing[field]
    traits = {
        key: value
        for key, value in (existing.get("traits") or {}).items()
        if key not in record.removed_traits
    }
    traits.update(record.traits)
    body["traits"] = traits
    return body


def _writable_view(existing: Mapping[str, Any]) -> dict[str, Any]:
    """What ``existing`` holds of the fields a PUT writes, shaped like :func:`merged_customer`."""
    view: dict[str, Any] = {
        "customerId": existing.get("customerId"),
        "customerName": existing.get("customerName"),
    }
    if existing.get("customerEmail"):
        view["customerEmail"] = existing["customerEmail"]
    for field in _KEPT_FIELDS:
        if existing.get(field) is not None:
            view[field] = existing[field]
    view["traits"] = dict(existing.get("traits") or {})
    return view


# Reading the customer list pays off only when it replaces many lookups: a run that sends fewer
# users than this reads each one instead.
PREFETCH_MIN_SENDS = 100
# Listing may cost at most one page request per this many users sent (1%), so a small run
# against a large account does not read the whole account first.
SENDS_PER_PAGE = 100


def read_existing_ids(
    client: AmberfloClient,
    *,
    sends: int,
    policy: RetryPolicy = DEFAULT_POLICY,
    page_size: int = 1000,
) -> frozenset[str] | None:
    """Every customer id in Amberflo, read in pages, for a merge run that sends ``sends`` users.

    None when the listing would not pay off (fewer than :data:`PREFETCH_MIN_SENDS` users, or more
    than one page per :data:`SENDS_PER_PAGE` users), or when it fails: the writer then reads each
    customer as it goes, which is slower but equally correct. Only a complete listing is
    returned, because only a complete one proves that a customer does not exist.
    :class:`~sync.errors.AuthError` propagates: no later request would succeed either.
    """
    if sends < PREFETCH_MIN_SENDS:
        return None
    max_pages = sends // SENDS_PER_PAGE
    ids: set[str] = set()
    page = 1
    try:
        while True:
            if page > max_pages:
                log.info("customer_prefetch_skipped", reason="account too large", pages=page - 1)
                return None
            items, last = policy.call(partial(client.customers_page, page, page_size))
            ids.update(c["customerId"] for c in items if isinstance(c.get("customerId"), str))
            if last:
                break
            page += 1
    except (RetriableError, PermanentError) as exc:
        log.warning(
            "customer_prefetch_failed", endpoint=exc.endpoint, status=exc.status, reason=str(exc)
        )
        return None
    log.info("customers_prefetched", customers=len(ids), pages=page)
    return frozenset(ids)


def _already_exists(exc: PermanentError) -> bool:
    """Whether a POST failed because the customer exists (Amberflo's exact words are unknown)."""
    message = str(exc).lower()
    return exc.status in (400, 409) and "exist" in message and "not exist" not in message


def deliver_customers(
    writer: CustomerWriter,
    records: Iterable[CustomerRecord],
    *,
    concurrency: int = 8,
    on_outcome: Callable[[CustomerRecord, Outcome], None],
    stop: threading.Event | None = None,
    unavailable_after: int | None = None,
) -> DeliverySummary:
    """Upsert every record with up to ``concurrency`` in flight; one outcome per record.

    ``on_outcome`` runs on the calling thread. :class:`~sync.errors.AuthError` propagates after
    in-flight upserts finish and are reported. When ``unavailable_after`` customers in a row
    (default: twice the concurrency, at least 10) fail for transient reasons after their full
    retry budget, Amberflo is taken to be down: no new customer starts, and the summary says
    why, so a run against a dead API ends in minutes rather than spending the whole retry
    deadline on every remaining user. The users not attempted keep their old state and go out
    with the next run.
    """
    counts = _Counts()
    breaker = _Breaker(unavailable_after or max(10, 2 * concurrency), stop)

    def report(result: tuple[CustomerRecord, Outcome]) -> None:
        record, outcome = result
        counts.add(outcome)
        breaker.observe(outcome)
        on_outcome(record, outcome)

    interrupted = _pump(
        records,
        lambda record: (record, writer.upsert(record)),
        concurrency=concurrency,
        stop=breaker,
        report=report,
    )
    summary = counts.summary(interrupted, stopped_reason=breaker.reason)
    log.info(
        "customers_delivered",
        delivered=summary.delivered,
        failed=summary.failed,
        interrupted=interrupted,
        stopped_reason=breaker.reason,
    )
    return summary


class _Breaker:
    """Trips after ``threshold`` consecutive transient failures; also relays the caller's stop."""

    def __init__(self, threshold: int, stop: threading.Event | None) -> None:
        self._threshold = threshold
        self._stop = stop
        self._streak = 0
        self.reason: str | None = None

    def observe(self, outcome: Outcome) -> None:
        transient = not outcome.ok and (
            outcome.status is None or outcome.status == 429 or outcome.status >= 500
        )
        self._streak = self._streak + 1 if transient else 0
        if self._streak >= self._threshold and self.reason is None:
            self.reason = (
                f"Amberflo failed {self._streak} customers in a row after every retry "
                f"(last: {outcome.status or 'no answer'} {outcome.reason or ''}); stopped "
                "starting new ones: the rest go with the next run"
            ).replace("  ", " ")
            log.error("amberflo_unavailable", consecutive_failures=self._streak)

    def is_set(self) -> bool:
        return self.reason is not None or (self._stop is not None and self._stop.is_set())


# -- meter records --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Batch:
    """Records that go in one ingest request, as JSON, with their caller references."""

    items: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class _Rejected:
    """A record refused before sending (too large, not serializable)."""

    ref: str
    reason: str

    def settled(self) -> _Settled:
        """Its failed outcome, as a batch's outcomes are reported."""
        return (self.ref,), Outcome(ref=self.ref, ok=False, reason=self.reason)


# Records that share one outcome: a batch accepted whole, or the records of a failed part.
# The outcome is one object for all of them (its ref is the first's): a batch of 100 costs
# one allocation, not 100.
_Settled: TypeAlias = tuple[Sequence[str], Outcome]


class JsonRecord(Protocol):
    """A meter record that serializes itself, to the bytes ``encode_json`` would give it."""

    def as_json(self) -> bytes:
        """The record as compact UTF-8 JSON; ``ValueError`` when it cannot be serialized."""
        ...


def deliver_meter_records(
    client: AmberfloClient,
    records: Iterable[tuple[str, Mapping[str, Any] | JsonRecord]],
    *,
    batch_size: int = 100,
    max_batch_bytes: int = 1_000_000,
    max_record_bytes: int = 100_000,
    concurrency: int = 4,
    policy: RetryPolicy = DEFAULT_POLICY,
    on_outcome: Callable[[str, Outcome], None],
    stop: threading.Event | None = None,
    log_summary: bool = True,
) -> DeliverySummary:
    """Ingest ``(ref, record)`` pairs in batches; one outcome per ref, on the calling thread.

    A record is a mapping, or a :class:`JsonRecord` that serializes itself more cheaply (the
    events path's :class:`~sync.events.MeterEvent`). Each is serialized once, on the calling
    thread, as the records are pulled: ``records`` may be a lazy stream that reads its input as
    batches go out. Batches hold at most ``batch_size`` records and ``max_batch_bytes`` of
    serialized JSON array; a record over ``max_record_bytes`` fails alone without being sent.
    ``log_summary`` logs the counts at the end (a caller that sends a stream in parts logs its
    own).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_record_bytes + 2 > max_batch_bytes:
        raise ValueError("max_record_bytes must leave room for the array brackets in a batch")
    counts = _Counts()

    def work(unit: _Batch | _Rejected) -> list[_Settled]:
        if isinstance(unit, _Rejected):
            return [unit.settled()]
        return _send_batch(client, policy, list(unit.items))

    def report(results: list[_Settled]) -> None:
        for refs, outcome in results:
            counts.add(outcome, len(refs))
            for ref in refs:
                on_outcome(ref, outcome)

    units = _batches(
        records,
        batch_size=batch_size,
        max_batch_bytes=max_batch_bytes,
        max_record_bytes=max_record_bytes,
    )
    if client.pipelines_ingest:
        interrupted = _pump_pipelined(
            units, client, policy, depth=concurrency, stop=stop, report=report
        )
    else:
        interrupted = _pump(units, work, concurrency=concurrency, stop=stop, report=report)
    summary = counts.summary(interrupted)
    if log_summary:
        log.info(
            "meter_records_delivered",
            delivered=summary.delivered,
            failed=summary.failed,
            interrupted=interrupted,
        )
    return summary


def _batches(
    records: Iterable[tuple[str, Mapping[str, Any] | JsonRecord]],
    *,
    batch_size: int,
    max_batch_bytes: int,
    max_record_bytes: int,
) -> Iterator[_Batch | _Rejected]:
    """Group records by count and by the byte size of the JSON array they make."""
    items: list[tuple[str, bytes]] = []
    size = 2  # the brackets of the JSON array
    for ref, record in records:
        try:
            # Asking for the method is cheaper than an isinstance check against Mapping.
            as_json = getattr(record, "as_json", None)
            encoded = as_json() if as_json is not None else encode_json(record)
        except (TypeError, ValueError) as exc:
            yield _Rejected(ref, f"the record cannot be serialized as JSON: {exc}")
            continue
        record_bytes = len(encoded)
        if record_bytes > max_record_bytes:
            yield _Rejected(
                ref,
                f"the record is {record_bytes} bytes as JSON, over the limit of "
                f"{max_record_bytes} bytes for one record",
            )
            continue
        added = record_bytes + (1 if items else 0)  # a comma between records
        if items and (len(items) >= batch_size or size + added > max_batch_bytes):
            yield _Batch(tuple(items))
            items, size, added = [], 2, record_bytes
        items.append((ref, encoded))
        size += added
    if items:
        yield _Batch(tuple(items))


def _pump_pipelined(
    units: Iterable[_Batch | _Rejected],
    client: AmberfloClient,
    policy: RetryPolicy,
    *,
    depth: int,
    stop: threading.Event | None,
    report: Callable[[list[_Settled]], None],
) -> bool:
    """Send batches from this thread through a :class:`_Pipeline`; True when stopped.

    Results are reported on this thread; an AuthError is raised once everything sent has been
    answered, and no new batch starts after it, as with :func:`_pump`.
    """
    if depth < 1:
        raise ValueError(f"concurrency must be at least 1, got {depth}")
    pipeline = _Pipeline(client, policy, depth=depth, report=report)
    interrupted = False
    try:
        for unit in units:
            # Checked after pulling, so a stop that arrives once everything has started is not
            # reported as an interruption.
            if pipeline.error is not None:
                break
            if stop is not None and stop.is_set():
                interrupted = True
                break
            if isinstance(unit, _Rejected):
                report([unit.settled()])
            else:
                pipeline.send(unit)
        pipeline.finish()
    finally:
        pipeline.close()
    if pipeline.error is not None:
        raise pipeline.error
    return interrupted


_Retry: TypeAlias = tuple[_Batch, RetriableError | PermanentError]


class _Pipeline:
    """Ingest requests from one thread, up to ``depth`` of them on the wire at once.

    Each batch's request is written at once on a connection of its own, and its answer read
    when ``depth`` others are waiting, or at the end: the next batches are serialized while
    Amberflo reads the first. Threads handing each request over cost a fifth of the events
    path's CPU (a worker process made 28 futex calls a request). A batch whose first try fails
    is retried or split by :func:`_send_batch` on a thread (at most ``depth`` at a time), so a
    back-off does not hold up the batches behind it.
    """

    def __init__(
        self,
        client: AmberfloClient,
        policy: RetryPolicy,
        *,
        depth: int,
        report: Callable[[list[_Settled]], None],
    ) -> None:
        self._client = client
        self._depth = depth
        self._report = report
        self._on_wire: deque[tuple[_Batch, PendingIngest]] = deque()
        self._retries: _Workers[_Retry, list[_Settled]] = _Workers(
            lambda retry: _send_batch(client, policy, list(retry[0].items), retry[1])
        )
        self._retrying = 0
        self.error: Exception | None = None
        """The first AuthError (or bug) met; no batch should be sent after it."""

    def send(self, batch: _Batch) -> None:
        """Put ``batch`` on the wire, first reading answers until there is room for it."""
        while len(self._on_wire) >= self._depth:
            self._settle_oldest()
        while self._retrying >= self._depth:
            self._collect_retry(block=True)
        self._on_wire.append(
            (batch, self._client.start_ingest([record for _, record in batch.items]))
        )
        self._collect_retry(block=False)

    def finish(self) -> None:
        """Read every answer and wait for every retry."""
        while self._on_wire:
            self._settle_oldest()
        while self._retrying:
            self._collect_retry(block=True)

    def close(self) -> None:
        """After an unexpected error: read what is still on the wire, so no connection is left
        with an answer in it, and end the retry threads."""
        for _, pending in self._on_wire:
            with contextlib.suppress(Exception):
                pending.result()
        self._on_wire.clear()
        self._retries.shutdown()

    def _settle_oldest(self) -> None:
        batch, pending = self._on_wire.popleft()
        try:
            pending.result()
        except (RetriableError, PermanentError) as exc:
            self._retrying += 1
            self._retries.submit((batch, exc), self._retrying)
            return
        except Exception as exc:  # noqa: BLE001 - AuthError (or a bug): raised at the end
            self.error = self.error or exc
            return
        self._report([_accepted(batch.items)])

    def _collect_retry(self, *, block: bool) -> None:
        try:
            done = self._retries.results.get(block=block)
        except queue.Empty:
            return
        self._retrying -= 1
        failure = _reported(done, self._report)
        self.error = self.error or failure


def _send_batch(
    client: AmberfloClient,
    policy: RetryPolicy,
    items: list[tuple[str, bytes]],
    first_failure: RetriableError | PermanentError | None = None,
) -> list[_Settled]:
    """Send one batch; on a 400 split it in halves until the bad records stand alone.

    ``first_failure``: how a first try made elsewhere (sent ahead by the pipeline) failed;
    it is retried or split as if it had happened here.
    """
    try:
        if isinstance(first_failure, PermanentError):
            raise first_failure
        policy.call(
            lambda: client.ingest_encoded([record for _, record in items]), failed=first_failure
        )
    except PermanentError as exc:
        if exc.status in _SPLIT_STATUSES and len(items) > 1:
            middle = len(items) // 2
            log.info("batch_split", records=len(items), status=exc.status)
            return _send_batch(client, policy, items[:middle]) + _send_batch(
                client, policy, items[middle:]
            )
        return [_failed(items, exc)]
    except RetriableError as exc:
        return [_failed(items, exc)]
    return [_accepted(items)]


def _accepted(items: Sequence[tuple[str, bytes]]) -> _Settled:
    refs = [ref for ref, _ in items]
    return refs, Outcome(ref=refs[0], ok=True, status=200)


def _failed(items: list[tuple[str, bytes]], exc: DeliveryError) -> _Settled:
    log.warning(
        "batch_failed",
        records=len(items),
        first_ref=items[0][0],
        endpoint=exc.endpoint,
        status=exc.status,
        reason=str(exc),
    )
    refs = [ref for ref, _ in items]
    return refs, Outcome(ref=refs[0], ok=False, status=exc.status, reason=str(exc))


# -- shared machinery -----------------------------------------------------------------------


class _Counts:
    """Delivered and failed items, counted on the calling thread only."""

    def __init__(self) -> None:
        self.delivered = 0
        self.failed = 0

    def add(self, outcome: Outcome, items: int = 1) -> None:
        if outcome.ok:
            self.delivered += items
        else:
            self.failed += items

    def summary(self, interrupted: bool, stopped_reason: str | None = None) -> DeliverySummary:
        return DeliverySummary(
            delivered=self.delivered,
            failed=self.failed,
            interrupted=interrupted,
            stopped_reason=stopped_reason,
        )


class _Stop(Protocol):
    """Anything that says whether to stop starting new work (a ``threading.Event``, a breaker)."""

    def is_set(self) -> bool: ...


def _pump(
    units: Iterable[U],
    work: Callable[[U], R],
    *,
    concurrency: int,
    stop: _Stop | None,
    report: Callable[[R], None],
) -> bool:
    """Run ``work`` over ``units`` with at most ``concurrency`` in flight; True when stopped.

    Units are pulled and ``report`` runs on this thread, for each result in completion order.
    If a unit raises (AuthError, or a bug), no new unit starts, the ones in flight finish and
    are reported, then the first error is raised.

    Worker threads take units from one queue and put results on another: per unit that is two
    queue operations, where a thread pool's futures, their locks and ``wait`` cost several times
    as much CPU, which an initial sync of a million users pays once per user.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    pool: _Workers[U, R] = _Workers(work)
    iterator = iter(units)
    in_flight = 0
    error: Exception | None = None
    interrupted = False
    exhausted = False
    try:
        while True:
            while error is None and not exhausted and not interrupted and in_flight < concurrency:
                try:
                    unit = next(iterator)
                except StopIteration:
                    exhausted = True
                    break
                # Checked after pulling, so a stop that arrives once everything has started
                # is not reported as an interruption.
                if stop is not None and stop.is_set():
                    interrupted = True
                    break
                in_flight += 1
                pool.submit(unit, in_flight)
            if not in_flight:
                break
            failure = _reported(pool.results.get(), report)
            in_flight -= 1
            error = error or failure
    finally:
        pool.shutdown()
    if error is not None:
        raise error
    return interrupted


def _reported(
    done: tuple[R, None] | tuple[None, BaseException], report: Callable[[R], None]
) -> Exception | None:
    """Report a worker's result, or return the Exception its unit raised (for the caller to
    raise once the rest is settled); anything else it raised (KeyboardInterrupt) goes on now."""
    result, failure = done
    if failure is None:
        report(cast(R, result))
        return None
    if isinstance(failure, Exception):
        return failure
    raise failure


class _Workers(Generic[U, R]):
    """Threads that run ``work`` on the units put in one queue and put the results in another,
    started as the number of units in flight first needs them."""

    def __init__(self, work: Callable[[U], R]) -> None:
        self._work = work
        self._tasks: queue.SimpleQueue[tuple[U] | None] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[tuple[R, None] | tuple[None, BaseException]] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []

    def submit(self, unit: U, in_flight: int) -> None:
        """Queue ``unit``; with ``in_flight`` units queued or running, start a thread if short."""
        self._tasks.put((unit,))
        if len(self._threads) < in_flight:
            thread = threading.Thread(target=self._run, name=f"deliver_{len(self._threads)}")
            thread.start()
            self._threads.append(thread)

    def shutdown(self) -> None:
        """Let every thread finish its unit, then end and join them."""
        for _ in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                self.results.put((self._work(task[0]), None))
            except BaseException as exc:  # noqa: BLE001 - handed to the pulling thread
                self.results.put((None, exc))
