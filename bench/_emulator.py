"""``amberflo-sync emulator`` as a child process, for the benchmarks that send to it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def emulator_process() -> Iterator[tuple[str, psutil.Process]]:
    """The emulator on a free port, in its own process; yields its URL and the process (to
    measure its CPU). It is stopped on the way out."""
    child = subprocess.Popen(
        [sys.executable, "-m", "sync", "--log-format", "json", "emulator", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        line = child.stdout.readline() if child.stdout else ""
        if "listening on " not in line:
            raise RuntimeError(f"the emulator did not start: {line!r}")
        yield line.rsplit(" ", 1)[-1].strip(), psutil.Process(child.pid)
    finally:
        child.terminate()
        child.wait(timeout=30)
