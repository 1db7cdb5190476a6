"""Mapping in worker processes (sync.event_workers): the very stream mapping here gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psutil
import pytest

from sync.emulator import EmulatorHandle
from sync.event_input import read_units
from sync.event_workers import EncodedMeter, MappingPool, Paired, mapped_events
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


def comparable(pair: Paired) -> tuple[Any, ...]:
    event, mapped = pair
    if isinstance(mapped, MeterEvent | EncodedMeter):
        return (event.source, event.line, event.raw, "meter", mapped.as_json())
    return (event.source, event.line, event.raw, mapped)


def test_workers_yield_exactly_what_mapping_here_yields(tmp_path: Path) -> None:
    """Over many read blocks and mixed sources, with bad lines among good ones, worker
    processes give every message the same source, line, text and mapping (meter records byte
    for byte), in the same order, as mapping in this process."""
    first = write_mixed(tmp_path / "a.ndjson", 16_000)  # several 1 MiB read blocks
    document = tmp_path / "b.json"
    document.write_text(json.dumps([json.loads(message(n)) for n in (0, 1, 17)]), "utf-8")
    last = write_mixed(tmp_path / "c.ndjson", 300)
    sources = [str(first), str(document), str(last)]

    here = [comparable(pair) for pair in mapped_events(read_units(sources))]
    with MappingPool(2) as pool:
        there = [comparable(pair) for pair in mapped_events(read_units(sources), pool)]

    assert there == here
    assert first.stat().st_size > 2 << 20
    kinds = {entry[3] if entry[3] == "meter" else type(entry[3]).__name__ for entry in here}
    assert kinds == {"meter", "IdentifyEvent", "Skipped", "Rejected"}


def test_an_event_stream_left_early_cancels_the_blocks_queued(tmp_path: Path) -> None:
    """A consumer that stops reading (a stop request) leaves no work behind: the pool closes."""
    path = write_mixed(tmp_path / "a.ndjson", 30_000)
    with MappingPool(1) as pool:
        stream = mapped_events(read_units([str(path)]), pool)
        taken = [next(stream) for _ in range(10)]
        stream.close()
    assert [event.line for event, _ in taken][:3] == [1, 2, 3]


def run_events(emulator: EmulatorHandle, tmp_path: Path, source: Path, workers: int) -> Any:
    folder = tmp_path / f"workers-{workers}"
    folder.mkdir()
    config = folder / "sync.toml"
    config.write_text(f'[state]\ndir = "state"\n[events]\nworkers = {workers}\n', "utf-8")
    env = {
        **os.environ,
        "AMBERFLO_API_KEY": "test-key",
        "AMBERFLO_BASE_URL": emulator.url,
        "AMBERFLO_SYNC_CONFIG": str(config),
    }
    return subprocess.run(
        [sys.executable, "-m", "sync", "--log-format", "json", "events", str(source)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


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
        assert ('"event": "mapping_workers_started"' in done.stderr) is (workers > 0)
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


def test_workers_ignore_stop_signals_and_leave_with_their_parent(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group: workers leave stopping to their parent, and
    exit on their own when the parent is gone without closing the pool."""
    script = textwrap.dedent(
        """
        import os, sys
        from sync.event_workers import MappingPool
        pool = MappingPool(2)
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


def test_a_pool_needs_a_worker() -> None:
    """Zero workers is not a pool (the setting's 0 means: map in this process)."""
    with pytest.raises(ValueError, match="at least 1"):
        MappingPool(0)
