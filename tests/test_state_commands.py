"""``state adopt|show|reset|info``: the real CLI in subprocesses for the acceptance paths, the
functions in-process for the finer points; real snapshot and state files, the emulator on a
real socket.

The expected set of users a run must send is worked out here from the two bundled CSV files
with the csv module alone (rows that differ, among users holding a value), not by the diff.
"""

from __future__ import annotations

import csv
import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from sync.config import Settings, load_settings
from sync.emulator import EmulatorHandle
from sync.errors import FatalError, MassExitError, StateError, UsageError
from sync.pipeline import RunOptions, adopt_state, run_sync
from sync.state import StateStore
from sync.state_commands import show_user, state_info

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "engage"
KEY = "state-commands-key-7d1e"
AUDIENCES = ("Order Completed Last 30 Days", "VIP Users", "Cart Abandoners", "High Intent Browsers")
TRAITS = ("total_revenue_180_days", "orders_count")


def valid_rows(path: Path) -> dict[str, dict[str, str]]:
    """The snapshot's users by id, leaving out rows without an id and ids with differing rows."""
    rows: dict[str, list[dict[str, str]]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["user_id"]:
                rows.setdefault(row["user_id"], []).append(row)
    return {key: found[0] for key, found in rows.items() if all(r == found[0] for r in found)}


def holds_value(row: dict[str, str] | None) -> bool:
    """A member of some audience or holder of some trait."""
    if row is None:
        return False
    return any(row[a] == "true" for a in AUDIENCES) or any(row[t] for t in TRAITS)


def users_to_send(before: Path, after: Path) -> set[str]:
    """Users whose record differs between two snapshots, among those who hold or held a value."""
    old, new = valid_rows(before), valid_rows(after)
    return {
        user
        for user in old.keys() | new.keys()
        if old.get(user) != new.get(user)
        and (holds_value(old.get(user)) or holds_value(new.get(user)))
    }


class Job:
    """A config, a snapshot file and a state folder in ``tmp_path``, run through the real CLI."""

    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        self.url = url
        self.snapshot = root / "snapshot.csv"
        self.state = root / "state"
        self.config = root / "sync.toml"
        self.config.write_text(
            '[source]\npath = "snapshot.csv"\nname_column = "name"\nemail_column = "email"\n'
            '[state]\ndir = "state"\n'
            "[amberflo]\nconcurrency = 2\nmax_attempts = 3\nretry_deadline_seconds = 5\n"
        )

    def use(self, name: str) -> None:
        """Make the bundled ``examples/engage/<name>`` the snapshot."""
        shutil.copyfile(EXAMPLES / name, self.snapshot)

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ["PATH"], "AMBERFLO_BASE_URL": self.url, "AMBERFLO_API_KEY": KEY}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``amberflo-sync <args> --config <this job's>``, no terminal on standard input."""
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "sync",
                "--log-format",
                "json",
                *args,
                "--config",
                str(self.config),
            ],
            env=self.env(),
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def settings(self) -> Settings:
        return load_settings(self.config, overrides={"api_key": KEY, "base_url": self.url})

    def runs(self) -> list[dict[str, Any]]:
        return StateStore(self.state).runs()


@pytest.fixture
def job(tmp_path: Path, emulator: EmulatorHandle) -> Job:
    return Job(tmp_path, emulator.url)


def console() -> Console:
    return Console(record=True, width=120, color_system=None)


def sent_to(emulator: EmulatorHandle) -> set[str]:
    """Customer ids Amberflo received a write for (the emulator started empty)."""
    return set(emulator.customers())


# -- adopt -----------------------------------------------------------------------------------


def test_adopt_then_run_sends_nothing_and_a_changed_snapshot_sends_exactly_the_changes(
    job: Job, emulator: EmulatorHandle
) -> None:
    """After adopting snapshot 1, a run of it sends nothing and a run of snapshot 2 sends
    exactly the users that differ; state show of one then matches what Amberflo holds."""
    job.use("snapshot-1.csv")

    adopted = job.cli("state", "adopt", "--yes")

    assert adopted.returncode == 0, adopted.stderr
    assert "Will record 37 users" in adopted.stdout
    assert emulator.requests() == []
    same = job.cli("run")
    assert same.returncode == 0, same.stderr
    assert emulator.requests() == []
    assert job.runs()[-1]["counts"]["to_send"] == 0

    job.use("snapshot-2.csv")
    changed = job.cli("run")

    assert changed.returncode == 0, changed.stderr
    expected = users_to_send(EXAMPLES / "snapshot-1.csv", EXAMPLES / "snapshot-2.csv")
    assert sent_to(emulator) == expected
    run = job.runs()[-1]
    assert run["counts"]["delivered"] == len(expected)

    shown = job.cli("state", "show", "usr_1007", "--json")

    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    customer = emulator.customers()["usr_1007"]
    assert record["keys"] == customer["traits"]
    assert (record["name"], record["email"]) == (
        customer["customerName"],
        customer["customerEmail"],
    )
    assert record["last_run"] == run["run_id"]


def snake(name: str) -> str:
    """The key of one of the bundled snapshots' audience or trait names."""
    return name.lower().replace(" ", "_")


def test_adopt_over_an_empty_state_records_exactly_the_snapshots_rows(job: Job) -> None:
    """Every valid user holding a value is recorded with the snapshot's values, name and
    email and the adopt as its last run; users without a value and invalid rows are not."""
    job.use("snapshot-1.csv")

    assert adopt_state(job.settings(), yes=True, verify=0, console=console()) == 0

    adopt_id = job.runs()[-1]["run_id"]
    store = StateStore(job.state)
    rows = valid_rows(EXAMPLES / "snapshot-1.csv")
    holders = {user for user, row in rows.items() if holds_value(row)}
    assert store.info().users == len(holders) == job.runs()[-1]["counts"]["adopted"]
    for user, row in rows.items():
        shown = store.show(user)
        if user not in holders:
            assert shown is None
            continue
        assert shown is not None
        expected = {snake(a): "true" for a in AUDIENCES if row[a] == "true"}
        expected |= {t: row[t] for t in TRAITS if row[t]}
        assert (shown["keys"], shown["name"], shown["email"]) == (
            expected,
            row["name"] or None,
            row["email"] or None,
        )
        assert shown["last_run"] == adopt_id


def test_adopt_without_a_terminal_or_yes_refuses_and_records_nothing(job: Job) -> None:
    """No --yes and no terminal to ask on: exit 2 with a message naming --yes; no state."""
    job.use("snapshot-1.csv")

    result = job.cli("state", "adopt")

    assert result.returncode == 2
    assert "--yes" in result.stderr
    assert not (job.state / "manifest.json").exists()


@pytest.mark.parametrize(("answer", "code", "recorded"), [("y", 0, True), ("n", 2, False)])
def test_adopt_at_a_terminal_asks_first(job: Job, answer: str, code: int, recorded: bool) -> None:
    """At a terminal adopt shows what it will record and asks: y records, n records nothing."""
    job.use("snapshot-1.csv")
    leader, follower = pty.openpty()
    os.write(leader, f"{answer}\n".encode())
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sync", "state", "adopt", "--config", str(job.config)],
            env=job.env(),
            cwd=job.root,
            stdin=follower,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(follower)
        os.close(leader)

    assert result.returncode == code, result.stderr
    assert "Will record 37 users" in result.stdout
    assert "Record it? [y/N]" in result.stdout
    assert StateStore(job.state).exists() is recorded


def test_adopt_verify_refuses_when_amberflo_differs_and_shows_the_differences(
    job: Job, emulator: EmulatorHandle
) -> None:
    """--verify compares sampled users with Amberflo: after a sync of snapshot 1, adopting
    snapshot 2 over a fresh state is refused with the differing keys listed; snapshot 1 is
    accepted."""
    job.use("snapshot-1.csv")
    run_sync(job.settings(), RunOptions(), console=console())
    shutil.rmtree(job.state)
    job.use("snapshot-2.csv")
    out = console()

    code = adopt_state(job.settings(), yes=True, verify=1000, console=out)

    text = out.export_text()
    assert code == 1
    assert (
        "usr_1007: total_revenue_180_days is '186.68' in Amberflo, '352.09' in the snapshot" in text
    )
    assert "usr_2000: not a customer in Amberflo" in text  # new in snapshot 2
    assert "Refusing to adopt" in text
    assert not StateStore(job.state).exists()

    job.use("snapshot-1.csv")
    out = console()
    assert adopt_state(job.settings(), yes=True, verify=1000, console=out) == 0
    assert "they match" in out.export_text()
    assert len(StateStore(job.state).load().users) == 37


def test_adopt_refuses_a_snapshot_that_would_exit_most_users(job: Job) -> None:
    """An adopt that would record more exits than safety.max_exit_fraction allows is refused."""
    job.use("snapshot-1.csv")
    assert adopt_state(job.settings(), yes=True, verify=0, console=console()) == 0
    # Snapshot 1 cut after its first users, as a truncated export would be.
    lines = (EXAMPLES / "snapshot-1.csv").read_text().splitlines()
    job.snapshot.write_text("\n".join(lines[:4]) + "\n")

    with pytest.raises(MassExitError, match="max_exit_fraction"):
        adopt_state(job.settings(), yes=True, verify=0, console=console())
    assert len(StateStore(job.state).load().users) == 37


def test_adopt_refuses_without_yes_when_stdin_is_not_a_terminal(job: Job) -> None:
    """Called in-process (pytest's standard input is no terminal), adopt refuses before it
    touches the state folder."""
    job.use("snapshot-1.csv")
    with pytest.raises(UsageError, match="--yes"):
        adopt_state(job.settings(), yes=False, verify=0, console=console())
    assert not job.state.exists()


# -- show and info ---------------------------------------------------------------------------


def test_show_names_the_run_that_last_delivered_each_user(
    job: Job, emulator: EmulatorHandle
) -> None:
    """After adopt then a run, a user the run sent shows the run; an untouched one the adopt."""
    job.use("snapshot-1.csv")
    adopt_state(job.settings(), yes=True, verify=0, console=console())
    adopt_id = job.runs()[-1]["run_id"]
    job.use("snapshot-2.csv")
    run_id = run_sync(job.settings(), RunOptions(), console=console()).run_id
    store = StateStore(job.state)

    changed, untouched = store.show("usr_1007"), store.show("usr_1042")

    assert changed is not None
    assert untouched is not None
    assert (changed["last_run"], untouched["last_run"]) == (run_id, adopt_id)
    assert changed["keys"] == emulator.customers()["usr_1007"]["traits"]
    out = console()
    assert show_user(job.settings(), "usr_1007", as_json=False, console=out) == 0
    text = out.export_text()
    for line in ("customer  usr_1007", "name      Ben Smith", f"last run  {run_id}"):
        assert line in text
    assert "order_completed_last_30_days = true" in text


def test_show_of_an_unknown_user_fails_naming_it(job: Job) -> None:
    """A user the state does not hold is a fatal error (exit 1) naming the id."""
    job.use("snapshot-1.csv")
    adopt_state(job.settings(), yes=True, verify=0, console=console())

    with pytest.raises(FatalError, match="'usr_nobody' is not in the state") as raised:
        show_user(job.settings(), "usr_nobody", as_json=False, console=console())
    assert raised.value.exit_code == 1


def test_info_reports_version_users_keys_last_run_and_size(job: Job) -> None:
    """info in text and JSON: format version, user count, managed keys, last run, bytes."""
    job.use("snapshot-1.csv")
    adopt_state(job.settings(), yes=True, verify=0, console=console())
    run_id = job.runs()[-1]["run_id"]
    out = console()

    assert state_info(job.settings(), as_json=True, console=out) == 0

    info = json.loads(out.export_text())
    assert info["format_version"] == 1
    assert info["users"] == 37
    assert info["audience_keys"] == [
        "order_completed_last_30_days",
        "vip_users",
        "cart_abandoners",
        "high_intent_browsers",
    ]
    assert info["trait_keys"] == list(TRAITS)
    assert info["last_run"] == run_id
    assert info["bytes_on_disk"] >= (job.state / "state.parquet").stat().st_size > 0
    out = console()
    state_info(job.settings(), as_json=False, console=out)
    assert "users           37" in out.export_text()


# -- damaged state ---------------------------------------------------------------------------


def test_a_truncated_state_is_refused_clearly_and_reset_recovers(
    job: Job, emulator: EmulatorHandle
) -> None:
    """A state.parquet cut in half: run exits 1 naming the file and `state reset`; reset keeps
    a backup and the next run is an initial full sync."""
    job.use("snapshot-1.csv")
    run_sync(job.settings(), RunOptions(), console=console())
    table = job.state / "state.parquet"
    data = table.read_bytes()
    table.write_bytes(data[: len(data) // 2])

    refused = job.cli("run")

    assert refused.returncode == 1
    assert str(table) in refused.stderr
    assert "amberflo-sync state reset" in refused.stderr
    with pytest.raises(StateError, match="state reset"):
        state_info(job.settings(), as_json=False, console=console())

    reset = job.cli("state", "reset", "--yes")

    assert reset.returncode == 0, reset.stderr
    (backup,) = (job.state / "backups").iterdir()
    assert (backup / "state.parquet").read_bytes() == data[: len(data) // 2]
    emulator.reset()
    rerun = run_sync(job.settings(), RunOptions(), console=console())
    assert rerun.exit_code == 0
    assert rerun.diff is not None
    assert rerun.diff.summary.added == rerun.diff.summary.to_send == 37
    assert len(emulator.customers()) == 37


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_damaged_state_is_named_even_when_the_snapshot_is_gone_too(
    job: Job, dry_run: bool
) -> None:
    """The state loads while the snapshot is read; when both fail, the state's error is the
    one reported (exit 1, naming the file and the way out), as when it was loaded first."""
    job.use("snapshot-1.csv")
    run_sync(job.settings(), RunOptions(), console=console())
    table = job.state / "state.parquet"
    table.write_bytes(table.read_bytes()[:100])
    job.snapshot.unlink()

    refused = job.cli("run", *(["--dry-run"] if dry_run else []))

    assert refused.returncode == 1
    assert str(table) in refused.stderr
    assert "amberflo-sync state reset" in refused.stderr


def test_an_unknown_format_version_names_the_manifest_and_the_way_out(job: Job) -> None:
    """A manifest from a newer version: show and info refuse, naming the file and reset."""
    job.use("snapshot-1.csv")
    adopt_state(job.settings(), yes=True, verify=0, console=console())
    manifest = job.state / "manifest.json"
    body = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**body, "format_version": 99}))

    for command in (
        lambda: show_user(job.settings(), "usr_1007", as_json=True, console=console()),
        lambda: state_info(job.settings(), as_json=True, console=console()),
    ):
        with pytest.raises(StateError) as raised:
            command()
        assert str(manifest) in str(raised.value)
        assert "newer amberflo-sync" in str(raised.value)
        assert "state reset" in str(raised.value)
