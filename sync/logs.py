"""Logging, set up once per process: a readable console on a terminal, JSON lines otherwise.

Every line carries the run id (bound through ``structlog.contextvars``), and a redaction
processor removes the API key from every value of every event, whatever the call site logs,
so a secret cannot reach a log file by accident. Logs go to standard error; standard output is
kept for what a command prints on purpose (dry-run records, ``--json`` output).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import stamina.instrumentation
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[REDACTED]"
_SENSITIVE_KEYS = frozenset({"api_key", "x-api-key", "x_api_key", "authorization", "apikey"})


class SecretRedactor:
    """A structlog processor that hides secrets in event values, nested ones included."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = [secret for secret in secrets if secret]

    def add(self, secret: str | None) -> None:
        """Start hiding ``secret`` (ignored when empty)."""
        if secret and secret not in self._secrets:
            self._secrets.append(secret)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        return self._scrub_mapping(event_dict)

    def _scrub_mapping(self, mapping: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in list(mapping.items()):
            if key.lower() in _SENSITIVE_KEYS and value:
                mapping[key] = REDACTED
            else:
                mapping[key] = self._scrub(value)
        return mapping

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return self._scrub_mapping(dict(value))
        if isinstance(value, list | tuple):
            return type(value)(self._scrub(item) for item in value)
        if isinstance(value, BaseException):
            return self._scrub(repr(value))
        return value


REDACTOR = SecretRedactor()

# One lock for every log line of the process. It is held across fork(): a child forked while
# another thread is writing a line (the stop watcher, see sync.signals) would otherwise be born
# with it taken and hang at its own first line.
_WRITE_LOCK = threading.Lock()
os.register_at_fork(
    before=_WRITE_LOCK.acquire,
    after_in_parent=_WRITE_LOCK.release,
    after_in_child=_WRITE_LOCK.release,
)


class LineWriter:
    """structlog's final logger: writes each rendered event to ``out`` as one whole line."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def msg(self, message: str) -> None:
        """Write ``message`` and a newline, flushed, under the process's write lock."""
        with _WRITE_LOCK:
            self._out.write(message + "\n")
            self._out.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def configure_logging(
    *, level: str = "info", json_lines: bool | None = None, stream: TextIO | None = None
) -> None:
    """Configure structlog and the standard library's logging once for this process.

    ``json_lines`` None picks by the stream: a console renderer on a terminal, JSON otherwise.
    """
    out = stream or sys.stderr
    as_json = not out.isatty() if json_lines is None else json_lines
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        REDACTOR,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=lambda *_: LineWriter(out),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library (httpx logs each request at INFO) are
    # kept quiet unless asked: the job logs its own, redacted, summary of each request.
    logging.basicConfig(stream=out, level=max(numeric_level, logging.WARNING), force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # Delivery logs one `retrying` event per retry with the endpoint and reason; stamina's own
    # hook would log each retry a second time.
    stamina.instrumentation.set_on_retry_hooks([])


def bind_run(run_id: str, **context: Any) -> None:
    """Put the run id (and any other context) on every following log line of this thread."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(run_id=run_id, **context)
