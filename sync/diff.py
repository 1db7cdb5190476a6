"""The Engage diff: what each user should look like in Amberflo, and who must be sent.

This module is pure (no I/O) and its docstring is the data contract.

Inputs
------
:class:`Snapshot` (made by :mod:`sync.snapshot`) and :class:`KnownState` (kept by
:mod:`sync.state`). Both hold a ``users`` frame indexed by customer id with ``name``, ``email``
and one column per managed key holding the value **as it goes on the wire**: a string, or NA
for absent. Audience columns hold ``"true"`` (member), ``"false"`` (stored exit) or NA; trait
columns hold the formatted value or NA. Values are compared as those strings, so ``5`` and
``5.0`` differ and nulls equal nulls. (A snapshot keeps its computed traits as read and renders
them to wire text only for the users the diff looks at; ``Snapshot.users`` renders them all.)
Columns whose name starts with ``_`` are fingerprints (see :mod:`sync.fingerprint`): ``_hash``
(the record fingerprint of the snapshot row a stored row came from, ``0`` = unknown),
``_id_hash`` and ``_id_check`` (the id's 128-bit fingerprint).

Desired record
--------------
For a user in the snapshot: each audience key is ``"true"`` for a member, ``"false"`` for a
non-member whose stored record holds a value for that key (a member once: the exit is sent),
absent otherwise; each trait key is its value or absent; ``name``/``email`` come from the
snapshot, or from the stored record where the snapshot has none. For a user in the state but
missing from the snapshot (an *exit*): every audience key it has stored becomes ``"false"``, its
traits become absent, its name and email stay as stored.

Kinds (every known user, snapshot or state, is exactly one)
-----------------------------------------------------------
- ``added``: not in the state, and holds at least one audience or trait value (a user who never
  had any value is never sent);
- ``changed``: in both, and the desired record differs from the stored one;
- ``exited``: in the state only, and still held a ``"true"`` or a trait value;
- ``unchanged``: everything else.

``added``, ``changed`` and ``exited`` users are sent. With ``full=True`` every snapshot user
that has or had a value, and every user missing from the snapshot that had one, is sent as
well, whatever the state says (their kind stays what it is; the extra ones are ``unchanged``).
An empty state makes the first run an initial full sync: members and trait holders only, no
``"false"``.

Keys stored in the state that the snapshot no longer manages are left alone: not sent, not
removed from customers, and dropped from the next state. Keys the state did not know are
listed in ``summary.new_keys``.

Speed
-----
Snapshot and state are matched on id fingerprints by sorting and merging ``uint64`` arrays (no
string join). A matched user whose record fingerprint equals its stored ``_hash`` is unchanged
without looking at a single value; only the others are compared value by value, only their
stored rows (and the exits') are read from a partial state, and only the traits of users
compared or sent are rendered as text. A snapshot read against the state goes further: the
users whose fingerprint vouches for them never reach the diff at all, only their count (see
:class:`Settled`). Every step is a numpy or Arrow pass over a column, never a Python loop over
users.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Final, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from sync.fingerprint import (
    UNKNOWN,
    HashOrder,
    RecordFingerprint,
    id_fingerprints,
    order_hashes,
    row_bits,
)
from sync.idorder import insertion_points, sort_order
from sync.model import ChangeKind, DiffSummary, KeyStats, UserChange
from sync.threads import WORKERS, map_on_threads, runs_of

__all__ = [
    "AUDIENCE_DTYPE",
    "FINGERPRINTS",
    "HASH",
    "ID_CHECK",
    "ID_HASH",
    "INDEX_NAME",
    "TEXT_DTYPE",
    "Diff",
    "InitialState",
    "KnownState",
    "Settled",
    "Snapshot",
    "TraitValues",
    "acknowledged_rows",
    "apply_acknowledged",
    "diff",
    "initial_state",
    "merge_run",
    "record_fingerprints",
    "stored_fingerprints",
]

INDEX_NAME: Final = "customer_id"
HASH: Final = "_hash"
ID_HASH: Final = "_id_hash"
ID_CHECK: Final = "_id_check"
FINGERPRINTS: Final = (HASH, ID_HASH, ID_CHECK)
TEXT_DTYPE: Final = pd.StringDtype("pyarrow")
# One categorical dtype for every audience column, snapshot and state alike: one byte per user
# instead of a string, and frames concatenate without re-coding.
AUDIENCE_DTYPE: Final = pd.CategoricalDtype(["false", "true"])
_FALSE, _TRUE, _ABSENT = 0, 1, -1

Kind = Literal["added", "changed", "exited", "unchanged"]
KINDS: Final[tuple[Kind, ...]] = ("added", "changed", "exited", "unchanged")

Ints = npt.NDArray[np.intp]
Bools = npt.NDArray[np.bool_]
U64 = npt.NDArray[np.uint64]
_T = TypeVar("_T", bound=np.generic)


# -- inputs ----------------------------------------------------------------------------------


def _empty_invalid() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": pd.Series([], dtype=TEXT_DTYPE),
            "source": pd.Series([], dtype=TEXT_DTYPE),
            "row": pd.Series([], dtype="int64"),
            "reason": pd.Series([], dtype=TEXT_DTYPE),
        }
    )


def _as_text(values: pa.Array) -> pa.Array:
    return values


@dataclass(frozen=True, eq=False)
class TraitValues:
    """One computed trait of every snapshot user: the values as read, and how they go on the
    wire.

    Rendering a float column as text is the dearest step of reading a snapshot, and only the
    few users the diff compares or sends need it, so ``render`` (elementwise: rendering some
    rows gives those rows of rendering them all) runs on demand. ``present`` says per user
    whether the wire value is there (not null, not NaN, not empty).
    """

    raw: pa.Array
    render: Callable[[pa.Array], pa.Array]
    present: Bools

    @classmethod
    def of_text(cls, text: pa.Array) -> TraitValues:
        """Values that are wire text already."""
        return cls(text, _as_text, _bools(text.is_valid()))

    def text(self, rows: Ints | None = None) -> pa.Array:
        """The wire text of every user, or of ``rows`` (NA = absent)."""
        values = self.raw if rows is None else self.raw.take(pa.array(rows, type=pa.int64()))
        rendered: pa.Array = self.render(values)
        return rendered


@dataclass(frozen=True, eq=False)
class Settled:
    """Snapshot users settled as unchanged while the snapshot was read, and so left out of it.

    Each was matched to a stored row whose record fingerprint equals its own (see
    :mod:`sync.settle`): the diff would find it unchanged without looking at a value, so its
    values were never kept. ``count`` is how many there are, ``members`` how many of them are
    members of each audience key, and ``seen`` flags, per stored row, whether a snapshot user
    (settled or not) holds it: the rows left unflagged are the exits.
    """

    count: int
    seen: Bools
    members: Mapping[str, int]


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One validated snapshot: users by id, values as they go on the wire.

    ``base`` is indexed by customer id with columns ``name``, ``email``, then every audience
    key (``"true"`` or NA), then the fingerprints; ``traits`` holds each trait key's values
    (see :class:`TraitValues`), in snapshot order. :attr:`users` joins them into one frame of
    wire text. ``key_names`` maps each key to the name it came from; ``invalid`` lists the rows
    left out (``customer_id`` (NA when missing), ``source`` file, ``row`` (1-based record
    number in that file), ``reason``) and ``invalid_counts`` counts them by reason; ``files``
    are the files read, in order. ``id_order`` is the :class:`HashOrder` of ``base``'s
    ``_id_hash`` when the reader sorted it already (the diff sorts it otherwise).

    ``settled``, when the snapshot was read against the state, accounts for the users left out
    as unchanged (see :class:`Settled`): ``base`` then holds only the others, and the diff
    counts the settled ones among the unchanged. Such a snapshot cannot make a ``full`` diff.
    """

    base: pd.DataFrame
    traits: Mapping[str, TraitValues]
    audience_keys: tuple[str, ...]
    trait_keys: tuple[str, ...]
    key_names: Mapping[str, str] = field(default_factory=dict)
    invalid: pd.DataFrame = field(default_factory=_empty_invalid)
    invalid_counts: Mapping[str, int] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    id_order: HashOrder | None = None
    settled: Settled | None = None

    @cached_property
    def users(self) -> pd.DataFrame:
        """Every user with every value as wire text: ``name``, ``email``, audience keys,
        trait keys, fingerprints (renders every trait: the diff itself never needs this)."""
        frame = self.base.copy()
        for key in self.trait_keys:
            frame[key] = _text_array(self.traits[key].text())
        return frame[["name", "email", *self.audience_keys, *self.trait_keys, *FINGERPRINTS]]

    @classmethod
    def from_users(
        cls,
        users: pd.DataFrame,
        audience_keys: Sequence[str],
        trait_keys: Sequence[str],
        *,
        files: Sequence[str] = (),
    ) -> Snapshot:
        """A snapshot from a frame of wire values (another reader, tests); ids must be unique.

        Columns are coerced to the canonical dtypes and the fingerprints computed here.
        """
        frame = _canonical(users, tuple(audience_keys), tuple(trait_keys))
        if not frame.index.is_unique:
            raise ValueError("snapshot ids must be unique")
        frame[HASH] = record_fingerprints(frame, tuple(audience_keys), tuple(trait_keys))
        return cls(
            base=frame.drop(columns=list(trait_keys)),
            traits={key: TraitValues.of_text(_text(frame, key)) for key in trait_keys},
            audience_keys=tuple(audience_keys),
            trait_keys=tuple(trait_keys),
            key_names={key: key for key in (*audience_keys, *trait_keys)},
            files=tuple(files),
        )


@dataclass(frozen=True, eq=False)
class KnownState:
    """The users as Amberflo last acknowledged them (see the module docstring for columns).

    The state store keeps ``users`` as it is; rows restored without fingerprints still work
    (they are compared value by value once, and get fingerprints when next sent).

    A state may also be *partial* (``fetch`` given): ``users`` then holds only the fingerprint
    columns of every stored user, in stored order and without ids, and ``fetch(positions)``
    returns the full stored rows at those positions (sorted, unique), indexed by id. The diff
    reads values only for the users whose fingerprint changed and for the exits, so a dry run
    need not load every stored value; :meth:`whole` loads the rest when something needs it.

    ``id_order`` is the :class:`HashOrder` of ``users``' ``_id_hash`` once
    :meth:`with_id_order` has sorted it (the diff sorts it otherwise).
    """

    users: pd.DataFrame
    audience_keys: tuple[str, ...] = ()
    trait_keys: tuple[str, ...] = ()
    fetch: Callable[[Ints], pd.DataFrame] | None = None
    id_order: HashOrder | None = None

    @classmethod
    def empty(cls) -> KnownState:
        """The state before the first run: no users, no keys."""
        return cls(users=_canonical(_no_users(), (), ()))

    def rows(self, positions: Ints) -> pd.DataFrame:
        """The full stored rows at ``positions`` (sorted, unique), in that order."""
        if self.fetch is not None:
            return self.fetch(positions)
        if len(positions) == len(self.users):
            return self.users  # sorted and unique: every row, in order
        return self.users.iloc[positions]

    def with_id_order(self) -> KnownState:
        """This state with its id fingerprints sorted for the diff's match: a loader thread
        does it while the snapshot is read, instead of the diff waiting for it."""
        hashes = _uint64(self.users, ID_HASH)
        if self.id_order is not None or hashes is None:
            return self
        return replace(self, id_order=order_hashes(hashes))

    def whole(self) -> KnownState:
        """This state with every stored row loaded in ``users`` (itself when it is whole)."""
        if self.fetch is None:
            return self
        users = self.fetch(np.arange(len(self.users), dtype=np.intp))
        return KnownState(users, self.audience_keys, self.trait_keys)


def _no_users() -> pd.DataFrame:
    index = pd.Index(pd.array([], dtype=TEXT_DTYPE), name=INDEX_NAME)
    return pd.DataFrame(index=index, columns=["name", "email"], dtype=TEXT_DTYPE)


# -- output ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Diff:
    """The users to send and why.

    ``desired`` holds the desired record of every user to send (snapshot users in snapshot
    order, then exits), indexed by id, with the canonical columns of a stored row: it is what
    the state holds for them once Amberflo acknowledges them. ``kinds`` gives each one's kind.
    ``refreshed`` holds fresh record fingerprints of users found unchanged value by value
    whose stored fingerprint was stale; :func:`apply_acknowledged` stores them, so the next
    run skips those users on the fast path.
    """

    desired: pd.DataFrame
    kinds: pd.Series
    audience_keys: tuple[str, ...]
    trait_keys: tuple[str, ...]
    summary: DiffSummary
    mass_exit_fraction: float
    dropped_keys: tuple[str, ...] = ()
    refreshed: pd.DataFrame = field(default_factory=lambda: _fingerprint_frame(0))

    @cached_property
    def _lookup(self) -> pd.Index:
        """The id fingerprints of ``desired`` as a hash table, built once for all checkpoints."""
        table: pd.Index = pd.Index(self.desired[ID_HASH].to_numpy(dtype=np.uint64))
        return table

    def ids(self, kind: Kind) -> pd.Index:
        """The ids of the users of one kind among those to send."""
        return self.desired.index[(self.kinds == kind).to_numpy()]


def _fingerprint_frame(size: int) -> pd.DataFrame:
    index = pd.Index(pd.array([None] * size, dtype=TEXT_DTYPE), name=INDEX_NAME)
    return pd.DataFrame({name: np.zeros(size, np.uint64) for name in FINGERPRINTS}, index=index)


# -- column access ---------------------------------------------------------------------------


def _text(frame: pd.DataFrame, column: str, rows: Ints | None = None) -> pa.Array:
    """A column as an Arrow string array (nulls = absent), optionally only ``rows``.

    A negative row stands for a user the frame lacks: its value is absent.
    """
    size = len(frame) if rows is None else len(rows)
    if column not in frame.columns or len(frame) == 0:
        return pa.nulls(size, pa.string())
    series = frame[column]
    if isinstance(series.dtype, pd.CategoricalDtype):
        codes = _category_codes(series)
        categories = pa.array([str(value) for value in series.cat.categories], pa.string())
        picked = codes if rows is None else np.where(rows < 0, -1, codes[np.maximum(rows, 0)])
        return categories.take(pa.array(picked, mask=picked < 0))
    values = _arrow_text(series.array)
    if rows is not None:
        return _as_string(_taken_rows(values, rows))
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return _as_string(values)


def _arrow_text(values: object) -> pa.Array | pa.ChunkedArray:
    """Text from pandas as Arrow: the column's own Arrow data when it has some (pandas keeps
    ``large_string``), so taking a few rows does not first convert ten million."""
    arrow = pa.array(values, from_pandas=True)
    if pa.types.is_string(arrow.type) or pa.types.is_large_string(arrow.type):
        return arrow
    return arrow.cast(pa.string())


def _as_string(values: pa.Array) -> pa.Array:
    return values if pa.types.is_string(values.type) else values.cast(pa.string())


def _taken_rows(values: pa.Array | pa.ChunkedArray, rows: Ints) -> pa.Array:
    """``values`` at ``rows`` as one array; a negative row gives a null.

    A few rows of a column of many chunks are taken a chunk at a time: Arrow's take of a chunked
    string column joins every chunk first, a copy of the whole column (0.25 s for a column of
    ten million emails, to take a few thousand of them). Taking most of a column, that copy
    costs about what the take does, less than sorting the rows by chunk.
    """
    missing = rows < 0
    wanted = np.maximum(rows, 0)
    if (
        not isinstance(values, pa.ChunkedArray)
        or values.num_chunks <= 1
        or 2 * len(rows) >= len(values)
    ):
        taken = values.take(pa.array(wanted, mask=missing if missing.any() else None))
        return taken.combine_chunks() if isinstance(taken, pa.ChunkedArray) else taken
    order = np.argsort(wanted, kind="stable")
    ordered = wanted[order]
    sizes = np.fromiter((len(chunk) for chunk in values.chunks), np.int64, values.num_chunks)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    bounds = np.searchsorted(ordered, starts)
    pieces = [
        values.chunk(k).take(pa.array(ordered[bounds[k] : bounds[k + 1]] - starts[k]))
        for k in range(values.num_chunks)
        if bounds[k] < bounds[k + 1]
    ]
    in_order = pa.concat_arrays(pieces) if pieces else pa.array([], values.type)
    # Back to the order asked for, with the nulls, in one take of the few rows taken.
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return in_order.take(pa.array(back, mask=missing))


def _audience(frame: pd.DataFrame, column: str, rows: Ints | None = None) -> tuple[Bools, Bools]:
    """``(is "true", holds a value)`` per user for one audience column."""
    size = len(frame) if rows is None else len(rows)
    if column not in frame.columns:
        return np.zeros(size, bool), np.zeros(size, bool)
    series = frame[column]
    if isinstance(series.dtype, pd.CategoricalDtype):
        codes = _category_codes(series)
        if rows is not None:
            codes = codes[rows]
        return codes == _true_code(series), codes >= 0
    values = _text(frame, column, rows)
    is_true = pc.fill_null(pc.equal(values, "true"), False)
    return _bools(is_true), _bools(values.is_valid())


@dataclass(frozen=True, eq=False)
class _Members:
    """Who is a member of one audience, per snapshot user: ``code`` at ``codes``.

    The codes are the audience column's own one-byte categorical codes, not a copy: twenty
    audiences of ten million users held as flags were 200 MB for the whole diff.
    """

    codes: npt.NDArray[np.integer]
    code: int

    @classmethod
    def of(cls, frame: pd.DataFrame, column: str) -> _Members:
        series = frame[column] if column in frame.columns else None
        if series is not None and isinstance(series.dtype, pd.CategoricalDtype):
            return cls(_category_codes(series), _true_code(series))
        return cls(_audience(frame, column)[0].view(np.int8), 1)

    def at(self, rows: Ints) -> Bools:
        member: Bools = self.codes[rows] == self.code
        return member

    def every(self) -> Bools:
        member: Bools = self.codes == self.code
        return member


def _category_codes(series: pd.Series) -> npt.NDArray[np.integer]:
    """A categorical column's codes, read-only, without a copy (``Series.cat.codes`` makes a
    new Series, which copies them: 190 MB for twenty audiences of ten million users)."""
    categorical = series.array
    if not isinstance(categorical, pd.Categorical):
        raise TypeError(f"column {series.name!r} is not categorical")
    codes: npt.NDArray[np.integer] = categorical.codes
    return codes


def _true_code(series: pd.Series) -> int:
    """The code of ``"true"`` in a categorical audience column (-2, which no code is, when
    the column has no such category)."""
    categories = list(series.cat.categories)
    return categories.index("true") if "true" in categories else -2


def _bools(values: pa.Array | pa.ChunkedArray) -> Bools:
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=bool)


def _count(values: pa.Array) -> int:
    """How many values are present."""
    return int(len(values) - values.null_count)


def _differs(new: pa.Array, old: pa.Array) -> Bools:
    """Per row: the two wire values differ (null equals null)."""
    same = pc.fill_null(pc.equal(new, old), False)
    both_null = pc.and_(new.is_null(), old.is_null())
    return ~_bools(pc.or_(same, both_null))


def _uint64(frame: pd.DataFrame, column: str) -> U64 | None:
    """A fingerprint column as ``uint64`` (NA = 0), or None if the frame lacks it."""
    if column not in frame.columns:
        return None
    return np.asarray(frame[column].to_numpy(dtype=np.uint64, na_value=0), dtype=np.uint64)


def _ids(frame: pd.DataFrame) -> pa.Array:
    values = pa.array(frame.index.array, type=pa.string(), from_pandas=True)
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _stored_id_fingerprints(frame: pd.DataFrame) -> tuple[U64, U64] | None:
    """The frame's stored id fingerprints, or None when a row (or the column) lacks them."""
    stored_hash, stored_check = _uint64(frame, ID_HASH), _uint64(frame, ID_CHECK)
    if stored_hash is None or stored_check is None:
        return None
    if ((stored_hash == 0) & (stored_check == 0)).any():
        return None
    return stored_hash, stored_check


def stored_fingerprints(state: KnownState) -> tuple[U64, U64, U64] | None:
    """The state's id fingerprints (``_id_hash``, ``_id_check``) and record fingerprints
    (``_hash``, :data:`~sync.fingerprint.UNKNOWN` where unknown) per stored row, or None when
    a row lacks its id fingerprints."""
    ids = _stored_id_fingerprints(state.users)
    if ids is None:
        return None
    return ids[0], ids[1], _record_hashes(state.users)


def _record_hashes(frame: pd.DataFrame) -> U64:
    """A state frame's record fingerprints, :data:`~sync.fingerprint.UNKNOWN` for all when
    it has none (rows restored without them)."""
    stored = _uint64(frame, HASH)
    return np.full(len(frame), UNKNOWN, dtype=np.uint64) if stored is None else stored


def _ids_at(frame: pd.DataFrame, rows: Ints) -> pa.Array:
    """The ids of ``rows``, taken without first joining (or converting) the id column."""
    return _as_string(_taken_rows(_arrow_text(frame.index.array), rows))


def _id_fingerprints(frame: pd.DataFrame) -> tuple[U64, U64]:
    """The frame's id fingerprints: stored ones when complete, else computed from the ids."""
    stored = _stored_id_fingerprints(frame)
    return stored if stored is not None else id_fingerprints(_ids(frame))


def record_fingerprints(
    users: pd.DataFrame, audience_keys: Sequence[str], trait_keys: Sequence[str]
) -> U64:
    """Record fingerprints of a frame of wire values (name, email, members, trait text)."""
    fingerprint = RecordFingerprint(len(users))
    for column in ("name", "email"):
        fingerprint.add_strings(column, _text(users, column))
    fingerprint.add_flags({key: _audience(users, key)[0] for key in audience_keys})
    for key in trait_keys:
        fingerprint.add_strings(key, _text(users, key))
    return fingerprint.finish()


# -- matching --------------------------------------------------------------------------------


def _match(
    snapshot: pd.DataFrame,
    state: pd.DataFrame,
    table: pd.Index | None = None,
    snap_order: HashOrder | None = None,
    state_order: HashOrder | None = None,
) -> Ints:
    """For each snapshot user, its row in the state, or -1.

    ``table`` is the state's ``_id_hash`` as an index, when the caller keeps one at hand;
    ``snap_order`` and ``state_order`` the sides' :class:`HashOrder`, when sorted already.
    """
    if len(state) == 0:
        return np.full(len(snapshot), -1, dtype=np.intp)
    found = _fast_match(
        _id_fingerprints(snapshot), _id_fingerprints(state), table, snap_order, state_order
    )
    if found is not None:
        return found
    # Two ids share 64 bits of fingerprint (or the state repeats an id): join exactly instead.
    exact = pc.index_in(_ids(snapshot), value_set=_ids(state))
    return np.asarray(exact.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.intp)


def _fast_match(
    snapshot: tuple[U64, U64],
    state: tuple[U64, U64],
    table: pd.Index | None = None,
    snap_order: HashOrder | None = None,
    state_order: HashOrder | None = None,
) -> Ints | None:
    """:func:`_match` on id fingerprints alone; None when they cannot settle it.

    ``table`` (the state's ``_id_hash`` as an index, kept by a caller that matches often) is
    probed directly; otherwise both sides are sorted and merged (see :func:`_merge_match`).
    """
    (snap_hash, snap_check), (state_hash, state_check) = snapshot, state
    if table is None:
        positions = _merge_match(snap_hash, state_hash, snap_order, state_order)
        if positions is None:
            return None
    else:
        if not table.is_unique:
            return None
        positions = np.asarray(table.get_indexer(pd.Index(snap_hash)), dtype=np.intp)

    def confirmed(run: slice) -> bool:
        # Every match confirmed by the second word: gathers of millions, a run a thread.
        at = positions[run]
        found = at >= 0
        return bool(np.array_equal(state_check[at[found]], snap_check[run][found]))

    return positions if all(map_on_threads(confirmed, runs_of(len(positions)))) else None


def _merge_match(
    snap_hash: U64,
    state_hash: U64,
    snap_order: HashOrder | None = None,
    state_order: HashOrder | None = None,
) -> Ints | None:
    """For each snapshot hash, the state row with the same hash, or -1; None if the state
    repeats a hash.

    Both sides are sorted by their hashes' high bits (see :class:`HashOrder`; either side's
    order may come sorted already: the snapshot's from reading it, the state's from loading
    it) and merged with a search of sorted keys, which walks memory in order; a pandas hash
    table of ten million ``uint64`` probes memory at random and took longer. Hashes whose
    high bits agree but whose low bits differ (a few among millions) are told apart by
    comparing whole hashes, one step at a time.
    """
    if len(state_hash) == 0:
        return np.full(len(snap_hash), -1, dtype=np.intp)
    bits = row_bits(len(snap_hash), len(state_hash))

    def sorted_side(hashes: U64, order: HashOrder | None) -> HashOrder:
        return order if order is not None and order.bits == bits else order_hashes(hashes, bits)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sort") as pool:
        # The two sides sort at once, when either must: numpy's sort releases the GIL (ten
        # million users a side: about 0.5 s each).
        state_side = pool.submit(sorted_side, state_hash, state_order)
        snap_order = sorted_side(snap_hash, snap_order)
        stored_order = state_side.result()
    if stored_order.repeated(state_hash).any():
        return None
    positions = np.empty(len(snap_hash), dtype=np.intp)
    # The probes are merged in a few runs of the snapshot's order at once, on threads: each
    # run searches the whole stored side and fills its own rows of ``positions``.
    map_on_threads(
        lambda run: merge_run(
            snap_order.packed[run], snap_hash, stored_order, state_hash, positions
        ),
        # Four runs a thread: only two runs' temporaries are alive at once (80 MB less at the
        # peak of a 10M diff than two runs).
        runs_of(len(snap_hash), per_worker=4),
    )
    return positions


def merge_run(
    packed: U64, snap_hash: U64, stored_order: HashOrder, state_hash: U64, positions: Ints
) -> None:
    """Match one run of the snapshot's sorted order (``packed``: keys with rows in the low
    bits) against the stored side, writing each probe's stored row (or -1) into ``positions``.

    The stored side stays packed: searching a probe's key (its low bits zero) finds the first
    entry of that key, and the entry's low bits are its row. Every array of ten million rows
    made here is 80 MB more at the diff's peak, so the temporaries go as soon as they are used.
    """
    low, stored = stored_order.low, stored_order.packed
    probe_rows = (packed & low).astype(np.intp)
    probes = packed & ~low
    probe_whole = snap_hash[probe_rows]
    last = len(stored) - 1
    at = np.searchsorted(stored, probes)
    np.minimum(at, last, out=at)
    entry = stored[at]
    same_key = (entry & ~low) == probes
    found = (entry & low).astype(np.intp)
    del entry
    hit = same_key & (state_hash[found] == probe_whole)
    found[~hit] = -1
    # A miss may still match a later entry with the same high bits.
    pending = np.flatnonzero(~hit & same_key)
    del hit, same_key
    while len(pending):
        where = at[pending] + 1
        alike = (where <= last) & ((stored[np.minimum(where, last)] & ~low) == probes[pending])
        pending, where = pending[alike], where[alike]
        at[pending] = where
        rows = (stored[where] & low).astype(np.intp)
        hit = state_hash[rows] == probe_whole[pending]
        found[pending[hit]] = rows[hit]
        pending = pending[~hit]
    positions[probe_rows] = found


def _locate(
    snapshot: pd.DataFrame, state: KnownState, order: HashOrder | None = None
) -> tuple[Ints, KnownState]:
    """:func:`_match` of the snapshot against a whole or partial state (``order``: of the
    snapshot's ``_id_hash``, when known).

    A partial state is matched on its stored fingerprints; it is loaded whole (and returned
    so) only when they cannot settle it: rows without fingerprints, or an id collision.
    """
    if state.fetch is not None and len(state.users):
        stored = _stored_id_fingerprints(state.users)
        if stored is not None:
            found = _fast_match(
                _id_fingerprints(snapshot), stored, snap_order=order, state_order=state.id_order
            )
            if found is not None:
                return found, state
        state = state.whole()
    return _match(snapshot, state.users, snap_order=order, state_order=state.id_order), state


@dataclass
class _Sides:
    """The snapshot and the state being compared: matched, with the snapshot's values at hand,
    and the per-key counters filled as each group of users is looked at.

    ``position`` and every ``stored_rows`` argument count rows of the whole state; ``known``
    holds only the stored rows the diff looks at, and ``read_rows`` (ascending) which ones.
    """

    snap: pd.DataFrame
    known: pd.DataFrame
    audience_keys: tuple[str, ...]
    trait_keys: tuple[str, ...]
    position: Ints  # per snapshot user: its row in the state, or -1
    read_rows: Ints  # the rows of the state in ``known``, ascending
    snap_hash: U64
    state_hash: U64
    members: dict[str, _Members]
    traits: Mapping[str, TraitValues]
    entered: dict[str, int]
    exited: dict[str, int]
    changed: dict[str, int]

    @classmethod
    def of(cls, snapshot: Snapshot, state: KnownState, position: Ints) -> _Sides:
        snap = snapshot.base
        keys = (*snapshot.audience_keys, *snapshot.trait_keys)
        snap_hash = _uint64(snap, HASH)
        if snap_hash is None:
            raise ValueError("a snapshot's base frame must carry its record fingerprints")
        return cls(
            snap=snap,
            known=state.users.iloc[:0],
            audience_keys=snapshot.audience_keys,
            trait_keys=snapshot.trait_keys,
            position=position,
            read_rows=np.zeros(0, dtype=np.intp),
            snap_hash=snap_hash,
            state_hash=_record_hashes(state.users),
            members={key: _Members.of(snap, key) for key in snapshot.audience_keys},
            traits=snapshot.traits,
            entered=dict.fromkeys(keys, 0),
            exited=dict.fromkeys(keys, 0),
            changed=dict.fromkeys(keys, 0),
        )

    def read(self, state: KnownState, stored_rows: Ints) -> None:
        """Read the stored rows the diff will look at (sorted, unique)."""
        self.known = state.rows(stored_rows)
        self.read_rows = stored_rows

    def in_known(self, stored_rows: Ints) -> Ints:
        """Rows of ``known`` for rows of the state (-1 for a row not read, or -1 given).

        A search of the rows read, not a table over every stored user: that was 80 MB at ten
        million users, held through the whole diff, for the few rows read."""
        if len(self.read_rows) == 0:
            return np.full(len(stored_rows), -1, dtype=np.intp)
        at = np.minimum(np.searchsorted(self.read_rows, stored_rows), len(self.read_rows) - 1)
        found: Ints = np.where(self.read_rows[at] == stored_rows, at, -1)
        return found

    def has_value(self) -> Bools:
        """Per snapshot user: a member of some audience or holder of some trait."""
        result = np.zeros(len(self.snap), dtype=bool)
        for member in self.members.values():
            result |= member.every()
        for values in self.traits.values():
            result |= values.present
        return result

    def suspects(self, rows: Ints) -> Ints:
        """Matched ``rows`` whose fingerprint does not vouch for them being unchanged."""

        def among(run: slice) -> Ints:
            # Gathers of millions at random from the state's fingerprints: a run a thread.
            some = rows[run]
            stored = self.state_hash[self.position[some]]
            keep: Bools = (stored != self.snap_hash[some]) | (stored == UNKNOWN)
            return some[keep]

        # Four runs a thread: fewer of each run's gathers alive at once (the peak of a dry run
        # at 10M users was here).
        parts = map_on_threads(among, runs_of(len(rows), per_worker=4))
        return np.concatenate(parts) if parts else rows[:0]

    def stale(self, rows: Ints) -> Ints:
        """Unchanged ``rows`` whose stored fingerprint differs from the snapshot's."""
        keep: Bools = self.state_hash[self.position[rows]] != self.snap_hash[rows]
        return rows[keep]

    def compare(self, rows: Ints) -> Bools:
        """Which matched ``rows`` have a desired record unlike the stored one (and count)."""
        stored_rows = self.in_known(self.position[rows])
        differs = np.zeros(len(rows), dtype=bool)
        for key, member in self.members.items():
            now = member.at(rows)
            was, _ = _audience(self.known, key, stored_rows)
            # A non-member's desired value ("false" if it held one, else absent) equals what
            # is stored unless that is "true": only membership itself can differ.
            differs |= now != was
            self.entered[key] += int((now & ~was).sum())
            self.exited[key] += int((~now & was).sum())
        for key, values in self.traits.items():
            changed = _differs(values.text(rows), _text(self.known, key, stored_rows))
            differs |= changed
            self.changed[key] += int(changed.sum())
        for column in ("name", "email"):
            new = _text(self.snap, column, rows)
            # An absent name or email keeps the stored one, so only a given value can differ.
            differs |= _bools(new.is_valid()) & _differs(
                new, _text(self.known, column, stored_rows)
            )
        return differs

    def count_added(self, rows: Ints) -> None:
        """Count new users ``rows``: every value they hold is an entry or a change."""
        for key, member in self.members.items():
            self.entered[key] += int(member.at(rows).sum())
        for key, values in self.traits.items():
            self.changed[key] += int(values.present[rows].sum())

    def count_exited(self, stored_rows: Ints) -> None:
        """Count exited users: every ``"true"`` is an exit, every trait value a change."""
        stored_rows = self.in_known(stored_rows)
        for key in self.audience_keys:
            self.exited[key] += int(_audience(self.known, key, stored_rows)[0].sum())
        for key in self.trait_keys:
            self.changed[key] += _count(_text(self.known, key, stored_rows))

    def held(self, stored_rows: Ints) -> tuple[Bools, Bools]:
        """Per stored row: holds a ``"true"`` or a trait value; holds any value at all."""
        stored_rows = self.in_known(stored_rows)
        still = np.zeros(len(stored_rows), dtype=bool)
        ever = np.zeros(len(stored_rows), dtype=bool)
        for key in self.audience_keys:
            is_true, has = _audience(self.known, key, stored_rows)
            still |= is_true
            ever |= has
        for key in self.trait_keys:
            present = _bools(_text(self.known, key, stored_rows).is_valid())
            still |= present
            ever |= present
        return still, ever

    def desired(self, rows: Ints, gone: Ints) -> pd.DataFrame:
        """Desired records of snapshot ``rows`` then of exited stored rows ``gone``."""
        snap, known = self.snap, self.known
        stored_rows = self.in_known(self.position[rows])
        gone = self.in_known(gone)
        in_state = stored_rows >= 0
        safe_rows = np.where(in_state, stored_rows, 0)
        data: dict[str, object] = {}
        for column in ("name", "email"):
            mine = pc.coalesce(_text(snap, column, rows), _text(known, column, stored_rows))
            data[column] = _text_array(pa.concat_arrays([mine, _text(known, column, gone)]))
        for key in self.audience_keys:
            member = self.members[key].at(rows)
            had = _audience(known, key, safe_rows)[1] & in_state if in_state.any() else in_state
            codes = np.concatenate(
                [
                    np.where(member, _TRUE, np.where(had, _FALSE, _ABSENT)),
                    np.where(_audience(known, key, gone)[1], _FALSE, _ABSENT),
                ]
            )
            data[key] = pd.Categorical.from_codes(codes.astype(np.int8), dtype=AUDIENCE_DTYPE)
        for key in self.trait_keys:
            # A trait holds its snapshot value; an exit's traits are absent.
            values = self.traits[key].text(rows)
            data[key] = _text_array(pa.concat_arrays([values, pa.nulls(len(gone), pa.string())]))
        data[HASH] = np.concatenate([self.snap_hash[rows], np.full(len(gone), UNKNOWN, np.uint64)])
        snap_ids, known_ids = _id_fingerprints(snap), _id_fingerprints(known)
        data[ID_HASH] = np.concatenate([snap_ids[0][rows], known_ids[0][gone]])
        data[ID_CHECK] = np.concatenate([snap_ids[1][rows], known_ids[1][gone]])
        ids = pa.concat_arrays([_ids_at(snap, rows), _ids_at(known, gone)])
        # Fresh arrays, this frame's alone: no copy (the default for a dict) needed.
        index = pd.Index(_text_array(ids), name=INDEX_NAME)
        frame = pd.DataFrame(data, index=index, copy=False)
        return frame[["name", "email", *self.audience_keys, *self.trait_keys, *FINGERPRINTS]]

    def key_stats(self, settled_members: Mapping[str, int]) -> tuple[KeyStats, ...]:
        """Per key its counts; ``settled_members``: members among users the reader settled."""
        audiences = [
            KeyStats(
                key=key,
                kind="audience",
                members=int(np.count_nonzero(member.every())) + settled_members.get(key, 0),
                entered=self.entered[key],
                exited=self.exited[key],
            )
            for key, member in self.members.items()
        ]
        traits = [KeyStats(key=key, kind="trait", changed=self.changed[key]) for key in self.traits]
        return (*audiences, *traits)


def diff(snapshot: Snapshot, state: KnownState, *, full: bool = False, samples: int = 20) -> Diff:
    """Compare ``snapshot`` with ``state`` (see the module docstring for the rules)."""
    settled = snapshot.settled
    if settled is not None and full:
        raise ValueError("a full diff needs every snapshot user: read the snapshot whole")
    position, state = _locate(snapshot.base, state, snapshot.id_order)
    sides = _Sides.of(snapshot, state, position)
    known = state.users
    has_value = sides.has_value()
    matched = position >= 0
    both = np.flatnonzero(matched)
    # Users in both: the fingerprint filter, then a value-by-value look at the rest.
    candidates = both if full else sides.suspects(both)
    seen = np.zeros(len(known), dtype=bool) if settled is None else settled.seen.copy()
    seen[position[both]] = True
    gone = np.flatnonzero(~seen)
    del seen
    if not full:
        del both  # 80 MB at 10M users, needed again only to send everyone
    # Only these stored rows are ever looked at value by value (all matched ones with --full).
    sides.read(state, np.sort(np.concatenate([position[candidates], gone])))

    differs = sides.compare(candidates)
    changed_rows = candidates[differs]
    stale = sides.stale(candidates[~differs])

    new_rows = np.flatnonzero(~matched)
    added_rows = new_rows[has_value[new_rows]]
    sides.count_added(added_rows)

    still_held, ever_held = sides.held(gone)
    sides.count_exited(gone[still_held])

    size = len(snapshot.base)
    in_snapshot = size if settled is None else size + settled.count
    kind_of_row = np.full(size, KINDS.index("unchanged"), dtype=np.int8)
    kind_of_row[added_rows] = KINDS.index("added")
    kind_of_row[changed_rows] = KINDS.index("changed")
    if full:
        had = np.zeros(size, dtype=bool)
        had[both] = sides.held(position[both])[1]
        send_rows = np.flatnonzero(has_value | had)
        gone_sent = ever_held
    else:
        send_rows = np.sort(np.concatenate([added_rows, changed_rows]))
        gone_sent = still_held
    desired = sides.desired(send_rows, gone[gone_sent])
    gone_kinds = np.where(still_held[gone_sent], KINDS.index("exited"), KINDS.index("unchanged"))
    kinds = pd.Series(
        pd.Categorical.from_codes(
            np.concatenate([kind_of_row[send_rows], gone_kinds]).astype(np.int8),
            dtype=pd.CategoricalDtype(list(KINDS)),
        ),
        index=desired.index,
        name="kind",
    )

    exited = int(still_held.sum())
    managed = (*snapshot.audience_keys, *snapshot.trait_keys)
    stored_keys = (*state.audience_keys, *state.trait_keys)
    summary = DiffSummary(
        in_snapshot=in_snapshot,
        invalid=dict(snapshot.invalid_counts),
        added=len(added_rows),
        changed=len(changed_rows),
        exited=exited,
        unchanged=in_snapshot + len(gone) - len(added_rows) - len(changed_rows) - exited,
        to_send=len(desired),
        keys=sides.key_stats({} if settled is None else settled.members),
        new_keys=tuple(key for key in managed if key not in stored_keys),
        samples=_samples(
            desired,
            kinds,
            sides.known,
            sides.in_known(np.concatenate([position[send_rows], gone[gone_sent]])),
            samples,
        ),
    )
    return Diff(
        desired=desired,
        kinds=kinds,
        audience_keys=snapshot.audience_keys,
        trait_keys=snapshot.trait_keys,
        summary=summary,
        mass_exit_fraction=exited / len(known) if len(known) else 0.0,
        dropped_keys=tuple(key for key in stored_keys if key not in managed),
        refreshed=_fingerprints_at(snapshot.base, stale),
    )


def _fingerprints_at(frame: pd.DataFrame, rows: Ints) -> pd.DataFrame:
    """The fingerprint columns of ``rows`` of ``frame``, indexed by id.

    Not ``frame.iloc[rows]``: pandas takes every column of it, and a chunked text column is
    copied whole by Arrow's take, even for no rows at all (about 0.5 s at 10M users).
    """
    data = {column: frame[column].array[rows] for column in FINGERPRINTS}
    index = pd.Index(_text_array(_ids_at(frame, rows)), name=INDEX_NAME)
    return pd.DataFrame(data, index=index, copy=False)


def _text_array(values: pa.Array | pa.ChunkedArray) -> pd.arrays.ArrowStringArray:
    chunked = values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])
    return pd.arrays.ArrowStringArray(chunked)


# -- samples ---------------------------------------------------------------------------------


def _samples(
    desired: pd.DataFrame,
    kinds: pd.Series,
    known: pd.DataFrame,
    stored_rows: Ints,
    per_kind: int,
) -> tuple[UserChange, ...]:
    """Up to ``per_kind`` users of each sent kind, lowest ids first, before -> after.

    ``stored_rows`` gives each desired row's row in ``known`` (-1 for a new user).
    """
    if per_kind <= 0 or len(desired) == 0:
        return ()
    fields = [column for column in desired.columns if column not in FINGERPRINTS]
    changes: list[UserChange] = []
    kind: ChangeKind
    for kind in ("added", "changed", "exited"):
        rows = np.flatnonzero((kinds == kind).to_numpy())
        if len(rows) > per_kind:
            pick = pc.select_k_unstable(
                pa.table({"id": _ids(desired).take(pa.array(rows))}),
                k=per_kind,
                sort_keys=[("id", "ascending")],
            )
            rows = rows[np.asarray(pick.to_numpy(zero_copy_only=False), dtype=np.intp)]
        ids = np.asarray(_ids(desired).take(pa.array(rows)).to_pylist(), dtype=object)
        rows = rows[np.argsort(ids, kind="stable")]
        after = _records(desired, rows, fields)
        before = _records(known, stored_rows[rows], fields)
        ids = _ids(desired).take(pa.array(rows)).to_pylist()
        for customer_id, old, new in zip(ids, before, after, strict=True):
            differing = [name for name in fields if old[name] != new[name]]
            changes.append(
                UserChange(
                    customer_id=str(customer_id),
                    kind=kind,
                    before={name: old[name] for name in differing},
                    after={name: new[name] for name in differing},
                )
            )
    return tuple(changes)


def _records(frame: pd.DataFrame, rows: Ints, fields: Sequence[str]) -> list[dict[str, str | None]]:
    """The wire values of ``rows`` (-1: a user the frame lacks, all absent), as dicts."""
    columns = {name: _text(frame, name, rows).to_pylist() for name in fields}
    return [{name: columns[name][i] for name in fields} for i in range(len(rows))]


# -- state after delivery --------------------------------------------------------------------


def acknowledged_rows(result: Diff, ids: Iterable[str]) -> pd.DataFrame:
    """The new stored rows of the users Amberflo acknowledged (``ids`` must have been sent).

    This is what a checkpoint records: the full desired row of each user, fingerprints
    included.
    """
    if ids is result.desired.index or (
        isinstance(ids, pd.Index) and ids.equals(result.desired.index)
    ):
        # Every user sent was acknowledged (state adopt, a run without failures): the rows are
        # the desired frame itself, with no per-id lookup over a million ids.
        return result.desired
    wanted = list(dict.fromkeys(ids))
    probe = pd.DataFrame(index=pd.Index(pd.array(wanted, dtype=TEXT_DTYPE)))
    positions = _match(probe, result.desired, result._lookup)
    if (positions < 0).any():
        unknown = [wanted[i] for i in np.flatnonzero(positions < 0)[:3]]
        raise ValueError(f"acknowledged ids that this diff did not send, e.g. {unknown}")
    return result.desired.iloc[np.sort(positions)]


def apply_acknowledged(state: KnownState, result: Diff, acked_ids: Iterable[str]) -> KnownState:
    """The state once the users in ``acked_ids`` are acknowledged: pure, sorted by id.

    Acknowledged users get their desired row; users found unchanged get their refreshed
    fingerprint; every other stored row stays as it was, except that keys the diff no longer
    manages are dropped from the state.
    """
    state = state.whole()
    audience_keys, trait_keys = result.audience_keys, result.trait_keys
    base = _stored_form(state.users, audience_keys, trait_keys)
    hashes = np.asarray(base[HASH].to_numpy(dtype=np.uint64), dtype=np.uint64)
    refreshed = bool(len(result.refreshed) and len(base))
    if refreshed:
        where = _match(result.refreshed, base)
        found = where >= 0
        hashes = hashes.copy()
        hashes[where[found]] = result.refreshed[HASH].to_numpy(dtype=np.uint64)[found]
    rows = acknowledged_rows(result, acked_ids)[list(base.columns)]
    where = _match(rows, base)
    existing = where >= 0
    # One row order over [stored rows, acknowledged rows], then one take per column: every
    # stored row stays in place unless its acknowledged row replaces it, and new users are
    # sorted in among them (a stored state is sorted by id already).
    order = np.arange(len(base), dtype=np.intp)
    order[where[existing]] = len(base) + np.flatnonzero(existing)
    new = np.flatnonzero(~existing)
    if len(new):
        order = _sorted_in(order, base, rows, new)
    elif not existing.any():
        # Nothing acknowledged: the stored rows, with any refreshed fingerprints.
        users = base.assign(**{HASH: hashes}) if refreshed else base
        return KnownState(users=users, audience_keys=audience_keys, trait_keys=trait_keys)
    users = _concat_take(base, rows, order, hashes)
    return KnownState(users=users, audience_keys=audience_keys, trait_keys=trait_keys)


def _sorted_in(order: Ints, base: pd.DataFrame, rows: pd.DataFrame, new: Ints) -> Ints:
    """``order`` (over ``base``'s rows, in id order, then ``rows``') with ``rows``' ``new``
    positions added where their ids sort.

    A run adds a few thousand users to a state of a million: those are sorted and placed by
    binary search (:func:`insertion_points`), not sorted again with every stored id (at a
    million users, two copies of every id and a sort: about 0.3 s).
    """
    new_ids = _ids(rows).take(pa.array(new))
    ranked = new[sort_order(new_ids)]
    points = insertion_points(_held_text(base.index.array), _ids(rows).take(pa.array(ranked)))
    if points is not None:
        return np.insert(order, points, len(base) + ranked)
    everything = np.concatenate([order, len(base) + new])
    ids = pa.concat_arrays([_ids(base), new_ids])
    return everything[sort_order(ids)]


def initial_state(snapshot: Snapshot) -> KnownState:
    """The state once Amberflo acknowledged every user an initial sync of ``snapshot`` sends.

    Exactly what :func:`apply_acknowledged` makes of ``diff(snapshot, KnownState.empty())``
    with every user acknowledged, built straight from the snapshot in id order: each user
    holding a value (an audience membership or a trait), members ``"true"`` and no
    ``"false"``, traits as wire text, the snapshot's name, email and fingerprints. Over an
    empty state there is nothing to compare and nothing to merge into, so this skips building
    the desired records in snapshot order only to sort them again.
    """
    return InitialState.of(snapshot).whole()


@dataclass(frozen=True, eq=False)
class InitialState:
    """:func:`initial_state` of a snapshot, ready to be built whole or a part at a time.

    ``rows`` are the snapshot rows the state holds, in id order. Built in parts
    (:meth:`parts`), the state can be written while its next part is gathered, and no part
    outlives its writing. Gathering a column in id order is a random-access copy: the copies
    of a part run on a small thread pool (Arrow's take and numpy's indexing release the GIL).
    """

    rows: Ints
    audience_keys: tuple[str, ...]
    trait_keys: tuple[str, ...]
    ids: pa.Array
    text: Mapping[str, pa.Array | pa.ChunkedArray]
    members: Mapping[str, Bools]
    traits: Mapping[str, Callable[[Ints], pa.Array]]
    hashes: tuple[U64, U64, U64]

    @classmethod
    def of(cls, snapshot: Snapshot) -> InitialState:
        """The initial state of ``snapshot``: which rows, in which order, from which columns."""
        base = snapshot.base
        members = {key: _audience(base, key)[0] for key in snapshot.audience_keys}
        held = np.zeros(len(base), dtype=bool)
        for flags in members.values():
            held |= flags
        for key in snapshot.trait_keys:
            held |= snapshot.traits[key].present
        ids = _held_text(base.index.array)
        rows = np.flatnonzero(held)
        # Usually every user holds something: the ids are then sorted as they are, uncopied.
        rows = rows[sort_order(ids if len(rows) == len(ids) else ids.take(pa.array(rows)))]
        id_hash, id_check = _id_fingerprints(base)
        return cls(
            rows=rows,
            audience_keys=snapshot.audience_keys,
            trait_keys=snapshot.trait_keys,
            ids=ids,
            text={column: _text_column(base, column) for column in ("name", "email")},
            members=members,
            traits={key: _wire_text(snapshot.traits[key]) for key in snapshot.trait_keys},
            hashes=(base[HASH].to_numpy(dtype=np.uint64), id_hash, id_check),
        )

    def __len__(self) -> int:
        return len(self.rows)

    def whole(self) -> KnownState:
        """The whole state."""
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            users = self._frame(self.rows, pool)
        return KnownState(users, self.audience_keys, self.trait_keys)

    def parts(self, size: int) -> Iterator[pd.DataFrame]:
        """The state's users in consecutive parts of ``size`` users (the last may be short;
        one empty part when there are no users, so that its columns are known)."""
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            for start in range(0, max(len(self.rows), 1), size):
                yield self._frame(self.rows[start : start + size], pool)

    def _frame(self, rows: Ints, pool: ThreadPoolExecutor) -> pd.DataFrame:
        """The users frame of ``rows`` (snapshot rows, in id order), gathered on ``pool``."""
        record_hash, id_hash, id_check = self.hashes
        # Largest first, so that the last job to finish is a short one.
        index = pool.submit(_taken_rows, self.ids, rows)
        text = {name: pool.submit(_taken_rows, self.text[name], rows) for name in self.text}
        traits = {key: pool.submit(self.traits[key], rows) for key in self.trait_keys}
        codes = {key: pool.submit(_member_codes, self.members[key], rows) for key in self.members}
        hashes = pool.submit(lambda: (record_hash[rows], id_hash[rows], id_check[rows]))
        data: dict[str, object] = {name: _text_array(job.result()) for name, job in text.items()}
        for key, coded in codes.items():
            # Codes made here are valid: pandas need not check a million of them again.
            valid = coded.result()
            data[key] = pd.Categorical.from_codes(valid, dtype=AUDIENCE_DTYPE, validate=False)
        for key, trait in traits.items():
            data[key] = _text_array(trait.result())
        data[HASH], data[ID_HASH], data[ID_CHECK] = hashes.result()
        ids = index.result()
        return pd.DataFrame(data, index=pd.Index(_text_array(ids), name=INDEX_NAME))


def _text_column(frame: pd.DataFrame, column: str) -> pa.Array | pa.ChunkedArray:
    """A text column of ``frame`` as Arrow (nulls = absent), as it is held when it can be."""
    if column in frame.columns and frame[column].dtype == TEXT_DTYPE:
        values: pa.Array | pa.ChunkedArray = pa.array(frame[column].array, from_pandas=True)
        return values
    return _text(frame, column)


def _held_text(values: pd.api.extensions.ExtensionArray) -> pa.Array:
    """Pandas text (ids) as one Arrow array of the type it is held in.

    Pandas holds text as ``large_string`` and casts anything else to it: asking for
    ``string`` here would copy every id twice, once now and once back into the frame.
    """
    arrow = pa.array(values, from_pandas=True)
    return arrow.combine_chunks() if isinstance(arrow, pa.ChunkedArray) else arrow


def _member_codes(flags: Bools, rows: Ints) -> npt.NDArray[np.int8]:
    """Audience codes of ``rows``: ``"true"`` for a member, absent otherwise (never false)."""
    return np.where(flags[rows], np.int8(_TRUE), np.int8(_ABSENT))


def _wire_text(values: TraitValues) -> Callable[[Ints], pa.Array]:
    """The wire text of ``values`` at any rows, for taking nearly every user's.

    Floats are rendered once per distinct value: a million scores or amounts hold a few
    thousand distinct ones, and rendering a float as Python's repr is the dear part. Arrow's
    dictionary keeps ``0.0`` and ``-0.0`` (and NaN) apart and rendering is elementwise, so the
    text is exactly what rendering every value gives.
    """
    if not pa.types.is_floating(values.raw.type):
        return values.text
    encoded = pc.dictionary_encode(values.raw)
    rendered: pa.Array = values.render(encoded.dictionary)
    codes: pa.Array = encoded.indices

    def text(rows: Ints) -> pa.Array:
        return rendered.take(codes.take(pa.array(rows)))

    return text


def _stored_form(
    users: pd.DataFrame, audience_keys: Sequence[str], trait_keys: Sequence[str]
) -> pd.DataFrame:
    """``users`` in canonical form (see :func:`_canonical`), as it is when it already is.

    A state as loaded is canonical for the keys it was committed with; re-encoding a million
    rows only to get the same frame back was most of the cost of folding a run into it.
    """
    columns = ["name", "email", *audience_keys, *trait_keys, *FINGERPRINTS]
    canonical = (
        list(users.columns) == columns
        and users.index.dtype == TEXT_DTYPE
        and users.index.name == INDEX_NAME
        and all(users[column].dtype == TEXT_DTYPE for column in ("name", "email", *trait_keys))
        and all(users[key].dtype == AUDIENCE_DTYPE for key in audience_keys)
        and all(users[column].dtype == np.uint64 for column in FINGERPRINTS)
    )
    if not canonical:
        return _canonical(users, audience_keys, trait_keys)
    unknown = (users[ID_HASH].to_numpy() == 0) & (users[ID_CHECK].to_numpy() == 0)
    if unknown.any():
        return _canonical(users, audience_keys, trait_keys)
    return users


def _concat_take(
    first: pd.DataFrame, second: pd.DataFrame, order: Ints, hashes: U64
) -> pd.DataFrame:
    """Rows ``order`` of ``first`` then ``second`` (both in canonical form, same columns),
    with ``hashes`` as ``first``'s ``_hash``: each column copied once, in Arrow or numpy, the
    columns on a small thread pool (both release the GIL while they copy)."""
    data: dict[str, object] = {}
    # Pandas is read here, in this thread; the pool only runs Arrow and numpy on what it gets.
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        index = pool.submit(_taken_rows, _chunks(first.index.array, second.index.array), order)
        for column in first.columns:
            head, tail = first[column], second[column]
            if column == HASH:
                data[column] = pool.submit(_gather, hashes, tail.to_numpy(np.uint64), order)
            elif isinstance(head.dtype, pd.CategoricalDtype):
                codes = _category_codes(head), _category_codes(tail)
                data[column] = (head.dtype, pool.submit(_gather, codes[0], codes[1], order))
            elif isinstance(head.dtype, np.dtype):
                data[column] = pool.submit(_gather, head.to_numpy(), tail.to_numpy(), order)
            else:
                data[column] = pool.submit(_taken_rows, _chunks(head.array, tail.array), order)
        for column, value in data.items():
            if isinstance(value, tuple):
                dtype, coded = value
                # Codes of valid categoricals: pandas need not check them again.
                data[column] = pd.Categorical.from_codes(
                    coded.result(), dtype=dtype, validate=False
                )
            elif isinstance(value, Future):
                result = value.result()
                data[column] = _text_array(result) if isinstance(result, pa.Array) else result
        ids = index.result()
    return pd.DataFrame(data, index=pd.Index(_text_array(ids), name=INDEX_NAME))


def _gather(head: npt.NDArray[_T], tail: npt.NDArray[_T], order: Ints) -> npt.NDArray[_T]:
    """Rows ``order`` of ``head`` then ``tail``."""
    return np.concatenate([head, tail])[order]


def _chunks(*arrays: object) -> pa.ChunkedArray:
    """Arrow-backed string arrays as one chunked array of the first one's string type."""
    parts = [pa.array(array, from_pandas=True) for array in arrays]
    kind = parts[0].type
    chunks = [
        chunk.cast(kind)
        for part in parts
        for chunk in (part.chunks if isinstance(part, pa.ChunkedArray) else [part])
    ]
    return pa.chunked_array(chunks, type=kind)


def _canonical(
    users: pd.DataFrame, audience_keys: Sequence[str], trait_keys: Sequence[str]
) -> pd.DataFrame:
    """``users`` with exactly the columns of a stored row for these keys, in canonical dtypes.

    Missing key columns become absent; columns of keys no longer managed are dropped;
    fingerprints are computed where missing (``_hash`` then is ``0``: unknown).
    """
    index = pd.Index(_text_array(_ids(users)), name=INDEX_NAME)
    data: dict[str, object] = {}
    for column in ("name", "email", *trait_keys):
        data[column] = _text_array(_text(users, column))
    for key in audience_keys:
        if key in users.columns and users[key].dtype == AUDIENCE_DTYPE:
            data[key] = users[key].array
        elif key in users.columns:
            is_true, has = _audience(users, key)
            codes = np.where(is_true, _TRUE, np.where(has, _FALSE, _ABSENT)).astype(np.int8)
            data[key] = pd.Categorical.from_codes(codes, dtype=AUDIENCE_DTYPE)
        else:
            data[key] = pd.Categorical.from_codes(
                np.full(len(users), _ABSENT, np.int8), dtype=AUDIENCE_DTYPE
            )
    stored_hash = _uint64(users, HASH)
    data[HASH] = stored_hash if stored_hash is not None else np.zeros(len(users), np.uint64)
    data[ID_HASH], data[ID_CHECK] = _id_fingerprints(users)
    columns = ["name", "email", *audience_keys, *trait_keys, *FINGERPRINTS]
    frame = pd.DataFrame(data, index=index)
    return frame[columns]
