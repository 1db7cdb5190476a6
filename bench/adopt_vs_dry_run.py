"""``state adopt`` against ``run --dry-run`` on the same 1M-user snapshot, as real subprocesses.

Adopt reads what a dry run reads and sends nothing; instead of a report it writes the new
state. Two situations:

- *first*: snapshot A over an empty state (adopting an account an earlier tool kept in sync).
  Adopt builds the state straight from the snapshot (no diff), then commits it.
- *over state*: snapshot B over the committed state of A (adopting again after a change).
  Adopt loads the state and diffs as a dry run does, folds the changed users in, and commits
  the whole table: a million rows written, where the dry run writes nothing.

Snapshots come from ``_data.py`` (the scale benchmark's realistic wide Parquet files, written
under ``bench/data/<users>/`` if missing). Each command runs ``--repeat`` times, alternating, in
a fresh process with a fresh copy of the state folder (copying is not timed); the median wall
time, CPU time and peak RSS (``os.wait4``) are printed.

    .venv/bin/python bench/adopt_vs_dry_run.py [--users 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _data import AUDIENCES, EMAIL_COLUMN, ID_COLUMN, TRAITS, write_snapshots

HERE = Path(__file__).resolve().parent
COMMANDS = {
    "dry run": ["run", "--dry-run"],
    "adopt": ["state", "adopt", "--yes"],
}


@dataclass(frozen=True)
class Sample:
    seconds: float
    cpu_seconds: float
    peak_mib: float


def _config(snapshot: Path, state: Path) -> str:
    return (
        "[source]\n"
        f"path = {json.dumps(str(snapshot))}\n"
        f"id_column = {json.dumps(ID_COLUMN)}\n"
        f"email_column = {json.dumps(EMAIL_COLUMN)}\n"
        f"audiences = {json.dumps(list(AUDIENCES))}\n"
        f"traits = {json.dumps(list(TRAITS))}\n"
        "[state]\n"
        f"dir = {json.dumps(str(state))}\n"
    )


def _run(args: list[str], config: Path) -> Sample:
    command = [
        sys.executable,
        "-m",
        "sync",
        "--log-level",
        "warning",
        *args,
        "--config",
        str(config),
    ]
    env = {"PATH": os.environ["PATH"]}  # no API key: neither command needs one
    with tempfile.TemporaryFile() as output:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=output, stderr=output, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            output.seek(0)
            raise SystemExit(f"{' '.join(args)} failed:\n{output.read().decode()[-2000:]}")
    return Sample(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def _measure(
    name: str, snapshot: Path, base_state: Path | None, work: Path, repeat: int
) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {label: [] for label in COMMANDS}
    for round_number in range(repeat):
        # Dry run first in odd rounds, adopt first in even ones: on this VM the second of two
        # runs in a row was up to 8% faster, the same command both times.
        order = list(COMMANDS.items())
        for label, args in order if round_number % 2 == 0 else order[::-1]:
            state = work / "state"
            shutil.rmtree(state, ignore_errors=True)
            if base_state is not None:
                shutil.copytree(base_state, state)
            config = work / "sync.toml"
            config.write_text(_config(snapshot, state))
            sample = _run(args, config)
            samples[label].append(sample)
            print(
                f"  {name}, round {round_number + 1}: {label:>8} {sample.seconds:6.2f} s wall "
                f"{sample.cpu_seconds:6.2f} s cpu {sample.peak_mib:6.0f} MiB",
                flush=True,
            )
    return samples


def _summary(name: str, samples: dict[str, list[Sample]]) -> None:
    median = {
        label: Sample(
            statistics.median(s.seconds for s in runs),
            statistics.median(s.cpu_seconds for s in runs),
            statistics.median(s.peak_mib for s in runs),
        )
        for label, runs in samples.items()
    }
    dry, adopt = median["dry run"], median["adopt"]
    print(
        f"{name}: dry run {dry.seconds:.2f} s ({dry.peak_mib:.0f} MiB), adopt "
        f"{adopt.seconds:.2f} s ({adopt.peak_mib:.0f} MiB): adopt/dry run = "
        f"{adopt.seconds / dry.seconds:.2f}x wall, {adopt.cpu_seconds / dry.cpu_seconds:.2f}x cpu"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    data = HERE / "data" / str(args.users)
    first, second = data / "snapshot-a.parquet", data / "snapshot-b.parquet"
    if not (first.is_file() and second.is_file()):
        print(f"writing snapshots of {args.users} users under {data}", flush=True)
        write_snapshots(data, args.users)
    with tempfile.TemporaryDirectory(prefix="adopt-bench-") as scratch:
        work = Path(scratch)
        first_run = _measure("first", first, None, work, args.repeat)
        # The committed state of A, as an adopt leaves it, is the base of the second situation.
        base = work / "base-state"
        config = work / "base.toml"
        config.write_text(_config(first, base))
        _run(COMMANDS["adopt"], config)
        over_state = _measure("over state", second, base, work, args.repeat)
    _summary("first (A over an empty state)", first_run)
    _summary("over state (B over the state of A)", over_state)


if __name__ == "__main__":
    main()
