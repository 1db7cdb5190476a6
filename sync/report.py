"""Rendering of a dry-run or run report: terminal, JSON, Markdown and self-contained HTML.

The report is what a person reads before letting a job rewrite their billing customers, so every
format carries the same content: counts (in snapshot, invalid by reason, added, changed, exited,
unchanged, to send), delivery when there was one, per-audience and per-trait figures, the managed
keys new since the last run, and before -> after samples of changed users with values as they go
on the wire.

Everything here is pure (a :class:`ReportInput` in, a string out) except :func:`write_report`,
which picks the format from the file extension and writes the file atomically. The input is
already aggregated by the diff and its samples are bounded, so rendering costs the same for ten
users or ten million.

Values are shown so that an absent value (``None``: the key is not sent, or removed) can never be
mistaken for the string ``"false"`` or an empty string. Every user-provided string (ids, names,
keys, values, paths, reasons) is escaped for the format it lands in: HTML-escaped in HTML,
code spans or backslash escapes in Markdown, plain text (never markup) in the terminal.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sync.errors import (
    EXIT_FATAL,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    FatalError,
    UsageError,
)
from sync.model import ChangeKind, DeliverySummary, DiffSummary, KeyStats, UserChange

__all__ = [
    "SCHEMA_VERSION",
    "SUPPORTED_EXTENSIONS",
    "ReportFormat",
    "ReportInput",
    "ReportMode",
    "render_html",
    "render_json",
    "render_markdown",
    "render_terminal",
    "report_format",
    "write_report",
]

SCHEMA_VERSION: Final = 1

ReportMode = Literal["dry-run", "run", "full", "full-dry-run"]
ReportFormat = Literal["json", "md", "html"]

SUPPORTED_EXTENSIONS: Final[Mapping[str, ReportFormat]] = {
    ".json": "json",
    ".md": "md",
    ".html": "html",
}

_KIND_ORDER: Final[Mapping[ChangeKind, int]] = {"added": 0, "changed": 1, "exited": 2}
# name and email lead every sample so a reader sees who the user is before what changes.
_IDENTITY_FIELDS: Final = ("name", "email")

_EXIT_MEANING: Final[Mapping[int, str]] = {
    EXIT_OK: "ok",
    EXIT_FATAL: "fatal",
    EXIT_USAGE: "usage error",
    EXIT_PARTIAL: "partial",
    EXIT_LOCKED: "locked",
}

_MODE_TITLE: Final[Mapping[ReportMode, str]] = {
    "dry-run": "Dry run",
    "full-dry-run": "Full dry run",
    "run": "Run",
    "full": "Full run",
}

_DRY_RUN_NOTE: Final = "Dry run: nothing was sent to Amberflo and the state folder was not touched."


@dataclass(frozen=True, slots=True)
class ReportInput:
    """Everything one report shows. ``delivery`` is ``None`` for a dry run.

    ``started_at`` and ``finished_at`` must be timezone-aware; reports show them in UTC.
    """

    run_id: str
    mode: ReportMode
    started_at: dt.datetime
    finished_at: dt.datetime
    source: str
    state_dir: str
    diff: DiffSummary
    delivery: DeliverySummary | None
    exit_code: int | None

    def __post_init__(self) -> None:
        for name, moment in (("started_at", self.started_at), ("finished_at", self.finished_at)):
            # A naive time would be shown as UTC whatever zone it was taken in.
            if moment.tzinfo is None or moment.utcoffset() is None:
                raise ValueError(f"ReportInput.{name} must be timezone-aware, got {moment!r}")

    @property
    def is_dry_run(self) -> bool:
        """Whether nothing was sent (``dry-run`` or ``full-dry-run``)."""
        return self.mode.endswith("dry-run")

    @property
    def duration_seconds(self) -> float:
        """Wall time of the run, in seconds."""
        return (self.finished_at - self.started_at).total_seconds()


# --------------------------------------------------------------------------- content


@dataclass(frozen=True, slots=True)
class _Code:
    """An identifier or path, shown verbatim (in a code font where the format has one)."""

    text: str


@dataclass(frozen=True, slots=True)
class _Value:
    """A value as it goes on the wire; ``None`` is absent and is shown as such."""

    text: str | None


# A plain ``str`` cell is prose or a formatted number; every kind of cell is escaped on output.
_Cell = str | _Code | _Value


@dataclass(frozen=True, slots=True)
class _Table:
    """One titled table of the report, independent of the format it is rendered in."""

    id: str
    title: str
    columns: tuple[tuple[str, bool], ...]  # (header, numeric)
    rows: tuple[tuple[_Cell, ...], ...]
    empty: str
    note: str = ""


def _utc(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _num(value: int) -> str:
    return f"{value:,}"


def _signed(value: int, sign: str) -> str:
    return f"{sign}{value:,}" if value else "0"


def _audiences(diff: DiffSummary) -> list[KeyStats]:
    return sorted((k for k in diff.keys if k.kind == "audience"), key=lambda k: k.key)


def _traits(diff: DiffSummary) -> list[KeyStats]:
    return sorted((k for k in diff.keys if k.kind == "trait"), key=lambda k: k.key)


def _invalid(diff: DiffSummary) -> list[tuple[str, int]]:
    return sorted(diff.invalid.items())


def _samples(diff: DiffSummary) -> list[UserChange]:
    return sorted(diff.samples, key=lambda s: (_KIND_ORDER[s.kind], s.customer_id))


def _ordered_fields(keys: Iterable[str]) -> list[str]:
    unique = set(keys)
    lead = [k for k in _IDENTITY_FIELDS if k in unique]
    return lead + sorted(unique.difference(_IDENTITY_FIELDS))


def _sample_rows(sample: UserChange) -> list[tuple[str, str | None, str | None]]:
    """``(field, before, after)`` for every field of a sample; missing on one side = absent."""
    fields = _ordered_fields([*sample.before, *sample.after])
    return [(f, sample.before.get(f), sample.after.get(f)) for f in fields]


def _exit_label(code: int) -> str:
    meaning = _EXIT_MEANING.get(code)
    return f"{code} ({meaning})" if meaning else str(code)


def _title(report: ReportInput) -> str:
    return f"amberflo-sync {_MODE_TITLE[report.mode].lower()}"


def _facts(report: ReportInput) -> list[tuple[str, _Cell]]:
    facts: list[tuple[str, _Cell]] = [
        ("Run", _Code(report.run_id)),
        ("Source", _Code(report.source)),
        ("State folder", _Code(report.state_dir)),
        ("Started", _utc(report.started_at)),
        ("Took", f"{report.duration_seconds:.1f} s"),
    ]
    if report.exit_code is not None:
        facts.append(("Exit code", _exit_label(report.exit_code)))
    return facts


def _summary(report: ReportInput, *, with_reasons: bool) -> _Table:
    """Counts, then delivery; ``with_reasons`` nests invalid rows by reason under their total."""
    diff = report.diff
    rows: list[tuple[_Cell, ...]] = [
        ("Users in snapshot", _num(diff.in_snapshot)),
        ("Invalid rows", _num(sum(diff.invalid.values()))),
    ]
    if with_reasons:
        rows += [(f"  {reason}", _num(count)) for reason, count in _invalid(diff)]
    rows += [
        ("Added", _num(diff.added)),
        ("Changed", _num(diff.changed)),
        ("Exited", _num(diff.exited)),
        ("Unchanged", _num(diff.unchanged)),
        ("To send", _num(diff.to_send)),
    ]
    delivery = report.delivery
    if delivery is not None:
        rows += [("Delivered", _num(delivery.delivered)), ("Failed", _num(delivery.failed))]
    return _Table("summary", "Summary", (("", False), ("Users", True)), tuple(rows), "")


def _delivery_notes(report: ReportInput) -> list[tuple[str, _Cell]]:
    """Where the failures are listed, and whether the run stopped early."""
    notes: list[tuple[str, _Cell]] = []
    delivery = report.delivery
    if delivery is not None and delivery.failure_file is not None:
        notes.append(("Failures are listed in", _Code(delivery.failure_file)))
    if delivery is not None and delivery.interrupted:
        notes.append(("The run was interrupted", "rerun to send the rest"))
    if delivery is not None and delivery.stopped_reason is not None:
        notes.append(("The run stopped early", delivery.stopped_reason))
    return notes


def _sections(report: ReportInput) -> list[_Table]:
    """The detail tables, in reading order, shared by the Markdown and HTML reports."""
    diff = report.diff
    return [
        _Table(
            "audiences",
            "Audiences",
            (("Audience", False), ("Members", True), ("Entering", True), ("Exiting", True)),
            tuple(
                (_Code(k.key), _num(k.members), _signed(k.entered, "+"), _signed(k.exited, "-"))
                for k in _audiences(diff)
            ),
            "No audiences.",
        ),
        _Table(
            "traits",
            "Computed traits",
            (("Trait", False), ("Users changing", True)),
            tuple((_Code(k.key), _num(k.changed)) for k in _traits(diff)),
            "No computed traits.",
        ),
        _Table(
            "new-keys",
            "Managed keys new since the last run",
            (("Key", False),),
            tuple((_Code(key),) for key in diff.new_keys),
            "None.",
        ),
        _Table(
            "samples",
            "Samples: before -> after",
            (
                ("Customer", False),
                ("Change", False),
                ("Key", False),
                ("Before", False),
                ("After", False),
            ),
            tuple(
                (_Code(s.customer_id), s.kind, _Code(field), _Value(before), _Value(after))
                for s in _samples(diff)
                for field, before, after in _sample_rows(s)
            ),
            "No changed users.",
            note="Values as they go on the wire. Absent means the key is not sent (or is removed "
            "from the customer), which is not the string false.",
        ),
        _Table(
            "invalid",
            "Invalid rows",
            (("Reason", False), ("Rows", True)),
            tuple((reason, _num(count)) for reason, count in _invalid(diff)),
            "No invalid rows.",
            note="Left out of this run; their state is untouched.",
        ),
    ]


# --------------------------------------------------------------------------- terminal


def _rich_cell(cell: _Cell) -> Text:
    # Text, never a markup string: a "[" in a key or path must print as itself.
    if isinstance(cell, str):
        return Text(cell)
    return Text("(absent)" if cell.text is None else cell.text, overflow="fold")


def _rich_table(table: _Table) -> Table:
    rich_table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header, numeric in table.columns:
        rich_table.add_column(header, justify="right" if numeric else "left")
    for row in table.rows:
        rich_table.add_row(*(_rich_cell(cell) for cell in row))
    return rich_table


def render_terminal(report: ReportInput, console: Console) -> None:
    """Print the report to ``console``: a summary, per-audience and per-trait tables, new keys.

    Nothing relies on colour (signs and words carry the meaning), so it reads the same in cron
    mail or with ``NO_COLOR``. Samples are left to the file reports (``--report``).
    """
    console.print(Text(f"{_title(report)} {report.run_id}", style="bold"))
    for label, cell in _facts(report)[1:]:
        console.print(Text.assemble((f"{label.lower()}: ", "dim"), _rich_cell(cell)))
    if report.is_dry_run:
        console.print(Text(_DRY_RUN_NOTE, style="bold"))
    console.print()
    for table in [_summary(report, with_reasons=True), *_sections(report)]:
        if table.id in ("samples", "invalid"):
            continue  # samples are for the file reports; invalid reasons are in the summary
        # The title goes on its own line: as a table title it would wrap to a narrow table.
        console.print(Text(table.title, style="bold"))
        console.print(_rich_table(table) if table.rows else Text(table.empty))
        if table.id == "summary":
            for label, cell in _delivery_notes(report):
                console.print(Text.assemble(f"{label}: ", _rich_cell(cell)))
        console.print()


# --------------------------------------------------------------------------- JSON


def _document(report: ReportInput) -> dict[str, object]:
    diff = report.diff
    delivery = report.delivery
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": report.run_id,
        "mode": report.mode,
        "started_at": _utc(report.started_at),
        "finished_at": _utc(report.finished_at),
        "source": report.source,
        "state_dir": report.state_dir,
        "exit_code": report.exit_code,
        "counts": {
            "in_snapshot": diff.in_snapshot,
            "invalid": sum(diff.invalid.values()),
            "added": diff.added,
            "changed": diff.changed,
            "exited": diff.exited,
            "unchanged": diff.unchanged,
            "to_send": diff.to_send,
        },
        "invalid": dict(_invalid(diff)),
        "audiences": [
            {"key": k.key, "members": k.members, "entered": k.entered, "exited": k.exited}
            for k in _audiences(diff)
        ],
        "traits": [{"key": k.key, "changed": k.changed} for k in _traits(diff)],
        "new_keys": list(diff.new_keys),
        "delivery": None
        if delivery is None
        else {
            "delivered": delivery.delivered,
            "failed": delivery.failed,
            "failure_file": delivery.failure_file,
            "interrupted": delivery.interrupted,
            "stopped_reason": delivery.stopped_reason,
        },
        "samples": [
            {
                "customer_id": s.customer_id,
                "kind": s.kind,
                "before": {f: s.before[f] for f in _ordered_fields(s.before)},
                "after": {f: s.after[f] for f in _ordered_fields(s.after)},
            }
            for s in _samples(diff)
        ],
    }


def render_json(report: ReportInput) -> str:
    """Return the report as JSON (``sync/report.schema.json``, ``schema_version`` 1).

    Key order is fixed and lists are sorted (audiences and traits by key, samples by kind then
    customer id), so two reports of the same data are byte-identical and diff cleanly.
    """
    return json.dumps(_document(report), indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- Markdown

# Characters that could start inline Markdown (emphasis, links, HTML, entities, tables).
_MD_SPECIAL: Final = frozenset("\\`*_[]<|~&!#")
_BACKTICK_RUN: Final = re.compile("`+")


def _md_text(value: str) -> str:
    """Escape prose for a GFM table cell: inline syntax and ``|`` lose their meaning."""
    flat = " ".join(value.splitlines())
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in flat)


def _md_code(value: str) -> str:
    """Return ``value`` as a code span that survives any backticks, pipes or HTML in it."""
    flat = " ".join(value.splitlines())
    if flat == "":
        return "*empty string*"
    # A fence one backtick longer than the longest run inside it cannot close early.
    fence = "`" * (max((len(run) for run in _BACKTICK_RUN.findall(flat)), default=0) + 1)
    padded = f" {flat} " if flat.startswith("`") or flat.endswith("`") else flat
    # A GFM row is split on unescaped pipes before code spans are parsed.
    escaped = padded.replace("|", "\\|")
    return f"{fence}{escaped}{fence}"


def _md_cell(cell: _Cell) -> str:
    if isinstance(cell, _Code):
        return _md_code(cell.text)
    if isinstance(cell, _Value):
        return "*absent*" if cell.text is None else _md_code(cell.text)
    return _md_text(cell)


def _md_table(table: _Table, *, heading: bool = True) -> list[str]:
    lines = [f"## {_md_text(table.title)}", ""] if heading else []
    if not table.rows:
        return [*lines, _md_text(table.empty), ""]
    if table.note:
        lines += [_md_text(table.note), ""]
    lines += [
        "| " + " | ".join(_md_text(header) for header, _ in table.columns) + " |",
        "| " + " | ".join("--:" if numeric else "---" for _, numeric in table.columns) + " |",
    ]
    lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in table.rows]
    return [*lines, ""]


def render_markdown(report: ReportInput) -> str:
    """Return the report as GitHub-flavoured Markdown: the same content as the HTML, in tables."""
    lines = [f"# {_md_text(_title(report))}", ""]
    if report.is_dry_run:
        lines += [f"> {_md_text(_DRY_RUN_NOTE)}", ""]
    facts = _Table("run", "Run", (("", False), ("", False)), tuple(_facts(report)), "")
    lines += _md_table(facts, heading=False)
    lines += _md_table(_summary(report, with_reasons=False))
    notes = _delivery_notes(report)
    if notes:
        lines += [f"- {_md_text(label)}: {_md_cell(cell)}" for label, cell in notes] + [""]
    for table in _sections(report):
        lines += _md_table(table)
    return "\n".join(lines)


# --------------------------------------------------------------------------- HTML

_CSS: Final = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1040px; padding: 24px 20px 48px; color: #1f2328;
  background: #fff; font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px;
  background: #f3f4f6; border-radius: 4px; padding: 1px 4px; overflow-wrap: anywhere; }
.meta { color: #57606a; margin: 0; }
.meta code { background: none; padding: 0; }
.note { margin: 12px 0 0; padding: 8px 12px; border-left: 4px solid #57606a;
  background: #f6f8fa; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 10px;
  margin-top: 20px; }
.card { border: 1px solid #d0d7de; border-radius: 8px; padding: 10px 12px; }
.card .label { display: block; color: #57606a; font-size: 12px; }
.card .value { display: block; font-size: 22px; font-weight: 600;
  font-variant-numeric: tabular-nums; }
.card.alert { border: 2px solid #b42318; }
.card.alert .value { color: #b42318; }
table { border-collapse: collapse; width: 100%; margin: 8px 0; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid #e5e7eb;
  vertical-align: top; }
thead th { font-size: 12px; color: #57606a; font-weight: 600; border-bottom: 2px solid #d0d7de; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody.user { border-top: 2px solid #d0d7de; }
tbody.user th { font-weight: normal; }
tr.same td.value { opacity: .55; }
.absent { color: #57606a; font-style: italic; }
.arrow { color: #8c959f; }
.kind { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
svg { display: block; width: 100%; height: auto; max-width: 860px; margin: 8px 0 16px; }
footer { margin-top: 40px; color: #8c959f; font-size: 12px; }
@media print { body { max-width: none; } h2 { break-after: avoid; }
  tbody.user, .card { break-inside: avoid; } }
"""

_ENTER_FILL: Final = "#2f855a"
_EXIT_FILL: Final = "#c53030"
_CHART_WIDTH: Final = 860
_CHART_LABEL_RIGHT: Final = 250
_CHART_BAR_LEFT: Final = 260
_CHART_BAR_RIGHT: Final = 770  # leaves room for a "+1,000,000" label after the longest bar
_CHART_ROW: Final = 40
_CHART_TOP: Final = 34
_CHART_LABEL_CHARS: Final = 34


def _esc(value: str) -> str:
    return html.escape(value, quote=True)


def _html_cell(cell: _Cell) -> str:
    if isinstance(cell, str):
        return _esc(cell)
    if cell.text is None:
        # Set in italics outside a code box, so it cannot be read as a string that is sent.
        return '<span class="absent">absent</span>'
    if cell.text == "":
        return '<span class="absent">empty string</span>'
    return f"<code>{_esc(cell.text)}</code>"


def _html_table(table: _Table) -> str:
    align = [' class="num"' if numeric else "" for _, numeric in table.columns]
    head = "".join(
        f'<th scope="col"{cls}>{_esc(header)}</th>'
        for (header, _), cls in zip(table.columns, align, strict=True)
    )
    body = "".join(
        "<tr>"
        + "".join(f"<td{cls}>{_html_cell(cell)}</td>" for cell, cls in zip(row, align, strict=True))
        + "</tr>"
        for row in table.rows
    )
    return f'<table id="{table.id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _shorten(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "\N{HORIZONTAL ELLIPSIS}"


def _audience_chart(audiences: Sequence[KeyStats]) -> str:
    """An inline SVG horizontal bar chart: per audience, users entering and exiting.

    Entering is solid green and exiting red with white diagonal hatching, each followed by its
    signed number, so the chart reads in greyscale print too. Bars share one linear scale; a
    non-zero count is at least 2 px wide so it never vanishes next to a large one.
    """
    peak = max((max(k.entered, k.exited) for k in audiences), default=0)
    span = _CHART_BAR_RIGHT - _CHART_BAR_LEFT
    height = _CHART_TOP + _CHART_ROW * len(audiences) + 8

    def width(value: int) -> float:
        return 0.0 if value == 0 else max(2.0, round(value * span / peak, 1))

    left = _CHART_BAR_LEFT
    parts = [
        f'<svg id="audience-chart" role="img" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {_CHART_WIDTH} {height}" width="{_CHART_WIDTH}" height="{height}" '
        'aria-labelledby="audience-chart-title" font-family="system-ui, sans-serif" '
        'font-size="12" fill="#1f2328">',
        '<title id="audience-chart-title">Users entering and exiting each audience</title>',
        '<defs><pattern id="exit-hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)">'
        f'<rect width="6" height="6" fill="{_EXIT_FILL}"/>'
        '<line x1="0" y1="0" x2="0" y2="6" stroke="#fff" stroke-width="2.5"/></pattern></defs>',
        f'<g class="legend"><rect x="{left}" y="8" width="14" height="12" fill="{_ENTER_FILL}"/>'
        f'<text x="{left + 20}" y="18">entering (+)</text>'
        f'<rect x="{left + 120}" y="8" width="14" height="12" fill="url(#exit-hatch)" '
        f'stroke="{_EXIT_FILL}"/><text x="{left + 140}" y="18">exiting (-)</text></g>',
        f'<line x1="{left}" y1="{_CHART_TOP - 4}" x2="{left}" y2="{height - 6}" stroke="#8c959f"/>',
    ]
    for index, k in enumerate(audiences):
        top = _CHART_TOP + index * _CHART_ROW
        enter_w, exit_w = width(k.entered), width(k.exited)
        parts.append(
            f'<g class="bar" data-key="{_esc(k.key)}">'
            f"<title>{_esc(k.key)}: {_num(k.entered)} entering, {_num(k.exited)} exiting, "
            f"{_num(k.members)} members now</title>"
            f'<text x="{_CHART_LABEL_RIGHT}" y="{top + 20}" text-anchor="end">'
            f"{_esc(_shorten(k.key, _CHART_LABEL_CHARS))}</text>"
            f'<rect class="entering" x="{left}" y="{top + 2}" width="{enter_w}" height="15" '
            f'fill="{_ENTER_FILL}"/>'
            f'<text x="{left + enter_w + 5}" y="{top + 14}">{_signed(k.entered, "+")}</text>'
            f'<rect class="exiting" x="{left}" y="{top + 19}" width="{exit_w}" height="15" '
            f'fill="url(#exit-hatch)" stroke="{_EXIT_FILL}" stroke-width="{int(k.exited > 0)}"/>'
            f'<text x="{left + exit_w + 5}" y="{top + 31}">{_signed(k.exited, "-")}</text>'
            "</g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _samples_table(samples: Sequence[UserChange]) -> str:
    """Before -> after per key, one row group per user; unchanged identity fields are greyed."""
    head = "".join(
        f'<th scope="col">{h}</th>' for h in ("Customer", "Change", "Key", "Before", "", "After")
    )
    groups = []
    for s in samples:
        rows = _sample_rows(s)
        span = len(rows)
        lines = []
        for index, (field, before, after) in enumerate(rows):
            lead = (
                f'<th scope="rowgroup" rowspan="{span}">{_html_cell(_Code(s.customer_id))}</th>'
                f'<td rowspan="{span}" class="kind">{_esc(s.kind)}</td>'
                if index == 0
                else ""
            )
            same = ' class="same"' if before == after else ""
            lines.append(
                f"<tr{same}>{lead}<td>{_html_cell(_Code(field))}</td>"
                f'<td class="value">{_html_cell(_Value(before))}</td>'
                '<td class="arrow">\N{RIGHTWARDS ARROW}</td>'
                f'<td class="value">{_html_cell(_Value(after))}</td></tr>'
            )
        groups.append(f'<tbody class="user">{"".join(lines)}</tbody>')
    return f'<table id="samples"><thead><tr>{head}</tr></thead>{"".join(groups)}</table>'


def _html_cards(report: ReportInput) -> str:
    diff = report.diff
    invalid = sum(diff.invalid.values())
    cards = [
        ("Users in snapshot", diff.in_snapshot, False),
        ("Invalid rows", invalid, invalid > 0),
        ("Added", diff.added, False),
        ("Changed", diff.changed, False),
        ("Exited", diff.exited, False),
        ("Unchanged", diff.unchanged, False),
        ("To send", diff.to_send, False),
    ]
    delivery = report.delivery
    if delivery is not None:
        cards += [
            ("Delivered", delivery.delivered, False),
            ("Failed", delivery.failed, delivery.failed > 0),
        ]
    notes = [f"{_esc(label)}: {_html_cell(cell)}." for label, cell in _delivery_notes(report)]
    html_cards = "".join(
        f'<div class="card{" alert" if alert else ""}"><span class="label">{_esc(label)}</span>'
        f'<span class="value">{_num(value)}</span></div>'
        for label, value, alert in cards
    )
    note = f'<p class="note">{" ".join(notes)}</p>' if notes else ""
    return f'<section class="cards" id="summary">{html_cards}</section>{note}'


def _html_section(table: _Table, report: ReportInput) -> str:
    parts = [f"<section><h2>{_esc(table.title)}</h2>"]
    if not table.rows:
        parts.append(f"<p>{_esc(table.empty)}</p>")
    else:
        if table.note:
            parts.append(f"<p>{_esc(table.note)}</p>")
        if table.id == "audiences":
            parts.append(_audience_chart(_audiences(report.diff)))
        # Samples group each user's rows together, which the generic table cannot express.
        samples = _samples(report.diff)
        parts.append(_samples_table(samples) if table.id == "samples" else _html_table(table))
    parts.append("</section>")
    return "".join(parts)


def render_html(report: ReportInput) -> str:
    """Return the report as one self-contained HTML page for mailing and offline reading.

    No scripts, external styles, fonts or images; a Content-Security-Policy forbids loading
    anything, a second guard behind escaping every user-provided string.
    """
    meta = " \N{MIDDLE DOT} ".join(
        f"{_esc(label.lower())} {_html_cell(cell)}" for label, cell in _facts(report)
    )
    dry_note = f'<p class="note">{_esc(_DRY_RUN_NOTE)}</p>' if report.is_dry_run else ""
    sections = "".join(_html_section(table, report) for table in _sections(report))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(_title(report))} {_esc(report.run_id)}</title>"
        f"<style>{_CSS}</style></head>\n"
        f'<body><header><h1>{_esc(_title(report))}</h1><p class="meta">{meta}</p>{dry_note}'
        f"</header>{_html_cards(report)}{sections}"
        f"<footer>Report schema version {SCHEMA_VERSION}.</footer></body></html>\n"
    )


# --------------------------------------------------------------------------- files

_RENDERERS: Final[Mapping[ReportFormat, Callable[[ReportInput], str]]] = {
    "json": render_json,
    "md": render_markdown,
    "html": render_html,
}


def report_format(path: Path) -> ReportFormat:
    """Return the format that ``path``'s extension asks for.

    Raises :class:`~sync.errors.UsageError` naming the supported extensions, so a command can
    check ``--report`` before it does any work.
    """
    fmt = SUPPORTED_EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        supported = ", ".join(SUPPORTED_EXTENSIONS)
        raise UsageError(
            f"cannot write a report to {path}: unknown extension {path.suffix or '(none)'!r}; "
            f"use one of {supported}"
        )
    return fmt


def write_report(path: Path, report: ReportInput) -> None:
    """Render ``report`` in the format of ``path``'s extension and write it atomically.

    The file is written next to its destination, fsynced and renamed over it, so a reader (or a
    mailer picking it up) never sees half a report. Missing parent folders are created.
    Raises :class:`~sync.errors.UsageError` for an unknown extension and
    :class:`~sync.errors.FatalError` when the file cannot be written.
    """
    content = _RENDERERS[report_format(path)](report).encode()
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: never follow or reuse a file someone else put at the temporary name.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            temp.replace(path)
        finally:
            temp.unlink(missing_ok=True)
    except OSError as exc:
        raise FatalError(f"cannot write the report to {path}: {exc.strerror or exc}") from exc
