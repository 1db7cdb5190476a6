"""The state after delivery, by its fast paths: ``apply_acknowledged`` on a state as the store
loads it (reusing the stored columns) gives what it gives on the same state in plain form, and
``initial_state`` (what ``state adopt`` records over an empty state) gives what diffing against
the empty state and folding every user in gives."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sync.config import SourceSettings
from sync.diff import (
    HASH,
    InitialState,
    KnownState,
    Snapshot,
    apply_acknowledged,
    diff,
    initial_state,
)
from sync.snapshot import read_snapshot
from sync.state import StateStore, StoredState

AUDIENCES = ("vip", "cart")
TRAITS = ("plan",)
RUN = "20250101T000000Z-aaaaaa"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "engage"
Row = Mapping[str, str | None]


def snapshot(rows: Mapping[str, Row]) -> Snapshot:
    """A snapshot of ``rows`` (``{id: {column: wire value}}``)."""
    columns = ["name", "email", *AUDIENCES, *TRAITS]
    data = {column: [row.get(column) for row in rows.values()] for column in columns}
    index = pd.Index(list(rows), dtype="string", name="customer_id")
    frame = pd.DataFrame(data, index=index, dtype="string")
    return Snapshot.from_users(frame, AUDIENCES, TRAITS)


def loaded(tmp_path: Path, rows: Mapping[str, Row]) -> KnownState:
    """The state after ``rows`` were delivered, committed to a real store and loaded back."""
    result = diff(snapshot(rows), KnownState.empty())
    state = apply_acknowledged(KnownState.empty(), result, result.desired.index)
    store = StateStore(tmp_path / "state")
    store.commit(StoredState(state.users, state.audience_keys, state.trait_keys), RUN)
    stored = store.load()
    return KnownState(stored.users, stored.audience_keys, stored.trait_keys)


def plain(state: KnownState) -> KnownState:
    """The same state in plain form: Python objects, no categoricals, a default index name."""
    users = state.users.astype(object)
    users.index = pd.Index(list(users.index), dtype=object)
    return KnownState(users, state.audience_keys, state.trait_keys)


FIRST: dict[str, Row] = {
    "u1": {"name": "Ann", "vip": "true", "plan": "pro"},
    "u3": {"email": "c@x.io", "cart": "true"},
    "u5": {"vip": "true", "cart": "true", "plan": "free"},
    "u7": {"plan": "team"},
}
SECOND: dict[str, Row] = {
    "u0": {"vip": "true"},  # new, sorts first
    "u1": {"name": "Ann", "vip": "true", "plan": "pro"},  # unchanged
    "u3": {"email": "c@x.io", "plan": "free"},  # left cart, gained a plan
    "u4": {"cart": "true"},  # new, sorts in between
    "u7": {"plan": "team"},  # unchanged; u5 exited
}


def test_a_loaded_state_folds_in_like_a_plain_one(tmp_path: Path) -> None:
    """New, changed and exited users give the same next state whatever form the state has."""
    state = loaded(tmp_path, FIRST)
    result = diff(snapshot(SECOND), state)
    assert (result.summary.added, result.summary.changed, result.summary.exited) == (2, 1, 1)

    fast = apply_acknowledged(state, result, result.desired.index)
    slow = apply_acknowledged(plain(state), result, result.desired.index)

    pd.testing.assert_frame_equal(fast.users, slow.users)
    assert list(fast.users.index) == ["u0", "u1", "u3", "u4", "u5", "u7"]
    assert diff(snapshot(SECOND), fast).summary.to_send == 0


def test_new_users_are_sorted_in_whatever_order_the_state_is_in(tmp_path: Path) -> None:
    """New users land in id order among stored ones, placed or, for a state out of order,
    sorted with them: the same next state either way."""
    state = loaded(tmp_path, FIRST)
    backwards = KnownState(state.users.iloc[::-1], state.audience_keys, state.trait_keys)
    result = diff(snapshot(SECOND), state)

    placed = apply_acknowledged(state, result, result.desired.index)
    sorted_again = apply_acknowledged(backwards, result, result.desired.index)

    assert list(placed.users.index) == ["u0", "u1", "u3", "u4", "u5", "u7"]
    pd.testing.assert_frame_equal(placed.users, sorted_again.users)


def test_a_partial_acknowledgement_folds_in_like_a_plain_one(tmp_path: Path) -> None:
    """Only some users acknowledged: the same next state from either form, the rest kept."""
    state = loaded(tmp_path, FIRST)
    result = diff(snapshot(SECOND), state)

    fast = apply_acknowledged(state, result, ["u4", "u5"])
    slow = apply_acknowledged(plain(state), result, ["u4", "u5"])

    pd.testing.assert_frame_equal(fast.users, slow.users)
    again = diff(snapshot(SECOND), fast)
    assert sorted(again.desired.index) == ["u0", "u3"]


def test_refreshed_fingerprints_leave_the_callers_state_untouched(tmp_path: Path) -> None:
    """Stale fingerprints are refreshed in the new state, never written into the old one."""
    state = loaded(tmp_path, FIRST)
    stale = state.users.copy()
    stale[HASH] = np.zeros(len(stale), dtype=np.uint64)
    before = stale.copy()
    result = diff(snapshot(FIRST), KnownState(stale, state.audience_keys, state.trait_keys))
    assert result.summary.to_send == 0
    assert len(result.refreshed) == len(FIRST)

    after = apply_acknowledged(KnownState(stale, state.audience_keys, state.trait_keys), result, [])

    pd.testing.assert_frame_equal(stale, before)
    pd.testing.assert_frame_equal(after.users, state.users)


def random_snapshot(seed: int, size: int) -> Snapshot:
    """``size`` users in random order with random memberships, traits, names and emails; a
    fifth hold no value at all (an initial sync never sends them)."""
    rng = np.random.default_rng(seed)
    rows: dict[str, Row] = {}
    for n in rng.permutation(size):
        holds = n % 5 != 0
        rows[f"{['usr_', '', 'c-'][n % 3]}{n * 7919 % 100003}"] = {
            "name": f"User {n}" if rng.random() < 0.7 else None,
            "email": f"u{n}@x.io" if rng.random() < 0.5 else None,
            "vip": "true" if holds and rng.random() < 0.4 else None,
            "cart": "true" if holds and rng.random() < 0.3 else ("false" if n % 7 == 0 else None),
            "plan": str(rng.choice(["free", "pro", "team"])) if holds and n % 2 else None,
        }
    return snapshot(rows)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_initial_state_is_the_state_an_initial_sync_leaves(seed: int) -> None:
    """Built straight from a snapshot, the state equals the diff-then-fold of an initial sync."""
    snap = random_snapshot(seed, 400)
    result = diff(snap, KnownState.empty())

    direct = initial_state(snap)
    folded = apply_acknowledged(KnownState.empty(), result, result.desired.index)

    pd.testing.assert_frame_equal(direct.users, folded.users)
    assert (direct.audience_keys, direct.trait_keys) == (folded.audience_keys, folded.trait_keys)
    assert len(direct.users) == result.summary.added
    assert diff(snap, direct).summary.to_send == 0


@pytest.mark.parametrize("size", [1, 7, 400])
def test_initial_state_in_parts_is_the_whole_state_cut_in_order(size: int) -> None:
    """Parts of ``size`` users, put together, are the whole initial state."""
    initial = InitialState.of(random_snapshot(4, 400))

    parts = list(initial.parts(size))

    assert [len(part) for part in parts[:-1]] == [size] * (len(parts) - 1)
    assert 0 < len(parts[-1]) <= size
    pd.testing.assert_frame_equal(pd.concat(parts), initial.whole().users)
    assert len(initial) == len(initial.whole().users)


def test_initial_state_of_no_holders_is_one_empty_part() -> None:
    """A snapshot where nobody holds a value gives one empty part, with the state's columns."""
    initial = InitialState.of(snapshot({"u1": {"name": "Ann"}, "u2": {"email": "b@x.io"}}))

    parts = list(initial.parts(10))

    assert len(initial) == 0
    assert len(parts) == 1
    pd.testing.assert_frame_equal(parts[0], initial.whole().users)
    assert list(parts[0].columns) == [
        "name",
        "email",
        *AUDIENCES,
        *TRAITS,
        "_hash",
        "_id_hash",
        "_id_check",
    ]


def test_initial_state_of_a_read_snapshot_keeps_typed_traits_and_leaves_invalid_rows_out() -> None:
    """From a real file with invalid rows and number traits: the same state as the slow path."""
    source = SourceSettings(
        path=str(EXAMPLES / "snapshot-1.csv"), name_column="name", email_column="email"
    )
    snap = read_snapshot(source, {})
    assert snap.invalid_counts
    result = diff(snap, KnownState.empty())

    direct = initial_state(snap)

    folded = apply_acknowledged(KnownState.empty(), result, result.desired.index)
    pd.testing.assert_frame_equal(direct.users, folded.users)
    assert list(direct.users.index) == sorted(direct.users.index)


def test_initial_state_renders_float_traits_as_the_slow_path_does(tmp_path: Path) -> None:
    """Floats rendered once per distinct value keep -0.0, NaN, nulls and exponents exact."""
    rng = np.random.default_rng(7)
    size = 5000
    special = [0.0, -0.0, float("nan"), None, 1e16, 1e-7, 0.1, 2.0, -3.5, 123456789.125]
    scores = [
        special[n] if n < len(special) else float(rng.integers(0, 50)) / 8 for n in range(size)
    ]
    amounts = [None if n % 11 == 0 else float(rng.normal(100, 40)) for n in range(size)]
    path = tmp_path / "floats.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": [f"u{n * 7919 % 100003}" for n in range(size)],
                "vip": [n % 3 == 0 for n in range(size)],
                "score": pa.array(scores, pa.float64()),
                "amount": pa.array(amounts, pa.float32()),
            }
        ),
        path,
    )
    snap = read_snapshot(SourceSettings(path=str(path), audiences=["vip"]), {})
    result = diff(snap, KnownState.empty())

    direct = initial_state(snap)

    folded = apply_acknowledged(KnownState.empty(), result, result.desired.index)
    pd.testing.assert_frame_equal(direct.users, folded.users)
    score = direct.users["score"]
    assert (score["u0"], score["u7919"], score["u31676"]) == ("0.0", "-0.0", "1e+16")
    assert pd.isna(score["u15838"])
    assert pd.isna(score["u23757"])
