"""Which run last delivered each user: the ``_last_run`` column the store keeps on disk.

The diff engine's rows say what a user looks like, not which run sent it, and the engine is
free to rebuild them (its canonical form drops columns it does not know). So the store owns this
column: :meth:`StateStore.commit` computes it from what it already knows, and
:meth:`StateStore.load` leaves it out of the frame it hands back. For each committed row, the
newest of these names its run:

1. ``delivered``: ids the committing run acknowledged without checkpointing them
   (``state adopt``, which records a whole snapshot at once);
2. the pending checkpoints, newest first, each by the run id in its file name (a run's own,
   and those of a run that crashed before its commit);
3. the previous commit's ``_last_run``, matched on the engine's id fingerprints where the
   tables have them.

A row none of them names (a user whose stored row only had its fingerprint refreshed since a
state written before this column existed) has none. The column is stored as a categorical
(one small code per user, the run ids once), so it costs the table almost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Final

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

LAST_RUN_COLUMN: Final = "_last_run"
# The diff engine's 128-bit id fingerprints, when a table has them: matching a million users
# of the previous commit on two integer columns costs a tenth of matching their ids as text.
ID_FINGERPRINTS: Final = ("_id_hash", "_id_check")


@dataclass(frozen=True, slots=True)
class RunSource:
    """Ids and, per id, the run that delivered it (``runs`` codes into ``names``; -1 = none)."""

    ids: pa.Array
    codes: np.ndarray
    names: tuple[str, ...]

    @classmethod
    def of_run(cls, ids: pa.Array, run_id: str) -> RunSource:
        """Every id in ``ids`` delivered by ``run_id``."""
        return cls(ids=ids, codes=np.zeros(len(ids), dtype=np.int32), names=(run_id,))


@dataclass(frozen=True)
class PreviousRuns:
    """The previous commit's ``_last_run`` column (``codes`` into ``names``, -1 = none), with
    its users' id fingerprints (None if it has none) and a way to read their ids."""

    codes: np.ndarray
    names: tuple[str, ...]
    fingerprints: tuple[np.ndarray, np.ndarray] | None
    read_ids: Callable[[], pa.Array]

    @classmethod
    def of_column(
        cls,
        runs: pa.Array,
        fingerprints: tuple[np.ndarray, np.ndarray] | None,
        read_ids: Callable[[], pa.Array],
    ) -> PreviousRuns:
        """From a stored ``_last_run`` column (a dictionary array, nulls = unknown)."""
        if not pa.types.is_dictionary(runs.type):
            runs = runs.dictionary_encode()
        codes = pc.fill_null(runs.indices.cast(pa.int32()), -1).to_numpy(zero_copy_only=False)
        names = tuple(str(name) for name in runs.dictionary.to_pylist())
        return cls(np.asarray(codes, dtype=np.int32), names, fingerprints, read_ids)

    def prepare(self) -> None:
        """Build the fingerprint lookup now (a load does, on a thread that has the time)."""
        if self._lookup is not None:
            _ = self._lookup.is_unique

    @cached_property
    def _lookup(self) -> pd.Index | None:
        """The previous commit's id hashes, to look rows up by (None without fingerprints)."""
        return None if self.fingerprints is None else pd.Index(self.fingerprints[0])

    def positions(self, table: pa.Table, ids: pa.Array) -> np.ndarray:
        """Per row of ``table`` (whose ids are ``ids``): its row in the previous commit, or -1."""
        lookup = self._lookup
        if (
            self.fingerprints is not None
            and lookup is not None
            and all(name in table.column_names for name in ID_FINGERPRINTS)
        ):
            old_check = self.fingerprints[1]
            new_hash, new_check = (_uint64(table.column(name)) for name in ID_FINGERPRINTS)
            if lookup.is_unique:
                found = np.asarray(lookup.get_indexer(pd.Index(new_hash)), dtype=np.int64)
                hit = found >= 0
                # The second 64 bits settle it: equal there too, the ids are equal.
                if np.array_equal(old_check[found[hit]], new_check[hit]):
                    return found
        # Two ids share a fingerprint, or a table lacks them: match the ids themselves.
        exact = pc.index_in(ids, value_set=self.read_ids().cast(ids.type))
        return np.asarray(exact.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)


def _uint64(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.asarray(values.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.uint64)


def without_last_run(table: pa.Table) -> pa.Table:
    """``table`` without the store's ``_last_run`` column (what ``load`` hands the engine)."""
    if LAST_RUN_COLUMN in table.column_names:
        return table.drop_columns([LAST_RUN_COLUMN])
    return table


def stamp_last_run(
    table: pa.Table,
    ids: pa.Array,
    sources: Sequence[RunSource],
    previous: PreviousRuns | None = None,
) -> pa.Table:
    """``table`` (whose customer ids are ``ids``) with its ``_last_run`` column set.

    ``sources`` go newest first: the first one holding an id names its run; ``previous`` (the
    last commit's column) names the run of the rows no source holds.
    """
    table = without_last_run(table)
    names: list[str] = []
    id_parts: list[pa.Array] = []
    code_parts: list[np.ndarray] = []
    for source in sources:
        if len(source.ids) == 0:
            continue
        offset = len(names)
        names.extend(source.names)
        id_parts.append(source.ids.cast(ids.type))
        code_parts.append(np.where(source.codes >= 0, source.codes + offset, -1))
    codes = np.full(len(ids), -1, dtype=np.int32)
    if id_parts and id_parts[0].equals(ids):
        # The newest source holds every row, in order (``state adopt`` over an empty state).
        codes = code_parts[0].astype(np.int32)
    elif id_parts:
        # One hash lookup for every source at once: index_in answers with the first match,
        # and the sources come newest first.
        found = pc.index_in(ids, value_set=pa.concat_arrays(id_parts))
        where = np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
        all_codes = np.concatenate(code_parts)
        hit = where >= 0
        codes[hit] = all_codes[where[hit]]
    if previous is not None and (codes < 0).any():
        offset = len(names)
        names.extend(previous.names)
        rows = previous.positions(table, ids)
        fill = (codes < 0) & (rows >= 0)
        old = previous.codes[rows[fill]]
        codes[fill] = np.where(old >= 0, old + offset, -1)
    # Keep only the run ids still in use, so the list does not grow with every run.
    used = np.unique(codes[codes >= 0])
    compact = np.searchsorted(used, codes).astype(np.int32)
    column = pa.DictionaryArray.from_arrays(
        pa.array(compact, mask=codes < 0),
        pa.array([names[code] for code in used], pa.string()),
    )
    return table.append_column(LAST_RUN_COLUMN, column)
