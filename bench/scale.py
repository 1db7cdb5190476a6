"""How the Engage diff scales: wall time and peak memory of ours against DuckDB and polars.

    .venv/bin/python bench/scale.py generate --users 1000000
    .venv/bin/python bench/scale.py measure --users 1000000 [--repeat 3]
    .venv/bin/python bench/scale.py measure --users 100000 1000000 10000000   # growth table

``generate`` writes, under ``bench/data/<users>/``: snapshot A and B (see ``_data.py``), the
committed state of A as a first run leaves it (read A, diff it against the empty state,
acknowledge every user, commit: the code path of ``state adopt``), and a ``sync.toml`` that
points a run at B and that state.

``measure`` runs each method (see ``_methods.py``) in a fresh process, ``--repeat`` times,
round robin so a noisy neighbour hurts every method alike, and takes the median wall time and
peak RSS (``os.wait4``'s ``ru_maxrss`` of that one child). It prints a table with the ratios of
ours to the others and writes it as JSON under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _data import AUDIENCES, EMAIL_COLUMN, ID_COLUMN, TRAITS, Snapshots, write_snapshots
from _methods import ours_command, ours_counts

from sync.config import load_settings
from sync.diff import KnownState, apply_acknowledged, diff
from sync.snapshot import read_snapshot
from sync.state import StateStore, StoredState

HERE = Path(__file__).resolve().parent

DATA = HERE / "data"
RESULTS = HERE / "results"
METHODS = ("ours", "stages", "floor", "duckdb", "polars")
RUN_ID = "20260101T000000Z-000000"


def _directory(users: int) -> Path:
    return DATA / str(users)


# -- generate --------------------------------------------------------------------------------


def _config(directory: Path, snapshot: Path) -> str:
    def toml_list(names: Sequence[str]) -> str:
        return "[" + ", ".join(json.dumps(name) for name in names) + "]"

    return (
        "[source]\n"
        f"path = {json.dumps(snapshot.name)}\n"
        'layout = "wide"\n'
        f"id_column = {json.dumps(ID_COLUMN)}\n"
        f"email_column = {json.dumps(EMAIL_COLUMN)}\n"
        f"audiences = {toml_list(list(AUDIENCES))}\n"
        f"traits = {toml_list(TRAITS)}\n"
        "[state]\n"
        'dir = "state"\n'
    )


def generate(users: int, *, state_only: bool = False) -> None:
    """Snapshots, the state of A and the run's config for ``users`` users; with
    ``state_only``, the state and config again over the snapshots already there (after a
    change to the state's format)."""
    directory = _directory(users)
    started = time.perf_counter()
    if state_only:
        paths = Snapshots(directory / "snapshot-a.parquet", directory / "snapshot-b.parquet")
    else:
        paths = write_snapshots(directory, users)
        print(f"snapshots written in {time.perf_counter() - started:.1f} s", flush=True)
    config = directory / "sync.toml"
    # The state is A as acknowledged: read with B's settings, so keys and columns match.
    config.write_text(_config(directory, paths.first))
    settings = load_settings(config, require_api_key=False)
    assert settings.source is not None
    snapshot = read_snapshot(settings.source, settings.keys)
    empty = KnownState.empty()
    result = diff(snapshot, empty, samples=0)
    state = apply_acknowledged(empty, result, result.desired.index)
    store = StateStore(settings.state.dir)
    store.reset()
    store.commit(
        StoredState(state.users, state.audience_keys, state.trait_keys, last_run=RUN_ID), RUN_ID
    )
    config.write_text(_config(directory, paths.second))
    print(f"{directory}: ready in {time.perf_counter() - started:.1f} s")


# -- measure ---------------------------------------------------------------------------------


@dataclass
class Sample:
    """One run of one method."""

    seconds: float
    cpu_seconds: float
    peak_mib: float
    result: dict[str, Any]


def _run_once(method: str, directory: Path) -> Sample:
    if method == "ours":
        command = ours_command(directory)
    else:
        command = [sys.executable, str(HERE / "_methods.py"), method, str(directory)]
    with tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors)
        assert child.stdout is not None
        output = child.stdout.read()
        # wait4 reports this one child's peak RSS; RUSAGE_CHILDREN would mix every child's.
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            errors.seek(0)
            tail = errors.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"{method} failed with exit code {child.returncode}:\n{tail}")
    # The last line: a method's own log lines may come before it.
    result = ours_counts(directory) if method == "ours" else json.loads(output.splitlines()[-1])
    return Sample(
        seconds=seconds,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_mib=usage.ru_maxrss / 1024,  # kilobytes on Linux
        result=result,
    )


def _warm(directory: Path) -> None:
    """Read every input once, so the first method timed does not pay for a cold page cache."""
    for path in sorted(directory.rglob("*.parquet")):
        with path.open("rb") as handle:
            while handle.read(1 << 24):
                pass


def measure(users: int, repeat: int, methods: Sequence[str]) -> dict[str, Any]:
    """Median wall time, CPU time and peak RSS of each method over ``repeat`` rounds."""
    directory = _directory(users)
    if not (directory / "sync.toml").is_file():
        raise SystemExit(f"no data: run `bench/scale.py generate --users {users}` first")
    _warm(directory)
    samples: dict[str, list[Sample]] = {method: [] for method in methods}
    for round_number in range(repeat):
        # Each round starts one method later: on this VM the slot a run takes in a round
        # moved its time by up to 8% (the same command, run twice in a row, was faster second).
        shift = round_number % len(methods)
        for method in [*methods[shift:], *methods[:shift]]:
            sample = _run_once(method, directory)
            samples[method].append(sample)
            print(
                f"  round {round_number + 1}: {method:>7} {sample.seconds:7.2f} s "
                f"{sample.peak_mib:8.0f} MiB  {sample.result}",
                flush=True,
            )
    summary = {
        method: {
            "seconds": statistics.median(s.seconds for s in runs),
            "cpu_seconds": statistics.median(s.cpu_seconds for s in runs),
            "peak_mib": statistics.median(s.peak_mib for s in runs),
            "result": runs[-1].result,
            "runs": [asdict(s) for s in runs],
        }
        for method, runs in samples.items()
    }
    return {
        "users": users,
        "repeat": repeat,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "methods": summary,
    }


def _ratio(mine: float, theirs: float) -> str:
    return f"{mine / theirs:.2f}x" if theirs else "-"


def table(measured: dict[str, Any]) -> str:
    """A Markdown table of one size: medians, and ours as a multiple of each other method."""
    methods = measured["methods"]
    lines = [
        f"{measured['users']:,} users, median of {measured['repeat']}",
        "",
        "| method | wall s | CPU s | peak RSS MiB | ours / it (time) | ours / it (RSS) | found |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    ours = methods.get("ours")
    for method, figures in methods.items():
        found = {k: v for k, v in figures["result"].items() if k != "stages"}
        lines.append(
            f"| {method} | {figures['seconds']:.2f} | {figures['cpu_seconds']:.2f} "
            f"| {figures['peak_mib']:.0f} "
            f"| {_ratio(ours['seconds'], figures['seconds']) if ours else '-'} "
            f"| {_ratio(ours['peak_mib'], figures['peak_mib']) if ours else '-'} "
            f"| {found} |"
        )
    stages = methods.get("stages", {}).get("result", {}).get("stages")
    if stages:
        timed = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in stages.items())
        lines += ["", f"stages (last round): {timed}"]
    return "\n".join(lines)


def growth(measured: Sequence[dict[str, Any]]) -> str:
    """How each method's time and memory grow with the number of users."""
    methods = list(measured[0]["methods"])
    header = " | ".join(f"{m['users']:,}" for m in measured)
    lines = [
        f"| method | {header} |",
        "|---|" + "---:|" * len(measured),
    ]
    for method in methods:
        cells = [
            f"{m['methods'][method]['seconds']:.2f} s, {m['methods'][method]['peak_mib']:.0f} MiB"
            for m in measured
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("generate", help="write snapshots, state and config")
    make.add_argument("--users", type=int, nargs="+", default=[1_000_000])
    make.add_argument(
        "--state-only",
        action="store_true",
        help="keep the snapshots, write the state of A again (after a state format change)",
    )
    run = commands.add_parser("measure", help="time every method, print the table")
    run.add_argument("--users", type=int, nargs="+", default=[1_000_000])
    run.add_argument("--repeat", type=int, default=3)
    run.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args()

    if args.command == "generate":
        for users in args.users:
            generate(users, state_only=args.state_only)
    else:
        RESULTS.mkdir(exist_ok=True)
        everything = []
        for users in args.users:
            print(f"{users:,} users:", flush=True)
            measured = measure(users, args.repeat, args.methods)
            (RESULTS / f"scale-{users}.json").write_text(json.dumps(measured, indent=2))
            print(table(measured), "\n", flush=True)
            everything.append(measured)
        if len(everything) > 1:
            print(growth(everything))


if __name__ == "__main__":
    main()
