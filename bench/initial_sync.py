"""Users per second of an initial sync to the emulator, in merge and in replace mode.

Generates (once per size, in ``--dir``) a wide Parquet snapshot of ``--users`` users: a name,
an email, 5 audiences (each user a member of about 10%) and 3 computed traits, one of which
every user holds, so the initial sync sends every user. Starts ``amberflo-sync emulator`` as a
subprocess, then for each mode runs ``amberflo-sync run`` (the real command line, a subprocess)
against an empty emulator and an empty state folder; checks that the emulator then holds
exactly the snapshot's users with exactly the expected name, email and traits; and prints the
users per second, the time projected for 1,000,000 users, and the CPU seconds the run and the
emulator used (the machine's cores are shared by both). The run's JSON log splits its wall
time into phases: start-up, reading and diffing (up to ``diff_computed``), delivery (up to
``customers_delivered``, with its own users per second) and the commit (up to
``run_finished``).

    .venv/bin/python bench/initial_sync.py [--users 100000] [--modes merge,replace]
        [--concurrency 8] [--timeout 1800] [--dir bench/data/initial_sync]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from _emulator import emulator_process

AUDIENCES = ("VIP Users", "Cart Abandoners", "High Intent", "Churn Risk", "Newsletter")
PLANS = np.array(["free", "pro", "enterprise"])
API_KEY = "bench-initial-sync"
ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "sync"]


def snapshot_path(directory: Path, users: int) -> Path:
    """The snapshot of ``users`` users, generated on first use (seeded: always the same)."""
    path = directory / f"users-{users}.parquet"
    if path.exists():
        return path
    rng = np.random.default_rng(20260101)
    ids = np.char.add("user-", np.arange(users).astype(str))
    columns: dict[str, pa.Array] = {
        "user_id": pa.array(ids),
        "name": pa.array(np.char.add("User ", np.arange(users).astype(str))),
        "email": pa.array(np.char.add(ids, "@example.com")),
    }
    for audience in AUDIENCES:
        columns[audience] = pa.array(rng.random(users) < 0.1)
    columns["plan"] = pa.array(rng.choice(PLANS, users))
    columns["total_revenue"] = pa.array(np.round(rng.random(users) * 1000, 2))
    orders = rng.integers(0, 50, users)
    columns["orders_count"] = pa.array(orders, mask=rng.random(users) < 0.3)
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def expected_customers(path: Path) -> dict[str, dict[str, Any]]:
    """What the emulator must hold after an initial sync, by customerId (DESIGN.md rules:
    members get ``"true"``, non-members nothing; floats in shortest repr; null is absent)."""
    table = pq.read_table(path).to_pylist()
    expected: dict[str, dict[str, Any]] = {}
    for row in table:
        traits = {
            audience.lower().replace(" ", "_"): "true" for audience in AUDIENCES if row[audience]
        }
        traits["plan"] = row["plan"]
        traits["total_revenue"] = repr(row["total_revenue"])
        if row["orders_count"] is not None:
            traits["orders_count"] = str(row["orders_count"])
        expected[row["user_id"]] = {
            "customerName": row["name"],
            "customerEmail": row["email"],
            "traits": traits,
        }
    return expected


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


@dataclass(frozen=True)
class Result:
    mode: str
    users: int
    seconds: float
    exit_code: int
    run_cpu: float
    emulator_cpu: float
    verified: str
    phases: dict[str, float]


def run_mode(
    mode: str,
    snapshot: Path,
    *,
    work: Path,
    url: str,
    server: psutil.Process,
    args: argparse.Namespace,
) -> Result:
    """One initial sync in ``mode`` against an emptied emulator, timed and verified."""
    folder = work / mode
    state = folder / "state"
    if state.exists():
        subprocess.run(["rm", "-rf", str(state)], check=True)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "sync.toml"
    config.write_text(
        f'[source]\npath = "{snapshot}"\nlayout = "wide"\nid_column = "user_id"\n'
        f'name_column = "name"\nemail_column = "email"\n'
        f'[state]\ndir = "{state}"\n'
        f'[amberflo]\nwrite_mode = "{mode}"\nconcurrency = {args.concurrency}\n'
    )
    httpx.post(f"{url}/_emulator/reset").raise_for_status()
    env = {
        **os.environ,
        "AMBERFLO_API_KEY": API_KEY,
        "AMBERFLO_BASE_URL": url,
        "AMBERFLO_SYNC_CONFIG": str(config),
    }
    emulator_before = cpu_seconds(server)
    children_before = os.times()
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    with (folder / "run.log").open("w") as log:
        completed = subprocess.run(
            [*CLI, "--log-format", "json", "run"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=args.timeout,
            check=False,
        )
    seconds = time.perf_counter() - started
    children_after = os.times()
    run_cpu = (children_after.children_user - children_before.children_user) + (
        children_after.children_system - children_before.children_system
    )
    emulator_cpu = cpu_seconds(server) - emulator_before
    phases = phase_seconds(folder / "run.log", started_at)
    return Result(
        mode=mode,
        users=args.users,
        seconds=seconds,
        exit_code=completed.returncode,
        run_cpu=run_cpu,
        emulator_cpu=emulator_cpu,
        verified=verify(url, snapshot),
        phases=phases,
    )


def phase_seconds(log_path: Path, started_at: datetime) -> dict[str, float]:
    """Seconds from the process start to the diff, of delivery, and of the commit, read from
    the run's JSON log lines (empty when a line is missing)."""
    stamps: dict[str, datetime] = {}
    for line in log_path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "timestamp" in event:
            stamps.setdefault(event.get("event", ""), datetime.fromisoformat(event["timestamp"]))
    marks = ("diff_computed", "customers_delivered", "run_finished")
    if not all(mark in stamps for mark in marks):
        return {}
    diffed, delivered, finished = (stamps[mark] for mark in marks)
    return {
        "start_read_diff": (diffed - started_at).total_seconds(),
        "deliver": (delivered - diffed).total_seconds(),
        "commit": (finished - delivered).total_seconds(),
    }


def verify(url: str, snapshot: Path) -> str:
    """ "ok" when the emulator holds exactly the expected customers, else what differs."""
    response = httpx.get(f"{url}/_emulator/customers", timeout=600)
    response.raise_for_status()
    stored: dict[str, dict[str, Any]] = response.json()
    expected = expected_customers(snapshot)
    if set(stored) != set(expected):
        missing = len(set(expected) - set(stored))
        extra = len(set(stored) - set(expected))
        return f"FAILED: {missing} customers missing, {extra} unexpected"
    wrong = [
        customer_id
        for customer_id, want in expected.items()
        if any(stored[customer_id].get(key) != value for key, value in want.items())
    ]
    if wrong:
        example = wrong[0]
        return (
            f"FAILED: {len(wrong)} customers differ, e.g. {example}: "
            f"{json.dumps(stored[example])} != {json.dumps(expected[example])}"
        )
    return f"ok ({len(stored)} customers, names, emails and traits as expected)"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--modes", default="merge,replace")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / "data" / "initial_sync")
    args = parser.parse_args()

    snapshot = snapshot_path(args.dir, args.users)
    results = []
    with emulator_process() as (url, server):
        for mode in args.modes.split(","):
            work = args.dir / f"run-{args.users}"
            result = run_mode(mode, snapshot, work=work, url=url, server=server, args=args)
            results.append(result)
            rate = result.users / result.seconds
            print(
                f"{mode:8} {result.users:>9,} users in {result.seconds:7.1f} s = "
                f"{rate:7,.0f} users/s -> 1M users in {1_000_000 / rate / 60:5.1f} min | "
                f"exit {result.exit_code} | CPU: run {result.run_cpu:.1f} s "
                f"({result.run_cpu / result.users * 1000:.3f} ms/user), emulator "
                f"{result.emulator_cpu:.1f} s ({result.emulator_cpu / result.users * 1000:.3f} "
                f"ms/user) | {result.verified}",
                flush=True,
            )
            if result.phases:
                phases = result.phases
                print(
                    f"         phases: start, read and diff {phases['start_read_diff']:.1f} s | "
                    f"delivery {phases['deliver']:.1f} s = "
                    f"{result.users / phases['deliver']:,.0f} users/s | "
                    f"commit {phases['commit']:.1f} s",
                    flush=True,
                )
    print(f"(machine: {psutil.cpu_count()} cores; load average {os.getloadavg()[0]:.1f})")
    if any(r.exit_code != 0 or not r.verified.startswith("ok") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
