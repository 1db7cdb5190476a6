"""The ``run`` and ``history`` commands as a scheduler sees them: exit codes, messages on
standard error, JSON log lines off a terminal, and the run lock between two processes."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from engage_job import SNAPSHOT_1, SNAPSHOT_2, Job, events

from sync.emulator import EmulatorHandle, EmulatorOptions, running_emulator
from sync.state import StateStore


@pytest.fixture
def job(tmp_path: Path, emulator: EmulatorHandle) -> Job:
    """A job on the scenario's columns, pointed at a fresh emulator."""
    return Job(tmp_path, emulator.url)


def test_a_run_logs_progress_and_one_summary_line_off_a_terminal(job: Job) -> None:
    """Off a terminal a run logs JSON lines: a progress line and exactly one run_finished line
    carrying the counts and the exit code."""
    job.write(SNAPSHOT_1)

    result = job.run()

    assert result.returncode == 0, result.stderr
    progress = events(result.stderr, "progress")
    assert progress
    assert (progress[-1]["done"], progress[-1]["total"], progress[-1]["failed"]) == (4, 4, 0)
    (finished,) = events(result.stderr, "run_finished")
    assert finished["exit_code"] == 0
    assert finished["run_id"] == job.last_run()["run_id"]
    assert (finished["counts"]["to_send"], finished["counts"]["delivered"]) == (4, 4)


def test_history_lists_the_runs_as_a_table_and_as_json(job: Job, emulator: EmulatorHandle) -> None:
    """history shows every run with its id, its exit code and the full path of a partial run's
    failure file; --json gives one object per run, oldest first."""
    job.write(SNAPSHOT_1)
    assert job.run().returncode == 0
    job.write(SNAPSHOT_2)
    emulator.set_faults(reject_customers=["u6"])
    assert job.run().returncode == 3
    recorded = StateStore(job.state).runs()

    as_json = job.cli("history", "--config", str(job.config), "--json", key=None)
    as_table = job.cli("history", "--config", str(job.config), key=None)

    assert as_json.returncode == as_table.returncode == 0
    listed = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(run["run_id"], run["exit_code"]) for run in listed] == [
        (recorded[0]["run_id"], 0),
        (recorded[1]["run_id"], 3),
    ]
    assert listed[1]["failure_file"] == recorded[1]["failure_file"]
    assert listed[1]["counts"]["failed"] == 1
    lines = as_table.stdout.splitlines()
    # A row shows the run's start time and the random suffix of its id.
    for run in recorded:
        assert any(run["run_id"][-6:] in line for line in lines), run["run_id"]
    assert any("3 partial" in line for line in lines)
    assert any(recorded[1]["failure_file"] in line for line in lines)


def test_a_second_run_on_the_same_state_stops_at_once_with_exit_4(
    job: Job, emulator: EmulatorHandle
) -> None:
    """While one run holds the state folder, another exits 4 at once, naming the holder, and
    records nothing; the first run then finishes normally."""
    job = Job(job.root, job.url, amberflo={"concurrency": 1})
    job.write([(f"l{n:02d}", "", "", "true", "false", "", "") for n in range(20)])
    # One request at a time, 300 ms each: the first run sends for about 12 s, far longer than
    # the second needs to start and stop; the latency is lifted as soon as it has.
    emulator.set_faults(latency_ms=300)
    first = subprocess.Popen(
        job.command(),
        env=job.env(),
        cwd=job.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while emulator.stats()["requests_total"] == 0:  # the lock is taken before any request
            assert first.poll() is None, "the first run ended early"
            assert time.monotonic() < deadline, "the first run never started sending"
            time.sleep(0.02)

        second = job.run()

        assert second.returncode == 4
        assert "holds the lock" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert "nothing was done" in second.stderr
    finally:
        emulator.set_faults(latency_ms=0)
        assert first.wait(timeout=60) == 0
    assert len(StateStore(job.state).runs()) == 1


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"source": {"layout": "diagonal"}}, "sync.toml"),
        ({"source": {"id_column": "customer"}}, "snapshot.csv"),
    ],
    ids=["bad-layout", "missing-column"],
)
def test_a_config_error_exits_2_naming_the_file(
    tmp_path: Path, emulator: EmulatorHandle, setting: dict[str, dict[str, str]], named: str
) -> None:
    """A bad layout or a missing id column exits 2 with one message naming the file at fault,
    before any request."""
    job = Job(tmp_path, emulator.url, **setting)
    job.write(SNAPSHOT_1)

    result = job.run()

    assert result.returncode == 2
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("amberflo-sync:")]
    assert named in message
    assert emulator.stats()["requests_total"] == 0


def test_an_unreadable_source_exits_1_naming_the_file(job: Job, emulator: EmulatorHandle) -> None:
    """A snapshot that cannot be read exits 1 with a message naming it, and sends nothing."""
    broken = job.root / "snapshot.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    job = Job(job.root, job.url, source={"path": "snapshot.parquet"})

    result = job.run()

    assert result.returncode == 1
    assert f"amberflo-sync: error: cannot read {broken}" in result.stderr
    assert emulator.stats()["requests_total"] == 0


def test_a_snapshot_that_has_not_landed_exits_1_and_records_the_run(
    job: Job, emulator: EmulatorHandle
) -> None:
    """A missing export is an unreadable source (exit 1, recorded), not a config error."""
    result = job.run()  # the job's snapshot.csv was never written

    assert result.returncode == 1
    assert "snapshot.csv does not exist" in result.stderr
    assert emulator.stats()["requests_total"] == 0
    assert job.last_run()["exit_code"] == 1


def test_a_rejected_key_exits_1_with_a_clear_message_and_is_never_printed(
    tmp_path: Path,
) -> None:
    """When Amberflo refuses the key, the run exits 1 saying so, and the key appears in no
    output, log line or state file."""
    wrong = "wrong-key-9d3e1b77c0"
    with running_emulator(EmulatorOptions(port=0, api_keys=frozenset({"right"}))) as emulator:
        job = Job(tmp_path, emulator.url)
        job.write(SNAPSHOT_1)

        result = job.run(key=wrong)

    assert result.returncode == 1
    assert "rejected the API key" in result.stderr
    assert "AMBERFLO_API_KEY" in result.stderr
    assert wrong not in result.stdout + result.stderr
    for path in job.state.rglob("*"):
        if path.is_file():
            assert wrong.encode() not in path.read_bytes(), path
    assert job.last_run()["exit_code"] == 1
    (finished,) = events(result.stderr, "run_finished")
    assert (finished["exit_code"], finished["level"]) == (1, "error")
    assert "rejected the API key" in finished["error"]


def test_a_report_that_cannot_be_written_fails_the_run_and_records_it_once(
    job: Job, emulator: EmulatorHandle
) -> None:
    """When --report cannot be written after delivery, the run exits 1 naming the report, keeps
    what Amberflo acknowledged, and runs.jsonl holds one line for it, with its counts."""
    job.write(SNAPSHOT_1)
    blocked = job.root / "snapshot.csv" / "report.json"  # a folder that is a file

    result = job.run("--report", str(blocked))

    assert result.returncode == 1
    assert f"cannot write the report to {blocked}" in result.stderr
    (run,) = StateStore(job.state).runs()
    assert run["exit_code"] == 1
    assert (run["counts"]["to_send"], run["counts"]["delivered"]) == (4, 4)
    assert len(StateStore(job.state).load().users) == 4
    assert len(emulator.customers()) == 4
    assert len(events(result.stderr, "run_finished")) == 1


def test_a_real_run_without_a_key_is_a_usage_error(job: Job, emulator: EmulatorHandle) -> None:
    """Without AMBERFLO_API_KEY a real run exits 2, says which variable to set, sends nothing."""
    job.write(SNAPSHOT_1)

    result = job.run(key=None)

    assert result.returncode == 2
    assert "AMBERFLO_API_KEY is not set" in result.stderr
    assert emulator.stats()["requests_total"] == 0


def test_a_report_with_an_unknown_extension_is_refused_before_any_work(job: Job) -> None:
    """--report with an unsupported extension exits 2 naming the supported ones; no state
    folder is created."""
    job.write(SNAPSHOT_1)

    result = job.run("--report", str(job.root / "report.txt"))

    assert result.returncode == 2
    assert ".json, .md, .html" in result.stderr
    assert not job.state.exists()
