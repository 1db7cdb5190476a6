"""End-to-end runs of ``amberflo-sync run``: the real CLI in a subprocess, real snapshot and
state files in ``tmp_path``, the emulator on a real socket (scenario in ``engage_job.py``)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from engage_job import (
    AFTER_1,
    AFTER_2,
    KEY,
    SNAPSHOT_1,
    SNAPSHOT_2,
    Job,
    events,
    held,
    looked_up,
    state_files,
)

from sync.emulator import EmulatorHandle, EmulatorOptions, running_emulator
from sync.state import StateStore

# Users of the kill test: enough that sending them takes a couple of seconds at 50 ms a request.
KILL_USERS = 40


@pytest.fixture
def job(tmp_path: Path, emulator: EmulatorHandle) -> Job:
    """A job on the scenario's columns, pointed at a fresh emulator."""
    return Job(tmp_path, emulator.url)


@pytest.fixture
def seeded() -> Iterator[EmulatorHandle]:
    """An emulator whose fault draws are seeded."""
    with running_emulator(EmulatorOptions(port=0, seed=11)) as handle:
        yield handle


def test_three_runs_send_exactly_the_changed_users(job: Job, emulator: EmulatorHandle) -> None:
    """An initial sync, then entries, exits, a trait change, a new and a vanished user, then
    nothing: each run upserts exactly those users and Amberflo ends as the snapshot says."""
    job.write(SNAPSHOT_1)
    first = job.run()
    assert first.returncode == 0, first.stderr
    assert held(emulator) == AFTER_1
    assert looked_up(emulator) == Counter({"u1": 1, "u2": 1, "u4": 1, "u5": 1})

    job.write(SNAPSHOT_2)
    mark = len(emulator.requests())
    second = job.run()
    assert second.returncode == 0, second.stderr
    assert held(emulator) == AFTER_2
    assert looked_up(emulator, mark) == Counter({"u1": 1, "u4": 1, "u5": 1, "u6": 1})
    counts = job.last_run()["counts"]
    assert (counts["added"], counts["changed"], counts["exited"]) == (1, 2, 1)
    assert (counts["to_send"], counts["delivered"], counts["failed"]) == (4, 4, 0)

    before = emulator.stats()["requests_total"]
    third = job.run()
    assert third.returncode == 0, third.stderr
    assert emulator.stats()["requests_total"] == before
    assert held(emulator) == AFTER_2
    assert job.last_run()["counts"]["to_send"] == 0


def test_merge_mode_keeps_traits_set_by_someone_else(job: Job, emulator: EmulatorHandle) -> None:
    """A customer's stripeId, set outside this job, survives our upsert of its other traits."""
    with httpx.Client(base_url=emulator.url, headers={"x-api-key": KEY}) as api:
        created = api.post(
            "/customers",
            json={"customerId": "u1", "customerName": "Old", "traits": {"stripeId": "cus_42"}},
        )
        assert created.status_code == 200
    job.write(SNAPSHOT_1[:1])

    result = job.run()

    assert result.returncode == 0, result.stderr
    name, _, traits = held(emulator)["u1"]
    assert name == "Ann"
    assert traits == {**AFTER_1["u1"][2], "stripeId": "cus_42"}


def test_a_typed_parquet_snapshot_syncs_like_the_csv(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    """A Parquet snapshot with boolean audiences and a nullable integer trait leaves the same
    customers as the CSV of the same users (integers as 3, not 3.0)."""
    job = Job(tmp_path, emulator.url, source={"path": "snapshot.parquet"})
    job.write_parquet(SNAPSHOT_1)

    result = job.run()

    assert result.returncode == 0, result.stderr
    assert held(emulator) == AFTER_1


def test_a_parquet_snapshot_is_settled_against_the_state_as_it_is_read(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    """The second run of a Parquet snapshot keeps values only for the users the state does not
    vouch for (u2, unchanged, is settled while the file is read; u3 was never stored), logs
    the read's progress and leaves the customers the CSV runs leave."""
    job = Job(tmp_path, emulator.url, source={"path": "snapshot.parquet"})
    job.write_parquet(SNAPSHOT_1)
    assert job.run().returncode == 0
    job.write_parquet(SNAPSHOT_2)

    result = job.run()

    assert result.returncode == 0, result.stderr
    (read,) = events(result.stderr, "snapshot_read")
    assert (read["users"], read["settled"]) == (5, 1)
    reading = [
        line
        for line in events(result.stderr, "progress")
        if line["operation"] == "reading snapshot"
    ]
    assert (reading[-1]["done"], reading[-1]["total"], reading[-1]["invalid"]) == (5, 5, 0)
    assert held(emulator) == AFTER_2


def test_a_run_converges_under_a_30_percent_fault_rate(
    tmp_path: Path, seeded: EmulatorHandle
) -> None:
    """With 429s and 5xx answers on ~30% of requests, the run retries to exit 0 and every
    customer ends as the snapshot says."""
    job = Job(tmp_path, seeded.url, amberflo={"concurrency": 8})
    rows = [(f"w{n:02d}", f"W {n}", "", "true", "false", f"p{n}", str(n)) for n in range(16)]
    job.write(rows)
    # Mostly 429s, answered with Retry-After: 0; a 5xx waits for the backoff (about a second).
    seeded.set_faults(rate_429=0.2, retry_after=0, rate_5xx=0.1)

    result = job.run()

    assert result.returncode == 0, result.stderr
    statuses = {status for counts in seeded.stats()["requests"].values() for status in counts}
    assert "429" in statuses
    assert statuses & {"500", "502", "503"}
    assert held(seeded) == {
        f"w{n:02d}": (
            f"W {n}",
            None,
            {"vip_users": "true", "plan": f"p{n}", "orders_count": str(n)},
        )
        for n in range(16)
    }
    assert events(result.stderr, "retrying")


def test_a_rejected_customer_fails_alone_and_is_the_only_one_retried(
    job: Job, emulator: EmulatorHandle
) -> None:
    """A customer Amberflo answers 400 ends the run with exit 3, is named with its reason in
    the failure file and the report, and is the only user the next run sends."""
    job.write(SNAPSHOT_1)
    emulator.set_faults(reject_customers=["u4"])
    report = job.root / "report.json"

    first = job.run("--report", str(report))

    assert first.returncode == 3, first.stderr
    run = job.last_run()
    failures = [json.loads(line) for line in Path(run["failure_file"]).read_text().splitlines()]
    assert [(f["customerId"], f["status"], f["run_id"]) for f in failures] == [
        ("u4", 400, run["run_id"])
    ]
    assert "rejected" in failures[0]["reason"]
    assert json.loads(report.read_text())["delivery"] == {
        "delivered": 3,
        "failed": 1,
        "failure_file": run["failure_file"],
        "interrupted": False,
        "stopped_reason": None,
    }
    assert held(emulator) == {k: v for k, v in AFTER_1.items() if k != "u4"}

    emulator.set_faults(reject_customers=[])
    mark = len(emulator.requests())
    second = job.run()

    assert second.returncode == 0, second.stderr
    assert looked_up(emulator, mark) == Counter({"u4": 1})
    assert held(emulator) == AFTER_1


def slow_job(root: Path, emulator: EmulatorHandle) -> tuple[Job, dict[str, Any]]:
    """A job of KILL_USERS new users that takes a couple of seconds to send, and the customers
    it must leave in Amberflo."""
    job = Job(root, emulator.url, amberflo={"concurrency": 2})
    rows = [(f"k{n:03d}", f"K {n}", "", "true", "false", f"p{n}", "") for n in range(KILL_USERS)]
    job.write(rows)
    # Two requests per new customer (GET, POST) at 50 ms each, two at a time: about 2 s of
    # sending, so a signal lands well inside it.
    emulator.set_faults(latency_ms=50)
    expected = {
        f"k{n:03d}": (f"K {n}", None, {"vip_users": "true", "plan": f"p{n}"})
        for n in range(KILL_USERS)
    }
    return job, expected


def signal_mid_send(job: Job, emulator: EmulatorHandle, signum: signal.Signals) -> int:
    """Start the job, send ``signum`` once customers arrive and a checkpoint is written, and
    return the run's exit status (negative: killed by that signal)."""
    with (job.root / f"{signum.name}.log").open("w") as log:
        process = subprocess.Popen(
            job.command(), env=job.env(), cwd=job.root, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            _wait_for(lambda: len(emulator.customers()) >= 10 and _checkpoints(job.state))
            assert process.poll() is None, "the run finished before the signal"
            process.send_signal(signum)
        finally:
            status = process.wait(timeout=30)
    return status


def test_a_run_killed_mid_send_resumes_from_its_last_checkpoint(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    """After SIGKILL in the middle of sending, the state still loads, the rerun sends exactly
    the users no checkpoint held, and Amberflo ends right."""
    job, expected = slow_job(tmp_path, emulator)

    assert signal_mid_send(job, emulator, signal.SIGKILL) == -signal.SIGKILL

    acknowledged = set(StateStore(job.state).load().users.index)
    assert 5 <= len(acknowledged) < KILL_USERS
    assert {k: held(emulator)[k] for k in acknowledged} == {k: expected[k] for k in acknowledged}

    emulator.set_faults(latency_ms=0)
    mark = len(emulator.requests())
    rerun = job.run()

    assert rerun.returncode == 0, rerun.stderr
    resent = looked_up(emulator, mark)
    assert set(resent) == set(expected) - acknowledged
    assert max(resent.values()) == 1
    assert held(emulator) == expected
    users = StateStore(job.state).load().users
    assert sorted(users.index) == sorted(expected)


def test_sigterm_stops_after_the_requests_in_flight_and_commits_them(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    """SIGTERM mid-send ends the run with exit 3 recorded as interrupted, every user Amberflo
    holds is committed (no checkpoint left over), and the rerun sends exactly the others."""
    job, expected = slow_job(tmp_path, emulator)

    assert signal_mid_send(job, emulator, signal.SIGTERM) == 3

    run = job.last_run()
    assert (run["exit_code"], run["interrupted"]) == (3, True)
    assert not _checkpoints(job.state)
    committed = set(StateStore(job.state).load().users.index)
    assert committed == set(emulator.customers())
    assert run["counts"]["delivered"] == len(committed) < KILL_USERS

    emulator.set_faults(latency_ms=0)
    mark = len(emulator.requests())
    rerun = job.run()

    assert rerun.returncode == 0, rerun.stderr
    assert set(looked_up(emulator, mark)) == set(expected) - committed
    assert held(emulator) == expected


def _checkpoints(state: Path) -> bool:
    return any((state / "checkpoints").glob("*.parquet"))


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.02)


def test_an_empty_snapshot_after_a_full_one_trips_the_mass_exit_guard(
    job: Job, emulator: EmulatorHandle
) -> None:
    """An empty snapshot would exit every user: the run sends nothing, exits 1 with a message
    naming the way out, and leaves the state as it was; --allow-mass-exit then sends the exits."""
    job.write(SNAPSHOT_1)
    assert job.run().returncode == 0
    committed = state_files(job.state)
    before = emulator.stats()["requests_total"]
    job.write([])

    guarded = job.run()

    assert guarded.returncode == 1
    assert "--allow-mass-exit" in guarded.stderr
    assert emulator.stats()["requests_total"] == before
    assert state_files(job.state) == committed
    assert held(emulator) == AFTER_1

    allowed = job.run("--allow-mass-exit")

    assert allowed.returncode == 0, allowed.stderr
    assert {k: traits for k, (_, _, traits) in held(emulator).items()} == {
        "u1": {"vip_users": "false"},
        "u2": {"cart_abandoners": "false"},
        "u4": {"vip_users": "false", "cart_abandoners": "false"},
        "u5": {},
    }


def test_full_resends_every_user(job: Job, emulator: EmulatorHandle) -> None:
    """--full upserts every user of the snapshot that holds a value, changed or not."""
    job.write(SNAPSHOT_1)
    assert job.run().returncode == 0
    mark = len(emulator.requests())

    full = job.run("--full")

    assert full.returncode == 0, full.stderr
    assert looked_up(emulator, mark) == Counter({"u1": 1, "u2": 1, "u4": 1, "u5": 1})
    run = job.last_run()
    assert run["mode"] == "full"
    assert (run["counts"]["to_send"], run["counts"]["delivered"]) == (4, 4)
    assert held(emulator) == AFTER_1


def test_a_run_against_a_dead_amberflo_stops_early_and_says_why(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    """When every request fails, the run stops after a streak, exits 3 and keeps the state."""
    job = Job(
        tmp_path,
        emulator.url,
        amberflo={"concurrency": 1, "max_attempts": 1, "retry_deadline_seconds": 5},
    )
    many = [(f"x{i}", f"X{i}", "", "true", "false", "", "") for i in range(40)]
    job.write(many)
    emulator.set_faults(fail_all=True)
    result = job.run()
    assert result.returncode == 3, result.stderr
    run = job.last_run()
    assert "in a row" in run["stopped_reason"]
    # Ten customers in a row (the floor of the streak) failed; the other 30 were never tried.
    assert run["counts"]["failed"] == 10
    assert run["counts"]["delivered"] == 0
    emulator.set_faults(fail_all=False)
    second = job.run()
    assert second.returncode == 0, second.stderr
    assert set(emulator.customers()) == {f"x{i}" for i in range(40)}
