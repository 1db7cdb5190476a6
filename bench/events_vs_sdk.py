"""Records per second: our events path against Amberflo's own Python SDK, to one emulator.

Generates (once, in ``--dir``) ``--events`` Segment track events as NDJSON, then sends them to
an ``amberflo-sync emulator`` subprocess twice, each time from a fresh process and after
``POST /_emulator/reset``:

- **ours**: the real command line, ``amberflo-sync events FILE``;
- **sdk**: ``amberflo-metering-python``'s ``create_ingest_client`` (a ``ThreadedProducer`` with
  its default settings: 2 threads, batches of 100, gzip), fed the same file the way its README
  shows: one ``client.meter(...)`` per event, then ``client.flush()``. The SDK has no base-URL
  setting; its ingest host is the class attribute ``IngestSession.root_url``, pointed at the
  emulator here.

Both read and parse the same file, send the same 100,000 records (same uniqueId, customer,
meter, value, time and dimensions) and are timed from process start to exit. The emulator must
then hold every record exactly once, or the run counts as failed. The machine is shared and
noisy, so the two sides take turns ``--runs`` times and the medians are compared.

    .venv/bin/python bench/events_vs_sdk.py [--events 100000] [--runs 3] [--dir bench/data/events]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psutil
from _emulator import emulator_process

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "bench-events-vs-sdk"
CUSTOMERS = 1000
START = datetime(2026, 1, 1, tzinfo=UTC)
REGIONS = ("us-east-1", "us-west-2", "eu-west-1")


def events_file(directory: Path, count: int) -> Path:
    """``count`` track events as NDJSON, generated on first use (always the same)."""
    path = directory / f"track-{count}.ndjson"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for i in range(count):
            stamp = START + timedelta(milliseconds=i)
            event = {
                "type": "track",
                "messageId": f"msg-{i:08d}",
                "userId": f"user-{i % CUSTOMERS}",
                "event": "api_calls",
                "timestamp": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "properties": {"value": 1 + i % 7, "region": REGIONS[i % 3], "plan": "pro"},
            }
            out.write(json.dumps(event, separators=(",", ":")) + "\n")
    return path


def sdk_worker(path: str, url: str) -> None:
    """Send ``path`` with the SDK as its README does (runs in its own process)."""
    from metering.ingest import create_ingest_client  # noqa: PLC0415 - the SDK loads in its worker only
    from metering.session.ingest_session import IngestSession  # noqa: PLC0415

    IngestSession.root_url = url  # the SDK's only way to choose its ingest host
    client = create_ingest_client(api_key=API_KEY)
    refused = 0
    with Path(path).open() as lines:
        for line in lines:
            event = json.loads(line)
            properties = event["properties"]
            stamp = datetime.fromisoformat(event["timestamp"])
            accepted = client.meter(
                meter_api_name=event["event"],
                meter_value=float(properties["value"]),
                meter_time_in_millis=(stamp - datetime(1970, 1, 1, tzinfo=UTC))
                // timedelta(milliseconds=1),
                customer_id=event["userId"],
                dimensions={k: str(v) for k, v in properties.items() if k != "value"},
                unique_id=event["messageId"],
            )
            refused += not accepted
    client.shutdown()  # flush: blocks until every queued record was sent, then stops
    if refused:
        print(f"the SDK refused {refused} records (queue full)", file=sys.stderr)
        sys.exit(3)


@dataclass(frozen=True)
class Result:
    name: str
    seconds: float
    cpu: float
    emulator_cpu: float
    stored: int
    exit_code: int


def timed(
    name: str, command: list[str], env: dict[str, str], url: str, server: psutil.Process
) -> Result:
    """Reset the emulator, run ``command`` to its end, and count what the emulator stored."""
    httpx.post(f"{url}/_emulator/reset").raise_for_status()
    emulator_before = server.cpu_times()
    before = os.times()
    started = time.perf_counter()
    completed = subprocess.run(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
    )
    seconds = time.perf_counter() - started
    after = os.times()
    emulator_after = server.cpu_times()
    if completed.returncode != 0:
        print(completed.stderr.decode()[-2000:], file=sys.stderr)
    stats = httpx.get(f"{url}/_emulator/stats").json()
    return Result(
        name=name,
        seconds=seconds,
        cpu=(after.children_user - before.children_user)
        + (after.children_system - before.children_system),
        emulator_cpu=(emulator_after.user - emulator_before.user)
        + (emulator_after.system - emulator_before.system),
        stored=stats["records_unique"]
        if stats["records_received"] == stats["records_unique"]
        else -1,
        exit_code=completed.returncode,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3, help="turns each side takes (median)")
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / "data" / "events")
    parser.add_argument("--sdk-worker", nargs=2, metavar=("FILE", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sdk_worker:
        sdk_worker(*args.sdk_worker)
        return

    path = events_file(args.dir, args.events)
    with emulator_process() as (url, server), tempfile.TemporaryDirectory() as state:
        config = Path(state) / "sync.toml"
        config.write_text(f'[state]\ndir = "{state}/state"\n')
        env = {
            **os.environ,
            "AMBERFLO_API_KEY": API_KEY,
            "AMBERFLO_BASE_URL": url,
            "AMBERFLO_SYNC_CONFIG": str(config),
        }
        ours: list[Result] = []
        sdk: list[Result] = []
        for _ in range(args.runs):
            ours.append(
                timed(
                    "ours (amberflo-sync events)",
                    [sys.executable, "-m", "sync", "--log-format", "json", "events", str(path)],
                    env,
                    url,
                    server,
                )
            )
            sdk.append(
                timed(
                    "sdk (ThreadedProducer, defaults)",
                    [sys.executable, __file__, "--sdk-worker", str(path), url],
                    env,
                    url,
                    server,
                )
            )

    print(f"{args.events:,} track events, process start to exit, same emulator (reset between):")
    print(f"{'':34} {'seconds':>8} {'records/s':>10} {'CPU s':>6} {'emulator CPU s':>15} stored")
    for result in [r for pair in zip(ours, sdk, strict=True) for r in pair]:
        stored = "all, once" if result.stored == args.events else f"WRONG ({result.stored})"
        print(
            f"{result.name:34} {result.seconds:8.1f} {args.events / result.seconds:10,.0f} "
            f"{result.cpu:6.1f} {result.emulator_cpu:15.1f} {stored}"
            + ("" if result.exit_code == 0 else f" exit {result.exit_code}")
        )
    ours_s, sdk_s = (statistics.median(r.seconds for r in side) for side in (ours, sdk))
    for name, side, seconds in (("ours", ours, ours_s), ("sdk", sdk, sdk_s)):
        cpu = statistics.median(r.cpu for r in side)
        print(
            f"median {name}: {seconds:.1f} s, {args.events / seconds:,.0f} records/s, "
            f"{cpu:.1f} CPU s"
        )
    print(f"ratio of medians ours/sdk: {sdk_s / ours_s:.2f}x (goal: at least 3x)")
    print(f"(machine: {psutil.cpu_count()} cores; load average {os.getloadavg()[0]:.1f})")
    if any(r.exit_code != 0 or r.stored != args.events for r in ours + sdk):
        sys.exit(1)


if __name__ == "__main__":
    main()
