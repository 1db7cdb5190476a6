"""Reading a wide Parquet snapshot against the state (``read_snapshot(..., against=...)``):
users the stored fingerprints vouch for are settled as the file is read and only the others
kept, and the diff of that snapshot is the diff of the snapshot read whole, to the last count,
sample and invalid row. Where the state cannot settle it, the snapshot is read whole."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import structlog

import sync.snapshot
from sync.config import SourceSettings
from sync.diff import FINGERPRINTS, HASH, Diff, KnownState, apply_acknowledged, diff
from sync.fingerprint import UNKNOWN
from sync.settle import Settler, UnsettledError
from sync.snapshot import read_snapshot
from sync.state import StateStore, StoredState

RUN = "20250101T000000Z-aaaaaa"
AUDIENCES = ["VIP Users", "Cart Abandoners", "Beta"]
TRAITS = ["plan", "orders_count", "score"]
Row = dict[str, Any]


def users(count: int, seed: int) -> list[Row]:
    """``count`` users with typed columns: boolean audiences, text, integer and float traits,
    and nulls, as a warehouse export has them."""
    pick = random.Random(seed)
    return [
        {
            "user_id": f"user-{n:05d}",
            "name": pick.choice(["Ann", "Bob", None]),
            "email": pick.choice([f"u{n}@example.com", None]),
            **{audience: pick.random() < 0.4 for audience in AUDIENCES},
            "plan": pick.choice(["free", "pro", "team", None]),
            "orders_count": pick.choice([0, 3, 12, None]),
            "score": pick.choice([0.5, 2.25, None, float("nan")]),
        }
        for n in range(count)
    ]


def changed(rows: Sequence[Row], seed: int) -> list[Row]:
    """The next snapshot: some users changed, some gone, some new; ids shuffled."""
    pick = random.Random(seed)
    after: list[Row] = []
    for row in rows:
        roll = pick.random()
        if roll < 0.1:
            continue  # gone
        change = {pick.choice([*AUDIENCES, "plan", "email"]): None} if roll < 0.3 else {}
        after.append({**row, **change})
    after += [{**row, "user_id": f"new-{n}"} for n, row in enumerate(users(25, seed + 1))]
    pick.shuffle(after)
    return after


def write(path: Path, rows: Sequence[Row], row_group_size: int = 16) -> Path:
    pq.write_table(pa.Table.from_pylist(list(rows)), path, row_group_size=row_group_size)
    return path


def source(path: Path | str, **settings: Any) -> SourceSettings:
    fields: dict[str, Any] = {
        "path": str(path),
        "layout": "wide",
        "id_column": "user_id",
        "name_column": "name",
        "email_column": "email",
        "audiences": AUDIENCES,
        "traits": TRAITS,
    }
    return SourceSettings(**{**fields, **settings})


def committed(tmp_path: Path, settings: SourceSettings) -> StateStore:
    """The state after every user of ``settings``' snapshot was acknowledged, in a real store."""
    result = diff(read_snapshot(settings, {}), KnownState.empty(), samples=0)
    state = apply_acknowledged(KnownState.empty(), result, result.desired.index)
    store = StateStore(tmp_path / "state")
    store.commit(StoredState(state.users, state.audience_keys, state.trait_keys), RUN)
    return store


def whole_state(store: StateStore) -> KnownState:
    stored = store.load()
    return KnownState(stored.users, stored.audience_keys, stored.trait_keys).with_id_order()


def partial_state(store: StateStore) -> KnownState:
    """The state as a dry run loads it: fingerprints, and rows fetched when asked."""
    lazy = store.load_lazily(FINGERPRINTS)
    return KnownState(lazy.head, lazy.audience_keys, lazy.trait_keys, fetch=lazy.rows)


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of a few rows, so a small file is read in many of them."""
    monkeypatch.setattr(sync.snapshot, "_PART_ROWS", 7)


def assert_same_diff(settled: Diff, whole: Diff) -> None:
    pd.testing.assert_frame_equal(settled.desired, whole.desired)
    pd.testing.assert_series_equal(settled.kinds, whole.kinds)
    assert settled.summary == whole.summary
    pd.testing.assert_frame_equal(settled.refreshed, whole.refreshed)
    assert settled.mass_exit_fraction == whole.mass_exit_fraction


@pytest.mark.usefixtures("small_parts")
@pytest.mark.parametrize("load", [whole_state, partial_state], ids=["whole", "partial"])
def test_a_settled_read_diffs_like_a_whole_one(
    tmp_path: Path, load: Callable[[StateStore], KnownState]
) -> None:
    """New, changed, unchanged and gone users, users without an id and new ids given twice
    (alike and not), over parts of seven rows: the same diff, samples and invalid rows as the
    snapshot read whole, with only the users the state does not vouch for kept."""
    store = committed(tmp_path, source(write(tmp_path / "a.parquet", users(200, seed=1))))
    rows = changed(users(200, seed=1), seed=2)
    rows[3]["user_id"] = None
    rows[40]["user_id"] = "  "
    rows += [dict(rows[60]), {**rows[61], "plan": "other"}]  # new ids twice: alike, not alike
    rows[60]["user_id"] = rows[-2]["user_id"] = "twice-alike"
    rows[61]["user_id"] = rows[-1]["user_id"] = "twice-unlike"
    settings = source(write(tmp_path / "b.parquet", rows))

    snapshot = read_snapshot(settings, {}, against=lambda: load(store))
    whole = read_snapshot(settings, {})

    assert snapshot.settled is not None
    result = diff(snapshot, load(store))
    assert_same_diff(result, diff(whole, load(store)))
    assert result.summary.unchanged >= snapshot.settled.count > 100
    assert len(snapshot.base) == len(whole.base) - snapshot.settled.count
    pd.testing.assert_frame_equal(snapshot.invalid, whole.invalid)
    assert set(snapshot.invalid["reason"]) == {"missing_id", "conflicting_duplicate"}


@pytest.mark.usefixtures("small_parts")
def test_files_of_one_snapshot_are_settled_in_order(tmp_path: Path) -> None:
    """A folder of files is read file after file: the invalid rows name each file and row."""
    store = committed(tmp_path, source(write(tmp_path / "a.parquet", users(60, seed=3))))
    rows = changed(users(60, seed=3), seed=4)
    rows[50]["user_id"] = None
    folder = tmp_path / "b"
    folder.mkdir()
    write(folder / "part-1.parquet", rows[:30])
    write(folder / "part-2.parquet", rows[30:])

    snapshot = read_snapshot(source(folder), {}, against=lambda: whole_state(store))

    assert snapshot.settled is not None
    assert_same_diff(
        diff(snapshot, whole_state(store)),
        diff(read_snapshot(source(folder), {}), whole_state(store)),
    )
    assert snapshot.invalid[["source", "row"]].values.tolist() == [
        [str(folder / "part-2.parquet"), 21]
    ]


def test_stored_users_without_a_record_fingerprint_are_kept_and_compared(tmp_path: Path) -> None:
    """A stored row with an unknown record fingerprint vouches for nothing: its user is kept,
    compared value by value and, found alike, given a fresh fingerprint to store."""
    store = committed(tmp_path, source(write(tmp_path / "a.parquet", users(40, seed=5))))
    state = whole_state(store)
    stored = state.users.copy()
    unknown = np.arange(len(stored)) % 4 == 0
    stored[HASH] = np.where(unknown, UNKNOWN, stored[HASH])
    state = KnownState(stored, state.audience_keys, state.trait_keys)
    settings = source(tmp_path / "a.parquet")

    snapshot = read_snapshot(settings, {}, against=lambda: state)

    assert snapshot.settled is not None
    result = diff(snapshot, state)
    assert_same_diff(result, diff(read_snapshot(settings, {}), state))
    assert set(result.refreshed.index) == set(stored.index[unknown])
    assert set(snapshot.base.index) >= set(stored.index[unknown])
    assert result.summary.to_send == 0


def test_an_id_given_twice_that_the_state_knows_reads_the_snapshot_whole(tmp_path: Path) -> None:
    """Whether two rows of a stored id agree is for the whole snapshot to say: the read falls
    back to it, and the two unlike rows are left out as before."""
    rows = users(30, seed=6)
    store = committed(tmp_path, source(write(tmp_path / "a.parquet", rows)))
    rows.append({**rows[5], "plan": "other"})
    settings = source(write(tmp_path / "b.parquet", rows))

    with structlog.testing.capture_logs() as logs:
        snapshot = read_snapshot(settings, {}, against=lambda: whole_state(store))

    assert snapshot.settled is None
    assert [entry["reason"] for entry in logs if entry["event"] == "snapshot_read_whole"] == [
        "an id repeats in the snapshot"
    ]
    assert snapshot.invalid_counts == {"conflicting_duplicate": 2}
    assert diff(snapshot, whole_state(store)).summary.exited == 1


@pytest.mark.parametrize(
    ("settings", "state"),
    [
        pytest.param({}, KnownState.empty, id="no-stored-user"),
        pytest.param({"audiences": None, "traits": None}, None, id="text-column-to-infer"),
        pytest.param({"path": "a.csv"}, None, id="csv"),
        pytest.param({"layout": "long"}, None, id="long-layout"),
    ],
)
def test_snapshots_the_state_cannot_settle_are_read_whole(
    tmp_path: Path, settings: dict[str, Any], state: Callable[[], KnownState] | None
) -> None:
    """No stored user, a text column whose kind is inferred from its values, a CSV file or
    another layout: the snapshot is read whole, as without a state."""
    rows = users(20, seed=7)
    store = committed(tmp_path, source(write(tmp_path / "a.parquet", rows)))
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    chosen = source(tmp_path / settings.pop("path", "a.parquet"), **settings)
    if settings.get("layout") == "long":
        long_rows = [
            {"user_id": row["user_id"], "key": "plan", "value": row["plan"]} for row in rows
        ]
        write(tmp_path / "long.parquet", long_rows)
        chosen = SourceSettings(
            path=str(tmp_path / "long.parquet"),
            layout="long",
            id_column="user_id",
            key_column="key",
            value_column="value",
        )
    loaded = state or (lambda: whole_state(store))

    snapshot = read_snapshot(chosen, {}, against=loaded)

    assert snapshot.settled is None


def test_inferred_boolean_and_number_columns_are_settled(tmp_path: Path) -> None:
    """Unconfigured, a boolean column is an audience and a number column a trait by their
    types alone, so such a snapshot is settled; the keys match the whole read's."""
    rows = [{key: value for key, value in row.items() if key != "plan"} for row in users(30, 8)]
    settings = source(write(tmp_path / "a.parquet", rows), audiences=None, traits=None)
    store = committed(tmp_path, settings)

    snapshot = read_snapshot(settings, {}, against=lambda: whole_state(store))
    whole = read_snapshot(settings, {})

    assert snapshot.settled is not None
    assert snapshot.settled.count == len(whole.base) - len(snapshot.base) > 20
    assert (snapshot.audience_keys, snapshot.trait_keys) == (whole.audience_keys, whole.trait_keys)
    assert snapshot.trait_keys == ("orders_count", "score")


def test_a_full_diff_refuses_a_settled_snapshot(tmp_path: Path) -> None:
    """``--full`` sends every user, so it needs all of them: a settled snapshot is refused."""
    settings = source(write(tmp_path / "a.parquet", users(10, seed=9)))
    store = committed(tmp_path, settings)
    snapshot = read_snapshot(settings, {}, against=lambda: whole_state(store))

    with pytest.raises(ValueError, match="full diff needs every snapshot user"):
        diff(snapshot, whole_state(store), full=True)


def test_a_settler_counts_members_of_settled_users_only(tmp_path: Path) -> None:
    """The settled users' memberships are counted for the report (the kept ones are counted by
    the diff), and a stored row matched twice is a repeated id."""
    store = committed(tmp_path, source(write(tmp_path / "a.parquet", users(10, seed=10))))
    state = whole_state(store)
    settler = Settler(state)
    ids = (
        state.users["_id_hash"].to_numpy(np.uint64)[:4],
        state.users["_id_check"].to_numpy(np.uint64)[:4],
    )
    records = state.users[HASH].to_numpy(np.uint64)[:4].copy()
    records[1] += np.uint64(1)  # this one changed
    members = {"vip": np.array([True, True, False, True])}

    positions = settler.match(ids)
    keep = settler.keep(positions, records, members)

    assert positions.tolist() == [0, 1, 2, 3]
    assert keep.tolist() == [False, True, False, False]
    assert (settler.settled().count, settler.settled().members) == (3, {"vip": 2})
    with pytest.raises(UnsettledError, match="repeats"):
        settler.keep(settler.match(ids), records, members)


def test_an_empty_trait_column_is_still_named_when_read_a_part_at_a_time(tmp_path: Path) -> None:
    """A trait column with no value in any part gets the warning the whole read gives."""
    rows = [{**row, "score": None} for row in users(30, seed=11)]
    settings = source(write(tmp_path / "a.parquet", rows))
    store = committed(tmp_path, settings)

    with structlog.testing.capture_logs() as logs:
        snapshot = read_snapshot(settings, {}, against=lambda: whole_state(store))

    assert snapshot.settled is not None
    assert [entry["column"] for entry in logs if entry["event"] == "snapshot_column_empty"] == [
        "score"
    ]


@pytest.mark.usefixtures("small_parts")
def test_a_lazily_loaded_state_folds_in_like_a_whole_one(tmp_path: Path) -> None:
    """A run plans against the stored fingerprints alone and loads the stored rows for its
    commit: the next state is the one folding into the whole state gives, and the store
    writes and reads it back the same."""
    store = committed(tmp_path, source(write(tmp_path / "a.parquet", users(120, seed=12))))
    settings = source(write(tmp_path / "b.parquet", changed(users(120, seed=12), seed=13)))
    result = diff(
        read_snapshot(settings, {}, against=lambda: partial_state(store)), partial_state(store)
    )
    acknowledged = result.desired.index[::2]  # some of the users sent acknowledged

    lazily = apply_acknowledged(partial_state(store), result, acknowledged)
    wholly = apply_acknowledged(whole_state(store), result, acknowledged)

    pd.testing.assert_frame_equal(lazily.users, wholly.users)
    assert result.summary.to_send > len(acknowledged) > 10
    store.commit(StoredState(lazily.users, lazily.audience_keys, lazily.trait_keys), RUN)
    pd.testing.assert_frame_equal(whole_state(store).users, wholly.users, check_like=True)
