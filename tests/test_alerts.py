"""Alerts fire on changes of state (failing, recovered, thresholds crossed), not on every run,
and reach a real command and a real local webhook."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sync.alerts import AlertTracker, RunOutcome, alert_document
from sync.config import AlertSettings

HOOK = """{ cat; printf '\\n'; } >> "$1"
printf '%s %s\\n' "$AMBERFLO_SYNC_ALERT" "${AMBERFLO_API_KEY:-no-key}" >> "$1.env"
"""


def ok(
    run: str, *, to_send: int = 10, in_snapshot: int = 1000, failed: int = 0, changed: int = 0
) -> RunOutcome:
    return RunOutcome(
        run_id=run,
        exit_code=3 if failed else 0,
        to_send=to_send,
        in_snapshot=in_snapshot,
        failed=failed,
        changed=changed,
    )


def fatal(run: str) -> RunOutcome:
    return RunOutcome(run_id=run, exit_code=1, error="Amberflo rejected the API key")


@pytest.fixture
def received(tmp_path: Path) -> Path:
    return tmp_path / "alerts.jsonl"


@pytest.fixture
def tracker(tmp_path: Path, received: Path) -> AlertTracker:
    """A tracker whose alerts.command appends each alert document to ``received``."""
    script = tmp_path / "hook.sh"
    script.write_text(HOOK)
    return AlertTracker(AlertSettings(command=f"sh {script} {received}"))


def documents(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_failing_fires_once_and_recovered_once(tracker: AlertTracker, received: Path) -> None:
    """Three failing runs raise one 'failing' alert; the next good run raises one 'recovered'."""
    kinds = [tracker.observe(run) for run in (ok("r1"), fatal("r2"), fatal("r3"), fatal("r4"))]
    kinds += [tracker.observe(ok("r5")), tracker.observe(ok("r6"))]

    assert kinds == [[], ["failing"], [], [], ["recovered"], []]
    sent = documents(received)
    assert [(d["alert"], d["run_id"]) for d in sent] == [("failing", "r2"), ("recovered", "r5")]
    assert sent[0] == alert_document("failing", fatal("r2"))
    assert sent[0]["error"] == "Amberflo rejected the API key"


def test_a_run_where_every_user_failed_is_failing(tracker: AlertTracker) -> None:
    """Exit 3 with nothing delivered (Amberflo down) is failing; a partial exit 3 is not."""
    assert tracker.observe(ok("r1", to_send=10, failed=10)) == ["failing"]
    assert tracker.observe(ok("r2", to_send=100, failed=1)) == ["recovered"]


def test_rejected_share_alerts_when_it_crosses_the_threshold_and_again_after_falling_back(
    tracker: AlertTracker,
) -> None:
    """Above max_failed_fraction once: one alert; still above: none; below then above: again."""
    shares = [(100, 1), (100, 20), (100, 30), (100, 2), (100, 50)]
    kinds = [tracker.observe(ok(f"r{n}", to_send=t, failed=f)) for n, (t, f) in enumerate(shares)]

    assert kinds == [[], ["rejections_high"], [], [], ["rejections_high"]]


def test_change_volume_counts_changed_and_exited_users_not_new_ones(tracker: AlertTracker) -> None:
    """Known users changing or exiting past max_change_fraction alert; new users (a first sync
    is all new users) do not."""
    first_sync = ok("r1", to_send=950, changed=0)
    quiet = ok("r2", to_send=60, changed=50)
    churn = ok("r3", to_send=600, changed=600)

    assert [tracker.observe(run) for run in (first_sync, quiet, churn)] == [
        [],
        [],
        ["changes_high"],
    ]


def test_a_locked_run_changes_nothing(tracker: AlertTracker, received: Path) -> None:
    """Exit 4 (another run held the lock) neither starts nor ends a failing spell."""
    tracker.observe(fatal("r1"))

    assert tracker.observe(RunOutcome(run_id="r2", exit_code=4)) == []
    assert tracker.failing
    assert tracker.observe(ok("r3")) == ["recovered"]
    assert [d["alert"] for d in documents(received)] == ["failing", "recovered"]


def test_the_command_gets_the_alert_kind_and_never_the_api_key(
    tracker: AlertTracker, received: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook's environment names the alert in AMBERFLO_SYNC_ALERT and lacks the API key."""
    monkeypatch.setenv("AMBERFLO_API_KEY", "secret-key-must-not-leak")

    tracker.observe(fatal("r1"))

    assert Path(f"{received}.env").read_text() == "failing no-key\n"


class _Hook(BaseHTTPRequestHandler):
    bodies: list[tuple[str, Any]]

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.bodies.append((self.headers["Content-Type"], json.loads(self.rfile.read(length))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[tuple[str, Any]]]]:
    """A tiny local HTTP server recording every POST body; yields its URL and the bodies."""
    bodies: list[tuple[str, Any]] = []
    handler = type("Hook", (_Hook,), {"bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", bodies
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_webhook_receives_each_alert_as_json(
    webhook: tuple[str, list[tuple[str, Any]]],
) -> None:
    """alerts.webhook_url gets one JSON POST per alert."""
    url, bodies = webhook
    tracker = AlertTracker(AlertSettings(webhook_url=url))

    tracker.observe(fatal("r1"))
    tracker.observe(ok("r2"))

    assert [(kind, body["alert"], body["run_id"]) for kind, body in bodies] == [
        ("application/json", "failing", "r1"),
        ("application/json", "recovered", "r2"),
    ]


def test_a_broken_alert_target_is_logged_and_never_fails_the_run(tmp_path: Path) -> None:
    """A refused webhook and a command that exits 1 are each logged as alert_failed."""
    with ThreadingHTTPServer(("127.0.0.1", 0), _Hook) as closed:
        port = closed.server_address[1]  # bound, then closed: nothing listens there
    tracker = AlertTracker(
        AlertSettings(webhook_url=f"http://127.0.0.1:{port}/hook", command="sh -c 'exit 1'")
    )

    with capture_logs() as logs:
        assert tracker.observe(fatal("r1")) == ["failing"]

    failed = [entry["target"] for entry in logs if entry["event"] == "alert_failed"]
    assert failed == ["webhook", "command"]
