"""``amberflo-sync schedule``: the real command in a subprocess over real files and the emulator
(cycles with snapshot changes in between, SIGTERM during a send, a failing spell and its
alerts), plus the schedule arithmetic and the events drop folder in-process."""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from sync.config import load_settings
from sync.emulator import EmulatorHandle
from sync.errors import UsageError
from sync.schedule import Schedule, run_schedule
from sync.state import StateStore

KEY = "schedule-key-41c0"
COLUMNS = ("user_id", "name", "email", "VIP Users", "plan")
HOOK = """{ cat; printf '\\n'; } >> "$1"\n"""

Row = tuple[str, str, str, str, str]


def rows(prefix: str, count: int, plan: str = "pro") -> list[Row]:
    return [(f"{prefix}{n:03d}", f"{prefix.upper()} {n}", "", "true", plan) for n in range(count)]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Job:
    """A scheduled job in ``tmp_path``: config, snapshot, state, alert hook, log files."""

    def __init__(self, root: Path, url: str, *, max_attempts: int = 3) -> None:
        self.root = root
        self.url = url
        self.snapshot = root / "snapshot.csv"
        self.state = root / "state"
        self.config = root / "sync.toml"
        self.alerts = root / "alerts.jsonl"
        (root / "hook.sh").write_text(HOOK)
        self.config.write_text(
            '[source]\npath = "snapshot.csv"\nname_column = "name"\nemail_column = "email"\n'
            'audiences = ["VIP Users"]\ntraits = ["plan"]\n'
            '[state]\ndir = "state"\ncheckpoint_every = 5\n'
            f"[amberflo]\nconcurrency = 2\nmax_attempts = {max_attempts}\n"
            "retry_deadline_seconds = 5\n"
            f'[alerts]\ncommand = "sh {root / "hook.sh"} {self.alerts}"\n'
        )

    def write(self, snapshot: Sequence[Row]) -> None:
        """Replace the snapshot atomically, so a cycle never reads half a file."""
        temp = self.snapshot.with_suffix(".tmp")
        with temp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            writer.writerows(snapshot)
        temp.replace(self.snapshot)

    def argv(self, *args: str) -> list[str]:
        return [
            sys.executable, "-m", "sync", "--log-format", "json",
            "schedule", "--config", str(self.config), *args,
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ["PATH"], "AMBERFLO_BASE_URL": self.url, "AMBERFLO_API_KEY": KEY}

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        """Start the schedule in the background; its logs go to ``schedule.log``."""
        with (self.root / "schedule.log").open("ab") as log:
            return subprocess.Popen(
                self.argv(*args), env=self.env(), cwd=self.root, stdout=log, stderr=log
            )

    def runs(self) -> list[dict[str, Any]]:
        return StateStore(self.state).runs()

    def log_events(self) -> list[dict[str, Any]]:
        lines = (self.root / "schedule.log").read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def alert_kinds(self) -> list[str]:
        if not self.alerts.exists():
            return []
        return [json.loads(line)["alert"] for line in self.alerts.read_text().splitlines() if line]


def held(emulator: EmulatorHandle) -> dict[str, dict[str, str]]:
    return {cid: dict(c.get("traits") or {}) for cid, c in emulator.customers().items()}


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


def assert_no_overlap(runs: list[dict[str, Any]]) -> None:
    spans = sorted(
        (dt.datetime.fromisoformat(r["started_at"]), dt.datetime.fromisoformat(r["finished_at"]))
        for r in runs
    )
    for (_, finished), (started, _) in itertools.pairwise(spans):
        assert finished <= started


def test_cycles_follow_the_snapshot_and_sigterm_mid_send_commits_and_the_next_start_resumes(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    """Over several cycles each snapshot change reaches Amberflo; SIGTERM during a slow send
    ends the loop with exit 0 after committing what was acknowledged and recording the run as
    interrupted; runs never overlap nor meet a held lock; the next start sends only the rest.
    The change-volume alert fires once, for the cycle that changed every known user."""
    job = Job(tmp_path, emulator.url)
    job.write(rows("a", 5))
    process = job.start("--every", "1s")
    try:
        wait_for(lambda: len(emulator.customers()) == 5, "the first cycle")
        changed = [*rows("a", 4, plan="max"), *rows("b", 1)]  # a004 exits, b000 enters
        job.write(changed)
        wait_for(
            lambda: (
                held(emulator).get("a004") == {"vip_users": "false"}
                and held(emulator).get("a000", {}).get("plan") == "max"
                and "b000" in held(emulator)
            ),
            "the change to reach Amberflo",
        )
        emulator.set_faults(latency_ms=40)
        job.write([*changed, *rows("k", 120)])
        wait_for(
            lambda: sum(cid.startswith("k") for cid in emulator.customers()) >= 10,
            "the slow send to start",
        )
        assert process.poll() is None
    finally:
        code = stop(process)

    assert code == 0
    runs = job.runs()
    interrupted = runs[-1]
    assert (interrupted["interrupted"], interrupted["exit_code"]) == (True, 3)
    assert 10 <= interrupted["counts"]["delivered"] < 120
    assert len(runs) >= 3
    assert_no_overlap(runs)
    events = [entry["event"] for entry in job.log_events()]
    assert "stop_requested" in events
    assert "scheduled_run_skipped" not in events  # the lock was never contended
    state = StateStore(job.state).load().users
    acknowledged = {cid for cid in state.index if cid.startswith("k")}
    assert len(acknowledged) == interrupted["counts"]["delivered"]
    assert all(held(emulator)[cid] == {"vip_users": "true", "plan": "pro"} for cid in acknowledged)

    emulator.set_faults(latency_ms=0)
    resumed = subprocess.run(
        job.argv("--every", "1s", "--max-runs", "1"),
        env=job.env(),
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
        check=False,
    )

    assert resumed.returncode == 0, resumed.stderr
    assert job.runs()[-1]["counts"]["to_send"] == 120 - len(acknowledged)
    assert {cid for cid in emulator.customers() if cid.startswith("k")} == {
        r[0] for r in rows("k", 120)
    }
    # Snapshot B changed or exited all five known users: past max_change_fraction, once.
    assert job.alert_kinds() == ["changes_high"]


def test_a_failing_spell_is_recorded_the_loop_goes_on_and_alerts_fire_once_each_way(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    """While Amberflo answers 500 to everything, each cycle is recorded with its failures and
    the loop goes on; the alert hook hears 'failing' once and, after recovery, 'recovered' once."""
    job = Job(tmp_path, emulator.url, max_attempts=1)
    job.write(rows("a", 3))
    emulator.set_faults(fail_all=True)
    process = job.start("--every", "1s")
    try:
        wait_for(lambda: len(job.runs()) >= 2, "two failing cycles")
        emulator.set_faults(fail_all=False)
        wait_for(lambda: len(emulator.customers()) == 3, "recovery")
        recovered_at = len(job.runs())
        wait_for(lambda: len(job.runs()) >= recovered_at + 1, "a cycle after recovery")
    finally:
        code = stop(process)

    assert code == 0
    runs = job.runs()
    failing = [r for r in runs if r["counts"]["failed"] == 3]
    assert len(failing) >= 2
    for run in failing:
        assert run["exit_code"] == 3
        lines = Path(run["failure_file"]).read_text().splitlines()
        assert sorted(json.loads(line)["customerId"] for line in lines) == ["a000", "a001", "a002"]
    assert runs[-1]["exit_code"] == 0
    assert job.alert_kinds() == ["failing", "recovered"]


# -- in-process -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("every", "seconds"), [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("1.5h", 5400)]
)
def test_every_accepts_a_number_and_a_unit(every: str, seconds: float) -> None:
    """--every takes s, m, h or d; the next start is one interval after the previous one."""
    schedule = Schedule.parse(every=every, cron=None)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    assert schedule.first_start(start) == start
    assert schedule.next_after(start) == start + dt.timedelta(seconds=seconds)


def test_cron_starts_at_the_expressions_times() -> None:
    """--cron "0 */2 * * *" starts on even hours, strictly after the given moment."""
    schedule = Schedule.parse(every=None, cron="0 */2 * * *")
    moment = dt.datetime(2026, 1, 1, 3, 15, tzinfo=dt.UTC)

    assert schedule.first_start(moment) == dt.datetime(2026, 1, 1, 4, 0, tzinfo=dt.UTC)
    assert schedule.next_after(dt.datetime(2026, 1, 1, 4, 0, tzinfo=dt.UTC)) == dt.datetime(
        2026, 1, 1, 6, 0, tzinfo=dt.UTC
    )


@pytest.mark.parametrize(("every", "cron"), [("0s", None), ("2 hours", None), (None, "61 * * * *")])
def test_a_bad_interval_or_expression_is_a_usage_error(every: str | None, cron: str | None) -> None:
    """A zero or unparseable interval and an invalid cron expression are exit-2 errors."""
    with pytest.raises(UsageError):
        Schedule.parse(every=every, cron=cron)


def test_a_configuration_with_nothing_to_run_is_refused(tmp_path: Path) -> None:
    """Neither [source] nor [events] path: the schedule stops before its first cycle."""
    config = tmp_path / "sync.toml"
    config.write_text('[state]\ndir = "state"\n')
    settings = load_settings(config, require_api_key=False)

    with pytest.raises(UsageError, match="nothing to run"):
        run_schedule(settings, Schedule.parse(every="1s", cron=None), console=Console())


def test_a_cycle_forwards_the_events_drop_folder_and_moves_the_files(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    """With [events] path and no [source], a cycle sends the folder's events as meter records
    and moves each file to processed/<run_id>/, so the next cycle does not send it again."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    event = {
        "type": "track",
        "event": "Report Exported",
        "userId": "u1",
        "messageId": "m-1",
        "timestamp": "2026-01-01T00:00:00Z",
        "properties": {"value": 2},
    }
    (inbox / "batch-1.ndjson").write_text(json.dumps(event) + "\n")
    config = tmp_path / "sync.toml"
    config.write_text('[state]\ndir = "state"\n[events]\npath = "inbox"\n')
    settings = load_settings(config, overrides={"api_key": KEY, "base_url": emulator.url})

    code = run_schedule(
        settings, Schedule.parse(every="1s", cron=None), console=Console(), max_runs=1
    )

    assert code == 0
    (run,) = StateStore(tmp_path / "state").runs()
    assert (run["kind"], run["exit_code"]) == ("events", 0)
    assert [(r["meterApiName"], r["customerId"], r["meterValue"]) for r in emulator.ingested()] == [
        ("Report Exported", "u1", 2)
    ]
    assert not (inbox / "batch-1.ndjson").exists()
    assert (inbox / "processed" / run["run_id"] / "batch-1.ndjson").is_file()
