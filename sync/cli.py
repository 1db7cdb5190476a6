"""The command line: parses argv, sets up logging, and maps errors to exit codes.

Exit codes (DESIGN.md): 0 all delivered; 3 partial (see the run's failure or dead-letter file);
1 fatal (credentials rejected, source unreadable, state unusable, mass-exit guard tripped);
2 usage or configuration error; 4 another run holds the state lock.

Every command catches :class:`sync.errors.SyncError` in one place (:func:`main`), prints one
clear line to standard error and exits with the error's code. Nothing is swallowed: a scheduled
job fails loudly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import structlog
from rich.console import Console

from sync import __version__
from sync.config import Settings, choose_allocators, config_file_from, load_settings
from sync.errors import EXIT_FATAL, EXIT_USAGE, SyncError
from sync.logs import REDACTOR, configure_logging

log = structlog.get_logger(__name__)

CONFIG_OPTION = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Config file (default: $AMBERFLO_SYNC_CONFIG, else config/sync.toml).",
)


def _settings(config_file: Path | None, *, require_api_key: bool) -> Settings:
    settings = load_settings(config_file_from(config_file), require_api_key=require_api_key)
    if settings.api_key is not None:
        REDACTOR.add(settings.api_key.get_secret_value())
    return settings


# Off a terminal (cron mail, a CI log, a pipe) Rich would lay tables out for 80 columns and wrap
# every long line there, breaking the run ids and file paths a reader copies into the next
# command; so tables get room and plain lines are never wrapped.
_PIPE_WIDTH = 120


def _console() -> Console:
    if sys.stdout.isatty():
        return Console(file=sys.stdout, soft_wrap=False)
    return Console(file=sys.stdout, soft_wrap=True, width=_PIPE_WIDTH)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="amberflo-sync")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "console", "json"]),
    default="auto",
    show_default=True,
    help="auto: console on a terminal, JSON lines otherwise.",
)
def cli(log_level: str, log_format: str) -> None:
    """Keep Amberflo customers and meters in step with Segment."""
    configure_logging(
        level=log_level, json_lines=None if log_format == "auto" else log_format == "json"
    )


@cli.command()
@CONFIG_OPTION
@click.option("--full", is_flag=True, help="Send every user of the snapshot and every exit.")
@click.option("--dry-run", is_flag=True, help="Compute and report the changes; send nothing.")
@click.option(
    "--report",
    "report_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write a report of the run: .json, .md or .html.",
)
@click.option(
    "--allow-mass-exit", is_flag=True, help="Send even when the mass-exit guard would stop."
)
def run(
    config_file: Path | None,
    full: bool,
    dry_run: bool,
    report_file: Path | None,
    allow_mass_exit: bool,
) -> None:
    """Diff the Engage snapshot against the acknowledged state and upsert changed users."""
    from sync.report import report_format
    from sync.signals import graceful_stop

    if report_file is not None:
        report_format(report_file)  # a wrong extension is a usage error before any work
    settings = _settings(config_file, require_api_key=not dry_run)
    # pandas and pyarrow load here, after the cheap checks: a usage error answers at once.
    from sync.pipeline import RunOptions, run_sync

    # SIGTERM/SIGINT: finish the requests in flight, commit what Amberflo acknowledged,
    # record the run as interrupted (exit 3); a second signal exits at once.
    with graceful_stop() as stop:
        result = run_sync(
            settings,
            RunOptions(
                full=full,
                dry_run=dry_run,
                report_file=report_file,
                allow_mass_exit=allow_mass_exit,
            ),
            console=_console(),
            stop=stop,
        )
    sys.exit(result.exit_code)


@cli.command()
@click.argument("paths", nargs=-1)
@CONFIG_OPTION
@click.option("--dry-run", is_flag=True, help="Print the records it would send; send nothing.")
def events(paths: tuple[str, ...], config_file: Path | None, dry_run: bool) -> None:
    """Forward Segment events (page, screen, track, identify) from files, folders or '-'."""
    from sync.forward import forward_events
    from sync.runid import new_run_id
    from sync.signals import graceful_stop

    settings = _settings(config_file, require_api_key=not dry_run)
    # SIGTERM/SIGINT: read no further, finish what is in flight, dead-letter the rest of the
    # identify window as not sent, record the run as interrupted (exit 3); a second signal
    # exits at once.
    with graceful_stop() as stop:
        result = forward_events(
            settings,
            list(paths) or ["-"],
            dry_run=dry_run,
            run_id=new_run_id(),
            out=sys.stdout,
            stop=stop,
        )
    if not dry_run:
        # The dry run prints its counts as a JSON line; a real run says what happened in words.
        skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(result.skipped.items()))
        click.echo(
            f"events run {result.run_id}{' (interrupted)' if result.interrupted else ''}: "
            f"read {result.read}, sent {result.sent}, "
            f"skipped {result.skipped_total}{f' ({skipped})' if skipped else ''}, "
            f"dead-lettered {result.dead_lettered}"
        )
        if result.dead_letter_file:
            click.echo(f"dead letters (with the reason for each): {result.dead_letter_file}")
    sys.exit(result.exit_code)


@cli.command()
@CONFIG_OPTION
@click.option("--every", help="Interval between run starts, e.g. 30m, 2h, 1d.")
@click.option("--cron", "cron_expr", help='A cron expression, e.g. "0 */2 * * *" (UTC).')
@click.option("--max-runs", type=int, default=None, hidden=True)
def schedule(
    config_file: Path | None, every: str | None, cron_expr: str | None, max_runs: int | None
) -> None:
    """Run the Engage sync (and the events drop folder) on a schedule."""
    from sync.schedule import Schedule, run_schedule

    if (every is None) == (cron_expr is None):
        raise click.UsageError("give exactly one of --every or --cron")
    plan = Schedule.parse(every=every, cron=cron_expr)
    settings = _settings(config_file, require_api_key=True)
    sys.exit(run_schedule(settings, plan, console=_console(), max_runs=max_runs))


@cli.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run.")
@click.option("--limit", type=int, default=20, show_default=True)
def history(config_file: Path | None, as_json: bool, limit: int) -> None:
    """List recent runs: mode, start, duration, counts, exit code, failure file."""
    from sync.history import render_history
    from sync.state import RunLogs

    settings = _settings(config_file, require_api_key=False)
    runs = RunLogs(settings.state.dir).runs(limit=limit)
    if as_json:
        for entry in runs:
            click.echo(json.dumps(entry, sort_keys=True))
    else:
        render_history(runs, _console())


@cli.group()
def state() -> None:
    """Adopt, inspect or reset what the job remembers Amberflo acknowledged."""


@state.command()
@CONFIG_OPTION
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--verify",
    type=int,
    default=0,
    help="First compare N random customers in Amberflo with the snapshot; refuse on a mismatch.",
)
def adopt(config_file: Path | None, yes: bool, verify: int) -> None:
    """Record the current snapshot as acknowledged, sending nothing."""
    from sync.pipeline import adopt_state

    settings = _settings(config_file, require_api_key=verify > 0)
    sys.exit(adopt_state(settings, yes=yes, verify=verify, console=_console()))


@state.command()
@click.argument("user_id")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True)
def show(user_id: str, config_file: Path | None, as_json: bool) -> None:
    """Print the stored record of one user."""
    from sync.state_commands import show_user

    settings = _settings(config_file, require_api_key=False)
    sys.exit(show_user(settings, user_id, as_json=as_json, console=_console()))


@state.command()
@CONFIG_OPTION
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def reset(config_file: Path | None, yes: bool) -> None:
    """Forget the state (a timestamped backup is kept); the next run is an initial full sync."""
    from sync.state_commands import reset_state

    settings = _settings(config_file, require_api_key=False)
    sys.exit(reset_state(settings, yes=yes, console=_console()))


@state.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True)
def info(config_file: Path | None, as_json: bool) -> None:
    """Format version, users, managed keys, last run, size on disk."""
    from sync.state_commands import state_info

    settings = _settings(config_file, require_api_key=False)
    sys.exit(state_info(settings, as_json=as_json, console=_console()))


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8484, show_default=True)
@click.option("--api-key", "api_keys", multiple=True, help="Accept only these keys (repeatable).")
@click.option("--put-missing", type=click.Choice(["create", "error"]), default="create")
@click.option("--rate-429", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--retry-after", type=float, default=1.0, show_default=True)
@click.option("--rate-5xx", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--rate-drop", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--latency-ms", type=float, default=0.0, show_default=True)
@click.option("--fail-all", is_flag=True, help="Answer every API request with 500.")
@click.option("--seed", type=int, default=None)
def emulator(
    *,
    host: str,
    port: int,
    api_keys: tuple[str, ...],
    put_missing: str,
    rate_429: float,
    retry_after: float,
    rate_5xx: float,
    rate_drop: float,
    latency_ms: float,
    fail_all: bool,
    seed: int | None,
) -> None:
    """Serve a local, in-memory emulator of the Amberflo API (for demos and tests)."""
    from sync.emulator import EmulatorOptions, serve

    serve(
        EmulatorOptions(
            host=host,
            port=port,
            api_keys=frozenset(api_keys) or None,
            put_missing="error" if put_missing == "error" else "create",
            rate_429=rate_429,
            retry_after=retry_after,
            rate_5xx=rate_5xx,
            rate_drop=rate_drop,
            latency_ms=latency_ms,
            fail_all=fail_all,
            seed=seed,
        )
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``amberflo-sync`` and ``python -m sync``."""
    choose_allocators()  # before any command imports numpy or pyarrow
    try:
        cli.main(args=argv, prog_name="amberflo-sync", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("amberflo-sync: aborted", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except SyncError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo("amberflo-sync: interrupted", err=True)
        sys.exit(130)


def _fail(exc: SyncError) -> None:
    details: dict[str, Any] = {"error": type(exc).__name__}
    log.error("command_failed", reason=str(exc), **details)
    click.echo(f"amberflo-sync: error: {exc}", err=True)
    sys.exit(exc.exit_code if exc.exit_code else EXIT_FATAL)
