"""Reports: JSON against its schema, Markdown tables, self-contained HTML, terminal, files."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import re
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from sync.errors import FatalError, UsageError
from sync.model import DeliverySummary, DiffSummary, KeyStats, UserChange
from sync.report import (
    ReportInput,
    render_html,
    render_json,
    render_markdown,
    render_terminal,
    report_format,
    write_report,
)

XSS = "<script>alert(1)</script>"
RUN_ID = "20260101T030405Z-a1b2c3"
STARTED = dt.datetime(2026, 1, 1, 3, 4, 5, tzinfo=dt.UTC)


def make_diff(**overrides: Any) -> DiffSummary:
    base: dict[str, Any] = {
        "in_snapshot": 1_000_000,
        "invalid": {"null id": 12, "conflicting duplicate": 3},
        "added": 120_000,
        "changed": 4_321,
        "exited": 987,
        "unchanged": 874_692,
        "to_send": 125_308,
        "keys": (
            KeyStats("vip_users", "audience", members=50_000, entered=1_200, exited=300),
            KeyStats("churn_risk", "audience", members=9_000, entered=15, exited=4_200),
            KeyStats("total_revenue", "trait", changed=4_000),
            KeyStats("plan", "trait", changed=12),
        ),
        "new_keys": ("churn_risk",),
        "samples": (
            UserChange(
                "u-2",
                "exited",
                {"name": "Bob", "email": None, "vip_users": "true", "total_revenue": "2.5"},
                {"name": "Bob", "email": None, "vip_users": "false", "total_revenue": None},
            ),
            UserChange(
                XSS,
                "changed",
                {"name": "Ann", "email": "a@x.io", "vip_users": None, "plan": "pro"},
                {"name": "Ann", "email": "a@x.io", "vip_users": "true", "plan": "enterprise"},
            ),
            UserChange(
                "u-1",
                "added",
                {"name": None, "email": None, "churn_risk": None},
                {"name": "u-1", "email": None, "churn_risk": "true"},
            ),
        ),
    }
    return DiffSummary(**(base | overrides))


def make_report(**overrides: Any) -> ReportInput:
    base: dict[str, Any] = {
        "run_id": RUN_ID,
        "mode": "dry-run",
        "started_at": STARTED,
        "finished_at": STARTED + dt.timedelta(seconds=12),
        "source": "data/engage.parquet",
        "state_dir": "/var/lib/amberflo-sync",
        "diff": make_diff(),
        "delivery": None,
        "exit_code": 0,
    }
    return ReportInput(**(base | overrides))


def delivered_report() -> ReportInput:
    return make_report(
        mode="run",
        delivery=DeliverySummary(
            delivered=125_000, failed=308, failure_file="/state/failures/x.jsonl"
        ),
        exit_code=3,
    )


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    text = resources.files("sync").joinpath("report.schema.json").read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


# --------------------------------------------------------------------------- a tiny HTML parser


class Page(HTMLParser):
    """Collects tags, text, tables (cells with code spans wrapped in backticks) and SVG bars."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.bars: list[str] = []
        self.svg_titles: list[str] = []
        self.text: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._svg_depth = 0
        self._in_title = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "table":
            self._table = attributes.get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "code" and self._cell is not None:
            self._cell.append("`")
        elif tag == "svg" and attributes.get("id") == "audience-chart":
            self._svg_depth = 1
        elif self._svg_depth and tag == "g" and attributes.get("class") == "bar":
            self.bars.append(attributes.get("data-key") or "")
        elif self._svg_depth and tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "code" and self._cell is not None:
            self._cell.append("`")
        elif tag == "svg":
            self._svg_depth = 0
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._in_title and self._svg_depth:
            self.svg_titles.append(data)

    def tag_names(self) -> set[str]:
        return {tag for tag, _ in self.tags}


# --------------------------------------------------------------------------- JSON


def test_json_validates_against_the_schema_for_a_dry_run_and_a_run(
    schema: dict[str, Any],
) -> None:
    """Both a dry run (no delivery) and a run with delivery produce schema-valid JSON."""
    check = validator(schema)
    for report in (make_report(), delivered_report()):
        check.validate(json.loads(render_json(report)))


def test_json_round_trips_every_number() -> None:
    """Counts, invalid reasons, per-key figures and delivery come back exactly as given."""
    report = delivered_report()
    doc = json.loads(render_json(report))
    diff = report.diff
    assert doc["counts"] == {
        "in_snapshot": diff.in_snapshot,
        "invalid": 15,
        "added": diff.added,
        "changed": diff.changed,
        "exited": diff.exited,
        "unchanged": diff.unchanged,
        "to_send": diff.to_send,
    }
    assert doc["invalid"] == dict(diff.invalid)
    assert doc["audiences"] == [
        {"key": k.key, "members": k.members, "entered": k.entered, "exited": k.exited}
        for k in sorted(diff.keys, key=lambda k: k.key)
        if k.kind == "audience"
    ]
    assert doc["traits"] == [
        {"key": k.key, "changed": k.changed}
        for k in sorted(diff.keys, key=lambda k: k.key)
        if k.kind == "trait"
    ]
    assert doc["delivery"] == dataclasses.asdict(report.delivery)  # type: ignore[arg-type]
    assert (doc["run_id"], doc["mode"], doc["exit_code"]) == (RUN_ID, "run", 3)
    assert doc["started_at"] == "2026-01-01T03:04:05Z"


def test_json_keeps_absent_apart_from_the_string_false() -> None:
    """An absent value is null and "false" is a string, in every sample."""
    doc = json.loads(render_json(make_report()))
    exited = next(s for s in doc["samples"] if s["customer_id"] == "u-2")
    assert exited["before"]["vip_users"] == "true"
    assert exited["after"]["vip_users"] == "false"
    assert exited["after"]["total_revenue"] is None
    assert doc["delivery"] is None


def test_json_is_deterministic_whatever_the_input_order() -> None:
    """Reordered keys, samples and reasons render byte-identical JSON with a fixed key order."""
    diff = make_diff()
    shuffled = make_diff(
        keys=tuple(reversed(diff.keys)),
        samples=tuple(reversed(diff.samples)),
        invalid=dict(reversed(list(diff.invalid.items()))),
    )
    first = render_json(make_report(diff=diff))
    assert first == render_json(make_report(diff=shuffled))
    doc = json.loads(first)
    assert list(doc) == [
        "schema_version", "run_id", "mode", "started_at", "finished_at", "source", "state_dir",
        "exit_code", "counts", "invalid", "audiences", "traits", "new_keys", "delivery", "samples",
    ]  # fmt: skip
    assert [s["kind"] for s in doc["samples"]] == ["added", "changed", "exited"]
    assert list(doc["samples"][2]["before"]) == ["name", "email", "total_revenue", "vip_users"]


def test_schema_rejects_a_report_without_counts(schema: dict[str, Any]) -> None:
    """A document missing ``counts`` fails validation, naming the missing property."""
    doc = json.loads(render_json(make_report()))
    del doc["counts"]
    with pytest.raises(jsonschema.ValidationError, match="'counts' is a required property"):
        validator(schema).validate(doc)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("counts", "added"), -1),
        (("samples", 0, "kind"), "removed"),
        (("samples", 0, "after", "name"), 5),
        (("run_id",), "run-1"),
        (("delivery",), {"delivered": 1}),
        (("audiences", 0, "extra"), 1),
    ],
)
def test_schema_rejects_malformed_fields(
    schema: dict[str, Any], path: tuple[str | int, ...], value: object
) -> None:
    """Negative counts, unknown kinds, non-string values, bad run ids and stray fields fail."""
    doc = json.loads(render_json(make_report()))
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validator(schema).validate(doc)


def test_schema_documents_every_field(schema: dict[str, Any]) -> None:
    """Every property at every depth of the schema carries a description."""
    undocumented: list[str] = []

    def walk(node: dict[str, Any], where: str) -> None:
        for name, sub in node.get("properties", {}).items():
            if "description" not in sub:
                undocumented.append(f"{where}.{name}")
            walk(sub, f"{where}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{where}[]")
        for branch in node.get("oneOf", []):
            walk(branch, where)

    walk(schema, "$")
    assert "description" in schema
    assert undocumented == []


# --------------------------------------------------------------------------- Markdown


def md_tables(text: str) -> dict[str, list[list[str]]]:
    """Map each ``## heading`` to the GFM table under it, cells split on unescaped pipes."""
    tables: dict[str, list[list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:]
        elif line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line)[1:-1]
            tables.setdefault(heading, []).append([c.strip() for c in cells])
    return tables


def test_markdown_has_the_summary_and_per_key_tables() -> None:
    """The summary, audiences, traits, samples and invalid rows are GFM tables with the data."""
    tables = md_tables(render_markdown(delivered_report()))
    assert ["Users in snapshot", "1,000,000"] in tables["Summary"]
    assert ["Failed", "308"] in tables["Summary"]
    audiences = tables["Audiences"]
    assert audiences[0] == ["Audience", "Members", "Entering", "Exiting"]
    assert audiences[1] == ["---", "--:", "--:", "--:"]
    assert audiences[2:] == [
        ["`churn_risk`", "9,000", "+15", "-4,200"],
        ["`vip_users`", "50,000", "+1,200", "-300"],
    ]
    assert ["`total_revenue`", "4,000"] in tables["Computed traits"]
    assert ["conflicting duplicate", "3"] in tables["Invalid rows"]
    samples = tables["Samples: before -> after"]
    assert ["`u-2`", "exited", "`vip_users`", "`true`", "`false`"] in samples
    assert ["`u-2`", "exited", "`total_revenue`", "`2.5`", "*absent*"] in samples


def test_markdown_says_a_dry_run_sent_nothing_and_names_the_failure_file() -> None:
    """A dry run carries the nothing-sent note; a run lists where its failures are."""
    assert "> Dry run: nothing was sent" in render_markdown(make_report())
    run = render_markdown(delivered_report())
    assert "nothing was sent" not in run
    assert "- Failures are listed in: `/state/failures/x.jsonl`" in run


@settings(max_examples=60, deadline=None)
@given(customer_id=st.text(min_size=1, max_size=30), value=st.text(max_size=20))
def test_markdown_rows_keep_their_columns_whatever_the_text(customer_id: str, value: str) -> None:
    """Pipes, backticks and newlines in ids or values never add or drop a table column."""
    diff = make_diff(
        samples=(UserChange(customer_id, "changed", {"name": value}, {"name": None}),),
        invalid={value or "empty": 1},
    )
    tables = md_tables(render_markdown(make_report(diff=diff)))
    assert {len(row) for row in tables["Samples: before -> after"]} == {5}
    assert {len(row) for row in tables["Invalid rows"]} == {2}


# --------------------------------------------------------------------------- HTML


def test_html_has_one_chart_bar_per_audience() -> None:
    """The inline SVG chart has an id, role img, a title, and one bar group per audience."""
    page = Page(render_html(make_report()))
    svg = next(attrs for tag, attrs in page.tags if tag == "svg")
    assert svg["id"] == "audience-chart"
    assert svg["role"] == "img"
    assert page.svg_titles[0] == "Users entering and exiting each audience"
    assert page.bars == ["churn_risk", "vip_users"]
    assert any("vip_users: 1,200 entering, 300 exiting" in t for t in page.svg_titles)


def test_html_chart_scales_bars_to_the_largest_change() -> None:
    """The largest count fills the bar area, zero draws nothing, a tiny count stays visible."""
    diff = make_diff(
        keys=(
            KeyStats("big", "audience", entered=1_000_000, exited=0),
            KeyStats("small", "audience", entered=1, exited=500_000),
        )
    )
    page = Page(render_html(make_report(diff=diff)))
    widths = [
        (attrs["class"], float(attrs["width"] or 0))
        for tag, attrs in page.tags
        if tag == "rect" and attrs.get("class") in ("entering", "exiting")
    ]
    assert widths[0][0] == "entering"
    assert widths[1] == ("exiting", 0.0)
    assert widths[2] == ("entering", 2.0)
    assert widths[3][1] == pytest.approx(widths[0][1] / 2, abs=0.1)


def test_html_samples_table_shows_user_ids_and_absent_apart_from_false() -> None:
    """Each sample shows its user id and before -> after per key; absent is not a code value."""
    page = Page(render_html(make_report()))
    rows = page.tables["samples"]
    assert rows[0] == ["Customer", "Change", "Key", "Before", "", "After"]
    first_cells = [row[0] for row in rows[1:] if len(row) == 6]
    assert first_cells == ["`u-1`", f"`{XSS}`", "`u-2`"]
    assert ["`vip_users`", "`true`", "\N{RIGHTWARDS ARROW}", "`false`"] in rows
    assert ["`total_revenue`", "`2.5`", "\N{RIGHTWARDS ARROW}", "absent"] in rows


def test_html_has_summary_cards_invalid_reasons_and_delivery() -> None:
    """Cards carry the counts; invalid rows are listed by reason; the failure file is named."""
    page = Page(render_html(delivered_report()))
    text = " ".join(page.text)
    for label, value in (("Users in snapshot", "1,000,000"), ("To send", "125,308")):
        assert f"{label} {value}" in " ".join(text.split())
    assert page.tables["invalid"][1:] == [["conflicting duplicate", "3"], ["null id", "12"]]
    assert "/state/failures/x.jsonl" in text
    assert "nothing was sent" not in text


def test_html_escapes_user_provided_strings() -> None:
    """A script in an id, key, value, path or reason is shown as text, never run as a tag."""
    diff = make_diff(
        keys=(KeyStats(f'a"{XSS}', "audience", entered=1),),
        invalid={XSS: 1},
        samples=(UserChange(XSS, "changed", {XSS: None}, {XSS: XSS}),),
    )
    html_text = render_html(make_report(diff=diff, source=XSS, state_dir=XSS))
    assert XSS not in html_text
    page = Page(html_text)
    assert "script" not in page.tag_names()
    assert page.bars == [f'a"{XSS}']
    assert [f"`{XSS}`", "changed", f"`{XSS}`", "absent", "\N{RIGHTWARDS ARROW}", f"`{XSS}`"] in (
        page.tables["samples"]
    )


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=40))
def test_html_never_lets_input_become_markup(text: str) -> None:
    """Whatever the text of an id or value, the page holds only the tags the report writes."""
    diff = make_diff(samples=(UserChange(text, "added", {"k": None}, {"k": text}),))
    page = Page(render_html(make_report(diff=diff)))
    assert page.tables["samples"][1][0] == f"`{text}`"
    assert page.tag_names() <= ALLOWED_TAGS


ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "p", "section",
    "div", "span", "code", "table", "thead", "tbody", "tr", "th", "td", "footer", "ul", "li",
    "svg", "defs", "pattern", "rect", "line", "g", "text",
}  # fmt: skip


def test_html_is_self_contained() -> None:
    """No scripts, links, images or external URLs; a CSP forbids loading anything."""
    html_text = render_html(delivered_report())
    page = Page(html_text)
    assert page.tag_names() <= ALLOWED_TAGS
    for tag, attrs in page.tags:
        assert not {"src", "href"} & set(attrs), tag
        if tag != "svg":
            assert not any("http" in (v or "") for v in attrs.values()), tag
    assert "@import" not in html_text
    assert re.search(r"url\((?!#)", html_text) is None
    csp = next(a for t, a in page.tags if t == "meta" and a.get("http-equiv"))
    assert csp["content"] == "default-src 'none'; style-src 'unsafe-inline'"


def test_html_without_audiences_has_no_chart() -> None:
    """With no audiences the page says so instead of drawing an empty chart."""
    diff = make_diff(keys=(KeyStats("plan", "trait", changed=1),), samples=())
    page = Page(render_html(make_report(diff=diff)))
    assert "svg" not in page.tag_names()
    assert "No audiences." in page.text
    assert "No changed users." in page.text


# --------------------------------------------------------------------------- terminal


def test_terminal_shows_the_counts_without_colour() -> None:
    """The plain-text summary shows every count, the per-key tables and the new keys."""
    console = Console(record=True, width=100, color_system=None)
    render_terminal(make_report(), console)
    out = console.export_text()
    for label, value in (
        ("Users in snapshot", "1,000,000"),
        ("Invalid rows", "15"),
        ("null id", "12"),
        ("Added", "120,000"),
        ("Changed", "4,321"),
        ("Exited", "987"),
        ("Unchanged", "874,692"),
        ("To send", "125,308"),
    ):
        assert re.search(rf"^\s*{label}\s+{value}\s*$", out, re.MULTILINE), label
    assert re.search(r"^churn_risk\s+9,000\s+\+15\s+-4,200$", out, re.MULTILINE)
    assert re.search(r"^total_revenue\s+4,000$", out, re.MULTILINE)
    assert "Dry run: nothing was sent" in out
    assert "Delivered" not in out


def test_terminal_shows_delivery_and_prints_no_escape_codes() -> None:
    """A run shows delivered, failed and the failure file, with no ANSI codes for cron mail."""
    stream = io.StringIO()
    console = Console(file=stream, width=100, color_system=None, force_terminal=True)
    render_terminal(delivered_report(), console)
    out = stream.getvalue()
    assert "\x1b" not in out
    assert re.search(r"^Delivered\s+125,000$", out, re.MULTILINE)
    assert re.search(r"^Failed\s+308$", out, re.MULTILINE)
    assert "Failures are listed in: /state/failures/x.jsonl" in out
    assert "exit code: 3 (partial)" in out


def test_terminal_prints_markup_in_names_as_text() -> None:
    """A path, key or reason holding rich markup is printed literally; empty sections say so."""
    diff = make_diff(
        keys=(KeyStats("[bold]vip[/bold]", "audience", entered=2),),
        invalid={"[i]bad[/i] id": 1},
        new_keys=(),
    )
    console = Console(record=True, width=100, color_system=None)
    render_terminal(make_report(diff=diff, source="data/[red]x[/red].csv"), console)
    out = console.export_text()
    assert "source: data/[red]x[/red].csv" in out
    assert "[bold]vip[/bold]" in out
    assert "[i]bad[/i] id" in out
    assert "Computed traits\nNo computed traits." in out
    assert "Managed keys new since the last run\nNone." in out


def test_interrupted_run_without_exit_code_says_to_rerun(schema: dict[str, Any]) -> None:
    """An interrupted run tells the reader to rerun, in every format, and shows no exit code."""
    report = make_report(
        mode="full",
        delivery=DeliverySummary(delivered=10, failed=0, interrupted=True),
        exit_code=None,
    )
    doc = json.loads(render_json(report))
    validator(schema).validate(doc)
    assert doc["exit_code"] is None
    assert doc["delivery"]["interrupted"] is True
    console = Console(record=True, width=100, color_system=None)
    render_terminal(report, console)
    terminal = console.export_text()
    markdown = render_markdown(report)
    html_text = " ".join(Page(render_html(report)).text)
    for out in (terminal, markdown, html_text):
        assert "The run was interrupted: rerun to send the rest" in out
        assert "xit code" not in out
    assert "amberflo-sync full run" in terminal


def test_empty_string_is_shown_apart_from_absent() -> None:
    """An empty name and an absent one read differently in Markdown and HTML."""
    diff = make_diff(samples=(UserChange("u", "changed", {"name": ""}, {"name": None}),))
    report = make_report(diff=diff)
    rows = md_tables(render_markdown(report))["Samples: before -> after"]
    assert rows[2] == ["`u`", "changed", "`name`", "*empty string*", "*absent*"]
    html_rows = Page(render_html(report)).tables["samples"]
    assert html_rows[1][3:] == ["empty string", "\N{RIGHTWARDS ARROW}", "absent"]


def test_markdown_says_when_a_section_is_empty() -> None:
    """Sections with nothing to show carry a sentence instead of an empty table."""
    diff = make_diff(keys=(), invalid={}, new_keys=(), samples=())
    text = render_markdown(make_report(diff=diff))
    for heading, sentence in (
        ("Audiences", "No audiences."),
        ("Computed traits", "No computed traits."),
        ("Managed keys new since the last run", "None."),
        ("Samples: before -> after", "No changed users."),
        ("Invalid rows", "No invalid rows."),
    ):
        assert f"## {heading}\n\n{sentence}\n" in text, heading
    assert ["Invalid rows", "0"] in md_tables(text)["Summary"]


# --------------------------------------------------------------------------- files and input


@pytest.mark.parametrize(
    ("name", "render"),
    [
        ("report.json", render_json),
        ("report.md", render_markdown),
        ("Report.HTML", render_html),
    ],
)
def test_write_report_picks_the_format_by_extension(tmp_path: Path, name: str, render: Any) -> None:
    """The file holds the rendering its extension names; no temporary file is left."""
    path = tmp_path / "out" / name
    report = delivered_report()
    write_report(path, report)
    assert path.read_text(encoding="utf-8") == render(report)
    assert [p.name for p in path.parent.iterdir()] == [name]


def test_write_report_replaces_an_existing_file(tmp_path: Path) -> None:
    """Writing again replaces the old report whole."""
    path = tmp_path / "r.json"
    path.write_text("x" * 100_000, encoding="utf-8")
    write_report(path, make_report())
    assert json.loads(path.read_text(encoding="utf-8"))["run_id"] == RUN_ID


@pytest.mark.parametrize("name", ["report.txt", "report", "report.json.gz"])
def test_unknown_extension_is_a_usage_error(tmp_path: Path, name: str) -> None:
    """Another extension raises UsageError naming the supported ones, and writes nothing."""
    with pytest.raises(UsageError, match=r"use one of \.json, \.md, \.html") as info:
        write_report(tmp_path / name, make_report())
    assert info.value.exit_code == 2
    assert name in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_report_format_names_the_format() -> None:
    """The format follows the extension, whatever its case."""
    assert [report_format(Path(p)) for p in ("a.json", "b.MD", "c.html")] == ["json", "md", "html"]


def test_unwritable_report_path_is_fatal(tmp_path: Path) -> None:
    """A report under a regular file cannot be written: FatalError names the path."""
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(FatalError, match=r"cannot write the report to .*r\.html"):
        write_report(blocker / "r.html", make_report())


def test_report_input_refuses_naive_times() -> None:
    """A time without a zone is refused rather than shown as if it were UTC."""
    with pytest.raises(ValueError, match="started_at must be timezone-aware"):
        make_report(started_at=dt.datetime(2026, 1, 1, 3, 4, 5))
