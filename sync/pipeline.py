"""Orchestration of one Engage sync run, and of the state commands. The only module that
commits state.

One run::

    lock (not for a dry run) -> load state -> read snapshot -> diff -> plan
         -> dry run: report, mass-exit guard, stop (no network, no write)
         -> mass-exit guard -> deliver (concurrent)
         -> checkpoint acknowledged users as they come -> commit
         -> failure file, report, runs.jsonl line, one run_finished log line

Every run, dry or not, failed or not, ends with exactly one ``run_finished`` log line; every
real run that got the lock, with exactly one ``runs.jsonl`` line.

Only users Amberflo acknowledged advance in state; a failed user keeps its old stored record, so
the next run's diff sends it again. Checkpoints every ``state.checkpoint_every`` users or
``state.checkpoint_seconds`` bound what a crash can cost to a re-send of the last few seconds of
work (harmless: customer upserts are idempotent).
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime as dt
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import structlog
from rich.console import Console

from sync.amberflo import AmberfloClient
from sync.config import Settings
from sync.deliver import CustomerWriter, RetryPolicy, deliver_customers, read_existing_ids
from sync.diff import (
    FINGERPRINTS,
    Diff,
    InitialState,
    KnownState,
    acknowledged_rows,
    apply_acknowledged,
    diff,
)
from sync.errors import (
    EXIT_FATAL,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    ConfigError,
    MassExitError,
    SyncError,
    UsageError,
)
from sync.logs import bind_run
from sync.model import CustomerRecord, DeliverySummary, DiffSummary, Outcome
from sync.plan import plan_customers
from sync.progress import ProgressReporter
from sync.report import ReportInput, ReportMode, render_terminal, write_report
from sync.runid import new_run_id
from sync.snapshot import Snapshot, read_snapshot
from sync.state import StateStore, StoredState

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RunOptions:
    """The command-line switches of ``amberflo-sync run``."""

    full: bool = False
    dry_run: bool = False
    report_file: Path | None = None
    allow_mass_exit: bool = False


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one run did."""

    run_id: str
    exit_code: int
    diff: Diff | None
    delivery: DeliverySummary | None


def _mode(options: RunOptions) -> ReportMode:
    if options.dry_run:
        return "full-dry-run" if options.full else "dry-run"
    return "full" if options.full else "run"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _known(stored: StoredState) -> KnownState:
    return KnownState(
        users=stored.users, audience_keys=stored.audience_keys, trait_keys=stored.trait_keys
    )


def _partially_known(store: StateStore) -> KnownState:
    """The state with only its fingerprints loaded: what a dry run needs (see KnownState)."""
    lazy = store.load_lazily(FINGERPRINTS)
    return KnownState(
        users=lazy.head,
        audience_keys=lazy.audience_keys,
        trait_keys=lazy.trait_keys,
        fetch=lazy.rows,
    )


def _stored(known: KnownState, run_id: str) -> StoredState:
    return StoredState(
        users=known.users,
        audience_keys=known.audience_keys,
        trait_keys=known.trait_keys,
        last_run=run_id,
    )


def _require_source(settings: Settings) -> None:
    if settings.source is None:
        where = settings.config_file or "the config file"
        raise ConfigError(
            f"{where} has no [source] section: add one with at least `path` (see README)"
        )


def _load_while_reading(
    settings: Settings,
    store: StateStore,
    load: Callable[[], KnownState],
    *,
    settle: bool = False,
) -> tuple[KnownState, Snapshot]:
    """The state (``load`` of ``store``) and the snapshot, read at the same time.

    The snapshot needs only the state's audience keys, which the manifest gives, so a second
    thread loads the stored users meanwhile, and sorts their id fingerprints for the diff's
    match: both mostly decode Parquet, hash and sort, releasing the GIL (at 10M users the
    load and sort take about 2 s, hidden behind a read of 6). The thread runs in
    a copy of this context, so its log lines still name the run. A damaged state is reported
    before any error of the snapshot, as when the state was loaded first.

    ``settle``: the snapshot is read against the state once it is loaded, and keeps values only
    for the users the state does not vouch for (see :func:`read_snapshot`): not for a diff
    that must look at every user.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-load") as pool:
        loading = pool.submit(contextvars.copy_context().run, lambda: load().with_id_order())
        try:
            snapshot = _read_with_keys(
                settings, store.managed_keys()[0], loading.result if settle else None
            )
        except BaseException:
            loading.result()
            raise
        return loading.result(), snapshot


def _read_with_keys(
    settings: Settings,
    known_audiences: tuple[str, ...],
    against: Callable[[], KnownState] | None = None,
) -> Snapshot:
    """The snapshot, read knowing the stored audience keys (and the state, when ``against``),
    its progress shown as it is read a part at a time."""
    _require_source(settings)
    assert settings.source is not None  # narrowed by _require_source
    with ExitStack() as shown:
        reporter: ProgressReporter | None = None

        def show(done: int, total: int, invalid: int) -> None:
            nonlocal reporter
            if reporter is None:  # the total is known once the files are open
                reporter = shown.enter_context(
                    ProgressReporter("reading snapshot", total, failed_as="invalid")
                )
            reporter.update(done, invalid)
            if done >= total:
                shown.close()  # the bar ends before the read's own log lines

        return read_snapshot(
            settings.source,
            settings.keys,
            known_audiences=known_audiences,
            against=against,
            progress=show,
        )


def client_for(settings: Settings) -> AmberfloClient:
    """The HTTP client of a run, sized to the configured concurrency."""
    return AmberfloClient(
        api_key=settings.api_key_value,
        base_url=settings.base_url,
        ingest_url=settings.ingest_url,
        timeout=settings.amberflo.timeout_seconds,
        max_connections=max(settings.amberflo.concurrency, 4),
    )


def retry_policy_for(settings: Settings) -> RetryPolicy:
    """The retry policy the configuration asks for."""
    return RetryPolicy(
        attempts=settings.amberflo.max_attempts,
        deadline=settings.amberflo.retry_deadline_seconds,
    )


def run_sync(
    settings: Settings,
    options: RunOptions,
    *,
    console: Console,
    stop: threading.Event | None = None,
    run_id: str | None = None,
) -> RunResult:
    """Run the Engage sync once; return its exit code with what it did.

    Fatal errors (source unreadable, state unusable, mass-exit guard, credentials rejected)
    propagate as :class:`SyncError` after the run is recorded in ``runs.jsonl``.
    """
    run_id = run_id or new_run_id()
    bind_run(run_id, command="run")
    started = _now()
    store = StateStore(settings.state.dir)
    # The run's line in runs.jsonl, filled in as the run goes so that a run that fails half way
    # is still recorded with what it did.
    entry: dict[str, Any] = {
        "run_id": run_id,
        "kind": "sync",
        "mode": _mode(options),
        "started_at": started.isoformat(),
    }
    # A dry run takes no lock and writes nothing under the state folder: it reads the state as
    # of the last atomic commit, and is not recorded in runs.jsonl.
    records = None if options.dry_run else store
    with nullcontext() if options.dry_run else store.lock():
        try:
            if options.dry_run:
                result = _dry_run(
                    settings,
                    options=options,
                    store=store,
                    entry=entry,
                    started=started,
                    console=console,
                )
            else:
                result = _real_run(
                    settings,
                    options=options,
                    store=store,
                    entry=entry,
                    started=started,
                    console=console,
                    stop=stop,
                )
        except SyncError as exc:
            _finish(entry, exit_code=exc.exit_code, error=str(exc), store=records)
            raise
        _finish(entry, exit_code=result.exit_code, store=records)
        return result


def _finish(
    entry: dict[str, Any], *, exit_code: int, store: StateStore | None, error: str | None = None
) -> None:
    """End the run: complete its entry, append it to ``runs.jsonl`` (unless ``store`` is None:
    a dry run) and log the run's one ``run_finished`` summary line."""
    entry["finished_at"] = _now().isoformat()
    entry["exit_code"] = exit_code
    if error is not None:
        entry["error"] = error
    if store is not None:
        store.record_run(entry)
    summary = {k: v for k, v in entry.items() if k != "run_id"}  # run_id is bound already
    if exit_code == EXIT_OK:
        log.info("run_finished", **summary)
    elif exit_code == EXIT_PARTIAL:
        log.warning("run_finished", **summary)
    else:
        log.error("run_finished", **summary)


def _plan(
    settings: Settings, options: RunOptions, store: StateStore, entry: dict[str, Any]
) -> tuple[KnownState, Snapshot, Diff]:
    # The plan reads stored values only for the users it looks at; a real run loads the rest
    # for its commit while it delivers (see _real_run).
    known, snapshot = _load_while_reading(
        settings,
        store,
        lambda: _partially_known(store),
        settle=not options.full,
    )
    result = diff(snapshot, known, full=options.full, samples=settings.report.samples)
    summary = result.summary
    entry["counts"] = {
        "in_snapshot": summary.in_snapshot,
        "invalid": sum(summary.invalid.values()),
        "added": summary.added,
        "changed": summary.changed,
        "exited": summary.exited,
        "unchanged": summary.unchanged,
        "to_send": summary.to_send,
    }
    log.info(
        "diff_computed",
        in_snapshot=summary.in_snapshot,
        invalid=dict(summary.invalid),
        added=summary.added,
        changed=summary.changed,
        exited=summary.exited,
        unchanged=summary.unchanged,
        to_send=summary.to_send,
    )
    for reason, count in summary.invalid.items():
        log.warning("invalid_rows_left_out", reason=reason, rows=count)
    return known, snapshot, result


def _check_mass_exit(
    settings: Settings, options: RunOptions, known: KnownState, result: Diff
) -> None:
    """Raise :class:`MassExitError` when the run would exit too large a share of known users."""
    limit = settings.safety.max_exit_fraction
    if result.mass_exit_fraction <= limit or options.allow_mass_exit:
        return
    outcome = (
        "A real run would stop here and send nothing" if options.dry_run else "Nothing was sent"
    )
    raise MassExitError(
        f"this run would exit {result.summary.exited} of {len(known.users)} known users "
        f"({result.mass_exit_fraction:.0%}, more than safety.max_exit_fraction={limit:.0%}); "
        f"is the snapshot empty or truncated? {outcome}. If the exits are real, run again "
        "with --allow-mass-exit"
    )


def _report(
    settings: Settings,
    *,
    options: RunOptions,
    run_id: str,
    started: dt.datetime,
    snapshot: Snapshot,
    result: Diff,
    delivery: DeliverySummary | None,
    exit_code: int | None,
    console: Console,
) -> None:
    report = ReportInput(
        run_id=run_id,
        mode=_mode(options),
        started_at=started,
        finished_at=_now(),
        source=", ".join(snapshot.files),
        state_dir=str(settings.state.dir),
        diff=result.summary,
        delivery=delivery,
        exit_code=exit_code,
    )
    render_terminal(report, console)
    if options.report_file is not None:
        write_report(options.report_file, report)
        log.info("report_written", path=str(options.report_file))


def _dry_run(
    settings: Settings,
    *,
    options: RunOptions,
    store: StateStore,
    entry: dict[str, Any],
    started: dt.datetime,
    console: Console,
) -> RunResult:
    run_id = entry["run_id"]
    known, snapshot, result = _plan(settings, options, store, entry)
    _report(
        settings,
        options=options,
        run_id=run_id,
        started=started,
        snapshot=snapshot,
        result=result,
        delivery=None,
        exit_code=None,
        console=console,
    )
    # After the report: a dry run is how one looks at a suspicious snapshot, so it shows the
    # exits, then fails as the real run would.
    _check_mass_exit(settings, options, known, result)
    return RunResult(run_id=run_id, exit_code=EXIT_OK, diff=result, delivery=None)


class _Checkpointer:
    """Collects acknowledged users on the caller thread and checkpoints them now and then."""

    def __init__(
        self, store: StateStore, run_id: str, result: Diff, every: int, seconds: float
    ) -> None:
        self._store = store
        self._run_id = run_id
        self._diff = result
        self._every = every
        self._seconds = seconds
        self._pending: list[str] = []
        self._last = time.monotonic()
        self.acknowledged: list[str] = []

    def add(self, customer_id: str) -> None:
        self._pending.append(customer_id)
        self.acknowledged.append(customer_id)
        if len(self._pending) >= self._every or time.monotonic() - self._last >= self._seconds:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._store.checkpoint(
                self._run_id,
                acknowledged_rows(self._diff, self._pending),
                audience_keys=self._diff.audience_keys,
                trait_keys=self._diff.trait_keys,
            )
            log.debug("checkpoint_written", users=len(self._pending))
            self._pending = []
        self._last = time.monotonic()


def _real_run(
    settings: Settings,
    *,
    options: RunOptions,
    store: StateStore,
    entry: dict[str, Any],
    started: dt.datetime,
    console: Console,
    stop: threading.Event | None,
) -> RunResult:
    run_id = entry["run_id"]
    known, snapshot, result = _plan(settings, options, store, entry)
    _check_mass_exit(settings, options, known, result)
    checkpointer = _Checkpointer(
        store,
        run_id,
        result,
        settings.state.checkpoint_every,
        settings.state.checkpoint_seconds,
    )
    failures = store.run_log(run_id, "failures")
    total = result.summary.to_send
    with (
        # The commit needs every stored row: they load while Amberflo is written to, which
        # mostly waits on the network (the plan read only the rows it compared).
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-rows") as loader,
        failures,
        client_for(settings) as client,
        ProgressReporter("upserting customers", total) as progress,
    ):
        stored = loader.submit(contextvars.copy_context().run, known.whole)
        policy = retry_policy_for(settings)
        mode = settings.amberflo.write_mode
        writer = CustomerWriter(
            client,
            mode=mode,
            policy=policy,
            # One listing instead of one lookup per user, when the run sends many.
            existing_ids=read_existing_ids(client, sends=total, policy=policy)
            if mode == "merge"
            else None,
        )

        def on_outcome(record: CustomerRecord, outcome: Outcome) -> None:
            progress.advance(ok=outcome.ok)
            if outcome.ok:
                checkpointer.add(record.customer_id)
                return
            failures.write(
                {
                    "customerId": record.customer_id,
                    "status": outcome.status,
                    "reason": outcome.reason,
                    "run_id": run_id,
                }
            )
            log.warning(
                "customer_failed",
                customer_id=record.customer_id,
                status=outcome.status,
                reason=outcome.reason,
            )

        try:
            delivery = deliver_customers(
                writer,
                plan_customers(result),
                concurrency=settings.amberflo.concurrency,
                on_outcome=on_outcome,
                stop=stop,
            )
        finally:
            # Whatever stopped delivery (an auth error, a signal), what Amberflo acknowledged
            # is kept, and the run's record says how far it got.
            checkpointer.flush()
            failure_file = str(failures.path) if failures.count else None
            entry["counts"].update(delivered=len(checkpointer.acknowledged), failed=failures.count)
            entry["failure_file"] = failure_file
    # Every user sent acknowledged (each once): saying so with the plan's own index spares the
    # commit of an initial sync a lookup of a million ids.
    everyone = len(checkpointer.acknowledged) == len(result.desired)
    acknowledged: Iterable[str] = result.desired.index if everyone else checkpointer.acknowledged
    new_state = apply_acknowledged(stored.result(), result, acknowledged)
    # The stored rows are folded into the new state: let them go before it is written (both
    # held at once were 0.8 GiB more at the peak of a 10M-user run).
    del stored, known
    store.commit(_stored(new_state, run_id), run_id)
    delivery = dataclasses.replace(delivery, failure_file=failure_file)
    if delivery.stopped_reason is not None:
        # Amberflo kept failing: the run stopped itself, it was not interrupted by a signal.
        delivery = dataclasses.replace(delivery, interrupted=False)
        entry["stopped_reason"] = delivery.stopped_reason
    entry["interrupted"] = delivery.interrupted
    exit_code = (
        EXIT_OK
        if delivery.failed == 0 and not delivery.interrupted and delivery.stopped_reason is None
        else EXIT_PARTIAL
    )
    # The report comes before the run is recorded: a report that cannot be written fails the
    # run (exit 1), and run_sync records it once, with these counts and the error.
    _report(
        settings,
        options=options,
        run_id=run_id,
        started=started,
        snapshot=snapshot,
        result=result,
        delivery=delivery,
        exit_code=exit_code,
        console=console,
    )
    return RunResult(run_id=run_id, exit_code=exit_code, diff=result, delivery=delivery)


def confirm(console: Console, question: str) -> bool:
    """Ask a yes/no question on standard input; only ``y`` or ``yes`` is a yes.

    Callers check :func:`require_answer` first, so a script without a terminal is refused
    up front instead of reading an empty answer as "no" and exiting 0.
    """
    # markup=False: "[y/N]" would otherwise be read as a style tag and vanish.
    console.print(f"{question} [y/N] ", end="", markup=False)
    try:
        answer = input()
    except EOFError:
        return False
    return answer.strip().lower() in {"y", "yes"}


def require_answer(command: str, *, yes: bool) -> None:
    """Refuse (``UsageError``, exit 2) a command that would ask a question nobody can answer."""
    if not yes and not sys.stdin.isatty():
        raise UsageError(
            f"`amberflo-sync {command}` asks for confirmation, and standard input is not a "
            "terminal; pass --yes to confirm from a script. Nothing was done."
        )


def adopt_state(settings: Settings, *, yes: bool, verify: int, console: Console) -> int:
    """Record the current snapshot as acknowledged by Amberflo, sending nothing.

    As if a run had delivered every user: the next run sends only what changes after this
    snapshot. Asks first unless ``yes``. ``verify`` > 0 first compares that many random users
    with what Amberflo holds and refuses (exit 1) on any difference. A snapshot that would exit
    more than ``safety.max_exit_fraction`` of the known users is refused too (``MassExitError``):
    recording those exits would mean they are never sent.
    """
    require_answer("state adopt", yes=yes)
    run_id = new_run_id()
    bind_run(run_id, command="state adopt")
    started = _now()
    store = StateStore(settings.state.dir)
    with store.lock():
        adoption = _adoption(settings, store, verify=verify, console=console)
        if adoption is None:
            return EXIT_FATAL
        if not yes and not confirm(console, "Record it?"):
            console.print("Nothing recorded.")
            return EXIT_USAGE
        state, adopted = adoption.state, adoption.adopted
        if isinstance(state, InitialState):
            # Every user is new and delivered now: the state is written as it is built.
            store.commit_delivered(state.parts, state.audience_keys, state.trait_keys, run_id)
            count = len(state)
        else:
            assert adopted is not None  # a state built whole records the adopted users
            users = state.users.index
            # Every adopted user is in the new state; as many as it has rows means they are
            # all of them, and the state's own sorted ids let the commit see that without a
            # lookup.
            delivered = users if len(users) == len(adopted) else adopted
            store.commit(_stored(state, run_id), run_id, delivered=delivered)
            count = len(adopted)
        store.record_run(
            {
                "run_id": run_id,
                "kind": "adopt",
                "mode": "adopt",
                "started_at": started.isoformat(),
                "finished_at": _now().isoformat(),
                "exit_code": EXIT_OK,
                "counts": {
                    "in_snapshot": adoption.in_snapshot,
                    "invalid": adoption.invalid,
                    "adopted": count,
                },
            }
        )
    log.info("state_adopted", users=count, state_dir=str(settings.state.dir))
    console.print(f"Recorded {count} users as acknowledged (run {run_id}).")
    return EXIT_OK


@dataclass(frozen=True, slots=True)
class _Adoption:
    """What an adopt records: the new state, the users it records as delivered, and counts.

    Over an empty state the state is an :class:`InitialState`, written as it is built, and
    ``adopted`` is None: every user in it is adopted.
    """

    state: KnownState | InitialState
    adopted: pd.Index | None
    in_snapshot: int
    invalid: int


def _adoption(
    settings: Settings, store: StateStore, *, verify: int, console: Console
) -> _Adoption | None:
    """Read the snapshot, say what adopting it records, and build the state that records it.

    None when ``verify`` found users Amberflo holds differently (printed). The snapshot is
    dropped before the fold and the old state and the diff on return, before the commit: each
    step then reuses memory instead of faulting in fresh pages (at 1M users over a state,
    about 0.4 s less CPU and 150 MiB less peak).
    """
    known, snapshot = _load_while_reading(settings, store, lambda: _known(store.load()))
    in_snapshot, invalid = len(snapshot.base), sum(snapshot.invalid_counts.values())
    if len(known.users) == 0 and verify == 0:
        # Over an empty state every user holding a value is added and nothing else happens:
        # the new state is built straight from the snapshot, with no diff against nothing
        # and no merge into nothing, and written as it is built.
        initial = InitialState.of(snapshot)
        console.print(_adoption_summary(settings, snapshot, len(initial)), markup=False)
        return _Adoption(initial, None, in_snapshot, invalid)
    # The users a run would send (added, changed, exited) become acknowledged; the others'
    # stored rows already match the snapshot, so they keep them, and the run that last
    # delivered them. A --full diff would compare every user value by value for nothing.
    result = diff(snapshot, known, samples=0)
    _refuse_mass_exit(settings, result, known_users=len(known.users))
    console.print(
        _adoption_summary(
            settings,
            snapshot,
            result.summary.to_send,
            known_users=len(known.users),
            changes=result.summary,
        ),
        markup=False,
    )
    if verify > 0 and not _verified(settings, result, verify, console):
        return None
    # The diff holds all it needs of the snapshot: let it go, so the fold reuses its memory.
    del snapshot
    adopted = result.desired.index
    return _Adoption(apply_acknowledged(known, result, adopted), adopted, in_snapshot, invalid)


def _refuse_mass_exit(settings: Settings, result: Diff, *, known_users: int) -> None:
    """Raise :class:`MassExitError` when adopting would record too many exits as sent."""
    limit = settings.safety.max_exit_fraction
    if result.mass_exit_fraction > limit:
        raise MassExitError(
            f"this snapshot would exit {result.summary.exited} of {known_users} known users "
            f"({result.mass_exit_fraction:.0%}, more than safety.max_exit_fraction="
            f"{limit:.0%}); nothing was recorded. Check the snapshot; to adopt it anyway, "
            "run `amberflo-sync state reset` first"
        )


def _verified(settings: Settings, result: Diff, verify: int, console: Console) -> bool:
    """Compare ``verify`` random users with Amberflo; print and refuse on any difference."""
    differences = _verify_sample(settings, result, verify)
    if differences:
        for line in differences:
            console.print(f"  {line}", markup=False)
        console.print(
            "Refusing to adopt: Amberflo does not match the snapshot for the users "
            "above; nothing was recorded. Run `amberflo-sync run --full` to send the "
            "snapshot instead, or check that the snapshot is the one Amberflo was "
            "synced from."
        )
        return False
    console.print(f"Verified {min(verify, result.summary.to_send)} random users: they match.")
    return True


def _adoption_summary(
    settings: Settings,
    snapshot: Snapshot,
    to_record: int,
    *,
    known_users: int = 0,
    changes: DiffSummary | None = None,
) -> str:
    invalid = sum(snapshot.invalid_counts.values())
    lines = [
        f"Will record {to_record} users as acknowledged by Amberflo, sending nothing:",
        f"  snapshot: {', '.join(snapshot.files)} ({len(snapshot.base)} users"
        + (f", {invalid} invalid rows left out" if invalid else "")
        + ")",
        f"  keys: {len(snapshot.audience_keys)} audiences, {len(snapshot.trait_keys)} traits",
        f"  state: {settings.state.dir} "
        + (f"({known_users} known users)" if known_users else "(empty)"),
    ]
    if known_users and changes is not None:
        lines.append(
            f"  changes recorded as sent: {changes.added} added, {changes.changed} changed, "
            f"{changes.exited} exited; {changes.unchanged} unchanged users keep their record"
        )
    return "\n".join(lines)


def _verify_sample(settings: Settings, result: Diff, sample_size: int) -> list[str]:
    """Differences between ``sample_size`` random users to record and Amberflo's customers.

    For each managed key the snapshot's value must be Amberflo's, except that an audience the
    user is not in may be absent or ``"false"`` on either side (both mean "not a member").
    A name or email the snapshot gives must match too. Returns one line per difference.
    """
    size = min(sample_size, len(result.desired))
    rows = sorted(random.sample(range(len(result.desired)), size))
    sample = replace(result, desired=result.desired.iloc[rows], kinds=result.kinds.iloc[rows])
    audiences = set(result.audience_keys)
    differences: list[str] = []
    with client_for(settings) as client:
        for record in plan_customers(sample):
            existing = client.get_customer(record.customer_id)
            if existing is None:
                differences.append(f"{record.customer_id}: not a customer in Amberflo")
                continue
            traits: Mapping[str, Any] = existing.get("traits") or {}
            for key in (*result.audience_keys, *result.trait_keys):
                ours, theirs = record.traits.get(key), traits.get(key)
                if key in audiences and ours in (None, "false") and theirs in (None, "false"):
                    continue
                if ours != theirs:
                    differences.append(
                        f"{record.customer_id}: {key} is {theirs!r} in Amberflo, "
                        f"{ours!r} in the snapshot"
                    )
            for field, ours, theirs in (
                ("name", record.name, existing.get("customerName")),
                ("email", record.email, existing.get("customerEmail")),
            ):
                if ours is not None and ours != theirs:
                    differences.append(
                        f"{record.customer_id}: {field} is {theirs!r} in Amberflo, "
                        f"{ours!r} in the snapshot"
                    )
    return differences


def record_failed_run(
    settings: Settings, *, run_id: str, kind: str, started: dt.datetime, error: str
) -> None:
    """Record in ``runs.jsonl`` a run that ended in an unexpected error (exit 1).

    The scheduler outlives a failing run; a run that failed on a :class:`SyncError` records
    itself, and this records the others so ``history`` and the alerts still see them.
    """
    StateStore(settings.state.dir).record_run(
        {
            "run_id": run_id,
            "kind": kind,
            "mode": "run" if kind == "sync" else kind,
            "started_at": started.isoformat(),
            "finished_at": _now().isoformat(),
            "exit_code": EXIT_FATAL,
            "error": error,
        }
    )
