"""The state store under kill -9 and beside a concurrent writer, with real processes."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from sync.state import StateStore

REPO = Path(__file__).resolve().parents[1]
BATCH = 5

# A run that acknowledges users u000000, u000001, ... in batches: it checkpoints each batch,
# commits everything every fourth batch, and prints how many users are durable so far. It
# starts from whatever the folder holds, so a killed run is followed by one that recovers.
CHECKPOINT_LOOP = """
import sys
from pathlib import Path
import pandas as pd
import structlog
from sync.state import StateStore, StoredState
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

def batch(start, stop):
    ids = [f"u{n:06d}" for n in range(start, stop)]
    scores = [str(n) for n in range(start, stop)]
    return pd.DataFrame(
        {"name": pd.array(ids, dtype="string"), "score": pd.array(scores, dtype="string")},
        index=pd.Index(ids, dtype="string", name="user_id"),
    )

store = StateStore(Path(sys.argv[1]))
run_id, size = sys.argv[2], int(sys.argv[3])
with store.lock():
    done = len(store.load().users)
    print("ready", flush=True)
    while True:
        store.checkpoint(run_id, batch(done, done + size), trait_keys=["score"])
        done += size
        print(done, flush=True)
        if done % (4 * size) == 0:
            store.commit(StoredState(batch(0, done), (), ("score",), run_id), run_id)
"""

# A run that commits one of two states over and over, pausing briefly between commits.
COMMIT_LOOP = """
import sys, time
from pathlib import Path
import pandas as pd
import structlog
from sync.state import StateStore, StoredState
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

def users(prefix, count):
    ids = [f"{prefix}{n:04d}" for n in range(count)]
    index = pd.Index(ids, dtype="string")
    return pd.DataFrame({"name": pd.array(ids, dtype="string")}, index=index)

store = StateStore(Path(sys.argv[1]))
states = [StoredState(users("a", 300)), StoredState(users("b", 200))]
with store.lock():
    store.commit(states[0], "run-0")
    print("ready", flush=True)
    number = 0
    while True:
        number += 1
        store.checkpoint(f"run-{number}", users("c", 3))
        store.commit(states[number % 2], f"run-{number}")
        time.sleep(0.01)
"""


def start(script: str, *args: str) -> subprocess.Popen[str]:
    """Start ``script`` in a fresh interpreter and wait until it says it is ready."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    return process


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes a test starts; any still running at the end are killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        if process.stdout is not None and not process.stdout.closed:
            process.communicate()
        process.wait()


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_no_acknowledged_checkpoint(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    """After each SIGKILL the store loads a gapless prefix holding every durable batch."""
    directory = tmp_path / "state"
    rng = random.Random(20250101)
    durable = 0
    for round_number in range(4):
        run_id = f"20250101T00000{round_number}Z-abcdef"
        process = start(CHECKPOINT_LOOP, str(directory), run_id, str(BATCH))
        processes.append(process)
        time.sleep(rng.uniform(0.05, 0.6))
        process.send_signal(signal.SIGKILL)
        output, _ = process.communicate()
        printed = [int(line) for line in output.split()]
        durable = max([durable, *printed])

        users = StateStore(directory).load().users

        count = len(users)
        assert count >= durable, f"round {round_number}: {durable} were durable, {count} loaded"
        assert count % BATCH == 0
        assert list(users.index) == [f"u{n:06d}" for n in range(count)]
        assert list(users["score"]) == [str(n) for n in range(count)]
        assert users["score"].dtype == pd.StringDtype()
        durable = count
    assert durable > 0


@pytest.mark.slow
def test_readers_without_the_lock_see_whole_commits_only(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    """Loads beside a process committing in a loop always see one complete commit or another."""
    directory = tmp_path / "state"
    processes.append(start(COMMIT_LOOP, str(directory)))
    store = StateStore(directory)
    seen: set[tuple[str, int]] = set()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        users = store.load().users
        committed = users[~users.index.str.startswith("c")]
        prefix = committed.index[0][0]
        assert (prefix, len(committed)) in {("a", 300), ("b", 200)}
        assert committed.index.str.startswith(prefix).all()
        seen.add((prefix, len(committed)))
    assert seen
