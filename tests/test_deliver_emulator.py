"""Delivery over real sockets against the emulator: faults, auth, validation, no loss or dupes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
from structlog.testing import capture_logs

from sync.amberflo import AmberfloClient, encode_json
from sync.deliver import (
    CustomerWriter,
    RetryPolicy,
    deliver_customers,
    deliver_meter_records,
    merged_customer,
    read_existing_ids,
)
from sync.emulator import EmulatorHandle, EmulatorOptions, running_emulator
from sync.errors import AuthError, DeliveryError, PermanentError, RetriableError
from sync.model import CustomerRecord, Outcome

# No waiting between retries (except where a Retry-After says otherwise), many attempts so a
# 30% fault rate cannot exhaust them by chance.
PATIENT = RetryPolicy(attempts=25, wait_initial=0.0, wait_max=5.0, jitter=0.0)


@pytest.fixture
def seeded() -> Iterator[EmulatorHandle]:
    """An emulator whose fault draws are seeded, so a test sees the same faults every run."""
    with running_emulator(EmulatorOptions(port=0, seed=7)) as handle:
        yield handle


def client_for(emulator: EmulatorHandle, api_key: str = "test-key") -> AmberfloClient:
    return AmberfloClient(api_key=api_key, base_url=emulator.url, timeout=5.0)


def meter(i: int, **dimensions: str) -> dict[str, Any]:
    return {
        "uniqueId": f"msg-{i}",
        "customerId": f"user-{i % 7}",
        "meterApiName": "page",
        "meterValue": 1,
        "meterTimeInMillis": 1_700_000_000_000 + i,
        "dimensions": {"path": "_home", **dimensions},
    }


def retry_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == "retrying"]


def collect() -> tuple[dict[str, Outcome], Any]:
    outcomes: dict[str, Outcome] = {}

    def on_outcome(ref: str, outcome: Outcome) -> None:
        assert ref not in outcomes, f"{ref} reported twice"
        outcomes[ref] = outcome

    return outcomes, on_outcome


def test_a_429_waits_for_exactly_the_retry_after_it_carries(seeded: EmulatorHandle) -> None:
    """Throttled requests are retried after the emulator's Retry-After, and then arrive."""
    seeded.set_faults(rate_429=0.5, retry_after=0.05)
    records = [(f"e:{i}", meter(i)) for i in range(8)]
    outcomes, on_outcome = collect()
    with client_for(seeded) as client, capture_logs() as logs:
        summary = deliver_meter_records(
            client, records, batch_size=1, concurrency=1, policy=PATIENT, on_outcome=on_outcome
        )
    throttled = [e for e in retry_events(logs) if e["status"] == 429]
    assert throttled, "the seeded fault rate should have throttled at least once"
    assert {(e["wait"], e["retry_after"]) for e in throttled} == {(0.05, 0.05)}
    assert {e["endpoint"] for e in throttled} == {"POST /ingest"}
    assert summary.delivered == 8
    assert all(outcome.ok for outcome in outcomes.values())
    assert sorted(r["uniqueId"] for r in seeded.ingested()) == sorted(
        r["uniqueId"] for _, r in records
    )


@pytest.mark.parametrize(
    ("faults", "statuses"),
    [({"rate_5xx": 0.5}, {500, 502, 503}), ({"rate_drop": 0.5}, {None})],
)
def test_server_errors_and_dropped_connections_are_retried(
    seeded: EmulatorHandle, faults: dict[str, float], statuses: set[int | None]
) -> None:
    """5xx answers and connections closed without an answer are retried until they succeed."""
    seeded.set_faults(**faults)
    records = [CustomerRecord(f"c{i}", traits={"vip": "true"}) for i in range(10)]
    with client_for(seeded) as client, capture_logs() as logs:
        summary = deliver_customers(
            CustomerWriter(client, policy=PATIENT),
            records,
            concurrency=2,
            on_outcome=lambda r, o: None,
        )
    retried = retry_events(logs)
    assert retried
    assert {e["status"] for e in retried} <= statuses
    assert (summary.delivered, summary.failed) == (10, 0)
    assert set(seeded.customers()) == {f"c{i}" for i in range(10)}


def test_a_rejected_key_is_fatal_and_never_shown() -> None:
    """A key the emulator does not accept (403) raises AuthError that does not quote the key."""
    options = EmulatorOptions(port=0, api_keys=frozenset({"the-right-key"}))
    with running_emulator(options) as emulator, client_for(emulator, "a-wrong-key") as client:
        with pytest.raises(AuthError) as customers_error:
            deliver_customers(
                CustomerWriter(client, policy=PATIENT),
                [CustomerRecord("c1")],
                on_outcome=lambda r, o: None,
            )
        with pytest.raises(AuthError) as records_error:
            deliver_meter_records(
                client, [("e:0", meter(0))], policy=PATIENT, on_outcome=lambda r, o: None
            )
        assert emulator.customers() == {}
        assert emulator.ingested() == []
    for error in (customers_error.value, records_error.value):
        assert error.status == 403
        assert "a-wrong-key" not in str(error)
        assert "AMBERFLO_API_KEY" in str(error)


def test_one_invalid_record_does_not_keep_the_others_out(emulator: EmulatorHandle) -> None:
    """The emulator refuses a batch with a '/' in a dimension; the other nine still arrive."""
    records = [(f"e:{i}", meter(i, url="https://x" if i == 4 else "ok")) for i in range(10)]
    outcomes, on_outcome = collect()
    with client_for(emulator) as client:
        summary = deliver_meter_records(
            client, records, batch_size=10, policy=PATIENT, on_outcome=on_outcome
        )
    assert (summary.delivered, summary.failed) == (9, 1)
    bad = outcomes["e:4"]
    assert (bad.ok, bad.status) == (False, 400)
    assert bad.reason
    assert "url" in bad.reason
    assert sorted(r["uniqueId"] for r in emulator.ingested()) == sorted(
        f"msg-{i}" for i in range(10) if i != 4
    )


def client_ends(emulator: EmulatorHandle) -> list[Any]:
    """This process's open TCP connections to ``emulator`` (their local ends)."""
    port = int(emulator.url.rsplit(":", 1)[1])
    return [
        conn.laddr
        for conn in psutil.Process().net_connections("tcp")
        if conn.raddr and conn.raddr.port == port
    ]


def test_meter_batches_go_out_several_at_a_time_on_at_most_concurrency_connections() -> None:
    """Forty slow batches at concurrency 3 use exactly three connections: the client keeps
    three requests on the wire (fewer would need fewer), and never opens a fourth."""
    with running_emulator(EmulatorOptions(port=0, latency_ms=20)) as emulator:
        records = [(f"e:{i}", meter(i)) for i in range(400)]
        outcomes, on_outcome = collect()
        with client_for(emulator) as client:
            summary = deliver_meter_records(
                client, records, batch_size=10, concurrency=3, on_outcome=on_outcome
            )
            assert len(client_ends(emulator)) == 3
        assert (summary.delivered, summary.failed) == (400, 0)
        assert all(outcome.ok for outcome in outcomes.values())
        assert len(outcomes) == 400
        assert len(emulator.ingested()) == 400
        assert emulator.stats()["requests_total"] == 40


def failure_of(call: Any) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(
    ("faults", "records", "kind", "statuses"),
    [
        ({"rate_5xx": 1.0}, [meter(1)], RetriableError, {500, 502, 503}),
        ({"rate_429": 1.0, "retry_after": 7}, [meter(1)], RetriableError, {429}),
        ({"rate_drop": 1.0}, [meter(1)], RetriableError, {None}),
        ({}, [meter(1), meter(2, url="https://x")], PermanentError, {400}),
    ],
)
def test_a_request_sent_ahead_fails_as_the_same_request_made_at_once(
    seeded: EmulatorHandle,
    faults: dict[str, float],
    records: list[dict[str, Any]],
    kind: type[DeliveryError],
    statuses: set[int | None],
) -> None:
    """start_ingest's answer, read later, raises what ingest_encoded raises for the same
    batch: the same error class, status, Retry-After and message."""
    seeded.set_faults(**faults)
    encoded = [encode_json(record) for record in records]
    with client_for(seeded) as client:
        assert client.pipelines_ingest
        ahead = failure_of(client.start_ingest(encoded).result)
        at_once = failure_of(lambda: client.ingest_encoded(encoded))
    for error in (ahead, at_once):
        assert type(error) is kind
        assert error.status in statuses
        assert error.endpoint == "POST /ingest"
    assert (ahead.retry_after, str(ahead)) == (at_once.retry_after, str(at_once))
    assert seeded.ingested() == []


def test_requests_sent_ahead_are_all_answered_and_stored(emulator: EmulatorHandle) -> None:
    """Several ingest requests written before any answer is read each get their own answer."""
    batches = [[encode_json(meter(10 * b + i)) for i in range(b + 1)] for b in range(5)]
    with client_for(emulator) as client:
        pending = [client.start_ingest(batch) for batch in batches]
        assert [p.result() for p in pending] == [1, 2, 3, 4, 5]
    assert len(emulator.ingested()) == 15


def test_under_a_30_percent_fault_rate_nothing_is_lost_or_duplicated(
    seeded: EmulatorHandle,
) -> None:
    """With 429s, 5xx and drops on ~30% of requests, every record arrives exactly once and
    every customer ends exactly as desired."""
    seeded.set_faults(rate_429=0.12, retry_after=0, rate_5xx=0.12, rate_drop=0.12)
    existing = {
        f"c{i}": {"customerId": f"c{i}", "customerName": f"Old {i}", "traits": {"stripeId": "s"}}
        for i in range(0, 60, 3)
    }
    customer_records = [
        CustomerRecord(
            f"c{i}",
            name=f"Name {i}" if i % 2 else None,
            traits={"vip": "true" if i % 5 else "false", "score": str(i)},
        )
        for i in range(60)
    ]
    meter_records = [(f"e:{i}", meter(i, n=str(i))) for i in range(600)]

    with client_for(seeded) as client, capture_logs() as logs:
        for body in existing.values():
            PATIENT.call(lambda body=body: client.create_customer(body))
        customer_summary = deliver_customers(
            CustomerWriter(client, policy=PATIENT),
            customer_records,
            concurrency=6,
            on_outcome=lambda r, o: None,
        )
        outcomes, on_outcome = collect()
        meter_summary = deliver_meter_records(
            client,
            meter_records,
            batch_size=25,
            concurrency=4,
            policy=PATIENT,
            on_outcome=on_outcome,
        )

    retried = {e["status"] for e in retry_events(logs)}
    assert {429, None} <= retried, "throttles and drops should both have been retried"
    assert retried & {500, 502, 503}, "server errors should have been retried"

    assert (meter_summary.delivered, meter_summary.failed) == (600, 0)
    assert set(outcomes) == {ref for ref, _ in meter_records}
    ingested = seeded.ingested()
    assert len(ingested) == 600
    assert sorted(ingested, key=lambda r: r["uniqueId"]) == sorted(
        (record for _, record in meter_records), key=lambda r: r["uniqueId"]
    )

    assert (customer_summary.delivered, customer_summary.failed) == (60, 0)
    stored = seeded.customers()
    for record in customer_records:
        expected = merged_customer(existing.get(record.customer_id, {}), record)
        actual = {key: stored[record.customer_id].get(key) for key in expected}
        assert actual == expected, record.customer_id


def test_replace_mode_creates_missing_customers_when_put_is_refused() -> None:
    """With an emulator whose PUT answers 404 for unknown ids, replace mode falls back to POST."""
    options = EmulatorOptions(port=0, put_missing="error")
    with running_emulator(options) as emulator, client_for(emulator) as client:
        writer = CustomerWriter(client, mode="replace", policy=PATIENT)
        first = writer.upsert(CustomerRecord("c1", name="One", traits={"a": "1"}))
        second = writer.upsert(CustomerRecord("c1", traits={"b": "2"}))
        stored = emulator.customers()["c1"]
    assert first.ok
    assert second.ok
    assert (stored["customerName"], stored["traits"]) == ("c1", {"b": "2"})


def test_list_customers_walks_the_emulators_pages(emulator: EmulatorHandle) -> None:
    """Every customer comes back once through /customers/paging, page after page."""
    with client_for(emulator) as client:
        for i in range(23):
            client.create_customer({"customerId": f"c{i:02}", "customerName": f"C{i}"})
        listed = [c["customerId"] for c in client.list_customers(page_size=10)]
    assert sorted(listed) == [f"c{i:02}" for i in range(23)]


def test_a_listing_sees_customers_changed_between_two_reads(emulator: EmulatorHandle) -> None:
    """Pages read after a customer is created, replaced or deleted reflect that change."""
    with client_for(emulator) as client:
        for i in range(5):
            client.create_customer({"customerId": f"c{i}", "customerName": f"C{i}"})
        first = [c["customerId"] for c in client.list_customers(page_size=2)]
        client.create_customer({"customerId": "c5", "customerName": "C5"})
        client.replace_customer({"customerId": "c0", "customerName": "Renamed"})
        httpx.delete(f"{emulator.url}/customers/c1", headers={"x-api-key": "k"})
        second = {c["customerId"]: c["customerName"] for c in client.list_customers(page_size=2)}
    assert first == [f"c{i}" for i in range(5)]
    assert second == {"c0": "Renamed", "c2": "C2", "c3": "C3", "c4": "C4", "c5": "C5"}


def test_a_merge_run_with_the_listing_reads_only_the_customers_that_exist(
    emulator: EmulatorHandle,
) -> None:
    """With existing ids read up front, only customers already in Amberflo are looked up; new
    ones are created at once, and every customer ends as merge mode defines it."""
    existing = {
        f"c{i:03}": {"customerId": f"c{i:03}", "customerName": f"Old {i}", "traits": {"s": "x"}}
        for i in range(0, 200, 10)
    }
    records = [
        CustomerRecord(f"c{i:03}", traits={"vip": "true", "score": str(i)}) for i in range(200)
    ]
    with client_for(emulator) as client:
        for body in existing.values():
            client.create_customer(body)
        ids = read_existing_ids(client, sends=len(records), policy=PATIENT)
        summary = deliver_customers(
            CustomerWriter(client, policy=PATIENT, existing_ids=ids),
            records,
            concurrency=4,
            on_outcome=lambda r, o: None,
        )
    assert ids == frozenset(existing)
    assert (summary.delivered, summary.failed) == (200, 0)
    requests = emulator.stats()["requests"]
    assert requests["GET /customers"] == {"200": len(existing)}
    assert requests["POST /customers"] == {"200": 200}  # 20 set-up creations, 180 new customers
    stored = emulator.customers()
    for record in records:
        expected = merged_customer(existing.get(record.customer_id, {}), record)
        assert {key: stored[record.customer_id].get(key) for key in expected} == expected


def test_through_httpx_a_request_started_ahead_is_made_when_its_result_is_asked() -> None:
    """Through httpx (a proxy, a test transport) nothing can be put on the wire ahead: the
    client says so, and start_ingest's result() makes the whole request."""
    with running_emulator(EmulatorOptions(port=0)) as emulator:
        client = AmberfloClient(
            api_key="test-key", base_url=emulator.url, transport=httpx.HTTPTransport()
        )
        with client:
            assert not client.pipelines_ingest
            pending = client.start_ingest([encode_json(meter(1)), encode_json(meter(2))])
            assert emulator.ingested() == []
            assert pending.result() == 2
        assert len(emulator.ingested()) == 2
