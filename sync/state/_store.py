"""``StateStore``: what Amberflo acknowledged, per user, kept so that no crash can lose it.

A commit is three steps, with ``manifest.json`` as the single commit point:

1. the new table is written to ``state.parquet.next`` (temp file, fsync, rename);
2. ``manifest.json`` is replaced by one naming that file's size and sha256;
3. ``state.parquet.next`` is renamed over ``state.parquet`` and folded checkpoints are removed.

A reader takes whichever of ``state.parquet.next`` and ``state.parquet`` matches the manifest,
so a crash between any two steps leaves a loadable state: the old one before step 2, the new one
after it. Checkpoints written during a run carry a folder-wide sequence number; the manifest
records the highest one folded into the commit, and loading applies every later one on top, so
recovery after a crash needs no command.

Reading (``exists``, ``load``, ``info``, ``show``, ``runs``) never creates or touches a file: a
dry run leaves the folder as it found it. Writing assumes the caller holds :meth:`lock`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import structlog

from sync.errors import StateError
from sync.state._atomic import (
    HashingWriter,
    atomic_write,
    atomic_write_bytes,
    ensure_dir,
    fsync_dir,
    is_temp_file,
    replace_durably,
)
from sync.state._frames import (
    coded_columns,
    decode_categories,
    empty_users,
    encode_categories,
    index_column,
    to_coded_table,
    to_frame,
    trait_text_columns,
    upsert,
)
from sync.state._jsonl import JsonlLog
from sync.state._last_run import (
    ID_FINGERPRINTS,
    LAST_RUN_COLUMN,
    PreviousRuns,
    RunSource,
    stamp_last_run,
    without_last_run,
)
from sync.state._layout import (
    BACKUPS_DIR,
    CHECKPOINTS_DIR,
    MANIFEST_FILE,
    NEXT_STATE_FILE,
    STATE_FILE,
    CheckpointName,
    check_run_id,
    way_out,
)
from sync.state._lazy import LazyState, RowReader
from sync.state._lock import hold_lock
from sync.state._logs import LogKind, RunLogs
from sync.state._manifest import FORMAT_VERSION, Manifest, now_utc, parse_manifest

log = structlog.get_logger(__name__)

# Schema metadata key under which a checkpoint records its run and managed keys.
_CHECKPOINT_META = b"amberflo_sync"
# A reader without the lock may see a commit land halfway through its read; it then reads again.
_READ_ATTEMPTS = 3
_ROW_GROUP_SIZE = 128 * 1024
# A state written as it is built comes in parts of two row groups: each part costs a little
# (a frame, its conversion), and half as many parts made a million users' commit 0.1 s
# cheaper while still leaving most of the writing to overlap the building.
_PART_SIZE = 2 * _ROW_GROUP_SIZE

_R = TypeVar("_R")


@dataclass(frozen=True)
class StoredState:
    """The users table as Amberflo last acknowledged it, with the keys it manages.

    ``users`` is indexed by customer id (sorted) and has ``name``, ``email``, one column per
    managed key (NA = absent) and whatever extra columns the diff engine keeps.
    """

    users: pd.DataFrame = field(default_factory=empty_users)
    audience_keys: tuple[str, ...] = ()
    trait_keys: tuple[str, ...] = ()
    last_run: str | None = None


@dataclass(frozen=True)
class StateInfo:
    """A summary of a state folder, read without loading the users table.

    ``users`` counts the committed rows; ``pending_rows`` the rows of checkpoints not yet
    folded into a commit (users acknowledged since, some of them possibly already counted).
    """

    directory: Path
    exists: bool
    format_version: int
    users: int
    audience_keys: tuple[str, ...]
    trait_keys: tuple[str, ...]
    last_run: str | None
    updated_at: str | None
    state_bytes: int
    bytes_on_disk: int
    checkpoints_pending: int
    pending_rows: int


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    name: CheckpointName
    path: Path


@dataclass(frozen=True, slots=True)
class _Committed:
    """The last commit as found on disk: its manifest and verified bytes (None: no commit)."""

    manifest: Manifest | None
    data: pa.Buffer | None
    pending: tuple[_Checkpoint, ...]
    mapping: mmap.mmap | None = None  # what ``data`` is a view of
    manifest_bytes: bytes | None = None  # the manifest file as read

    def release(self) -> None:
        """Stop counting the pages of ``data`` read so far as this process's memory.

        They stay in the page cache, and are mapped again if read again. A lazy load reads
        the whole file once, a part at a time; without this every page read stayed resident
        as long as the state was in use (a gigabyte at ten million users).
        """
        if self.mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            self.mapping.madvise(mmap.MADV_DONTNEED)


@dataclass(frozen=True, slots=True)
class _LoadedRuns:
    """The ``_last_run`` column of the commit a full :meth:`StateStore.load` read, by the
    manifest that named that commit (None: the commit had no such column)."""

    manifest_bytes: bytes
    runs: PreviousRuns | None


class StateStore:
    """The state folder of one amberflo-sync configuration (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._seq_lock = threading.Lock()
        self._last_seq: int | None = None
        self._logs = RunLogs(self.directory)
        self._loaded_runs: _LoadedRuns | None = None

    # -- reading ---------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether a committed state is there."""
        return self._path(MANIFEST_FILE).is_file()

    def load(self, *, columns: Sequence[str] | None = None) -> StoredState:
        """The committed state with pending checkpoints applied; an empty one when there is none.

        ``columns`` reads only those columns (the id index always comes along). Raises
        ``StateError`` naming the file and the way out when the folder is damaged.
        """
        return self._consistently(lambda committed: self._load(committed, columns))

    def _load(self, committed: _Committed, columns: Sequence[str] | None) -> StoredState:
        manifest = committed.manifest
        if committed.data is None:
            users = empty_users()
            users = users[[c for c in users.columns if columns is None or c in columns]]
        else:
            table = self._parse(committed.data, self._path(STATE_FILE), columns)
            if manifest is not None and table.num_rows != manifest.row_count:
                raise StateError(
                    f"{self._path(STATE_FILE)} holds {table.num_rows} users but "
                    f"{self._path(MANIFEST_FILE)} says {manifest.row_count}. "
                    f"{way_out(self.directory)}"
                )
            if columns is None and committed.manifest_bytes is not None:
                # A commit after this load stamps ``_last_run`` from the column as read here,
                # instead of verifying and reading the file again (see _stamp_last_run).
                runs = _runs_of(table, self._read_committed_ids)
                if runs is not None:
                    runs.prepare()
                self._loaded_runs = _LoadedRuns(committed.manifest_bytes, runs)
            users = to_frame(without_last_run(table))
        audience_keys = manifest.audience_keys if manifest else ()
        trait_keys = manifest.trait_keys if manifest else ()
        updates = []
        for checkpoint in committed.pending:
            table = self._parse_checkpoint(checkpoint.path, columns)
            audience_keys, trait_keys = _merge_keys(audience_keys, trait_keys, table)
            updates.append(to_frame(table))
        if updates:
            users = upsert(users, updates)
            log.info(
                "state_checkpoints_applied",
                directory=str(self.directory),
                checkpoints=len(updates),
                rows=sum(len(update) for update in updates),
            )
        return StoredState(
            users=users,
            audience_keys=audience_keys,
            trait_keys=trait_keys,
            last_run=manifest.last_run if manifest else None,
        )

    def managed_keys(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The audience and trait keys :meth:`load` gives, from the manifest and the pending
        checkpoints' schemas alone: no table is read or verified, so this costs next to
        nothing beside a load (``state adopt`` reads the snapshot with them while it loads)."""
        manifest_bytes = self._manifest_bytes()
        manifest = (
            parse_manifest(manifest_bytes, self._path(MANIFEST_FILE)) if manifest_bytes else None
        )
        audience_keys = manifest.audience_keys if manifest else ()
        trait_keys = manifest.trait_keys if manifest else ()
        for checkpoint in self._checkpoints():
            if manifest is None or checkpoint.name.seq > manifest.checkpoint_seq:
                schema = self._checkpoint_schema(checkpoint.path)
                audience_keys, trait_keys = _merge_keys(audience_keys, trait_keys, schema)
        return audience_keys, trait_keys

    def load_lazily(self, head: Sequence[str]) -> LazyState:
        """The committed state with the ``head`` columns of every user loaded, the rest of each
        row read only when asked for (see :class:`LazyState`).

        A state with checkpoints still to fold in (a run crashed), or whose table lacks a
        ``head`` column, is loaded whole: :meth:`load` applies the checkpoints. Raises
        ``StateError`` as :meth:`load` does.
        """
        return self._consistently(lambda committed: self._load_lazily(committed, head))

    def _load_lazily(self, committed: _Committed, head: Sequence[str]) -> LazyState:
        manifest, data = committed.manifest, committed.data
        table = None
        if manifest is not None and data is not None and not committed.pending:
            table = self._parse(data, self._path(STATE_FILE), head, index=False)
        committed.release()
        if manifest is None or data is None or table is None or table.column_names != list(head):
            whole = self._load(committed, None)
            return LazyState.of_frame(
                whole.users,
                head,
                audience_keys=whole.audience_keys,
                trait_keys=whole.trait_keys,
                last_run=whole.last_run,
            )
        if table.num_rows != manifest.row_count:
            raise StateError(
                f"{self._path(STATE_FILE)} holds {table.num_rows} users but "
                f"{self._path(MANIFEST_FILE)} says {manifest.row_count}. "
                f"{way_out(self.directory)}"
            )

        def damaged(exc: Exception) -> StateError:
            return StateError(
                f"{self._path(STATE_FILE)} cannot be read as Parquet ({exc}). "
                f"{way_out(self.directory)}"
            )

        frame = table.to_pandas(split_blocks=True, self_destruct=True)
        return LazyState(
            head=frame,
            audience_keys=manifest.audience_keys,
            trait_keys=manifest.trait_keys,
            last_run=manifest.last_run,
            _rows=RowReader(data, damaged, committed.release, head=frame),
        )

    def info(self) -> StateInfo:
        """Version, users, managed keys, last run, bytes on disk and pending checkpoints.

        Verifies the committed file against the manifest (size and sha256) without parsing it.
        """
        return self._consistently(self._info)

    def _info(self, committed: _Committed) -> StateInfo:
        manifest = committed.manifest
        audience_keys = manifest.audience_keys if manifest else ()
        trait_keys = manifest.trait_keys if manifest else ()
        pending_rows = 0
        for checkpoint in committed.pending:
            schema = self._checkpoint_schema(checkpoint.path)
            audience_keys, trait_keys = _merge_keys(audience_keys, trait_keys, schema)
            pending_rows += pq.read_metadata(checkpoint.path).num_rows
        return StateInfo(
            directory=self.directory,
            exists=manifest is not None,
            format_version=FORMAT_VERSION,
            users=manifest.row_count if manifest else 0,
            audience_keys=audience_keys,
            trait_keys=trait_keys,
            last_run=manifest.last_run if manifest else None,
            updated_at=manifest.updated_at if manifest else None,
            state_bytes=manifest.state_bytes if manifest else 0,
            bytes_on_disk=_bytes_under(self.directory),
            checkpoints_pending=len(committed.pending),
            pending_rows=pending_rows,
        )

    def show(self, customer_id: str) -> dict[str, Any] | None:
        """One user's stored row, or None if the state does not know the id.

        ``{"customer_id", "name", "email", "keys": {key: value} (keys with a value, audiences
        first), "last_run" (the run that last delivered the user: the pending checkpoint's run, else
        the stored ``_last_run``, else a ``last_run`` column the engine keeps; None when
        unknown), "committed" (False while the row lives only in a pending checkpoint)}``.
        """
        return self._consistently(lambda committed: self._show(committed, customer_id))

    def _show(self, committed: _Committed, customer_id: str) -> dict[str, Any] | None:
        manifest = committed.manifest
        audience_keys = manifest.audience_keys if manifest else ()
        trait_keys = manifest.trait_keys if manifest else ()
        for checkpoint in committed.pending:
            schema = self._checkpoint_schema(checkpoint.path)
            audience_keys, trait_keys = _merge_keys(audience_keys, trait_keys, schema)
        row: dict[str, Any] | None = None
        is_committed = False
        last_run: str | None = None
        # The newest checkpoint holding the id wins, as it does when loading.
        for checkpoint in reversed(committed.pending):
            row = self._find_row(checkpoint.path, pa.memory_map(str(checkpoint.path)), customer_id)
            if row is not None:
                last_run = checkpoint.name.run_id
                break
        if row is None and committed.data is not None:
            row = self._find_row(
                self._path(STATE_FILE), pa.BufferReader(committed.data), customer_id
            )
            is_committed = row is not None
        if row is None:
            return None
        if last_run is None:
            last_run = row.get(LAST_RUN_COLUMN) or (
                None if "last_run" in (*audience_keys, *trait_keys) else row.get("last_run")
            )
        keys = {
            key: row[key]
            for key in (*audience_keys, *trait_keys)
            if key in row and row[key] is not None
        }
        return {
            "customer_id": customer_id,
            "name": row.get("name"),
            "email": row.get("email"),
            "keys": keys,
            "last_run": last_run,
            "committed": is_committed,
        }

    def runs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Finished runs from ``runs.jsonl``, newest last; at most the last ``limit``."""
        return self._logs.runs(limit)

    # -- writing (the caller holds the lock) ------------------------------------------------

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold the folder's run lock; ``LockHeldError`` at once, naming the holder, if taken."""
        return hold_lock(self.directory)

    def checkpoint(
        self,
        run_id: str,
        users: pd.DataFrame,
        *,
        audience_keys: Sequence[str] = (),
        trait_keys: Sequence[str] = (),
    ) -> Path:
        """Durably record rows Amberflo acknowledged since the last checkpoint; returns the file.

        Each row is the user's full new stored row. Passing the run's managed keys lets a state
        recovered from checkpoints alone (a first run that crashed) know which columns are keys.
        """
        check_run_id(run_id)
        table = to_coded_table(users)
        meta = {
            "run_id": run_id,
            "audience_keys": list(audience_keys),
            "trait_keys": list(trait_keys),
        }
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), _CHECKPOINT_META: json.dumps(meta).encode()}
        )
        with self._seq_lock:
            seq = self._next_seq()
            path = self._path(CHECKPOINTS_DIR) / CheckpointName(seq, run_id).file_name
            atomic_write(path, _parquet_writer(table))
            self._last_seq = seq
        log.debug("state_checkpoint_written", run_id=run_id, seq=seq, rows=table.num_rows)
        return path

    def commit(
        self, state: StoredState, run_id: str, *, delivered: Sequence[str] | pd.Index = ()
    ) -> None:
        """Atomically replace the committed state by ``state`` and drop the checkpoints.

        ``state`` must include every checkpoint written so far (it is built from :meth:`load`
        plus this run's acknowledged rows): they are removed once the commit is durable.
        ``delivered`` names users this run acknowledged without checkpointing them (``state
        adopt``); with the checkpoints, they give each row its ``_last_run`` (see
        :mod:`sync.state._last_run`).
        """
        check_run_id(run_id)
        table = to_coded_table(state.users)
        with self._seq_lock:
            table = self._stamp_last_run(table, run_id, delivered)
            self._commit_file(_parquet_writer(table), state.audience_keys, state.trait_keys, run_id)

    def commit_delivered(
        self,
        parts: Callable[[int], Iterable[pd.DataFrame]],
        audience_keys: Sequence[str],
        trait_keys: Sequence[str],
        run_id: str,
    ) -> None:
        """:meth:`commit` of a state whose every user ``run_id`` delivered (``state adopt``
        over an empty state), written as it is built.

        ``parts(size)`` gives the users table in consecutive parts of ``size`` users (the last
        may be shorter; at least one part, empty for no users), together in id order. Each
        part is encoded on a second thread while the next one is built, and is let go once
        written; parts are whole row groups, so the file is the one :meth:`commit` writes
        for the whole table, byte for byte.
        """
        check_run_id(run_id)

        def tables() -> Iterator[pa.Table]:
            last: pa.Scalar | None = None
            for part in parts(_PART_SIZE):
                table = to_coded_table(part)
                ids = table.column(index_column(table.schema)).combine_chunks()
                if len(ids) and last is not None and not pc.greater(ids[0], last).as_py():
                    raise ValueError(f"customer id {ids[0].as_py()!r} is out of order")
                last = ids[-1] if len(ids) else last
                yield stamp_last_run(table, ids, [RunSource.of_run(ids, run_id)])

        with self._seq_lock:
            self._commit_file(_parquet_parts_writer(tables()), audience_keys, trait_keys, run_id)

    def _commit_file(
        self,
        produce: Callable[[HashingWriter], int],
        audience_keys: Sequence[str],
        trait_keys: Sequence[str],
        run_id: str,
    ) -> None:
        """Make the table ``produce`` writes (returning how many users) the committed state,
        then drop the checkpoints it folds in (the caller holds ``_seq_lock``)."""
        folded = self._checkpoints()
        mark = max([self._last_seq or 0, self._lenient_mark(), *(c.name.seq for c in folded)])
        row_count = 0

        def write(out: HashingWriter) -> None:
            nonlocal row_count
            row_count = produce(out)

        written = atomic_write(self._path(NEXT_STATE_FILE), write)
        manifest = Manifest(
            last_run=run_id,
            audience_keys=tuple(audience_keys),
            trait_keys=tuple(trait_keys),
            row_count=row_count,
            content_hash=written.sha256,
            state_bytes=written.size,
            checkpoint_seq=mark,
            updated_at=now_utc(),
        )
        atomic_write_bytes(self._path(MANIFEST_FILE), manifest.to_json())
        replace_durably(self._path(NEXT_STATE_FILE), self._path(STATE_FILE))
        self._last_seq = mark
        self._remove_folded(folded)
        log.info(
            "state_committed",
            run_id=run_id,
            users=row_count,
            bytes=written.size,
            checkpoints_folded=len(folded),
        )

    def _stamp_last_run(
        self, table: pa.Table, run_id: str, delivered: Sequence[str] | pd.Index
    ) -> pa.Table:
        """``table`` with the ``_last_run`` column the commit stores (newest source first)."""
        ids = table.column(index_column(table.schema)).combine_chunks()
        # Through a pandas Index: an index of a million ids converts without Python objects.
        values = delivered.array if isinstance(delivered, pd.Index) else list(delivered)
        given = pa.array(values, pa.string(), from_pandas=True)
        if isinstance(given, pa.ChunkedArray):
            given = given.combine_chunks()
        sources = [RunSource.of_run(given, run_id)]
        if given.cast(ids.type).equals(ids):
            # This run delivered every row: no older source can name another run.
            return stamp_last_run(table, ids, sources)
        previous = None
        try:
            manifest_bytes = self._manifest_bytes()
            loaded = self._loaded_runs
            if manifest_bytes is not None and loaded and loaded.manifest_bytes == manifest_bytes:
                # This store loaded the committed state, which has not changed since: its run
                # column was verified and read then.
                manifest = parse_manifest(manifest_bytes, self._path(MANIFEST_FILE))
                pending, previous = self._pending(manifest), loaded.runs
            else:
                committed = self._committed(manifest_bytes)
                pending = list(committed.pending)
                if committed.data is not None:
                    previous = self._previous_runs(committed.data)
            for checkpoint in reversed(pending):
                id_column = index_column(pq.read_schema(checkpoint.path))
                ckpt_ids = pq.read_table(checkpoint.path, columns=[id_column]).column(0)
                sources.append(RunSource.of_run(ckpt_ids.combine_chunks(), checkpoint.name.run_id))
        except (StateError, pa.ArrowException, OSError, ValueError) as exc:
            # The committing run loaded this state moments ago; should it have gone bad since,
            # losing the bookkeeping must not lose the run's acknowledged users.
            log.warning("state_last_run_unknown", directory=str(self.directory), reason=str(exc))
        return stamp_last_run(table, ids, sources, previous)

    def _previous_runs(self, data: pa.Buffer) -> PreviousRuns | None:
        """The previous commit's ``_last_run`` column with its id fingerprints (None: none).

        Only these small columns are decoded; the ids only if the fingerprints cannot settle
        which row is whose.
        """
        schema = pq.read_schema(pa.BufferReader(data))
        if LAST_RUN_COLUMN not in schema.names:
            return None

        def read(columns: Sequence[str]) -> pa.Table:
            return pq.read_table(
                pa.BufferReader(data),
                columns=list(columns),
                use_pandas_metadata=False,
                page_checksum_verification=True,
            )

        def read_ids() -> pa.Array:
            return read([index_column(schema)]).column(0).combine_chunks()

        wanted = [name for name in (*ID_FINGERPRINTS, LAST_RUN_COLUMN) if name in schema.names]
        return _runs_of(read(wanted), read_ids)

    def _read_committed_ids(self) -> pa.Array:
        """The committed table's ids, read (and verified) now."""
        committed = self._committed(self._manifest_bytes())
        if committed.data is None:
            return pa.array([], pa.string())
        schema = pq.read_schema(pa.BufferReader(committed.data))
        table = self._parse(committed.data, self._path(STATE_FILE), [index_column(schema)])
        return table.column(index_column(schema)).combine_chunks()

    def run_log(self, run_id: str, kind: LogKind) -> JsonlLog:
        """The run's ``failures`` or ``dead-letter`` JSON Lines log (created on first write)."""
        return self._logs.run_log(run_id, kind)

    def record_run(self, entry: Mapping[str, Any]) -> None:
        """Append one finished run to ``runs.jsonl``, durably."""
        self._logs.record_run(entry)

    def reset(self) -> Path | None:
        """Move the state files into ``backups/<UTC timestamp>/``; returns it (None: no state).

        Run history, failure and dead-letter logs stay. Checkpoints go first and the manifest
        before ``state.parquet``, so an interrupted reset leaves a folder that the next reset
        finishes (a table without a manifest is refused, never taken as empty).
        """
        names = [CHECKPOINTS_DIR, MANIFEST_FILE, NEXT_STATE_FILE, STATE_FILE]
        present = [name for name in names if os.path.lexists(self._path(name))]
        if not present:
            return None
        backup = self._new_backup_dir()
        for name in present:
            self._path(name).replace(backup / name)
        fsync_dir(backup)
        fsync_dir(self.directory)
        log.info("state_reset", directory=str(self.directory), backup=str(backup), moved=present)
        return backup

    # -- internals -------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.directory / name

    def _consistently(self, read: Callable[[_Committed], _R]) -> _R:
        """``read`` applied to the last commit and its pending checkpoints, seen as one.

        Without the lock a commit may land while this reads (a dry run beside a real run): it
        replaces the table and removes the checkpoints it folded in. Whatever ``read`` made of
        the folder only counts if the manifest is the same after it as before; otherwise, and
        for a mismatch or a vanished file seen while the manifest changed, it reads again.
        """
        for _ in range(_READ_ATTEMPTS):
            before = self._manifest_bytes()
            try:
                result = read(self._committed(before))
            except (StateError, FileNotFoundError) as exc:
                if self._manifest_bytes() != before:
                    continue
                if isinstance(exc, FileNotFoundError):
                    raise StateError(
                        f"{exc.filename or 'a state file'} disappeared while the state was "
                        "read; is a `state reset` running? Try again."
                    ) from exc
                raise
            if self._manifest_bytes() == before:
                return result
        raise StateError(
            f"the state in {self.directory} kept changing while it was read; try again."
        )

    def _committed(self, manifest_bytes: bytes | None) -> _Committed:
        """The commit ``manifest_bytes`` describes, its table verified, and later checkpoints."""
        if manifest_bytes is None:
            # A lone state.parquet.next is a first commit that stopped before its commit point:
            # nothing was committed. A lone state.parquet lost its manifest: refuse it rather
            # than start over as if nothing had ever been sent.
            if self._path(STATE_FILE).exists():
                raise StateError(
                    f"{self._path(STATE_FILE)} is there but {self._path(MANIFEST_FILE)} is "
                    f"missing, so the table cannot be trusted. {way_out(self.directory)}"
                )
            return _Committed(None, None, tuple(self._checkpoints()))
        manifest = parse_manifest(manifest_bytes, self._path(MANIFEST_FILE))
        data, mapping = self._verified_bytes(manifest)
        return _Committed(manifest, data, tuple(self._pending(manifest)), mapping, manifest_bytes)

    def _pending(self, manifest: Manifest) -> list[_Checkpoint]:
        """The checkpoints written after the commit ``manifest`` describes."""
        return [c for c in self._checkpoints() if c.name.seq > manifest.checkpoint_seq]

    def _manifest_bytes(self) -> bytes | None:
        try:
            return self._path(MANIFEST_FILE).read_bytes()
        except FileNotFoundError:
            return None

    def _verified_bytes(self, manifest: Manifest) -> tuple[pa.Buffer, mmap.mmap]:
        """The committed table's bytes, checked against the manifest's size and sha256, and
        the memory mapping they are a view of.

        The file is memory-mapped: hashing pulls it into the page cache once, and Parquet then
        decodes from the same mapping instead of reading the file a second time.
        """
        problem = "is missing"
        # The staged file first: it only matches the manifest if a commit stopped after its
        # commit point and before the rename.
        for name in (NEXT_STATE_FILE, STATE_FILE):
            try:
                # Open first, then measure: a commit may rename the staged file at any moment,
                # and the mapping keeps hold of whichever file was opened.
                with self._path(name).open("rb") as file:
                    size = os.fstat(file.fileno()).st_size
                    if size != manifest.state_bytes or size == 0:
                        problem = (
                            f"has {size} bytes where the manifest expects {manifest.state_bytes}"
                        )
                        continue
                    mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            except FileNotFoundError:
                problem = "is missing"
                continue
            data = pa.py_buffer(mapping)
            if _sha256(mapping) != manifest.content_hash:
                problem = "does not have the sha256 the manifest records"
                continue
            return data, mapping
        raise StateError(
            f"{self._path(STATE_FILE)} {problem}: it was truncated, edited or replaced since "
            f"{self._path(MANIFEST_FILE)} was written. {way_out(self.directory)}"
        )

    def _parse(
        self,
        data: pa.Buffer | pa.NativeFile,
        path: Path,
        columns: Sequence[str] | None,
        *,
        index: bool = True,
    ) -> pa.Table:
        """The table in ``data``; ``columns`` only those of them that exist, and then the id
        index too unless ``index`` is false."""
        source = pa.BufferReader(data) if isinstance(data, pa.Buffer) else data
        try:
            if columns is not None:
                names = set(pq.read_schema(source).names)
                columns = [column for column in columns if column in names]
                source.seek(0)
            return pq.read_table(
                source,
                columns=columns,
                use_pandas_metadata=index,
                page_checksum_verification=True,
            )
        except (pa.ArrowException, OSError) as exc:
            raise StateError(
                f"{path} cannot be read as Parquet ({exc}). {way_out(self.directory)}"
            ) from exc

    def _parse_checkpoint(self, path: Path, columns: Sequence[str] | None) -> pa.Table:
        try:
            return self._parse(pa.memory_map(str(path)), path, columns)
        except StateError as exc:
            raise StateError(
                f"checkpoint {path} cannot be read ({exc.__cause__}). Delete it to go on: "
                "the users it acknowledged are simply sent again by the next run."
            ) from exc.__cause__

    def _checkpoint_schema(self, path: Path) -> pa.Schema:
        try:
            return pq.read_schema(path)
        except (pa.ArrowException, OSError) as exc:
            raise StateError(
                f"checkpoint {path} cannot be read ({exc}). Delete it to go on: "
                "the users it acknowledged are simply sent again by the next run."
            ) from exc

    def _find_row(
        self, path: Path, source: pa.NativeFile, customer_id: str
    ) -> dict[str, Any] | None:
        """One row by id; rows are sorted, so row-group statistics skip most of the file."""
        try:
            id_column = index_column(pq.read_schema(source))
            source.seek(0)
            table = pq.read_table(
                source, filters=[(id_column, "==", customer_id)], page_checksum_verification=True
            )
            table = decode_categories(table)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise StateError(
                f"{path} cannot be read as Parquet ({exc}). {way_out(self.directory)}"
            ) from exc
        rows = table.to_pylist()
        return rows[-1] if rows else None

    def _checkpoints(self) -> list[_Checkpoint]:
        """Every checkpoint file in the folder, in sequence order."""
        folder = self._path(CHECKPOINTS_DIR)
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            name = CheckpointName.parse(entry.name)
            if name is not None:
                found.append(_Checkpoint(name, folder / entry.name))
        return sorted(found, key=lambda checkpoint: checkpoint.name)

    def _lenient_mark(self) -> int:
        """The manifest's checkpoint mark, or 0 when there is no readable manifest."""
        data = self._manifest_bytes()
        if data is None:
            return 0
        try:
            return parse_manifest(data, self._path(MANIFEST_FILE)).checkpoint_seq
        except StateError:
            return 0

    def _next_seq(self) -> int:
        if self._last_seq is None:
            self._last_seq = max([self._lenient_mark(), *(c.name.seq for c in self._checkpoints())])
        return self._last_seq + 1

    def _remove_folded(self, folded: Sequence[_Checkpoint]) -> None:
        """Remove checkpoints the manifest now covers, and temp files of interrupted writes."""
        stale = [checkpoint.path for checkpoint in folded]
        for folder in (self.directory, self._path(CHECKPOINTS_DIR)):
            with contextlib.suppress(FileNotFoundError):
                stale.extend(path for path in folder.iterdir() if is_temp_file(path))
        for path in stale:
            path.unlink(missing_ok=True)
        if self._path(CHECKPOINTS_DIR).is_dir():
            fsync_dir(self._path(CHECKPOINTS_DIR))

    def _new_backup_dir(self) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        backups = self._path(BACKUPS_DIR)
        ensure_dir(backups)
        number = 1
        while True:
            # Two resets within a second get their own folders.
            candidate = backups / (stamp if number == 1 else f"{stamp}-{number}")
            try:
                candidate.mkdir()
            except FileExistsError:
                number += 1
                continue
            fsync_dir(backups)
            return candidate


# Bytes hashed between two releases of their pages: a multiple of any page size.
_HASH_CHUNK = 64 << 20


def _sha256(mapping: mmap.mmap) -> str:
    """The sha256 of a mapped file, hashed a chunk at a time.

    Each chunk's pages are released once hashed (they stay in the page cache), so checking a
    file of a gigabyte does not make a gigabyte of it count as this process's memory.
    """
    digest = hashlib.sha256()
    view = memoryview(mapping)
    try:
        for start in range(0, len(mapping), _HASH_CHUNK):
            digest.update(view[start : start + _HASH_CHUNK])
            if hasattr(mmap, "MADV_DONTNEED"):
                length = min(_HASH_CHUNK, len(mapping) - start)
                mapping.madvise(mmap.MADV_DONTNEED, start, length)
    finally:
        view.release()
    return digest.hexdigest()


def _runs_of(table: pa.Table, read_ids: Callable[[], pa.Array]) -> PreviousRuns | None:
    """The ``_last_run`` column of a committed table as read (codes), with its id
    fingerprints if it has them; None if it has no such column."""
    if LAST_RUN_COLUMN not in table.column_names:
        return None
    has_fingerprints = all(name in table.column_names for name in ID_FINGERPRINTS)
    prior = decode_categories(
        table.select([*(ID_FINGERPRINTS if has_fingerprints else ()), LAST_RUN_COLUMN])
    )
    fingerprints = None
    if has_fingerprints:
        id_hash, id_check = (_numbers(prior.column(name)) for name in ID_FINGERPRINTS)
        fingerprints = (id_hash, id_check)
    runs = prior.column(LAST_RUN_COLUMN).combine_chunks()
    return PreviousRuns.of_column(runs, fingerprints, read_ids)


def _numbers(column: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(column.to_numpy())


def _parquet_writer(table: pa.Table) -> Callable[[HashingWriter], int]:
    """Writes ``table`` as one Parquet file."""
    return _parquet_parts_writer(iter([table]))


def _parquet_parts_writer(tables: Iterator[pa.Table]) -> Callable[[HashingWriter], int]:
    """Writes ``tables`` (at least one, each of whole row groups but the last) as one Parquet
    file, the same as their concatenation written at once: each is encoded on a second thread
    while the next one is made (the Parquet writer releases the GIL as it encodes)."""

    def produce(out: HashingWriter) -> int:
        first = encode_categories(next(tables))
        options = _write_options(first.schema)
        row_group_size = options.pop("row_group_size")
        rows = int(first.num_rows)
        with (
            pq.ParquetWriter(out, first.schema, **options) as writer,
            ThreadPoolExecutor(max_workers=1) as pool,
        ):
            writing = pool.submit(writer.write_table, first, row_group_size=row_group_size)
            for table in tables:
                encoded = encode_categories(table)
                writing.result()
                writing = pool.submit(writer.write_table, encoded, row_group_size=row_group_size)
                rows += int(encoded.num_rows)
            writing.result()
        return rows

    return produce


def _write_options(schema: pa.Schema) -> dict[str, Any]:
    """How the state's Parquet file is written, for a table of ``schema`` (coded)."""
    return {
        # Chosen per column for the time to write and to read back (see _codecs).
        "compression": _codecs(schema),
        # Dictionary pages only for trait text, which repeats (plans, scores, counts): a
        # reader asking for those columns as dictionaries skips building a string per row.
        # On ids, names and emails the writer would build a dictionary per page only to give
        # it up, and audience codes read faster as plain LZ4 pages (below).
        "use_dictionary": trait_text_columns(schema),
        # Page checksums let a reader of part of a file (``show``) still catch corruption.
        "write_page_checksum": True,
        # Statistics serve only to find one id (``show``); on every string column they cost a
        # quarter of the write time.
        "write_statistics": [index_column(schema)],
        # Row groups of 128Ki users: `show` decodes one group, not the whole table.
        "row_group_size": _ROW_GROUP_SIZE,
    }


def _codecs(schema: pa.Schema) -> dict[str, str]:
    """Per column: LZ4 for text and audience codes (fast both ways), nothing for the rest.

    Random 64-bit fingerprints do not compress at all, so compressing them only spends time.
    Audience codes are stored plain (Parquet widens them to 32 bits) and LZ4 shrinks them to
    a byte a user or less: twenty audiences of ten million users read back in 0.75 s of CPU
    instead of 1.22 s as dictionary pages, and write in 2.1 s instead of 2.8 s, for a file
    60 MB larger.
    """
    text = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary)
    coded = set(coded_columns(schema))
    return {
        field.name: "lz4"
        if field.name in coded or any(check(field.type) for check in text)
        else "none"
        for field in schema
    }


def _merge_keys(
    audience_keys: tuple[str, ...], trait_keys: tuple[str, ...], source: pa.Table | pa.Schema
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The managed keys once a checkpoint's are added; a key's latest kind wins."""
    schema = source.schema if isinstance(source, pa.Table) else source
    raw = (schema.metadata or {}).get(_CHECKPOINT_META)
    if raw is None:
        return audience_keys, trait_keys
    meta = json.loads(raw)
    new_audiences = tuple(str(key) for key in meta.get("audience_keys", ()))
    new_traits = tuple(str(key) for key in meta.get("trait_keys", ()))
    audiences = tuple(
        dict.fromkeys([*(k for k in audience_keys if k not in new_traits), *new_audiences])
    )
    traits = tuple(dict.fromkeys([*(k for k in trait_keys if k not in new_audiences), *new_traits]))
    return audiences, traits


def _bytes_under(directory: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += (Path(root) / name).stat().st_size
    return total
