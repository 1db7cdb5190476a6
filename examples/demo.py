"""The README's quick start: the real job against the bundled emulator, no account needed.

Starts ``amberflo-sync emulator`` on a free port, then runs the CLI exactly as a user would:
an initial full sync of ``examples/engage/snapshot-1.csv``, a dry run of ``snapshot-2.csv``
with an HTML report, the real run of it, a run that finds nothing to send, the events path over
``examples/events/``, and ``history``. State and reports go to ``out/demo/``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "demo"
CLI = [sys.executable, "-m", "sync"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def step(title: str, *args: str, env: dict[str, str]) -> int:
    print(f"\n\033[1m== {title}\033[0m\n$ amberflo-sync {' '.join(args)}", flush=True)
    code = subprocess.run([*CLI, *args], env=env, cwd=ROOT, check=False).returncode  # noqa: S603
    print(f"(exit code {code})", flush=True)
    return code


def emulator_json(url: str, path: str) -> Any:
    with urllib.request.urlopen(f"{url}/_emulator/{path}", timeout=10) as response:  # noqa: S310
        return json.load(response)


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    emulator = subprocess.Popen(  # noqa: S603
        [*CLI, "--log-level", "warning", "emulator", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    if emulator.stdout is None:  # pragma: no cover - Popen with PIPE always has it
        raise RuntimeError("the emulator's output is not readable")
    print(emulator.stdout.readline().strip())  # "Amberflo emulator listening on ..."
    env = {
        **os.environ,
        # The emulator accepts any key; a real account's key goes here the same way.
        "AMBERFLO_API_KEY": "demo-key",
        "AMBERFLO_BASE_URL": url,
        "AMBERFLO_SYNC_STATE__DIR": str(OUT / "state"),
    }
    second = {**env, "AMBERFLO_SYNC_SOURCE__PATH": str(ROOT / "examples/engage/snapshot-2.csv")}
    codes = []
    try:
        codes.append(step("1. Initial full sync of snapshot-1", "run", env=env))
        codes.append(
            step(
                "2. Dry run of snapshot-2: what would change, as an HTML report",
                "run",
                "--dry-run",
                "--report",
                str(OUT / "report.html"),
                env=second,
            )
        )
        codes.append(step("3. Sync snapshot-2: only the changed users go", "run", env=second))
        codes.append(step("4. Same snapshot again: nothing to send", "run", env=second))
        codes.append(step("5. Forward Segment events", "events", "examples/events", env=env))
        step("6. Run history", "history", env=env)
        customers = emulator_json(url, "customers")
        stats = emulator_json(url, "stats")
        print(f"\n\033[1m== What the emulator holds now\033[0m ({len(customers)} customers)")
        for customer_id in sorted(customers)[:3]:
            customer = customers[customer_id]
            shown = ("customerId", "customerName", "traits")
            print(json.dumps({key: customer.get(key) for key in shown}))
        print(f"requests by route and status: {json.dumps(stats['requests'])}")
        print(f"meter records stored: {stats['records_unique']}")
        print(f"\nReport: {OUT / 'report.html'}   State: {OUT / 'state'}")
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)
    # Step 5's sample deliberately holds malformed events: exit 3 (dead-lettered) is expected.
    expected = [0, 0, 0, 0, 3]
    if codes != expected:
        print(f"unexpected exit codes {codes}, expected {expected}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
