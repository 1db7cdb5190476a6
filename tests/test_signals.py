"""``graceful_stop`` in a real process: signals arrive while the main thread is busy logging."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

# A run logs a line per dead letter; Ctrl-C is likely to land while the main thread holds the
# log's write lock. This process does nothing else, so nearly every signal lands there.
BUSY_LOGGER = textwrap.dedent(
    """
    import sys
    import structlog
    from sync.logs import configure_logging
    from sync.signals import graceful_stop

    configure_logging(json_lines=True, stream=open(sys.argv[1], "w"))
    log = structlog.get_logger()
    with graceful_stop() as stop:
        print("ready", flush=True)
        lines = 0
        while not stop.is_set():
            log.info("busy", line=lines)
            lines += 1
    print("stopped", flush=True)
    """
)


def start_busy_logger(log_file: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", BUSY_LOGGER, str(log_file)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    time.sleep(0.2)  # well into the loop
    return process


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait for the process; kill it if it hangs, so a hang fails the test, not the suite."""
    try:
        out, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("the process hung after the signal") from None
    return process.returncode, out


def logged_events(log_file: Path) -> list[str]:
    return [json.loads(line)["event"] for line in log_file.read_text().splitlines()]


def test_a_stop_signal_during_logging_stops_the_block_and_is_logged(tmp_path: Path) -> None:
    for attempt in range(5):  # several tries: each lands at another point of the loop
        log_file = tmp_path / f"log-{attempt}.jsonl"
        process = start_busy_logger(log_file)
        process.send_signal(signal.SIGINT)
        code, out = finish(process)
        assert (code, out) == (0, "stopped\n")
        events = logged_events(log_file)
        assert events.count("stop_requested") == 1
        assert events[0] == "busy"


def test_a_second_signal_exits_at_once_with_130(tmp_path: Path) -> None:
    script = BUSY_LOGGER.replace("while not stop.is_set():", "while True:")
    log_file = tmp_path / "log.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(log_file)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while "stop_requested" not in log_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    code, out = finish(process)
    assert (code, out) == (130, "")
    events = logged_events(log_file)
    assert events.count("stop_requested") == 1
    assert events.count("stop_forced") == 1
    assert events.index("stop_requested") < events.index("stop_forced")
