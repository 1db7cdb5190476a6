"""Delivery: the retry policy, customer upserts in both write modes, meter batches, accounting.

Requests are answered in-process by :class:`FakeAmberflo` through ``httpx.MockTransport``; the
socket tests against the emulator are in ``test_deliver_emulator.py``.
"""

from __future__ import annotations

import gzip
import json
import random
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import httpx
import pytest
import stamina
from structlog.testing import capture_logs

from sync.amberflo import AmberfloClient, encode_json
from sync.deliver import (
    PREFETCH_MIN_SENDS,
    SENDS_PER_PAGE,
    CustomerWriter,
    RetryPolicy,
    deliver_customers,
    deliver_meter_records,
    merged_customer,
    read_existing_ids,
)
from sync.errors import AuthError, PermanentError, RetriableError
from sync.model import CustomerRecord, Outcome

# Retries without waiting, so tests are fast and deterministic.
FAST = RetryPolicy(attempts=4, wait_initial=0.0, wait_max=0.0, jitter=0.0)

Answer = httpx.Response | Exception


class FakeAmberflo:
    """A small in-process Amberflo: customers by id, ingested records, scripted failures.

    ``script[(method, path)]`` holds answers given before the real one, one per request.
    Ingest refuses (400) any batch holding a record whose ``customerId`` starts with ``bad``.
    """

    def __init__(self, *, put_missing: Literal["create", "error"] = "create") -> None:
        self.put_missing = put_missing
        self.customers: dict[str, dict[str, Any]] = {}
        self.ingested: list[dict[str, Any]] = []
        self.batches: list[bytes] = []
        self.requests: list[tuple[str, str]] = []
        self.script: dict[tuple[str, str], list[Answer]] = {}
        self.refuse_key_for: set[str] = set()
        self._lock = threading.Lock()

    def fail_next(self, method: str, path: str, *answers: Answer) -> None:
        self.script.setdefault((method, path), []).extend(answers)

    def client(self) -> AmberfloClient:
        return AmberfloClient(
            api_key="k", base_url="https://fake.test", transport=httpx.MockTransport(self)
        )

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            route = (request.method, request.url.path)
            self.requests.append(route)
            scripted = self.script.get(route)
            if scripted:
                answer = scripted.pop(0)
                if isinstance(answer, Exception):
                    raise answer
                return answer
            if route == ("POST", "/ingest"):
                return self._ingest(request.content)
            if request.url.path == "/customers":
                return self._customers(request)
            if route == ("GET", "/customers/paging"):
                return self._page(request)
        return httpx.Response(404, json={"message": "no route"})

    def _page(self, request: httpx.Request) -> httpx.Response:
        limit, page = int(request.url.params["limit"]), int(request.url.params["page"])
        ids = sorted(self.customers)
        items = [self.customers[i] for i in ids[(page - 1) * limit : page * limit]]
        pages = -(-len(ids) // limit)
        return httpx.Response(200, json={"items": items, "metadata": {"totalFilteredPages": pages}})

    def _ingest(self, content: bytes) -> httpx.Response:
        raw = gzip.decompress(content)
        records = json.loads(raw)
        for record in records:
            if str(record["customerId"]).startswith("bad"):
                return httpx.Response(
                    400, json={"errorMessage": f"invalid customerId {record['customerId']}"}
                )
        self.batches.append(raw)
        self.ingested.extend(records)
        return httpx.Response(200, text=f"{len(records)} records were ingested")

    def _customers(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            customer_id = request.url.params["customerId"]
            if customer_id in self.refuse_key_for:
                return httpx.Response(403, json={"message": "Forbidden"})
            return httpx.Response(200, json=self.customers.get(customer_id, {}))
        body = json.loads(request.content)
        customer_id = body["customerId"]
        if customer_id in self.refuse_key_for:
            return httpx.Response(403, json={"message": "Forbidden"})
        exists = customer_id in self.customers
        if request.method == "POST" and exists:
            return httpx.Response(400, json={"message": f"customer {customer_id} already exists"})
        if request.method == "PUT" and not exists and self.put_missing == "error":
            return httpx.Response(404, json={"message": f"customer {customer_id} not found"})
        if not body.get("customerName"):
            return httpx.Response(400, json={"message": "customerName is required"})
        self.customers[customer_id] = body
        return httpx.Response(200, json=body)


@pytest.fixture
def fake() -> FakeAmberflo:
    return FakeAmberflo()


# -- retry policy ---------------------------------------------------------------------------


def test_waits_grow_exponentially_up_to_the_cap() -> None:
    """Without jitter the waits double from wait_initial and stop growing at wait_max."""
    policy = RetryPolicy(wait_initial=0.5, wait_max=3.0, jitter=0.0)
    assert [policy.wait_before_retry(n, None) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.wait_before_retry(10_000, None) == 3.0


def test_jitter_stays_within_its_bound() -> None:
    """Each wait is the backoff plus a random share of at most ``jitter`` seconds."""
    policy = RetryPolicy(wait_initial=1.0, wait_max=100.0, jitter=0.5)
    waits = [policy.wait_before_retry(2, None) for _ in range(200)]
    assert all(2.0 <= wait <= 2.5 for wait in waits)
    assert len(set(waits)) > 1


def test_retry_after_replaces_the_backoff_up_to_the_cap() -> None:
    """A Retry-After is the wait, capped at wait_max; a negative one means now."""
    policy = RetryPolicy(wait_initial=0.5, wait_max=30.0, jitter=1.0)
    assert policy.wait_before_retry(1, 7.0) == 7.0
    assert policy.wait_before_retry(1, 600.0) == 30.0
    assert policy.wait_before_retry(1, -3.0) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [{"attempts": 0}, {"deadline": 0}, {"wait_initial": -1}, {"wait_max": -1}, {"jitter": -1}],
)
def test_a_policy_that_cannot_work_is_refused(kwargs: dict[str, float]) -> None:
    """Zero attempts, a non-positive deadline or a negative wait raise ValueError."""
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def flaky(failures: list[Exception], result: str = "done") -> tuple[list[int], Any]:
    """A callable that raises ``failures`` in turn, then returns ``result``; and its call log."""
    calls: list[int] = []

    def call() -> str:
        calls.append(len(calls) + 1)
        if failures:
            raise failures.pop(0)
        return result

    return calls, call


def throttled(retry_after: float | None = None) -> RetriableError:
    return RetriableError("throttled", status=429, endpoint="POST /ingest", retry_after=retry_after)


def test_retriable_errors_are_retried_with_one_log_event_per_retry() -> None:
    """Each retry logs ``retrying`` with endpoint, status, attempt and wait, then succeeds."""
    down = RetriableError("down", status=503, endpoint="PUT /customers")
    calls, call = flaky([throttled(), down])
    with capture_logs() as logs:
        assert FAST.call(call) == "done"
    assert calls == [1, 2, 3]
    retries = [entry for entry in logs if entry["event"] == "retrying"]
    assert [(r["endpoint"], r["status"], r["attempt"], r["wait"]) for r in retries] == [
        ("POST /ingest", 429, 1, 0.0),
        ("PUT /customers", 503, 2, 0.0),
    ]


def test_the_last_error_propagates_when_attempts_run_out() -> None:
    """After ``attempts`` tries the last RetriableError is raised, with no retry logged for it."""
    errors: list[Exception] = [throttled() for _ in range(10)]
    last = errors[3]
    calls, call = flaky(errors)
    with capture_logs() as logs, pytest.raises(RetriableError) as caught:
        FAST.call(call)
    assert caught.value is last
    assert calls == [1, 2, 3, 4]
    assert len([entry for entry in logs if entry["event"] == "retrying"]) == 3


@pytest.mark.parametrize(
    "error",
    [
        PermanentError("bad record", status=400, endpoint="POST /ingest"),
        AuthError("rejected", status=403, endpoint="POST /ingest"),
        KeyError("a bug"),
    ],
)
def test_errors_that_cannot_heal_are_not_retried(error: Exception) -> None:
    """Permanent, auth and unexpected errors propagate after a single try."""
    calls, call = flaky([error])
    with pytest.raises(type(error)):
        FAST.call(call)
    assert calls == [1]


def test_a_retry_that_would_end_past_the_deadline_is_not_made() -> None:
    """A Retry-After that overruns the deadline fails at once instead of sleeping past it."""
    policy = RetryPolicy(attempts=10, deadline=1.0, wait_max=60.0)
    calls, call = flaky([throttled(retry_after=5.0)])
    with pytest.raises(RetriableError):
        policy.call(call)
    assert calls == [1]


def test_stamina_test_mode_caps_the_attempts() -> None:
    """``stamina.set_testing`` overrides the policy's attempts, so tests can shorten retries."""
    calls, call = flaky([throttled() for _ in range(10)])
    with stamina.set_testing(True, attempts=2), pytest.raises(RetriableError):
        RetryPolicy().call(call)
    assert calls == [1, 2]


# -- customer upserts -----------------------------------------------------------------------

EXISTING: dict[str, Any] = {
    "id": "u1",
    "customerId": "u1",
    "customerName": "Old Name",
    "customerEmail": "old@example.com",
    "enabled": True,
    "lifecycleStage": "active",
    "description": "a customer",
    "test": False,
    "address": {"city": "Lyon", "country": "FR"},
    "createTime": 1,
    "updateTime": 2,
    "traits": {"stripeId": "cus_1", "vip": "true", "plan": "basic"},
}


def test_merge_keeps_unmanaged_traits_and_fields_and_applies_ours(fake: FakeAmberflo) -> None:
    """Merge drops removed traits, writes ours over theirs, keeps the rest, then PUTs."""
    fake.customers["u1"] = dict(EXISTING)
    record = CustomerRecord(
        "u1", traits={"plan": "pro", "score": "5"}, removed_traits=frozenset({"vip"})
    )
    with fake.client() as client:
        outcome = CustomerWriter(client, policy=FAST).upsert(record)
    assert outcome == Outcome(ref="u1", ok=True, status=200)
    assert fake.requests == [("GET", "/customers"), ("PUT", "/customers")]
    assert fake.customers["u1"] == {
        "customerId": "u1",
        "customerName": "Old Name",
        "customerEmail": "old@example.com",
        "enabled": True,
        "lifecycleStage": "active",
        "description": "a customer",
        "test": False,
        "address": {"city": "Lyon", "country": "FR"},
        "traits": {"stripeId": "cus_1", "plan": "pro", "score": "5"},
    }


@pytest.mark.parametrize(
    ("existing", "record", "name", "email"),
    [
        (EXISTING, CustomerRecord("u1", name="New", email="new@example.com"), "New",
         "new@example.com"),
        (EXISTING, CustomerRecord("u1"), "Old Name", "old@example.com"),
        ({"customerId": "u1"}, CustomerRecord("u1"), "u1", None),
        ({"customerId": "u1", "customerName": ""}, CustomerRecord("u1", email="e@x.io"), "u1",
         "e@x.io"),
    ],
)  # fmt: skip
def test_merge_takes_name_and_email_from_us_then_amberflo_then_the_id(
    existing: Mapping[str, Any], record: CustomerRecord, name: str, email: str | None
) -> None:
    """customerName is ours, else Amberflo's, else the id; customerEmail ours, else Amberflo's."""
    body = merged_customer(existing, record)
    assert body["customerName"] == name
    assert body.get("customerEmail") == email


def test_merge_skips_the_put_when_amberflo_already_has_the_customer(fake: FakeAmberflo) -> None:
    """A merged customer equal to the stored one is not written and counts as delivered."""
    fake.customers["u1"] = dict(EXISTING)
    record = CustomerRecord("u1", traits={"plan": "basic"}, removed_traits=frozenset({"gone"}))
    with fake.client() as client:
        outcome = CustomerWriter(client, policy=FAST).upsert(record)
    assert outcome == Outcome(ref="u1", ok=True, reason="unchanged")
    assert fake.requests == [("GET", "/customers")]


def test_merge_creates_a_missing_customer_with_our_fields(fake: FakeAmberflo) -> None:
    """A customer Amberflo does not have is POSTed with the id as name when we have none."""
    records = [
        CustomerRecord("u1", traits={"vip": "true"}),
        CustomerRecord("u2", name="Ada", email="ada@example.com", traits={}),
    ]
    with fake.client() as client:
        writer = CustomerWriter(client, policy=FAST)
        assert [writer.upsert(r).ok for r in records] == [True, True]
    assert fake.requests == [("GET", "/customers"), ("POST", "/customers")] * 2
    assert fake.customers == {
        "u1": {"customerId": "u1", "customerName": "u1", "traits": {"vip": "true"}},
        "u2": {
            "customerId": "u2",
            "customerName": "Ada",
            "customerEmail": "ada@example.com",
            "traits": {},
        },
    }


def test_merge_falls_back_to_get_and_put_when_the_post_races_a_creation(
    fake: FakeAmberflo,
) -> None:
    """POST answered "already exists" reads the customer again and merges into it."""
    fake.customers["u1"] = dict(EXISTING)
    fake.fail_next("GET", "/customers", httpx.Response(200, json={}))  # created after our GET
    record = CustomerRecord("u1", traits={"plan": "pro"})
    with fake.client() as client:
        outcome = CustomerWriter(client, policy=FAST).upsert(record)
    assert outcome.ok
    assert fake.requests == [
        ("GET", "/customers"),
        ("POST", "/customers"),
        ("GET", "/customers"),
        ("PUT", "/customers"),
    ]
    assert fake.customers["u1"]["traits"] == {"stripeId": "cus_1", "vip": "true", "plan": "pro"}


# -- reading existing customers up front ------------------------------------------------------


def test_existing_ids_come_from_every_page_of_the_listing(fake: FakeAmberflo) -> None:
    """The listing is read page by page to the last one and yields every customer id."""
    for i in range(25):
        fake.customers[f"c{i:02}"] = {"customerId": f"c{i:02}", "customerName": "C"}
    with fake.client() as client, capture_logs() as logs:
        ids = read_existing_ids(client, sends=3 * SENDS_PER_PAGE, policy=FAST, page_size=10)
    assert ids == frozenset(fake.customers)
    assert fake.requests == [("GET", "/customers/paging")] * 3
    assert [e["customers"] for e in logs if e["event"] == "customers_prefetched"] == [25]


def test_a_small_run_reads_each_customer_instead_of_the_listing(fake: FakeAmberflo) -> None:
    """Below the threshold, no listing is read and the writer looks customers up one by one."""
    with fake.client() as client:
        assert read_existing_ids(client, sends=PREFETCH_MIN_SENDS - 1, policy=FAST) is None
    assert fake.requests == []


def test_the_listing_stops_when_the_account_is_too_large_for_the_run(fake: FakeAmberflo) -> None:
    """A listing that would need more than one page per SENDS_PER_PAGE users is abandoned."""
    budget = PREFETCH_MIN_SENDS // SENDS_PER_PAGE
    for i in range(10 * budget + 1):
        fake.customers[f"c{i:04}"] = {"customerId": f"c{i:04}", "customerName": "C"}
    with fake.client() as client:
        ids = read_existing_ids(client, sends=PREFETCH_MIN_SENDS, policy=FAST, page_size=10)
    assert ids is None
    assert len(fake.requests) == budget


@pytest.mark.parametrize(
    "failure",
    [
        httpx.Response(404, json={"message": "Not Found"}),
        httpx.Response(200, json={"unexpected": "shape"}),
        httpx.Response(503, text="down"),
    ],
)
def test_a_listing_that_fails_falls_back_to_lookups(
    fake: FakeAmberflo, failure: httpx.Response
) -> None:
    """A refused, malformed or unavailable listing gives no ids (and a warning), not an error."""
    fake.fail_next("GET", "/customers/paging", *[failure] * FAST.attempts)
    with fake.client() as client, capture_logs() as logs:
        ids = read_existing_ids(client, sends=PREFETCH_MIN_SENDS, policy=FAST)
    assert ids is None
    assert [e["event"] for e in logs if e["log_level"] == "warning"][-1] == (
        "customer_prefetch_failed"
    )


def test_a_rejected_key_during_the_listing_is_fatal(fake: FakeAmberflo) -> None:
    """A 403 on the listing raises AuthError: no later request could succeed."""
    fake.fail_next("GET", "/customers/paging", httpx.Response(403, json={"message": "Forbidden"}))
    with fake.client() as client, pytest.raises(AuthError):
        read_existing_ids(client, sends=PREFETCH_MIN_SENDS, policy=FAST)


def _merge_all(
    fake: FakeAmberflo, records: list[CustomerRecord], existing_ids: frozenset[str] | None
) -> list[Outcome]:
    with fake.client() as client:
        writer = CustomerWriter(client, policy=FAST, existing_ids=existing_ids)
        return [writer.upsert(record) for record in records]


def test_with_the_listing_merge_creates_new_customers_without_reading_them() -> None:
    """Customers absent from the listing are POSTed at once, listed ones still read first, and
    Amberflo ends exactly as it does without the listing."""
    records = [
        CustomerRecord("u1", traits={"plan": "pro"}, removed_traits=frozenset({"vip"})),
        CustomerRecord("new1", name="New", traits={"vip": "true"}),
        CustomerRecord("new2", traits={}),
    ]
    ends = {}
    for prefetch in (False, True):
        fake = FakeAmberflo()
        fake.customers["u1"] = dict(EXISTING)
        existing_ids = frozenset(fake.customers) if prefetch else None
        outcomes = _merge_all(fake, records, existing_ids)
        assert all(outcome.ok for outcome in outcomes)
        ends[prefetch] = fake.customers
        if prefetch:
            assert fake.requests == [
                ("GET", "/customers"),
                ("PUT", "/customers"),
                ("POST", "/customers"),
                ("POST", "/customers"),
            ]
    assert ends[True] == ends[False]
    assert ends[True]["u1"]["traits"] == {"stripeId": "cus_1", "plan": "pro"}


def test_a_customer_created_after_the_listing_is_merged_not_overwritten(
    fake: FakeAmberflo,
) -> None:
    """A customer someone created since the listing makes the POST fail with "exists"; the
    writer then reads it and merges, keeping the traits it does not manage."""
    fake.customers["u1"] = dict(EXISTING)  # created by someone else after the (empty) listing
    [outcome] = _merge_all(fake, [CustomerRecord("u1", traits={"plan": "pro"})], frozenset())
    assert outcome.ok
    assert fake.requests == [("POST", "/customers"), ("GET", "/customers"), ("PUT", "/customers")]
    assert fake.customers["u1"]["traits"] == {"stripeId": "cus_1", "vip": "true", "plan": "pro"}


def test_replace_puts_our_fields_alone(fake: FakeAmberflo) -> None:
    """Replace mode PUTs the record as it is, with no GET, dropping traits we do not send."""
    fake.customers["u1"] = dict(EXISTING)
    record = CustomerRecord("u1", traits={"plan": "pro"})
    with fake.client() as client:
        assert CustomerWriter(client, mode="replace", policy=FAST).upsert(record).ok
    assert fake.requests == [("PUT", "/customers")]
    assert fake.customers["u1"] == {
        "customerId": "u1",
        "customerName": "u1",
        "traits": {"plan": "pro"},
    }


def test_replace_posts_when_amberflo_says_the_customer_does_not_exist() -> None:
    """A PUT answered 404 is followed by a POST of the same body."""
    fake = FakeAmberflo(put_missing="error")
    record = CustomerRecord("u9", name="Nine", traits={"a": "1"})
    with fake.client() as client:
        assert CustomerWriter(client, mode="replace", policy=FAST).upsert(record).ok
    assert fake.requests == [("PUT", "/customers"), ("POST", "/customers")]
    assert fake.customers["u9"] == {
        "customerId": "u9",
        "customerName": "Nine",
        "traits": {"a": "1"},
    }


def test_replace_puts_again_when_its_post_races_a_creation(fake: FakeAmberflo) -> None:
    """PUT 404, then POST "already exists" (created meanwhile): the second PUT wins."""
    fake.customers["u1"] = dict(EXISTING)
    fake.fail_next("PUT", "/customers", httpx.Response(404, json={"message": "not found"}))
    fake.fail_next("POST", "/customers", httpx.Response(400, json={"message": "already exists"}))
    record = CustomerRecord("u1", name="One", traits={"a": "1"})
    with fake.client() as client:
        assert CustomerWriter(client, mode="replace", policy=FAST).upsert(record).ok
    assert fake.requests == [("PUT", "/customers"), ("POST", "/customers"), ("PUT", "/customers")]
    assert fake.customers["u1"] == {
        "customerId": "u1",
        "customerName": "One",
        "traits": {"a": "1"},
    }


def test_an_unknown_write_mode_is_refused(fake: FakeAmberflo) -> None:
    """Only merge and replace exist."""
    with fake.client() as client, pytest.raises(ValueError, match="write mode"):
        CustomerWriter(client, mode="upsert")  # type: ignore[arg-type]


def test_a_rejected_customer_becomes_a_failed_outcome_with_amberflos_reason(
    fake: FakeAmberflo,
) -> None:
    """A 4xx on the write fails that customer with the status and Amberflo's message."""
    fake.fail_next("POST", "/customers", httpx.Response(400, json={"message": "bad email"}))
    with fake.client() as client:
        outcome = CustomerWriter(client, policy=FAST).upsert(CustomerRecord("u1", email="x"))
    assert outcome == Outcome(ref="u1", ok=False, status=400, reason="bad email")


def test_transient_failures_are_retried_until_the_customer_is_written(
    fake: FakeAmberflo,
) -> None:
    """A 503 and a dropped connection on the way do not fail the customer."""
    fake.fail_next("GET", "/customers", httpx.Response(503))
    fake.fail_next("POST", "/customers", httpx.RemoteProtocolError("Server disconnected"))
    with fake.client() as client:
        outcome = CustomerWriter(client, policy=FAST).upsert(CustomerRecord("u1"))
    assert outcome.ok
    assert "u1" in fake.customers


def test_a_customer_fails_once_the_policy_gives_up(fake: FakeAmberflo) -> None:
    """Retriable failures past the policy fail the customer with the last status and reason."""
    fake.fail_next("GET", "/customers", *[httpx.Response(502) for _ in range(FAST.attempts)])
    with fake.client() as client:
        outcome = CustomerWriter(client, policy=FAST).upsert(CustomerRecord("u1"))
    assert not outcome.ok
    assert outcome.status == 502
    assert outcome.reason is not None
    assert "502" in outcome.reason
    assert fake.customers == {}


def test_a_rejected_key_is_fatal_for_an_upsert(fake: FakeAmberflo) -> None:
    """AuthError is not turned into an outcome: it propagates."""
    fake.refuse_key_for.add("u1")
    with fake.client() as client, pytest.raises(AuthError, match="AMBERFLO_API_KEY"):
        CustomerWriter(client, policy=FAST).upsert(CustomerRecord("u1"))


# -- deliver_customers ----------------------------------------------------------------------


def records_for(count: int, *, prefix: str = "u") -> list[CustomerRecord]:
    return [CustomerRecord(f"{prefix}{i}", traits={"n": str(i)}) for i in range(count)]


def test_every_customer_gets_one_outcome_on_the_calling_thread(fake: FakeAmberflo) -> None:
    """Outcomes arrive once per record, on the caller's thread, and the summary counts them."""
    fake.fail_next("POST", "/customers", httpx.Response(400, json={"message": "no"}))
    seen: list[tuple[str, bool, threading.Thread]] = []
    with fake.client() as client:
        summary = deliver_customers(
            CustomerWriter(client, policy=FAST),
            records_for(30),
            concurrency=4,
            on_outcome=lambda r, o: seen.append((r.customer_id, o.ok, threading.current_thread())),
        )
    assert sorted(ref for ref, _, _ in seen) == sorted(f"u{i}" for i in range(30))
    assert {thread for _, _, thread in seen} == {threading.current_thread()}
    assert (summary.delivered, summary.failed, summary.interrupted) == (29, 1, False)
    assert len(fake.customers) == 29


def test_work_in_flight_stays_bounded(fake: FakeAmberflo) -> None:
    """Records are pulled from the input only as workers free up, never all at once."""
    pulled = 0
    reported = 0
    most_in_flight = 0

    def source() -> Iterator[CustomerRecord]:
        nonlocal pulled, most_in_flight
        for record in records_for(200):
            pulled += 1
            most_in_flight = max(most_in_flight, pulled - reported)
            yield record

    def count(_: CustomerRecord, __: Outcome) -> None:
        nonlocal reported
        reported += 1

    with fake.client() as client:
        deliver_customers(
            CustomerWriter(client, policy=FAST), source(), concurrency=3, on_outcome=count
        )
    assert reported == 200
    assert 1 <= most_in_flight <= 3


def test_stop_starts_nothing_new_and_reports_what_was_in_flight(fake: FakeAmberflo) -> None:
    """Once ``stop`` is set no record starts; started ones finish, and interrupted is True."""
    stop = threading.Event()
    reported: list[str] = []

    def on_outcome(record: CustomerRecord, outcome: Outcome) -> None:
        reported.append(record.customer_id)
        if len(reported) == 5:
            stop.set()

    with fake.client() as client:
        summary = deliver_customers(
            CustomerWriter(client, policy=FAST),
            records_for(100),
            concurrency=4,
            on_outcome=on_outcome,
            stop=stop,
        )
    assert summary.interrupted
    assert 5 <= summary.delivered < 100
    assert summary.delivered == len(reported)
    assert set(fake.customers) == set(reported)  # nothing written goes unreported


def test_a_stop_set_before_the_start_sends_nothing(fake: FakeAmberflo) -> None:
    """With ``stop`` already set, no request is made."""
    stop = threading.Event()
    stop.set()
    with fake.client() as client:
        summary = deliver_customers(
            CustomerWriter(client, policy=FAST),
            records_for(3),
            on_outcome=lambda r, o: None,
            stop=stop,
        )
    assert (summary.delivered, summary.failed, summary.interrupted) == (0, 0, True)
    assert fake.requests == []


def test_a_rejected_key_stops_the_delivery_after_in_flight_work(fake: FakeAmberflo) -> None:
    """AuthError propagates; no new record starts, and every written customer was reported."""
    fake.refuse_key_for.add("u3")
    reported: list[str] = []
    with fake.client() as client, pytest.raises(AuthError):
        deliver_customers(
            CustomerWriter(client, policy=FAST),
            records_for(100),
            concurrency=4,
            on_outcome=lambda r, o: reported.append(r.customer_id),
        )
    assert "u3" not in reported
    assert len(fake.customers) < 100
    assert set(fake.customers) == set(reported)


def delivery_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("deliver_")}


def test_every_delivery_thread_ends_with_the_delivery(fake: FakeAmberflo) -> None:
    """After a delivery, whether it finished or stopped on a rejected key, none of its worker
    threads is left running."""
    fake.refuse_key_for.add("u40")
    with fake.client() as client:
        deliver_customers(
            CustomerWriter(client, policy=FAST),
            records_for(30),
            concurrency=4,
            on_outcome=lambda r, o: None,
        )
        assert delivery_threads() == set()
        with pytest.raises(AuthError):
            deliver_customers(
                CustomerWriter(client, policy=FAST),
                records_for(100),
                concurrency=4,
                on_outcome=lambda r, o: None,
            )
    assert delivery_threads() == set()


def test_a_callback_that_fails_ends_the_delivery_after_work_in_flight(fake: FakeAmberflo) -> None:
    """An error raised by ``on_outcome`` propagates once the upserts already started have
    finished; no new one starts and no worker thread is left."""
    reported: list[str] = []

    def on_outcome(record: CustomerRecord, _: Outcome) -> None:
        reported.append(record.customer_id)
        if len(reported) == 5:
            raise OSError("disk full")

    with fake.client() as client, pytest.raises(OSError, match="disk full"):
        deliver_customers(
            CustomerWriter(client, policy=FAST),
            records_for(100),
            concurrency=4,
            on_outcome=on_outcome,
        )
    assert len(reported) == 5
    # Those in flight when the callback failed (at most the concurrency) were written.
    assert 5 <= len(fake.customers) <= 5 + 4
    assert delivery_threads() == set()


# -- meter records --------------------------------------------------------------------------


def meter(customer_id: str, i: int, **dimensions: str) -> dict[str, Any]:
    return {
        "uniqueId": f"m{i}",
        "customerId": customer_id,
        "meterApiName": "page",
        "meterValue": 1,
        "meterTimeInMillis": 1_700_000_000_000 + i,
        "dimensions": dimensions,
    }


def deliver(
    fake: FakeAmberflo, records: list[tuple[str, dict[str, Any]]], **kwargs: Any
) -> tuple[dict[str, Outcome], Any]:
    """Deliver ``records`` to ``fake``; the outcome per ref (each seen once) and the summary."""
    outcomes: dict[str, Outcome] = {}

    def on_outcome(ref: str, outcome: Outcome) -> None:
        assert ref not in outcomes, f"{ref} reported twice"
        outcomes[ref] = outcome

    kwargs.setdefault("policy", FAST)
    with fake.client() as client:
        summary = deliver_meter_records(client, records, on_outcome=on_outcome, **kwargs)
    return outcomes, summary


def test_records_go_in_batches_of_at_most_batch_size(fake: FakeAmberflo) -> None:
    """250 records with batch_size 100 make requests of 100, 100 and 50."""
    records = [(f"events:{i}", meter("u1", i)) for i in range(250)]
    outcomes, summary = deliver(fake, records, batch_size=100, concurrency=1)
    assert [len(json.loads(batch)) for batch in fake.batches] == [100, 100, 50]
    assert fake.ingested == [record for _, record in records]
    assert all(outcome.ok for outcome in outcomes.values())
    assert (summary.delivered, summary.failed) == (250, 0)


def test_batches_respect_the_byte_limit_and_cover_every_record_once(fake: FakeAmberflo) -> None:
    """Seeded random record sizes: no request body passes max_batch_bytes or batch_size."""
    rng = random.Random(20240601)
    records = [(f"r{i}", meter("u1", i, note="x" * rng.randint(0, 700))) for i in range(300)]
    outcomes, summary = deliver(
        fake, records, batch_size=7, max_batch_bytes=2_000, max_record_bytes=1_000, concurrency=1
    )
    assert all(len(batch) <= 2_000 for batch in fake.batches)
    assert all(len(json.loads(batch)) <= 7 for batch in fake.batches)
    assert any(len(json.loads(batch)) < 7 for batch in fake.batches[:-1])  # bytes did cut some
    assert fake.ingested == [record for _, record in records]
    assert len(outcomes) == 300
    assert summary.delivered == 300


def test_an_oversize_record_fails_alone_without_being_sent(fake: FakeAmberflo) -> None:
    """A record over max_record_bytes fails with the reason; its neighbours are delivered."""
    big = meter("u1", 1, blob="y" * 5_000)
    records = [("a", meter("u1", 0)), ("big", big), ("c", meter("u1", 2))]
    outcomes, summary = deliver(fake, records, max_record_bytes=1_000, max_batch_bytes=10_000)
    assert not outcomes["big"].ok
    assert outcomes["big"].reason is not None
    assert "over the limit of 1000 bytes" in outcomes["big"].reason
    assert outcomes["a"].ok
    assert outcomes["c"].ok
    assert big not in fake.ingested
    assert (summary.delivered, summary.failed) == (2, 1)


def test_a_record_that_is_not_json_fails_alone(fake: FakeAmberflo) -> None:
    """A NaN value cannot go on the wire: that record fails, the others go."""
    records = [("nan", dict(meter("u1", 0), meterValue=float("nan"))), ("ok", meter("u1", 1))]
    outcomes, _ = deliver(fake, records)
    assert not outcomes["nan"].ok
    assert outcomes["nan"].reason is not None
    assert "cannot be serialized" in outcomes["nan"].reason
    assert outcomes["ok"].ok


def test_a_400_batch_is_split_until_the_bad_records_stand_alone(fake: FakeAmberflo) -> None:
    """Two bad records in a batch of 100 fail with Amberflo's reason; the other 98 arrive."""
    records = [
        (f"r{i}", meter("bad-17" if i == 17 else "bad-80" if i == 80 else "u1", i))
        for i in range(100)
    ]
    outcomes, summary = deliver(fake, records, batch_size=100, concurrency=2)
    assert outcomes["r17"] == Outcome(
        ref="r17", ok=False, status=400, reason="invalid customerId bad-17"
    )
    assert outcomes["r80"] == Outcome(
        ref="r80", ok=False, status=400, reason="invalid customerId bad-80"
    )
    good = [record for ref, record in records if ref not in ("r17", "r80")]
    assert sorted(r["uniqueId"] for r in fake.ingested) == sorted(r["uniqueId"] for r in good)
    assert (summary.delivered, summary.failed) == (98, 2)


def test_a_batch_fails_whole_when_retries_run_out(fake: FakeAmberflo) -> None:
    """Retriable failures past the policy fail every record of the batch with the reason."""
    fake.fail_next("POST", "/ingest", *[httpx.Response(503) for _ in range(FAST.attempts)])
    records = [(f"r{i}", meter("u1", i)) for i in range(5)]
    outcomes, summary = deliver(fake, records, concurrency=1)
    assert {o.status for o in outcomes.values()} == {503}
    assert all(not o.ok and o.reason and "503" in o.reason for o in outcomes.values())
    assert (summary.delivered, summary.failed) == (0, 5)
    assert fake.ingested == []


def test_a_rejected_key_is_fatal_for_meter_records(fake: FakeAmberflo) -> None:
    """A 403 on ingest raises AuthError instead of failing records one by one."""
    fake.fail_next("POST", "/ingest", httpx.Response(403, json={"message": "Forbidden"}))
    with pytest.raises(AuthError):
        deliver(fake, [("r0", meter("u1", 0))], concurrency=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"max_record_bytes": 1_000, "max_batch_bytes": 1_000}, "max_record_bytes"),
        ({"concurrency": 0}, "concurrency"),
    ],
)
def test_impossible_batch_settings_are_refused(
    fake: FakeAmberflo, kwargs: dict[str, int], message: str
) -> None:
    """Limits that could never make a batch raise ValueError before anything is sent."""
    with pytest.raises(ValueError, match=message):
        deliver(fake, [("r0", meter("u1", 0))], **kwargs)
    assert fake.requests == []


def down(fake: FakeAmberflo, answers: int) -> None:
    """Script ``answers`` 503s for every customer route (lookups and writes alike)."""
    for method in ("GET", "POST", "PUT"):
        fake.fail_next(method, "/customers", *[httpx.Response(503) for _ in range(answers)])


def test_a_run_against_a_dead_amberflo_stops_after_a_streak_of_failures(
    fake: FakeAmberflo,
) -> None:
    """Once customers keep failing after every retry, no new customer starts, and it says why."""
    down(fake, 10_000)
    with fake.client() as client, capture_logs() as logs:
        summary = deliver_customers(
            CustomerWriter(client, policy=FAST),
            records_for(500),
            concurrency=2,
            on_outcome=lambda r, o: None,
            unavailable_after=10,
        )
    assert summary.stopped_reason is not None
    assert "10 customers in a row" in summary.stopped_reason
    # The streak trips at 10; at most the customers already in flight finish after it.
    assert 10 <= summary.failed <= 12
    assert summary.delivered == 0
    assert [e for e in logs if e["event"] == "amberflo_unavailable"]


def test_failures_broken_by_successes_do_not_stop_the_run(fake: FakeAmberflo) -> None:
    """Scattered transient failures never add up to a streak: every customer is tried."""
    failing = {f"u{i}" for i in range(0, 60, 2)}

    class Flaky(FakeAmberflo):
        def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.url.params.get("customerId") in failing:
                return httpx.Response(503)
            return super().__call__(request)

    flaky = Flaky()
    with flaky.client() as client:
        summary = deliver_customers(
            CustomerWriter(client, policy=FAST),
            records_for(60),
            concurrency=1,
            on_outcome=lambda r, o: None,
            unavailable_after=3,
        )
    assert summary.stopped_reason is None
    assert (summary.delivered, summary.failed) == (30, 30)


def test_permanent_rejections_do_not_count_as_amberflo_being_down(fake: FakeAmberflo) -> None:
    """400s are about the customer, not the service: a run of them never stops delivery."""
    fake.fail_next("POST", "/customers", *[httpx.Response(400, json={"message": "no"})] * 40)
    with fake.client() as client:
        summary = deliver_customers(
            CustomerWriter(client, policy=FAST),
            records_for(50),
            concurrency=1,
            on_outcome=lambda r, o: None,
            unavailable_after=5,
        )
    assert summary.stopped_reason is None
    assert (summary.delivered, summary.failed) == (10, 40)


class SelfEncoded:
    """A record that serializes itself, as sync.events.MeterEvent does."""

    def __init__(self, record: dict[str, Any], *, broken: bool = False) -> None:
        self.record = record
        self.broken = broken

    def as_json(self) -> bytes:
        if self.broken:
            raise ValueError("Out of range float values are not JSON compliant")
        return json.dumps(self.record, separators=(",", ":")).encode()


def test_records_that_serialize_themselves_go_as_their_own_bytes(fake: FakeAmberflo) -> None:
    """A record with as_json is sent as the bytes it gives, mixed freely with mappings; one
    that cannot serialize fails alone with the reason."""
    records: list[tuple[str, Any]] = [
        ("a", SelfEncoded(meter("u1", 0, region="eu"))),
        ("b", meter("u1", 1)),
        ("bad", SelfEncoded(meter("u1", 2), broken=True)),
        ("c", SelfEncoded(meter("u1", 3))),
    ]
    outcomes, summary = deliver(fake, records, concurrency=1)
    sent = [meter("u1", 0, region="eu"), meter("u1", 1), meter("u1", 3)]
    assert fake.batches == [b"[" + b",".join(encode_json(record) for record in sent) + b"]"]
    assert not outcomes["bad"].ok
    assert outcomes["bad"].reason == (
        "the record cannot be serialized as JSON: Out of range float values are not JSON compliant"
    )
    assert (summary.delivered, summary.failed) == (3, 1)


def test_records_are_pulled_only_as_batches_go_out(fake: FakeAmberflo) -> None:
    """A lazy stream is read a batch or so ahead of what is in flight, never all at once."""
    pulled = 0
    most_ahead = 0

    def stream() -> Iterator[tuple[str, dict[str, Any]]]:
        nonlocal pulled
        for i in range(2_000):
            pulled += 1
            yield f"r{i}", meter("u1", i)

    def on_outcome(ref: str, outcome: Outcome) -> None:
        nonlocal most_ahead
        most_ahead = max(most_ahead, pulled - len(fake.ingested))

    with fake.client() as client:
        deliver_meter_records(
            client, stream(), batch_size=10, concurrency=2, policy=FAST, on_outcome=on_outcome
        )
    assert len(fake.ingested) == 2_000
    assert most_ahead <= 10 * (2 + 2)  # in flight, being filled, and one just pulled
