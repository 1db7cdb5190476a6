"""One ``events`` run end to end against the emulator over real sockets (sync.forward)."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from sync.amberflo import AmberfloClient
from sync.config import AmberfloSettings, Settings, StateSettings
from sync.emulator import EmulatorHandle, EmulatorOptions, running_emulator
from sync.errors import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL, AuthError, ConfigError, SourceError
from sync.events import MeterEvent, map_message
from sync.forward import STOPPED_REASON, WINDOW, EventsRunResult, forward_events

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "events"
RUN_ID = "20240502T101500Z-0a1b2c"
TS = "2024-05-02T09:17:00Z"


def settings_for(
    emulator: EmulatorHandle, state: Path, *, api_key: str | None = "test-key", **amberflo: Any
) -> Settings:
    return Settings(
        api_key=SecretStr(api_key) if api_key is not None else None,
        base_url=emulator.url,
        state=StateSettings(dir=state),
        amberflo=AmberfloSettings(**amberflo),
    )


def track(n: int, user: str = "acme", **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "messageId": f"msg-{n}",
        "userId": user,
        "event": "ApiCalls",
        "properties": {"value": n, **properties},
        "timestamp": TS,
    }


def identify(n: int, user: str, **traits: Any) -> dict[str, Any]:
    return {
        "type": "identify",
        "messageId": f"id-{n}",
        "userId": user,
        "traits": traits,
        "timestamp": TS,
    }


def ndjson(path: Path, *messages: object) -> str:
    lines = [m if isinstance(m, str) else json.dumps(m) for m in messages]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def dead_letters(result: EventsRunResult) -> list[dict[str, Any]]:
    assert result.dead_letter_file is not None
    text = Path(result.dead_letter_file).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def assert_accounted(result: EventsRunResult) -> None:
    assert result.read == result.sent + result.skipped_total + result.dead_lettered


def expected_records(path: Path) -> list[dict[str, Any]]:
    """The records the real mapping makes of an NDJSON file's valid meter messages."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            mapped = map_message(json.loads(line))
        except json.JSONDecodeError:
            continue
        if isinstance(mapped, MeterEvent):
            records.append(mapped.as_record())
    return records


def test_the_example_folder_is_forwarded_and_every_event_accounted_for(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """The bundled examples: meters and customers arrive, skips are counted by reason, bad
    events go to the dead-letter file with their reason and raw text, and the run exits 3."""
    state = tmp_path / "state"
    result = forward_events(
        settings_for(emulator, state), [str(EXAMPLES)], dry_run=False, run_id=RUN_ID, out=None
    )
    assert_accounted(result)
    assert (result.read, result.sent, result.dead_lettered, result.failed) == (14, 9, 2, 0)
    assert result.skipped == {
        "alias calls are not forwarded": 1,
        "group calls are not forwarded": 1,
        "integrations disables Amberflo": 1,
    }
    assert result.exit_code == EXIT_PARTIAL

    ndjson_records = expected_records(EXAMPLES / "segment-events.ndjson")
    ingested = emulator.ingested()
    assert len(ingested) == 7
    assert all(record in ingested for record in ndjson_records)

    customers = emulator.customers()
    assert customers["acme-corp"]["customerName"] == "Acme Corp"
    assert customers["acme-corp"]["traits"]["website"] == "https:__acme.example"
    assert customers["initech"]["customerEmail"] == "ap@initech.example"

    source = str(EXAMPLES / "segment-events.ndjson")
    lines = (EXAMPLES / "segment-events.ndjson").read_text(encoding="utf-8").splitlines()
    assert result.dead_letter_file == str(state / "dead-letter" / f"{RUN_ID}.jsonl")
    assert dead_letters(result) == [
        {
            "source": source,
            "line": 8,
            "reason": "track value is not a number: '12.5 GB'",
            "raw": lines[7],
        },
        {
            "source": source,
            "line": 10,
            "reason": "invalid JSON: Expecting property name enclosed in double quotes "
            "(column 105)",
            "raw": lines[9],
        },
    ]
    runs = [json.loads(line) for line in (state / "runs.jsonl").read_text().splitlines()]
    assert [(run["run_id"], run["kind"], run["exit_code"]) for run in runs] == [
        (RUN_ID, "events", EXIT_PARTIAL)
    ]
    assert runs[0]["counts"]["sent"] == 9
    assert runs[0]["dead_letter_file"] == result.dead_letter_file


def test_a_clean_run_exits_0_and_writes_no_dead_letter_file(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """When every event is delivered the exit code is 0 and no dead-letter file exists."""
    path = ndjson(tmp_path / "in.ndjson", track(1), track(2), identify(3, "acme", plan="pro"))
    state = tmp_path / "state"
    result = forward_events(
        settings_for(emulator, state), [path], dry_run=False, run_id=RUN_ID, out=None
    )
    assert (result.read, result.sent, result.exit_code) == (3, 3, EXIT_OK)
    assert result.dead_letter_file is None
    assert not (state / "dead-letter").exists()
    assert [r["meterValue"] for r in emulator.ingested()] == [1.0, 2.0]


def test_a_record_that_cannot_be_delivered_is_dead_lettered_while_the_rest_arrives(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """A track too large for one ingest request fails alone, with the reason; its batch
    neighbours arrive."""
    huge = track(2, **{f"p{i:04d}": "x" * 200 for i in range(600)})
    path = ndjson(tmp_path / "in.ndjson", track(1), huge, track(3))
    result = forward_events(
        settings_for(emulator, tmp_path / "state"), [path], dry_run=False, run_id=RUN_ID, out=None
    )
    assert_accounted(result)
    assert (result.sent, result.dead_lettered, result.failed) == (2, 1, 1)
    assert result.exit_code == EXIT_PARTIAL
    assert sorted(r["uniqueId"] for r in emulator.ingested()) == ["msg-1", "msg-3"]
    [letter] = dead_letters(result)
    assert letter["line"] == 2
    assert letter["reason"].startswith("not delivered: the record is ")
    assert "over the limit" in letter["reason"]
    assert json.loads(letter["raw"]) == huge


def test_amberflo_failures_are_dead_lettered_with_amberflos_reason(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """When Amberflo answers 500 and retries are spent, each event is dead-lettered with the
    status and Amberflo's message, and the run exits 3."""
    emulator.set_faults(fail_all=True)
    path = ndjson(tmp_path / "in.ndjson", track(1), identify(2, "acme", plan="pro"))
    result = forward_events(
        settings_for(emulator, tmp_path / "state", max_attempts=1),
        [path],
        dry_run=False,
        run_id=RUN_ID,
        out=None,
    )
    assert_accounted(result)
    assert (result.sent, result.dead_lettered, result.failed) == (0, 2, 2)
    assert result.exit_code == EXIT_PARTIAL
    reasons = [letter["reason"] for letter in dead_letters(result)]
    assert all(reason.startswith("not delivered (HTTP 500): ") for reason in reasons)
    assert emulator.ingested() == []


def test_identify_merges_into_the_existing_customer_and_folds_repeats(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """Identify calls for one user are applied in order over the customer Amberflo holds,
    keeping traits this job does not manage."""
    with AmberfloClient(api_key="test-key", base_url=emulator.url) as client:
        client.create_customer(
            {"customerId": "acme", "customerName": "Old Name", "traits": {"stripeId": "cus_1"}}
        )
    path = ndjson(
        tmp_path / "in.ndjson",
        identify(1, "acme", name="Acme", plan="free", seats=5),
        identify(2, "acme", plan="pro"),
    )
    result = forward_events(
        settings_for(emulator, tmp_path / "state"), [path], dry_run=False, run_id=RUN_ID, out=None
    )
    assert (result.sent, result.exit_code) == (2, EXIT_OK)
    customer = emulator.customers()["acme"]
    assert customer["customerName"] == "Acme"
    assert customer["traits"] == {"stripeId": "cus_1", "plan": "pro", "seats": "5"}


def test_sending_the_same_file_twice_gives_identical_records(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """Records are deterministic, so a re-sent file is deduplicated by Amberflo."""
    path = ndjson(tmp_path / "in.ndjson", *(track(n, region="us-west-2") for n in range(50)))
    settings = settings_for(emulator, tmp_path / "state")
    for run in ("20240502T101500Z-000001", "20240502T101500Z-000002"):
        result = forward_events(settings, [path], dry_run=False, run_id=run, out=None)
        assert result.sent == 50
    stats = emulator.stats()
    assert len(emulator.ingested()) == 50
    assert stats["records_unique"] == 50


def test_more_events_than_a_window_all_arrive(emulator: EmulatorHandle, tmp_path: Path) -> None:
    """Input larger than one delivery window is delivered window after window, none lost."""
    count = WINDOW * 2 + 17
    path = ndjson(tmp_path / "in.ndjson", *(track(n, user=f"u{n % 13}") for n in range(count)))
    result = forward_events(
        settings_for(emulator, tmp_path / "state"), [path], dry_run=False, run_id=RUN_ID, out=None
    )
    assert (result.read, result.sent, result.exit_code) == (count, count, EXIT_OK)
    assert len(emulator.ingested()) == count


def test_dry_run_sends_nothing_writes_nothing_and_prints_the_records(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """A dry run needs no API key, makes no request, creates no state folder, and prints each
    record as a JSON line followed by the counts."""
    state = tmp_path / "state"
    path = ndjson(
        tmp_path / "in.ndjson",
        track(1, region="us-west-2"),
        identify(2, "acme", name="Acme", email="a@acme.example", plan="pro"),
        {"type": "group", "messageId": "g", "userId": "acme", "groupId": "g1"},
        "{oops",
    )
    out = io.StringIO()
    result = forward_events(
        settings_for(emulator, state, api_key=None), [path], dry_run=True, run_id=RUN_ID, out=out
    )
    assert emulator.stats()["requests_total"] == 0
    assert not state.exists()
    assert result.dead_letter_file is None
    assert_accounted(result)
    assert out.getvalue().splitlines() == [
        '{"ingest":{"uniqueId":"msg-1","customerId":"acme","meterApiName":"ApiCalls",'
        '"meterValue":1.0,"meterTimeInMillis":1714641420000,"dimensions":{"region":"us-west-2"}}}',
        '{"customer":{"customerId":"acme","customerName":"Acme",'
        '"customerEmail":"a@acme.example","traits":{"plan":"pro"}}}',
        '{"dry_run":{"read":4,"skipped":1,"skipped_by_reason":{"group calls are not forwarded":1},'
        '"dead_lettered":1,"would_send":2}}',
    ]
    assert result.exit_code == EXIT_PARTIAL


def test_the_same_file_twice_prints_byte_identical_records(tmp_path: Path) -> None:
    """Two dry runs over copies of one file print exactly the same bytes."""
    first = tmp_path / "a.ndjson"
    shutil.copy(EXAMPLES / "segment-events.ndjson", first)
    second = tmp_path / "b.ndjson"
    shutil.copy(first, second)
    settings = Settings(api_key=None, state=StateSettings(dir=tmp_path / "state"))
    outputs = []
    for path in (first, second):
        out = io.StringIO()
        forward_events(settings, [str(path)], dry_run=True, run_id=RUN_ID, out=out)
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1]
    assert outputs[0].count('"ingest"') == 5


def test_a_real_run_without_an_api_key_is_a_config_error(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """Without AMBERFLO_API_KEY a real run stops before reading anything, naming the fix."""
    path = ndjson(tmp_path / "in.ndjson", track(1))
    with pytest.raises(ConfigError, match="AMBERFLO_API_KEY"):
        forward_events(
            settings_for(emulator, tmp_path / "state", api_key=None),
            [path],
            dry_run=False,
            run_id=RUN_ID,
            out=None,
        )
    assert emulator.stats()["requests_total"] == 0


def test_a_missing_source_fails_before_anything_is_sent(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """A mistyped second path stops the run before the first file is sent, and is recorded."""
    good = ndjson(tmp_path / "in.ndjson", track(1))
    state = tmp_path / "state"
    with pytest.raises(SourceError, match=r"missing\.ndjson"):
        forward_events(
            settings_for(emulator, state),
            [good, str(tmp_path / "missing.ndjson")],
            dry_run=False,
            run_id=RUN_ID,
            out=None,
        )
    assert emulator.stats()["requests_total"] == 0
    [run] = [json.loads(line) for line in (state / "runs.jsonl").read_text().splitlines()]
    assert (run["kind"], run["exit_code"]) == ("events", EXIT_FATAL)
    assert "missing.ndjson" in run["error"]


def test_a_rejected_api_key_is_fatal(tmp_path: Path) -> None:
    """Amberflo refusing the key raises AuthError (exit 1), recorded in runs.jsonl."""
    state = tmp_path / "state"
    path = ndjson(tmp_path / "in.ndjson", track(1))
    options = EmulatorOptions(port=0, api_keys=frozenset({"the-right-key"}))
    with running_emulator(options) as emulator:
        with pytest.raises(AuthError):
            forward_events(
                settings_for(emulator, state, api_key="a-wrong-key"),
                [path],
                dry_run=False,
                run_id=RUN_ID,
                out=None,
            )
        assert emulator.ingested() == []
    runs_text = (state / "runs.jsonl").read_text()
    assert json.loads(runs_text)["exit_code"] == EXIT_FATAL
    assert "a-wrong-key" not in runs_text


def test_a_stop_dead_letters_what_was_not_sent_and_reads_no_further(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """A stop requested before delivery leaves nothing unaccounted: the event read is
    dead-lettered as not sent, the rest of the file is not read, and the run exits 3."""
    path = ndjson(tmp_path / "in.ndjson", track(1), track(2), track(3))
    stop = threading.Event()
    stop.set()
    result = forward_events(
        settings_for(emulator, tmp_path / "state"),
        [path],
        dry_run=False,
        run_id=RUN_ID,
        out=None,
        stop=stop,
    )
    assert (result.read, result.sent, result.dead_lettered) == (1, 0, 1)
    assert result.interrupted
    assert result.exit_code == EXIT_PARTIAL
    assert [letter["reason"] for letter in dead_letters(result)] == [STOPPED_REASON]
    assert emulator.ingested() == []


def logged_run(emulator: EmulatorHandle, tmp_path: Path, *messages: object) -> list[Any]:
    """The log entries of one real events run over ``messages``."""
    path = ndjson(tmp_path / "in.ndjson", *messages)
    settings = settings_for(emulator, tmp_path / "state")
    with capture_logs() as logs:
        forward_events(settings, [path], dry_run=False, run_id=RUN_ID, out=None)
    return logs


def test_one_summary_line_is_logged_with_the_counts(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """The run logs events_run_finished once, with the counts and the exit code."""
    logs = logged_run(emulator, tmp_path, track(1), "not json")
    finished = [entry for entry in logs if entry["event"] == "events_run_finished"]
    assert len(finished) == 1
    assert {key: finished[0][key] for key in ("read", "sent", "dead_lettered", "exit_code")} == {
        "read": 2,
        "sent": 1,
        "dead_lettered": 1,
        "exit_code": EXIT_PARTIAL,
    }


def test_progress_is_logged_off_a_terminal_with_the_counts(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """Off a terminal an events run reports its progress as log lines; the last one carries
    the final counts (messages done, dead-lettered)."""
    logs = logged_run(emulator, tmp_path, *(track(n) for n in range(12)), "not json")
    progress = [entry for entry in logs if entry["event"] == "progress"]
    assert progress
    assert {key: progress[-1][key] for key in ("operation", "done", "failed")} == {
        "operation": "forwarding events",
        "done": 13,
        "failed": 1,
    }


def test_identify_calls_beyond_a_window_are_applied_in_order(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """Identify calls spread over several windows, between meter events, end with each
    customer as its last call left it, and every event is accounted for once."""
    messages: list[dict[str, Any]] = []
    for n in range(WINDOW * 2 + 50):
        messages.append(identify(n, f"u{n % 7}", seen=n, **({"tier": "gold"} if n < 7 else {})))
        if n % 3 == 0:
            messages.append(track(n))
    path = ndjson(tmp_path / "in.ndjson", *messages)
    result = forward_events(
        settings_for(emulator, tmp_path / "state"), [path], dry_run=False, run_id=RUN_ID, out=None
    )
    assert (result.read, result.sent, result.exit_code) == (len(messages), len(messages), EXIT_OK)
    customers = emulator.customers()
    last = {f"u{n % 7}": n for n in range(WINDOW * 2 + 50)}
    assert {user: customers[user]["traits"] for user in last} == {
        user: {"seen": str(n), "tier": "gold"} for user, n in last.items()
    }
    assert len(emulator.ingested()) == sum(1 for m in messages if m["type"] == "track")


def test_a_source_that_breaks_mid_file_delivers_what_came_before_and_fails(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """A gzip file cut short: the events read before the cut are delivered, then the run
    fails with SourceError naming the file, recorded in runs.jsonl."""
    lines = "".join(json.dumps(track(n)) + "\n" for n in range(5_000)).encode()
    compressed = gzip.compress(lines)
    path = tmp_path / "cut.ndjson.gz"
    path.write_bytes(compressed[: len(compressed) * 3 // 4])
    state = tmp_path / "state"
    with pytest.raises(SourceError, match=r"cut\.ndjson\.gz"):
        forward_events(
            settings_for(emulator, state), [str(path)], dry_run=False, run_id=RUN_ID, out=None
        )
    ingested = emulator.ingested()
    assert 0 < len(ingested) < 5_000
    assert sorted(int(r["uniqueId"][4:]) for r in ingested) == list(range(len(ingested)))
    [run] = [json.loads(line) for line in (state / "runs.jsonl").read_text().splitlines()]
    assert run["exit_code"] == EXIT_FATAL
