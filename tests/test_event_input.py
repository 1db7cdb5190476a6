"""Reading Segment messages from files, folders and stdin (sync.event_input)."""

from __future__ import annotations

import gzip
import io
import json
import os
import threading
from pathlib import Path

import pytest

from sync.errors import SourceError
from sync.event_input import RawEvent, read_events, read_stream


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def good(events: list[RawEvent]) -> list[tuple[int, dict[str, object] | None]]:
    return [(event.line, event.message) for event in events if event.error is None]


def bad(events: list[RawEvent]) -> list[tuple[int, str]]:
    return [(event.line, event.raw) for event in events if event.error is not None]


def test_ndjson_lines_keep_their_numbers_and_blank_lines_are_ignored(tmp_path: Path) -> None:
    """Each NDJSON line is one message numbered by its line; blank lines and CRLF are fine."""
    path = write(tmp_path / "a.ndjson", '{"n": 1}\r\n\n   \n{"n": 2}\n')
    events = list(read_events([path]))
    assert events == [
        RawEvent(path, 1, '{"n": 1}', {"n": 1}),
        RawEvent(path, 4, '{"n": 2}', {"n": 2}),
    ]


def test_malformed_lines_are_kept_with_a_reason_and_reading_goes_on(tmp_path: Path) -> None:
    """A line that is not JSON, or not an object, is yielded with its error; the rest follows."""
    path = write(tmp_path / "a.jsonl", '{"n": 1}\n{"n": \n42\n"text"\n{"n": 2}\n')
    events = list(read_events([path]))
    assert good(events) == [(1, {"n": 1}), (5, {"n": 2})]
    assert [(event.line, event.raw, event.error) for event in events if event.error] == [
        (2, '{"n":', "invalid JSON: Expecting value (column 6)"),
        (3, "42", "expected a JSON object, got a number"),
        (4, '"text"', "expected a JSON object, got a string"),
    ]


def test_a_broken_first_line_does_not_hide_the_rest_of_the_file(tmp_path: Path) -> None:
    """NDJSON whose first line is cut short is still read line by line after it."""
    path = write(tmp_path / "a.ndjson", '{"n": 1, "cut": \n{"n": 2}\n\n{"n": 3}\n')
    events = list(read_events([path]))
    assert good(events) == [(2, {"n": 2}), (4, {"n": 3})]
    assert bad(events) == [(1, '{"n": 1, "cut":')]


def test_invalid_utf8_spoils_only_its_line(tmp_path: Path) -> None:
    """A line with bytes that are not UTF-8 is reported; the other lines are read."""
    path = tmp_path / "a.ndjson"
    path.write_bytes(b'\xef\xbb\xbf{"n": 1}\n{"s": "\xff"}\n{"n": 2}\n')
    events = list(read_events([str(path)]))
    assert good(events) == [(1, {"n": 1}), (3, {"n": 2})]
    assert [(event.line, event.error) for event in events if event.error] == [
        (2, "line is not valid UTF-8")
    ]


def test_gzip_is_detected_by_content_not_by_name(tmp_path: Path) -> None:
    """A gzipped file is read whatever its name; a plain one named .gz fails only if broken."""
    zipped = tmp_path / "plain-name.ndjson"
    zipped.write_bytes(gzip.compress(b'{"n": 1}\n{"n": 2}\n'))
    events = list(read_events([str(zipped)]))
    assert good(events) == [(1, {"n": 1}), (2, {"n": 2})]


def test_a_truncated_gzip_is_a_source_error_naming_the_file(tmp_path: Path) -> None:
    """A gzip stream cut short cannot be read: SourceError names the file."""
    path = tmp_path / "cut.ndjson.gz"
    compressed = gzip.compress(b'{"n": 1}\n' * 1000)
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(SourceError, match=r"cut\.ndjson\.gz"):
        list(read_events([str(path)]))


def test_a_json_array_yields_its_items_with_their_lines(tmp_path: Path) -> None:
    """A JSON array yields each item with the line it starts on; non-objects are errors."""
    text = '\n[\n  {"n": 1,\n   "m": 2},\n  {"n": 3}, 7,\n  []\n]\n'
    path = write(tmp_path / "a.json", text)
    events = list(read_events([path]))
    assert good(events) == [(3, {"n": 1, "m": 2}), (5, {"n": 3})]
    assert [(event.line, event.error) for event in events if event.error] == [
        (5, "expected a JSON object, got a number"),
        (6, "expected a JSON object, got an array"),
    ]
    assert events[0].raw == '{"n": 1,\n   "m": 2}'


def test_a_large_array_streams_across_read_chunks(tmp_path: Path) -> None:
    """An array much larger than one read chunk, with an item larger than one chunk, is read
    whole and in order, line numbers intact."""
    items = [{"n": index, "pad": "x" * 50} for index in range(5000)]
    items[2500]["pad"] = "y" * 200_000
    text = "[\n" + ",\n".join(json.dumps(item) for item in items) + "\n]\n"
    path = write(tmp_path / "big.json", text)
    events = list(read_events([path]))
    assert [event.message for event in events] == items
    assert [event.line for event in events] == list(range(2, 5002))


def test_a_syntax_error_in_an_array_is_reported_once_and_ends_the_file(tmp_path: Path) -> None:
    """Items before a syntax error are read; the error is one event naming its line."""
    path = write(tmp_path / "a.json", '[{"n": 1},\n {"n": oops},\n {"n": 3}]\n')
    events = list(read_events([path]))
    assert good(events) == [(1, {"n": 1})]
    assert len(bad(events)) == 1
    error = events[-1]
    assert error.line == 2
    assert error.raw == '{"n": oops},'
    assert error.error is not None
    assert "the rest of this file was not read" in error.error


def test_a_batch_envelope_merges_context_and_integrations_into_items(tmp_path: Path) -> None:
    """Top-level context and integrations reach each item; the item's own values win."""
    envelope = {
        "batch": [
            {"type": "track", "context": {"ip": "1.2.3.4", "library": {"version": "2"}}},
            {"type": "page", "integrations": {"Amberflo": True}},
            "not an object",
        ],
        "context": {"library": {"name": "analytics-python", "version": "1"}, "locale": "en"},
        "integrations": {"All": False},
        "writeKey": "ignored",
    }
    path = write(tmp_path / "batch.json", json.dumps(envelope, indent=2))
    events = list(read_events([path]))
    assert good(events) == [
        (
            1,
            {
                "type": "track",
                "context": {
                    "ip": "1.2.3.4",
                    "library": {"version": "2", "name": "analytics-python"},
                    "locale": "en",
                },
                "integrations": {"All": False},
            },
        ),
        (
            1,
            {
                "type": "page",
                "integrations": {"Amberflo": True, "All": False},
                "context": envelope["context"],
            },
        ),
    ]
    assert events[2].error == "expected a JSON object, got a string"
    replayable = json.loads(events[1].raw)
    assert replayable == events[1].message


def test_an_envelope_on_one_ndjson_line_is_expanded(tmp_path: Path) -> None:
    """A one-line envelope inside NDJSON yields its items at that line."""
    line = json.dumps({"batch": [{"n": 1}, {"n": 2}], "context": {"c": 1}})
    path = write(tmp_path / "a.ndjson", '{"n": 0}\n' + line + "\n")
    assert good(list(read_events([path]))) == [
        (1, {"n": 0}),
        (2, {"n": 1, "context": {"c": 1}}),
        (2, {"n": 2, "context": {"c": 1}}),
    ]


def test_a_pretty_printed_message_is_one_message(tmp_path: Path) -> None:
    """A single indented JSON object (and another after it) are read as messages."""
    text = json.dumps({"type": "track", "n": 1}, indent=2) + "\n" + json.dumps({"n": 2}, indent=2)
    path = write(tmp_path / "one.json", text)
    assert good(list(read_events([path]))) == [(1, {"type": "track", "n": 1}), (5, {"n": 2})]


def test_folders_are_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    """A folder yields its .json/.jsonl/.ndjson files (and .gz) recursively, sorted by path;
    other and hidden files are ignored."""
    write(tmp_path / "b" / "z.ndjson", '{"f": "b/z"}\n')
    write(tmp_path / "a.json", '[{"f": "a"}]')
    write(tmp_path / "c.jsonl", '{"f": "c"}\n')
    (tmp_path / "b" / "y.ndjson.gz").write_bytes(gzip.compress(b'{"f": "b/y"}\n'))
    write(tmp_path / "notes.txt", "not events")
    write(tmp_path / ".hidden.json", '{"f": "hidden"}')
    events = list(read_events([str(tmp_path)]))
    assert [event.message for event in events] == [
        {"f": "a"},
        {"f": "b/y"},
        {"f": "b/z"},
        {"f": "c"},
    ]
    assert [Path(event.source).name for event in events] == [
        "a.json",
        "y.ndjson.gz",
        "z.ndjson",
        "c.jsonl",
    ]


def test_a_missing_path_fails_before_anything_is_read(tmp_path: Path) -> None:
    """A path that does not exist raises SourceError naming it at call time."""
    present = write(tmp_path / "a.ndjson", '{"n": 1}\n')
    missing = str(tmp_path / "nope.ndjson")
    with pytest.raises(SourceError, match=r"nope\.ndjson does not exist"):
        read_events([present, missing])


def test_stdin_is_read_for_dash_gzip_included() -> None:
    """``-`` reads the given standard input, plain or gzipped, named <stdin>."""
    stdin = io.BytesIO(gzip.compress(b'{"n": 1}\n{"n": 2}\n'))
    events = list(read_events(["-"], stdin=stdin))
    assert [(event.source, event.message) for event in events] == [
        ("<stdin>", {"n": 1}),
        ("<stdin>", {"n": 2}),
    ]


def test_an_empty_file_yields_nothing(tmp_path: Path) -> None:
    """An empty or blank file is not an error; it has no messages."""
    path = write(tmp_path / "empty.ndjson", "\n\n  \n")
    assert list(read_events([path])) == []


# The values where a fast JSON parser is most likely to part from the standard library's.
AWKWARD_VALUES: list[object] = [
    {"id": 12345678901234567890123, "n": -9223372036854775809, "max": 18446744073709551615},
    {"f": 0.1, "g": 1e-320, "h": 1.7976931348623157e308, "i": -0.0, "j": 5e-324},
    {"s": "café ☕ \u2028 \x1f", "q": '"\\/', "e": ""},
    {"nested": {"a": [1, {"b": None}], "c": True}},
]


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_every_line_reads_as_the_standard_library_reads_it(tmp_path: Path, newline: str) -> None:
    """Each NDJSON line gives what json.loads gives (huge integers exact, NaN and Infinity
    read, non-ASCII text intact), numbered as an editor numbers lines, whatever the line ending."""
    lines = [json.dumps(value, ensure_ascii=False) for value in AWKWARD_VALUES]
    lines += ['{"nan": NaN, "inf": -Infinity}', "", '{"after": "blank"}']
    path = tmp_path / "a.ndjson"
    path.write_bytes(newline.join(lines).encode())
    events = list(read_events([str(path)]))
    expected = [(n, json.loads(line)) for n, line in enumerate(lines, start=1) if line]
    assert [event.line for event in events] == [n for n, _ in expected]
    assert [event.raw for event in events] == [line for line in lines if line]
    assert repr([event.message for event in events]) == repr([value for _, value in expected])
    assert type(events[0].message["id"]) is int  # type: ignore[index]


def test_lines_across_read_blocks_are_whole_and_numbered(tmp_path: Path) -> None:
    """A file of several megabytes with lines of every length, one of them longer than a read
    block, is read line for line: nothing split, merged or renumbered at block edges."""
    values = [{"n": n, "pad": "x" * (n * 37 % 1500)} for n in range(6000)]
    values[3000]["pad"] = "y" * 3_000_000
    path = tmp_path / "big.ndjson"
    path.write_text("".join(json.dumps(v) + ("\r\n" if v["n"] % 2 else "\n") for v in values))
    events = list(read_events([str(path)]))
    assert [event.message for event in events] == values
    assert [event.line for event in events] == list(range(1, 6001))


def test_a_bad_line_keeps_the_standard_librarys_message(tmp_path: Path) -> None:
    """A malformed line is reported with the standard library's message and column, and a
    line with a byte-order mark only at the start of the file is read normally."""
    path = tmp_path / "a.ndjson"
    path.write_bytes(b'\xef\xbb\xbf{"n": 1}\n{"n": 1,}\n{"n": 2} {"n": 3}\n')
    events = list(read_events([str(path)]))
    assert [(event.line, event.message, event.error) for event in events] == [
        (1, {"n": 1}, None),
        (2, None, "invalid JSON: Expecting property name enclosed in double quotes (column 9)"),
        (3, None, "invalid JSON: Extra data (column 10)"),
    ]


def test_a_pipe_is_read_as_it_flows() -> None:
    """Lines arriving through a pipe come out as they arrive, before the writer is done, so a
    slow producer's events are not held back until a block fills."""
    read_end, write_end = os.pipe()
    got: list[RawEvent] = []
    with os.fdopen(read_end, "rb") as reader, os.fdopen(write_end, "wb") as writer:
        writer.write(b'{"n": 1}\n')
        writer.flush()
        first = threading.Thread(target=lambda: got.append(next(read_stream(reader, "pipe"))))
        first.start()
        first.join(timeout=10)  # guards against a hang; it returns at once when correct
        alive = first.is_alive()
        writer.close()  # ends the stream, so a stuck reader can finish
        first.join()
    assert not alive
    assert got == [RawEvent("pipe", 1, '{"n": 1}', {"n": 1})]
