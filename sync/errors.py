"""Every error this package raises, sorted by what the caller does next.

::

    SyncError                      root; carries the process exit code
    ├── UsageError                 exit 2: bad command line or configuration
    │   └── ConfigError            a setting is missing or invalid (names the key and the fix)
    ├── FatalError                 exit 1: the run cannot go on
    │   ├── AuthError              Amberflo rejected the API key (401/403)
    │   ├── SourceError            the snapshot or event source cannot be read
    │   ├── StateError             the state folder is unusable (corrupt, unknown version)
    │   └── MassExitError          the mass-exit guard tripped
    ├── LockHeldError              exit 4: another run holds the state lock
    └── DeliveryError              one request failed; the caller decides per item
        ├── RetriableError         429, 5xx, transport errors: try again later
        └── PermanentError         other 4xx: that item will not go through as it is

Errors are always chained (``raise ... from exc``) and carry their context (status, endpoint,
item) so a log line or failure file can say what happened without a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_LOCKED = 4


class SyncError(Exception):
    """Root of every error raised by amberflo-sync."""

    exit_code: int = EXIT_FATAL


class UsageError(SyncError):
    """The command line or the configuration is wrong; nothing was done."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A setting is missing or invalid."""


class FatalError(SyncError):
    """The run cannot go on; state is left as it was at the last commit."""

    exit_code = EXIT_FATAL


class AuthError(FatalError):
    """Amberflo rejected the credentials."""

    def __init__(self, message: str, *, status: int, endpoint: str) -> None:
        super().__init__(message)
        self.status = status
        self.endpoint = endpoint


class SourceError(FatalError):
    """A snapshot or event source cannot be read."""


class StateError(FatalError):
    """The state folder is unusable."""


class MassExitError(FatalError):
    """The run would exit more users than the configured share allows."""


class LockHeldError(SyncError):
    """Another run holds the state lock."""

    exit_code = EXIT_LOCKED


class DeliveryError(SyncError):
    """One request to Amberflo failed."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None,
        endpoint: str,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.endpoint = endpoint
        self.retry_after = retry_after


class RetriableError(DeliveryError):
    """A transient failure (429, 5xx, timeout, dropped connection): the request may be retried."""


class PermanentError(DeliveryError):
    """A 4xx other than 401/403/429: sending the same request again cannot succeed."""
