"""Dry runs through the real CLI: no network, no state write, and reports that predict the run.

The scenario (snapshots, expected customers) is in ``engage_job.py``.
"""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from engage_job import SNAPSHOT_1, SNAPSHOT_2, Job, events, looked_up

from sync.emulator import EmulatorHandle

SCHEMA = json.loads((Path(__file__).parents[1] / "sync" / "report.schema.json").read_text())


def folder_fingerprint(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every file's bytes and every entry's mtime (ns) under ``folder``, by relative path."""
    found: dict[str, tuple[bytes | None, int]] = {".": (None, folder.stat().st_mtime_ns)}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            path = Path(root) / name
            found[str(path.relative_to(folder))] = (None, path.stat().st_mtime_ns)
        for name in files:
            path = Path(root) / name
            found[str(path.relative_to(folder))] = (path.read_bytes(), path.stat().st_mtime_ns)
    return found


def report(path: Path) -> dict[str, Any]:
    """A JSON report, checked against ``sync/report.schema.json``."""
    document: dict[str, Any] = json.loads(path.read_text())
    jsonschema.Draft202012Validator(
        SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(document)
    return document


@pytest.fixture
def job(tmp_path: Path, emulator: EmulatorHandle) -> Job:
    """A job on the scenario's columns, pointed at a fresh emulator."""
    return Job(tmp_path, emulator.url)


def test_a_first_dry_run_needs_no_key_sends_nothing_and_creates_no_state(
    job: Job, emulator: EmulatorHandle
) -> None:
    """Without an API key and without a state folder, a dry run reports the initial sync,
    reaches no route of the emulator and creates no state folder."""
    job.write(SNAPSHOT_1)
    out = job.root / "reports" / "dry.json"

    result = job.run("--dry-run", "--report", str(out), key=None)

    assert result.returncode == 0, result.stderr
    assert emulator.stats()["requests_total"] == 0
    assert emulator.stats()["requests"] == {}
    assert not job.state.exists()
    document = report(out)
    assert document["mode"] == "dry-run"
    assert document["delivery"] is None
    assert (document["counts"]["added"], document["counts"]["to_send"]) == (4, 4)
    assert "Dry run" in result.stdout
    (finished,) = events(result.stderr, "run_finished")
    assert (finished["mode"], finished["exit_code"]) == ("dry-run", 0)
    assert finished["counts"]["to_send"] == 4


def test_a_dry_run_leaves_the_state_folder_byte_and_mtime_identical(
    job: Job, emulator: EmulatorHandle
) -> None:
    """After a real run, a dry run of a changed snapshot touches no file or folder of the
    state (content and mtime) and makes no request."""
    job.write(SNAPSHOT_1)
    assert job.run().returncode == 0
    job.write(SNAPSHOT_2)
    before = folder_fingerprint(job.state)
    requests = emulator.stats()["requests_total"]

    result = job.run("--dry-run", key=None)

    assert result.returncode == 0, result.stderr
    assert folder_fingerprint(job.state) == before
    assert emulator.stats()["requests_total"] == requests


def test_dry_run_reports_equal_what_each_following_run_sends(
    job: Job, emulator: EmulatorHandle
) -> None:
    """Before each run of the scenario, the dry-run report's counts, per-key figures and
    samples equal the real run's report, and its to_send is the number of users upserted."""
    for number, rows in enumerate((SNAPSHOT_1, SNAPSHOT_2, SNAPSHOT_2), start=1):
        job.write(rows)
        dry_file, real_file = job.root / f"dry-{number}.json", job.root / f"run-{number}.json"
        assert job.run("--dry-run", "--report", str(dry_file), key=None).returncode == 0
        mark = len(emulator.requests())
        assert job.run("--report", str(real_file)).returncode == 0

        dry, real = report(dry_file), report(real_file)
        for part in ("counts", "invalid", "audiences", "traits", "new_keys", "samples"):
            assert dry[part] == real[part], f"run {number}: {part} differs"
        sent = sum(looked_up(emulator, mark).values())
        assert dry["counts"]["to_send"] == real["delivery"]["delivered"] == sent
        assert real["delivery"]["failed"] == 0
        assert (dry["mode"], real["mode"]) == ("dry-run", "run")
    assert sent == 0  # the third run had nothing to send


class _Outline(HTMLParser):
    """The parts of an HTML page a reader's browser would fetch or show."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_the_html_report_is_self_contained_with_a_chart_and_samples(job: Job) -> None:
    """The HTML dry-run report loads nothing from outside, draws the audience chart and shows
    before -> after samples of the users that change."""
    job.write(SNAPSHOT_1)
    assert job.run().returncode == 0
    job.write(SNAPSHOT_2)
    out = job.root / "dry.html"

    assert job.run("--dry-run", "--report", str(out), key=None).returncode == 0

    page = _Outline()
    page.feed(out.read_text())
    page.close()
    names = [tag for tag, _ in page.tags]
    assert "script" not in names
    assert "link" not in names
    fetched = [
        value
        for _, attrs in page.tags
        for name, value in attrs.items()
        if name in ("src", "href") and value is not None and not value.startswith("#")
    ]
    assert fetched == []
    chart = [attrs for tag, attrs in page.tags if tag == "svg"]
    assert [attrs.get("id") for attrs in chart] == ["audience-chart"]
    bars = {attrs.get("data-key") for tag, attrs in page.tags if tag == "g" and "data-key" in attrs}
    assert bars == {"vip_users", "cart_abandoners"}
    assert ("table", {"id": "samples"}) in page.tags
    text = " ".join(page.text)
    for customer_id in ("u1", "u4", "u5", "u6"):
        assert customer_id in text


def test_a_dry_run_of_a_mass_exit_reports_it_then_fails_as_the_run_would(
    job: Job, emulator: EmulatorHandle
) -> None:
    """A dry run of an empty snapshot writes the report showing every exit, then exits 1 with
    the guard's message, still without any request."""
    job.write(SNAPSHOT_1)
    assert job.run().returncode == 0
    requests = emulator.stats()["requests_total"]
    job.write([])
    out = job.root / "dry.json"

    result = job.run("--dry-run", "--report", str(out), key=None)

    assert result.returncode == 1
    assert "A real run would stop here" in result.stderr
    assert "--allow-mass-exit" in result.stderr
    assert report(out)["counts"]["exited"] == 4
    assert emulator.stats()["requests_total"] == requests
