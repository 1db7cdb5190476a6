"""A configured amberflo-sync job in a temporary folder, driven through the real command line,
and the hand-written Engage scenario the end-to-end tests share.

The scenario's users and the Amberflo traits each run must leave are written out by hand, so a
test states what a customer must look like, not what the code happens to compute.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pandas as pd

from sync.emulator import EmulatorHandle
from sync.state import StateStore

KEY = "e2e-key-5f2c9a71"
COLUMNS = ("user_id", "name", "email", "VIP Users", "Cart Abandoners", "plan", "orders_count")
# Run 1: u3 is a member of nothing and holds no trait, so it is never sent.
SNAPSHOT_1 = (
    ("u1", "Ann", "ann@example.com", "true", "false", "pro", "3"),
    ("u2", "Bob", "bob@example.com", "false", "true", "", "1"),
    ("u3", "Cy", "", "false", "false", "", ""),
    ("u4", "Di", "di@example.com", "true", "true", "basic", "10"),
    ("u5", "Ed", "", "false", "false", "free", ""),
)
# Run 2: u1 exits VIP and enters Cart Abandoners; u2 and u3 are unchanged; u4 vanished; u5's
# plan changed; u6 is new.
SNAPSHOT_2 = (
    ("u1", "Ann", "ann@example.com", "false", "true", "pro", "3"),
    ("u2", "Bob", "bob@example.com", "false", "true", "", "1"),
    ("u3", "Cy", "", "false", "false", "", ""),
    ("u5", "Ed", "", "false", "false", "enterprise", ""),
    ("u6", "Fay", "fay@example.com", "true", "false", "", ""),
)
# What Amberflo must hold after each run: (name, email, traits).
AFTER_1 = {
    "u1": ("Ann", "ann@example.com", {"vip_users": "true", "plan": "pro", "orders_count": "3"}),
    "u2": ("Bob", "bob@example.com", {"cart_abandoners": "true", "orders_count": "1"}),
    "u4": (
        "Di",
        "di@example.com",
        {"vip_users": "true", "cart_abandoners": "true", "plan": "basic", "orders_count": "10"},
    ),
    "u5": ("Ed", None, {"plan": "free"}),
}
AFTER_2 = {
    "u1": (
        "Ann",
        "ann@example.com",
        {"vip_users": "false", "cart_abandoners": "true", "plan": "pro", "orders_count": "3"},
    ),
    "u2": AFTER_1["u2"],
    "u4": ("Di", "di@example.com", {"vip_users": "false", "cart_abandoners": "false"}),
    "u5": ("Ed", None, {"plan": "enterprise"}),
    "u6": ("Fay", "fay@example.com", {"vip_users": "true"}),
}


class Job:
    """One configured amberflo-sync job in a folder, run through the real command line."""

    def __init__(self, root: Path, url: str, **settings: Any) -> None:
        self.root = root
        self.url = url
        self.snapshot = root / "snapshot.csv"
        self.state = root / "state"
        self.config = root / "sync.toml"
        sections: dict[str, dict[str, Any]] = {
            "source": {
                "path": "snapshot.csv",
                "name_column": "name",
                "email_column": "email",
                "audiences": ["VIP Users", "Cart Abandoners"],
                "traits": ["plan", "orders_count"],
            },
            "state": {"dir": "state", "checkpoint_every": 5},
            "amberflo": {"concurrency": 4, "max_attempts": 25, "retry_deadline_seconds": 60},
        }
        for name, values in settings.items():
            sections.setdefault(name, {}).update(values)
        self.config.write_text(_toml(sections))

    def write(self, rows: Sequence[Sequence[str]]) -> None:
        """Make ``rows`` the snapshot the next run reads."""
        with self.snapshot.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            writer.writerows(rows)

    def write_parquet(self, rows: Sequence[Sequence[str]]) -> Path:
        """Write ``rows`` as ``snapshot.parquet`` with typed columns, as a warehouse export has
        them: boolean audiences, a nullable integer ``orders_count``, nulls for empty cells."""
        columns = {name: [row[i] or None for row in rows] for i, name in enumerate(COLUMNS)}
        frame = pd.DataFrame(
            {
                **{name: pd.array(columns[name], dtype="string") for name in COLUMNS[:3]},
                **{
                    name: pd.array([v == "true" for v in columns[name]], dtype="boolean")
                    for name in COLUMNS[3:5]
                },
                "plan": pd.array(columns["plan"], dtype="string"),
                "orders_count": pd.array(
                    [None if v is None else int(v) for v in columns["orders_count"]], dtype="Int64"
                ),
            }
        )
        path = self.root / "snapshot.parquet"
        frame.to_parquet(path, index=False)
        return path

    def command(self, *args: str) -> list[str]:
        """The argv of ``amberflo-sync run`` with this job's config and ``args``."""
        return [sys.executable, "-m", "sync", "run", "--config", str(self.config), *args]

    def env(self, key: str | None = KEY) -> dict[str, str]:
        """A clean environment: the emulator's URL and, unless None, the API key."""
        env = {"PATH": os.environ["PATH"], "AMBERFLO_BASE_URL": self.url}
        if key is not None:
            env["AMBERFLO_API_KEY"] = key
        return env

    def run(self, *args: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
        """Run the job once (with API key ``key``; None: none) and wait for it."""
        return self.cli("run", "--config", str(self.config), *args, key=key)

    def cli(self, *args: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
        """Run ``amberflo-sync args`` in this job's folder and wait for it."""
        return subprocess.run(
            [sys.executable, "-m", "sync", *args],
            env=self.env(key),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def last_run(self) -> dict[str, Any]:
        """The newest line of ``runs.jsonl``."""
        runs = StateStore(self.state).runs()
        assert runs, "no run recorded"
        return runs[-1]


def _toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def held(emulator: EmulatorHandle) -> dict[str, tuple[str, str | None, dict[str, str]]]:
    """What the emulator holds per customer: name, email, traits."""
    return {
        customer_id: (c["customerName"], c.get("customerEmail"), c.get("traits", {}))
        for customer_id, c in emulator.customers().items()
    }


def looked_up(emulator: EmulatorHandle, since: int = 0) -> Counter[str]:
    """How often each customer was read (``GET ?customerId=``) since request number ``since``.

    In merge mode a small run (these tests send at most a few dozen users) starts every upsert
    with that read, so this counts upserts per customer. A run sending many more may list the
    customers once instead and create new ones without a read.
    """
    requests = emulator.requests()
    assert len(requests) < 1000, "the emulator's request log overflowed; use fewer requests"
    found: Counter[str] = Counter()
    for request in requests[since:]:
        query = parse_qs(urlsplit(request["path"]).query)
        if request["method"] == "GET" and "customerId" in query:
            found[query["customerId"][0]] += 1
    return found


def events(output: str, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of event ``name`` in a run's standard error."""
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == name]


def state_files(state: Path) -> dict[str, bytes]:
    """The committed state: the users table and the manifest, as bytes."""
    return {name: (state / name).read_bytes() for name in ("state.parquet", "manifest.json")}
