"""Logging: JSON lines off a terminal, the run id on every line, the key redacted."""

from __future__ import annotations

import io
import json

import structlog

from sync.logs import REDACTED, SecretRedactor, bind_run, configure_logging


def test_json_lines_carry_the_run_id_and_never_the_key() -> None:
    """Whatever a call site logs, the API key is replaced and the run id is present."""
    stream = io.StringIO()
    configure_logging(json_lines=True, stream=stream)
    redactor = SecretRedactor(["s3cr3t-key"])
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            redactor,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(file=stream),
    )
    bind_run("run-1")
    structlog.get_logger().info(
        "request_failed",
        url="https://x/?k=s3cr3t-key",
        headers={"x-api-key": "anything"},
        error=ValueError("bad s3cr3t-key"),
    )
    line = json.loads(stream.getvalue().strip())
    assert "s3cr3t-key" not in stream.getvalue()
    assert line["run_id"] == "run-1"
    assert line["headers"]["x-api-key"] == REDACTED
    assert REDACTED in line["url"]
    assert REDACTED in line["error"]
