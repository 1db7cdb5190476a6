"""Event workers (sync.event_workers): blocks mapped and sent apart, accounted for here."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from sync.deliver import RetryPolicy
from sync.emulator import EmulatorHandle, EmulatorOptions, running_emulator
from sync.event_input import read_units
from sync.event_workers import EventWorkers, MeterDelivery, SentMeters, mapped_events
from sync.events import MeterEvent

ROOT = Path(__file__).resolve().parent.parent
TS = "2024-05-02T09:17:00Z"


def message(n: int) -> str:
    """Line ``n`` of a mixed input: mostly good events, some that are skipped or bad."""
    kind = n % 23
    if kind == 5:
        return '{"type": "track", "userId": "u1", "event": "x", '  # cut short: invalid JSON
    if kind == 7:
        return "[1, 2, 3]"  # JSON, but not a message
    if kind == 11:
        return json.dumps({"type": "group", "userId": f"u{n}", "groupId": "g", "timestamp": TS})
    if kind == 13:
        return json.dumps({"type": "track", "userId": f"u{n}", "timestamp": TS})  # no event
    if kind == 17:
        traits = {"plan": "pro", "seats": n}
        return json.dumps({"type": "identify", "userId": f"u{n % 5}", "traits": traits})
    if kind == 19:  # an id past 64 bits: read the standard way, digits kept
        long_id = "1234567890123456789012"
        return f'{{"type": "page", "userId": {long_id}, "name": "P", "timestamp": "{TS}"}}'
    properties = {"value": n % 9, "region": ["us", "eu"][n % 2], "nested": {"tier": n % 3}}
    return json.dumps(
        {
            "type": ["track", "page", "screen"][n % 3],
            "messageId": f"m-{n}",
            "userId": f"u{n % 97}",
            "event": "api_calls",
            "name": "Home",
            "properties": properties,
            "timestamp": TS,
        }
    )


def write_mixed(path: Path, count: int) -> Path:
    endings = ["\n", "\r\n", "\n\n"]
    path.write_text("".join(message(n) + endings[n % 3] for n in range(count)), encoding="utf-8")
    return path


def canonical(records: list[dict[str, Any]]) -> set[str]:
    return {json.dumps(record, sort_keys=True) for record in records}


def delivery_to(emulator: EmulatorHandle, concurrency: int = 4) -> MeterDelivery:
    return MeterDelivery(
        api_key="test-key",
        base_url=emulator.url,
        ingest_url=None,
        timeout=30.0,
        concurrency=concurrency,
        policy=RetryPolicy(attempts=3, deadline=30.0, wait_initial=0.01, jitter=0.01),
    )


def test_workers_send_the_meter_records_and_hand_back_the_rest_in_order(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """Over many read blocks and mixed sources, workers send exactly the meter records mapping
    here makes, and hand back every other message with its source, line, text and mapping,
    in input order."""
    first = write_mixed(tmp_path / "a.ndjson", 16_000)  # a few 1 MiB read blocks
    document = tmp_path / "b.json"
    document.write_text(json.dumps([json.loads(message(n)) for n in (0, 1, 17)]), "utf-8")
    last = write_mixed(tmp_path / "c.ndjson", 300)
    sources = [str(first), str(document), str(last)]
    assert first.stat().st_size > 2 << 20

    here = list(mapped_events(read_units(sources)))
    meters_here = [mapped.as_record() for _, mapped in here if isinstance(mapped, MeterEvent)]
    with EventWorkers(2, delivery_to(emulator)) as workers:
        there = list(workers.forward(read_units(sources)))

    sent = [item for item in there if isinstance(item, SentMeters)]
    kept = [item for item in there if not isinstance(item, SentMeters)]
    assert [item.failures for item in sent] == [[]] * len(sent)
    # Meter records of the document were mapped here (they are in `kept`); the rest were sent.
    kept_meters = [mapped.as_record() for _, mapped in kept if isinstance(mapped, MeterEvent)]
    assert sum(item.records for item in sent) + len(kept_meters) == len(meters_here)
    # The same records (the emulator keeps one of identical records, as Amberflo does).
    assert canonical(emulator.ingested()) | canonical(kept_meters) == canonical(meters_here)
    # Every other message comes back in input order (the document's, mapped here, whole).
    assert [(e.source, e.line, e.raw, m) for e, m in kept] == [
        (e.source, e.line, e.raw, m)
        for e, m in here
        if not isinstance(m, MeterEvent) or e.source == str(document)
    ]


def test_a_stop_finishes_the_blocks_given_out_and_takes_no_more(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """Once stopped, workers finish and hand back every block they were given (nothing sent
    goes unaccounted for), and no further block is taken."""
    path = write_mixed(tmp_path / "a.ndjson", 40_000)
    asked = itertools.count(1)
    with EventWorkers(1, delivery_to(emulator)) as workers:
        # Stopped once three blocks were given out (the first holds the first line alone).
        items = list(workers.forward(read_units([str(path)]), stop=lambda: next(asked) >= 3))
        assert workers.stopped_early
    sent = sum(item.records for item in items if isinstance(item, SentMeters))
    assert 0 < sent == len(emulator.ingested()) + emulator.stats()["records_duplicate"]
    lines_back = [item[0].line for item in items if not isinstance(item, SentMeters)]
    assert max(lines_back) < 20_000  # three blocks of about 5,000 lines, not the 40,000


def events_command(
    emulator: EmulatorHandle, folder: Path, source: Path, workers: int
) -> tuple[list[str], dict[str, str]]:
    """``amberflo-sync events SOURCE`` to ``emulator`` with ``workers``, its state in
    ``folder``: the command line and its environment."""
    folder.mkdir()
    config = folder / "sync.toml"
    config.write_text(f'[state]\ndir = "state"\n[events]\nworkers = {workers}\n', "utf-8")
    env = {
        **os.environ,
        "AMBERFLO_API_KEY": "test-key",
        "AMBERFLO_BASE_URL": emulator.url,
        "AMBERFLO_SYNC_CONFIG": str(config),
    }
    return [sys.executable, "-m", "sync", "--log-format", "json", "events", str(source)], env


def run_events(emulator: EmulatorHandle, tmp_path: Path, source: Path, workers: int) -> Any:
    argv, env = events_command(emulator, tmp_path / f"workers-{workers}", source, workers)
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, check=False)


def dead_letters(folder: Path) -> list[tuple[int, str]]:
    (log,) = (folder / "state" / "dead-letter").iterdir()
    rows = [json.loads(line) for line in log.read_text("utf-8").splitlines()]
    return sorted((row["line"], row["reason"]) for row in rows)


def test_a_large_file_is_forwarded_alike_with_and_without_workers(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """``amberflo-sync events`` with mapping workers sends every record once, the same
    records, and dead-letters the same lines for the same reasons as without them."""
    source = write_mixed(tmp_path / "in.ndjson", 14_000)
    assert source.stat().st_size > 2 << 20  # large enough for workers to be used
    outcomes = {}
    stats = []
    for workers in (0, 2):
        done = run_events(emulator, tmp_path, source, workers)
        assert done.returncode == 3, done.stderr[-2000:]  # the bad lines are dead-lettered
        assert ('"event": "event_workers_started"' in done.stderr) is (workers > 0)
        outcomes[workers] = (
            done.stdout.splitlines()[0].split(":", 1)[1],  # the counts, after the run id
            dead_letters(tmp_path / f"workers-{workers}"),
        )
        stats.append(emulator.stats())
    assert outcomes[2] == outcomes[0]
    # The second run sent as many records as the first, every one a duplicate of the first
    # run's: the same bytes went out.
    first, second = stats
    assert second["records_received"] == 2 * first["records_received"] > 10_000
    assert second["records_unique"] == first["records_unique"]


def test_under_faults_workers_deliver_every_meter_record_exactly_once(tmp_path: Path) -> None:
    """With throttles, server errors and dropped connections on about a quarter of the
    requests, a run with workers ends as a run without faults does: the same counts and every
    meter record stored once. The failed first tries of pipelined batches are retried, none is
    lost or counted twice."""
    source = write_mixed(tmp_path / "in.ndjson", 14_000)
    expected = canonical(
        [
            mapped.as_record()
            for _, mapped in mapped_events(read_units([str(source)]))
            if isinstance(mapped, MeterEvent)
        ]
    )
    runs = {}
    for name, options in {
        "calm": EmulatorOptions(port=0),
        "faulty": EmulatorOptions(
            port=0, seed=11, rate_429=0.15, retry_after=0, rate_5xx=0.05, rate_drop=0.05
        ),
    }.items():
        (tmp_path / name).mkdir()
        with running_emulator(options) as emulator:
            done = run_events(emulator, tmp_path / name, source, workers=2)
            ingest = emulator.stats()["requests"]["POST /ingest"]
            runs[name] = (done, emulator.ingested(), ingest)
    for done, stored, _ in runs.values():
        assert done.returncode == 3, done.stderr[-2000:]  # the file's bad lines, dead-lettered
        assert canonical(stored) == expected
        assert len(stored) == len(expected)
    calm, faulty = (runs[name][0] for name in ("calm", "faulty"))
    # The counts, after the run id: read, sent, skipped and dead-lettered alike.
    assert (
        faulty.stdout.splitlines()[0].split(":", 1)[1]
        == (calm.stdout.splitlines()[0].split(":", 1)[1])
    )
    failed_requests = sum(n for status, n in runs["faulty"][2].items() if status != "200")
    assert failed_requests > 10  # the faults did happen


def test_workers_ignore_stop_signals_and_leave_with_their_parent(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group: workers leave stopping to their parent, and
    exit on their own when the parent is gone without closing the pool."""
    script = textwrap.dedent(
        """
        import os, sys
        from sync.deliver import RetryPolicy
        from sync.event_workers import EventWorkers, MeterDelivery
        delivery = MeterDelivery("key", "http://127.0.0.1:9", None, 1.0, 2, RetryPolicy())
        pool = EventWorkers(2, delivery)
        print(os.getpid(), flush=True)
        sys.stdin.readline()
        os._exit(0)  # no shutdown: the workers are left to notice on their own
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        assert parent.stdin is not None
        workers = psutil.Process(int(parent.stdout.readline())).children()
        assert len(workers) == 2
        for worker in workers:
            os.kill(worker.pid, signal.SIGINT)
            os.kill(worker.pid, signal.SIGTERM)
        # A worker that took them would be gone (a zombie, counted as gone) within a second.
        stopped, _ = psutil.wait_procs(workers, timeout=1)
        assert stopped == []

        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.wait(timeout=30) == 0
    gone, left = psutil.wait_procs(workers, timeout=30)
    assert left == []
    assert len(gone) == 2


def test_a_pool_needs_a_worker(emulator: EmulatorHandle) -> None:
    """Zero workers is not a pool (the setting's 0 means: all in this process)."""
    with pytest.raises(ValueError, match="at least 1"):
        EventWorkers(0, delivery_to(emulator))


def test_a_rejected_api_key_in_a_worker_fails_the_run_with_exit_1(tmp_path: Path) -> None:
    """Amberflo refusing the key to a worker ends the run as it would in one process: exit 1,
    a message naming the refusal and the fix, and the key nowhere in it."""
    source = write_mixed(tmp_path / "in.ndjson", 14_000)
    options = EmulatorOptions(port=0, api_keys=frozenset({"the-right-key"}))
    with running_emulator(options) as emulator:
        done = run_events(emulator, tmp_path, source, workers=2)
        assert emulator.ingested() == []
    assert done.returncode == 1, done.stderr[-2000:]
    assert '"event": "event_workers_started"' in done.stderr
    assert "403" in done.stderr
    assert "test-key" not in done.stderr + done.stdout


@pytest.mark.parametrize("workers", [0, 2])
def test_ctrl_c_stops_an_events_run_with_everything_accounted_for(
    tmp_path: Path, workers: int
) -> None:
    """SIGINT stops ``amberflo-sync events`` gracefully, with or without workers: what was
    given out is finished, nothing further is read, and the run ends with exit 3, recorded as
    interrupted, every message read sent, skipped or dead-lettered."""
    source = write_mixed(tmp_path / "in.ndjson", 40_000)
    with running_emulator(EmulatorOptions(port=0, latency_ms=20)) as emulator:
        folder = tmp_path / f"workers-{workers}"
        argv, env = events_command(emulator, folder, source, workers)
        run = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while emulator.stats()["records_received"] == 0 and run.poll() is None:
                assert time.monotonic() < deadline, "no record reached the emulator"
                time.sleep(0.05)
            run.send_signal(signal.SIGINT)
            out, _ = run.communicate(timeout=120)
        finally:
            if run.poll() is None:  # hung: kill it, or the test would wait on it for ever
                run.kill()
                run.communicate()
    assert run.returncode == 3, out
    assert "(interrupted)" in out
    runs = (folder / "state" / "runs.jsonl").read_text("utf-8").splitlines()
    (entry,) = [json.loads(line) for line in runs]
    counts = entry["counts"]
    assert entry["interrupted"] is True
    assert counts["read"] == counts["sent"] + counts["skipped"] + counts["dead_lettered"]
    assert 0 < counts["read"] < 40_000


def test_a_record_refused_in_a_worker_is_dead_lettered_with_its_line(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """A meter record that fails in a worker (here: too large to send) is dead-lettered with
    its own line, text and reason; the records around it are delivered."""
    lines = [message(n) for n in range(14_000)]
    huge = {f"p{n}": "x" * 150 for n in range(1000)}  # over 100 KB as a record
    lines[9_001] = json.dumps(
        {"type": "track", "messageId": "big", "userId": "u1", "event": "e", "properties": huge}
        | {"timestamp": TS}
    )
    source = tmp_path / "in.ndjson"
    source.write_text("\n".join(lines) + "\n", "utf-8")
    done = run_events(emulator, tmp_path, source, workers=2)
    assert done.returncode == 3, done.stderr[-2000:]
    letters = dead_letters(tmp_path / "workers-2")
    too_large = [(line, reason) for line, reason in letters if "over the limit" in reason]
    assert [line for line, _ in too_large] == [9_002]
    stored = {record.get("uniqueId") for record in emulator.ingested()}
    assert "big" not in stored
    assert {"m-8999", "m-9003"} <= stored  # meter records on either side
