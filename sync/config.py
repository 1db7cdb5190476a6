"""Settings: ``config/sync.toml`` (or ``--config`` / ``AMBERFLO_SYNC_CONFIG``), then the
environment and a ``.env`` file. This is the only module that reads the environment.

Precedence, highest first: environment variables, ``.env``, the TOML file, defaults. The API key
comes only from the environment (``AMBERFLO_API_KEY``); a key written in the TOML file is refused,
because config files get committed and mailed around. Relative paths in the TOML file are
resolved from the file's own folder, so a config works from any working directory; relative paths
from the environment are resolved from the working directory.

Any other setting can be overridden from the environment as
``AMBERFLO_SYNC_<SECTION>__<KEY>``, e.g. ``AMBERFLO_SYNC_STATE__DIR=/var/lib/amberflo-sync``.
"""

from __future__ import annotations

import os
import platform
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sync.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("config/sync.toml")
CONFIG_ENV_VAR = "AMBERFLO_SYNC_CONFIG"
ARROW_POOL_ENV_VAR = "ARROW_DEFAULT_MEMORY_POOL"
NUMPY_HUGEPAGE_ENV_VAR = "NUMPY_MADVISE_HUGEPAGE"
JEMALLOC_CONF_ENV_VAR = "JE_ARROW_MALLOC_CONF"
# Half a second: pages freed by one step are reused by the next, yet a step's leftovers are
# handed back before they pile up under the following ones.
JEMALLOC_DECAY = "dirty_decay_ms:500,muzzy_decay_ms:500"
DEFAULT_BASE_URL = "https://app.amberflo.io"


class _Section(BaseModel):
    # A misspelt key in the TOML file must be an error, not a silently ignored line.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSettings(_Section):
    """``[source]``: where the Engage snapshot is and how it is laid out."""

    path: str
    layout: Literal["wide", "long", "membership"] = "wide"
    id_column: str = "user_id"
    name_column: str | None = None
    email_column: str | None = None
    key_column: str = "name"
    value_column: str = "value"
    audiences: list[str] | None = None
    traits: list[str] | None = None


class StateSettings(_Section):
    """``[state]``: the state store and how often a run checkpoints acknowledged users."""

    dir: Path = Path(".amberflo-sync")
    checkpoint_every: int = Field(default=5000, ge=1)
    checkpoint_seconds: float = Field(default=5.0, gt=0)


class AmberfloSettings(_Section):
    """``[amberflo]``: how customers are written and how hard delivery tries."""

    write_mode: Literal["merge", "replace"] = "merge"
    concurrency: int = Field(default=8, ge=1, le=256)
    timeout_seconds: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    retry_deadline_seconds: float = Field(default=300.0, gt=0)


class SafetySettings(_Section):
    """``[safety]``: guards against a truncated or empty snapshot."""

    max_exit_fraction: float = Field(default=0.5, ge=0.0, le=1.0)


class ReportSettings(_Section):
    """``[report]``: how many before -> after samples a report shows per category."""

    samples: int = Field(default=20, ge=0, le=10_000)


def _default_workers() -> int:
    """One mapping worker a core this process may run on, at most four: past that, delivery
    (one process) is the limit."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(cores, 4)


class EventsSettings(_Section):
    """``[events]``: the drop folder the ``schedule`` command forwards, when set, and how many
    worker processes parse and map large inputs (0: all in the main process)."""

    path: str | None = None
    workers: int = Field(default_factory=_default_workers, ge=0, le=64)


class AlertSettings(_Section):
    """``[alerts]``: who is told when runs start failing, recover, or change volume jumps."""

    webhook_url: str | None = None
    command: str | None = None
    max_failed_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    max_change_fraction: float = Field(default=0.25, ge=0.0, le=1.0)


class Settings(BaseSettings):
    """Every setting of one invocation."""

    model_config = SettingsConfigDict(
        env_prefix="AMBERFLO_SYNC_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        frozen=True,
    )

    api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("AMBERFLO_API_KEY", "api_key")
    )
    base_url: str = Field(
        default=DEFAULT_BASE_URL, validation_alias=AliasChoices("AMBERFLO_BASE_URL", "base_url")
    )
    ingest_url: str | None = Field(
        default=None, validation_alias=AliasChoices("AMBERFLO_INGEST_URL", "ingest_url")
    )
    source: SourceSettings | None = None
    state: StateSettings = StateSettings()
    amberflo: AmberfloSettings = AmberfloSettings()
    keys: dict[str, str] = Field(default_factory=dict)
    safety: SafetySettings = SafetySettings()
    report: ReportSettings = ReportSettings()
    events: EventsSettings = EventsSettings()
    alerts: AlertSettings = AlertSettings()
    config_file: Path | None = None

    @field_validator("base_url", "ingest_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https:// (got {value!r})")
        return value.rstrip("/") if value else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment must win over it.
        return env_settings, dotenv_settings, init_settings

    @property
    def api_key_value(self) -> str:
        """The API key; only the HTTP client should ask for it."""
        if self.api_key is None:
            raise ConfigError(
                "AMBERFLO_API_KEY is not set: export it (or put it in a .env file) with the API "
                "key from the Amberflo dashboard; a --dry-run needs none"
            )
        return self.api_key.get_secret_value()


def choose_allocators() -> None:
    """Pick how pyarrow and numpy take memory, unless the environment already says; call
    before either is imported.

    pyarrow (``ARROW_DEFAULT_MEMORY_POOL``): jemalloc where pyarrow's Linux x86-64 wheels carry
    it, else the C library's malloc; never the bundled mimalloc, which handed memory back to
    the kernel so eagerly that a 1M-user dry run spent 2.2 to 2.8 s in the kernel with it,
    against 0.8 s with malloc. jemalloc keeps freed pages for reuse: a 10M-user dry run
    peaked at 2.9 GiB instead of 3.4 GiB with malloc, and spent 2 s less in the kernel.

    pyarrow's jemalloc (``JE_ARROW_MALLOC_CONF``): freed pages go back to the kernel after
    half a second unused. With pyarrow's own setting they stayed for longer than a step of a
    run, and piled up under the next: a 10M-user dry run peaked at 2.6 to 2.9 GiB, and at
    2.5 GiB so, in the same time (alternated four times).

    numpy (``NUMPY_MADVISE_HUGEPAGE``): no transparent huge pages asked for. numpy asks for
    them on every large array; where the kernel then compacts memory to find free 2 MiB pages
    (``defrag`` of ``madvise``, a common default), a fresh column of ten million values took
    0.35 s to fault in instead of 0.05 s, and a 10M-user dry run spent 1.5 to 2 s more in
    the kernel.
    """
    jemalloc_built_in = sys.platform == "linux" and platform.machine() == "x86_64"
    os.environ.setdefault(ARROW_POOL_ENV_VAR, "jemalloc" if jemalloc_built_in else "system")
    os.environ.setdefault(JEMALLOC_CONF_ENV_VAR, JEMALLOC_DECAY)
    os.environ.setdefault(NUMPY_HUGEPAGE_ENV_VAR, "0")


def config_file_from(cli_value: Path | None) -> Path | None:
    """The config file this invocation uses: ``--config``, else ``AMBERFLO_SYNC_CONFIG``, else the
    default ``config/sync.toml`` when it exists."""
    if cli_value is not None:
        return cli_value
    from_env = os.environ.get(CONFIG_ENV_VAR)
    if from_env:
        return Path(from_env)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


_PATH_KEYS: tuple[tuple[str, str], ...] = (("source", "path"), ("state", "dir"), ("events", "path"))


def _read_toml(config_file: Path) -> dict[str, Any]:
    try:
        with config_file.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"config file {config_file} not found: pass --config FILE or set {CONFIG_ENV_VAR}"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_file}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {config_file} cannot be read: {exc}") from exc
    for secret in ("api_key", "AMBERFLO_API_KEY"):
        if secret in data:
            raise ConfigError(
                f"{config_file}: remove {secret!r}; the API key is read only from the "
                "environment variable AMBERFLO_API_KEY"
            )
    base = config_file.resolve().parent
    for section, key in _PATH_KEYS:
        table = data.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str):
            table[key] = str(_resolve(Path(table[key]), base))
    data["config_file"] = str(config_file.resolve())
    return data


def _resolve(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def _describe(error: ValidationError, origin: str) -> str:
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown setting (check its spelling and section)"
        lines.append(f"{origin}: {where}: {message}")
    return "\n".join(lines)


def load_settings(
    config_file: Path | None = None,
    *,
    require_api_key: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load the settings of one invocation; every problem is one clear :class:`ConfigError`.

    ``config_file`` None means no file: defaults and environment only. ``overrides`` take the
    place of TOML values (used by tests and by commands with their own flags).
    """
    data: dict[str, Any] = _read_toml(config_file) if config_file is not None else {}
    for key, value in (overrides or {}).items():
        data[key] = value
    origin = str(config_file) if config_file is not None else "settings"
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from exc
    settings = _absolute_paths(settings)
    if require_api_key:
        settings.api_key_value  # noqa: B018 - raises the ConfigError that explains the fix
    return settings


def _absolute_paths(settings: Settings) -> Settings:
    """Paths that came from the environment are relative to the working directory."""
    cwd = Path.cwd()
    state = settings.state.model_copy(update={"dir": _resolve(settings.state.dir, cwd)})
    update: dict[str, Any] = {"state": state}
    if settings.source is not None:
        source_path = str(_resolve(Path(settings.source.path), cwd))
        update["source"] = settings.source.model_copy(update={"path": source_path})
    if settings.events.path is not None:
        events_path = str(_resolve(Path(settings.events.path), cwd))
        update["events"] = settings.events.model_copy(update={"path": events_path})
    return settings.model_copy(update=update)


_CHILD_VARIABLES = frozenset({"PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER"})


def child_environment() -> dict[str, str]:
    """A minimal environment for commands this job starts (alert hooks): never the API key."""
    return {key: value for key, value in os.environ.items() if key in _CHILD_VARIABLES}
