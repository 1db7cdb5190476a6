"""The diff's rules, one table case at a time, and the state it advances."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from sync.config import SourceSettings
from sync.diff import (
    Diff,
    KnownState,
    Snapshot,
    _merge_match,
    _taken_rows,
    acknowledged_rows,
    apply_acknowledged,
    diff,
)
from sync.fingerprint import id_fingerprints, order_hashes
from sync.model import KeyStats
from sync.snapshot import read_snapshot

AUDIENCES = ("vip", "cart")
TRAITS = ("plan",)
Row = Mapping[str, str | None]


def _frame(rows: Mapping[str, Row], keys: Sequence[str]) -> pd.DataFrame:
    columns = ["name", "email", *keys]
    data = {column: [row.get(column) for row in rows.values()] for column in columns}
    index = pd.Index(list(rows), dtype="string", name="customer_id")
    return pd.DataFrame(data, index=index, dtype="string")


def _snapshot(
    rows: Mapping[str, Row], audiences: Sequence[str] = AUDIENCES, traits: Sequence[str] = TRAITS
) -> Snapshot:
    return Snapshot.from_users(_frame(rows, (*audiences, *traits)), audiences, traits)


def _state(
    rows: Mapping[str, Row], audiences: Sequence[str] = AUDIENCES, traits: Sequence[str] = TRAITS
) -> KnownState:
    """A state as another tool might hand it over: plain strings, no fingerprints."""
    return KnownState(_frame(rows, (*audiences, *traits)), tuple(audiences), tuple(traits))


def _synced(snapshot: Snapshot) -> KnownState:
    """The state after ``snapshot`` was fully delivered from an empty state."""
    result = diff(snapshot, KnownState.empty())
    return apply_acknowledged(KnownState.empty(), result, result.desired.index)


def _desired(result: Diff) -> dict[str, dict[str, str]]:
    """``{id: {field: value}}`` of the users to send, absent values and fingerprints left out."""
    users = result.desired.drop(columns=["_hash", "_id_hash", "_id_check"])
    return {
        str(customer_id): {k: str(v) for k, v in row.items() if not pd.isna(v)}
        for customer_id, row in users.iterrows()
    }


def _kinds(result: Diff) -> dict[str, str]:
    return {str(k): str(v) for k, v in result.kinds.items()}


def test_first_run_sends_members_and_trait_holders_only() -> None:
    """With no state, members and trait holders are added, without any "false"."""
    result = diff(
        _snapshot(
            {
                "u1": {"name": "Ann", "vip": "true", "plan": "gold"},
                "u2": {"plan": "silver"},
                "u3": {"name": "Nobody"},
            }
        ),
        KnownState.empty(),
    )
    assert _desired(result) == {
        "u1": {"name": "Ann", "vip": "true", "plan": "gold"},
        "u2": {"plan": "silver"},
    }
    assert _kinds(result) == {"u1": "added", "u2": "added"}
    summary = result.summary
    assert (summary.added, summary.changed, summary.exited, summary.unchanged) == (2, 0, 0, 1)
    assert summary.to_send == 2
    assert summary.new_keys == ("vip", "cart", "plan")


def test_leaving_an_audience_sends_false_and_never_members_stay_absent() -> None:
    """A member who leaves gets "false"; keys it never held stay absent."""
    state = _synced(_snapshot({"u1": {"vip": "true", "plan": "gold"}}))
    result = diff(_snapshot({"u1": {"plan": "gold"}}), state)
    assert _desired(result) == {"u1": {"vip": "false", "plan": "gold"}}
    assert _kinds(result) == {"u1": "changed"}
    assert result.summary.keys[0] == KeyStats(key="vip", kind="audience", exited=1)


def test_a_stored_false_is_not_sent_again() -> None:
    """A non-member whose stored value is already "false" is unchanged."""
    state = _state({"u1": {"vip": "false", "plan": "gold"}})
    result = diff(_snapshot({"u1": {"plan": "gold"}}), state)
    assert result.summary.to_send == 0
    assert result.summary.unchanged == 1


def test_rejoining_an_audience_is_an_entry() -> None:
    """A user whose stored value is "false" and who is a member again is sent "true"."""
    state = _state({"u1": {"vip": "false"}})
    result = diff(_snapshot({"u1": {"vip": "true"}}), state)
    assert _desired(result) == {"u1": {"vip": "true"}}
    assert result.summary.keys[0] == KeyStats(key="vip", kind="audience", members=1, entered=1)


def test_a_trait_that_goes_null_is_absent() -> None:
    """A trait value that disappears is a change to absent."""
    state = _state({"u1": {"vip": "true", "plan": "gold"}})
    result = diff(_snapshot({"u1": {"vip": "true"}}), state)
    assert _desired(result) == {"u1": {"vip": "true"}}
    assert result.summary.keys[2] == KeyStats(key="plan", kind="trait", changed=1)


def test_missing_user_exits_with_false_and_keeps_name() -> None:
    """A stored user missing from the snapshot is sent "false" for what it held, no traits."""
    state = _state(
        {
            "u1": {"name": "Ann", "email": "a@x.io", "vip": "true", "cart": "false", "plan": "x"},
            "u2": {"name": "Old", "vip": "false"},
            "u3": {"vip": "true"},
        }
    )
    result = diff(_snapshot({"u3": {"vip": "true"}}), state)
    assert _desired(result) == {
        "u1": {"name": "Ann", "email": "a@x.io", "vip": "false", "cart": "false"}
    }
    assert _kinds(result) == {"u1": "exited"}
    summary = result.summary
    assert (summary.exited, summary.unchanged) == (1, 2)
    assert result.mass_exit_fraction == pytest.approx(1 / 3)


def test_name_from_snapshot_or_else_as_stored() -> None:
    """A new name is a change; a snapshot without a name keeps the stored one."""
    state = _state({"u1": {"name": "Ann", "vip": "true"}, "u2": {"name": "Bob", "vip": "true"}})
    result = diff(
        _snapshot({"u1": {"name": "Anna", "vip": "true"}, "u2": {"cart": "true", "vip": "true"}}),
        state,
    )
    assert _desired(result) == {
        "u1": {"name": "Anna", "vip": "true"},
        "u2": {"name": "Bob", "vip": "true", "cart": "true"},
    }


def test_full_sends_everyone_who_has_or_had_a_value() -> None:
    """--full sends every snapshot user with a current or stored value and every exit."""
    state = _state(
        {"u1": {"vip": "true"}, "u2": {"vip": "false"}, "u3": {"cart": "false"}, "u4": {}}
    )
    result = diff(
        _snapshot({"u1": {"vip": "true"}, "u2": {}, "u5": {"plan": "p"}, "u6": {}}),
        state,
        full=True,
    )
    assert _kinds(result) == {
        "u1": "unchanged",
        "u2": "unchanged",
        "u5": "added",
        "u3": "unchanged",
    }
    assert _desired(result)["u3"] == {"cart": "false"}
    assert result.summary.to_send == 4
    assert (result.summary.added, result.summary.changed, result.summary.exited) == (1, 0, 0)


def test_keys_no_longer_managed_are_left_alone_and_dropped() -> None:
    """A key the snapshot no longer has is neither sent nor kept in the next state."""
    state = _synced(_snapshot({"u1": {"vip": "true", "cart": "true"}}))
    result = diff(_snapshot({"u1": {"vip": "true"}}, audiences=("vip", "loyal")), state)
    assert result.summary.to_send == 0
    assert result.dropped_keys == ("cart",)
    assert result.summary.new_keys == ("loyal",)
    after = apply_acknowledged(state, result, [])
    assert list(after.users.columns[:3]) == ["name", "email", "vip"]
    assert "cart" not in after.users.columns
    assert after.audience_keys == ("vip", "loyal")


def test_only_acknowledged_users_advance() -> None:
    """A user whose upsert failed keeps its old row, so the next diff sends it again."""
    state = _synced(_snapshot({"u1": {"vip": "true"}, "u2": {"vip": "true"}}))
    second = _snapshot({"u1": {"plan": "a"}, "u2": {"plan": "b"}})
    result = diff(second, state)
    assert sorted(result.desired.index) == ["u1", "u2"]
    after = apply_acknowledged(state, result, ["u2"])
    assert list(after.users.index) == ["u1", "u2"]
    again = diff(second, after)
    assert list(again.desired.index) == ["u1"]
    assert _desired(again) == {"u1": {"vip": "false", "plan": "a"}}


def test_new_users_are_inserted_in_id_order() -> None:
    """The state stays sorted by id when acknowledged users are new."""
    state = _synced(_snapshot({"b": {"vip": "true"}, "d": {"vip": "true"}}))
    snapshot = _snapshot(
        {"d": {"vip": "true"}, "c": {"vip": "true"}, "a": {"vip": "true"}, "b": {"vip": "true"}}
    )
    result = diff(snapshot, state)
    after = apply_acknowledged(state, result, result.desired.index)
    assert list(after.users.index) == ["a", "b", "c", "d"]
    assert diff(snapshot, after).summary.to_send == 0


def test_acknowledging_an_id_that_was_not_sent_is_an_error() -> None:
    """Acknowledged ids must come from the diff: anything else is a caller bug."""
    result = diff(_snapshot({"u1": {"vip": "true"}}), KnownState.empty())
    with pytest.raises(ValueError, match="did not send"):
        apply_acknowledged(KnownState.empty(), result, ["u9"])


def test_acknowledged_rows_are_full_stored_rows() -> None:
    """A checkpoint row holds every managed key and the fingerprints of the user."""
    result = diff(_snapshot({"u1": {"vip": "true"}, "u2": {"plan": "x"}}), KnownState.empty())
    rows = acknowledged_rows(result, ["u2"])
    assert list(rows.index) == ["u2"]
    assert list(rows.columns) == ["name", "email", "vip", "cart", "plan", *FINGERPRINT_COLUMNS]
    assert rows.loc["u2", "plan"] == "x"
    assert rows.loc["u2", "_hash"] != 0


FINGERPRINT_COLUMNS = ["_hash", "_id_hash", "_id_check"]


def test_samples_show_only_differing_fields_lowest_ids_first() -> None:
    """Samples are capped per kind, sorted by id, with before -> after of changed fields."""
    state = _state({"u9": {"name": "N", "vip": "true", "plan": "a"}, "u8": {"vip": "true"}})
    result = diff(
        _snapshot({"u9": {"vip": "true", "plan": "b"}, "c": {"vip": "true"}, "b": {"plan": "p"}}),
        state,
        samples=1,
    )
    samples = {
        (s.kind, s.customer_id): (dict(s.before), dict(s.after)) for s in result.summary.samples
    }
    assert samples == {
        ("added", "b"): ({"plan": None}, {"plan": "p"}),
        ("changed", "u9"): ({"plan": "a"}, {"plan": "b"}),
        ("exited", "u8"): ({"vip": "true"}, {"vip": "false"}),
    }


def test_samples_can_be_turned_off() -> None:
    """samples=0 gives no samples."""
    result = diff(_snapshot({"u1": {"vip": "true"}}), KnownState.empty(), samples=0)
    assert result.summary.samples == ()


def test_ids_sharing_a_fingerprint_fall_back_to_an_exact_match() -> None:
    """If stored id fingerprints repeat, users are still matched by their exact ids."""
    state = _synced(_snapshot({"u1": {"vip": "true"}, "u2": {"plan": "x"}}))
    forged = state.users.copy()
    forged["_id_hash"] = np.uint64(7)
    result = diff(
        _snapshot({"u1": {"vip": "true"}, "u2": {"plan": "y"}}),
        KnownState(forged, state.audience_keys, state.trait_keys),
    )
    assert _desired(result) == {"u2": {"plan": "y"}}
    assert _kinds(result) == {"u2": "changed"}


def test_a_match_its_second_word_does_not_confirm_falls_back_to_an_exact_match() -> None:
    """A stored id sharing the first fingerprint word with another snapshot id (but not the
    check word) is not taken for it: users are matched by their exact ids instead."""
    state = _synced(_snapshot({"u1": {"vip": "true"}, "u2": {"plan": "x"}}))
    forged = state.users.copy()
    forged.loc["u2", "_id_hash"] = id_fingerprints(pa.array(["u3"]))[0][0]
    result = diff(
        _snapshot({"u1": {"vip": "true"}, "u3": {"plan": "x"}}),
        KnownState(forged, state.audience_keys, state.trait_keys),
    )
    assert _kinds(result) == {"u2": "exited", "u3": "added"}


def test_fingerprints_sharing_their_high_bits_are_matched_whole() -> None:
    """The sort-merge match tells apart hashes differing only in their low bits, gives up on a
    state that repeats a hash, and finds nothing in an empty state."""
    state = np.array([5 << 40 | 1, 5 << 40 | 2, 7 << 40, 9, 5 << 40 | 4], dtype=np.uint64)
    snapshot = np.array([5 << 40 | 2, 5 << 40 | 1, 5 << 40 | 3, 9, 7 << 40, 8, 5 << 40 | 4])
    positions = _merge_match(snapshot.astype(np.uint64), state)
    assert positions is not None
    assert positions.tolist() == [1, 0, -1, 3, 2, -1, 4]
    assert _merge_match(snapshot.astype(np.uint64), np.array([3, 9, 3], dtype=np.uint64)) is None
    nothing_stored = _merge_match(snapshot.astype(np.uint64), state[:0])
    assert nothing_stored is not None
    assert nothing_stored.tolist() == [-1] * 7


def test_orders_sorted_elsewhere_match_as_ones_sorted_here() -> None:
    """Orders the snapshot reader or the state loader made are used as they are, and ones of
    another row width are made again, with the same answer every way."""
    state = np.array([5 << 40 | 1, 5 << 40 | 2, 7 << 40, 9, 5 << 40 | 4], dtype=np.uint64)
    snapshot = np.array([5 << 40 | 2, 9, 5 << 40 | 3, 7 << 40, 8], dtype=np.uint64)
    expected = [1, 3, -1, 2, -1]

    for order in (order_hashes(snapshot), order_hashes(snapshot, bits=40)):
        for stored_order in (None, order_hashes(state), order_hashes(state, bits=40)):
            positions = _merge_match(snapshot, state, order, stored_order)
            assert positions is not None
            assert positions.tolist() == expected


def test_a_state_sorted_when_loaded_diffs_the_same() -> None:
    """with_id_order sorts the stored id fingerprints once; the diff gives the same answer
    with them, and a state without fingerprints is left as it is."""
    state = _synced(_snapshot({"u1": {"vip": "true"}, "u2": {"plan": "x"}, "u3": {"vip": "true"}}))
    snapshot = _snapshot({"u1": {"vip": "true"}, "u2": {"plan": "y"}, "u4": {"vip": "true"}})

    sorted_state = state.with_id_order()

    assert sorted_state.id_order is not None
    assert state.id_order is None
    assert _desired(diff(snapshot, sorted_state)) == _desired(diff(snapshot, state))
    assert _kinds(diff(snapshot, sorted_state)) == {"u2": "changed", "u3": "exited", "u4": "added"}
    bare = _state({"u1": {"vip": "true"}})
    assert bare.with_id_order() is bare


def test_a_state_without_fingerprints_diffs_the_same() -> None:
    """Rows restored without fingerprints are compared value by value, with the same result."""
    rows: dict[str, Row] = {"u1": {"vip": "true", "plan": "a"}, "u2": {"cart": "true"}}
    snapshot = _snapshot({"u1": {"vip": "true", "plan": "b"}, "u3": {"vip": "true"}})
    with_fingerprints = diff(snapshot, _synced(_snapshot(rows)))
    without = diff(snapshot, _state(rows))
    assert _desired(with_fingerprints) == _desired(without)
    assert _kinds(with_fingerprints) == _kinds(without)
    assert with_fingerprints.summary == without.summary


def test_a_partial_state_that_fingerprints_cannot_match_is_loaded_whole() -> None:
    """A partial state whose id fingerprints collide is read whole and matched by exact ids."""
    state = _synced(_snapshot({"u1": {"vip": "true"}, "u2": {"plan": "x"}}))
    forged = state.users.copy()
    forged["_id_hash"] = np.uint64(7)
    asked: list[list[int]] = []

    def fetch(positions: np.ndarray) -> pd.DataFrame:
        asked.append(list(positions))
        return forged.iloc[positions]

    head = forged[["_hash", "_id_hash", "_id_check"]].reset_index(drop=True)
    partial = KnownState(head, state.audience_keys, state.trait_keys, fetch=fetch)
    result = diff(_snapshot({"u1": {"vip": "true"}, "u2": {"plan": "y"}}), partial)
    assert _desired(result) == {"u2": {"plan": "y"}}
    assert _kinds(result) == {"u2": "changed"}
    assert asked[0] == [0, 1]


def test_stale_fingerprints_are_refreshed_for_unchanged_users() -> None:
    """Users found unchanged value by value get the snapshot's fingerprint in the next state."""
    state = _state({"u1": {"vip": "true"}})
    snapshot = _snapshot({"u1": {"vip": "true"}})
    result = diff(snapshot, state)
    assert result.summary.to_send == 0
    after = apply_acknowledged(state, result, [])
    assert after.users.loc["u1", "_hash"] == snapshot.users.loc["u1", "_hash"]


def _ids(values: Iterable[object]) -> list[str]:
    return sorted(str(value) for value in values)


def test_ids_by_kind() -> None:
    """Diff.ids lists the users to send of one kind."""
    state = _state({"u1": {"vip": "true"}, "u2": {"vip": "true"}})
    result = diff(_snapshot({"u1": {"vip": "true", "plan": "x"}, "u3": {"vip": "true"}}), state)
    assert _ids(result.ids("added")) == ["u3"]
    assert _ids(result.ids("changed")) == ["u1"]
    assert _ids(result.ids("exited")) == ["u2"]


def test_bundled_samples_give_the_documented_counts() -> None:
    """examples/engage: 37 users added first, then 2 added, 15 changed and 1 exited."""
    examples = Path(__file__).resolve().parent.parent / "examples" / "engage"
    source = {"name_column": "name", "email_column": "email"}
    first = read_snapshot(SourceSettings(path=str(examples / "snapshot-1.csv"), **source), {})
    second = read_snapshot(SourceSettings(path=str(examples / "snapshot-2.csv"), **source), {})
    initial = diff(first, KnownState.empty())
    assert initial.summary.added == 37
    state = apply_acknowledged(KnownState.empty(), initial, initial.desired.index)
    summary = diff(second, state).summary
    assert (summary.added, summary.changed, summary.exited) == (2, 15, 1)


def test_snapshots_read_in_many_chunks_diff_as_read_in_one(tmp_path: Path) -> None:
    """A Parquet snapshot of many row groups holds its ids, names and emails in many chunks,
    which the diff takes rows from a chunk at a time: the users to send, their values and the
    refreshed fingerprints are those of the same snapshot in one chunk."""
    examples = Path(__file__).resolve().parent.parent / "examples" / "engage"
    source = {"name_column": "name", "email_column": "email"}

    def both(name: str) -> tuple[Snapshot, Snapshot]:
        frame = pd.read_csv(examples / name, dtype="string")
        # Without the sample's invalid rows, which the reader drops by gathering the rest into
        # one chunk.
        frame = frame.dropna(subset=["user_id"]).drop_duplicates("user_id", keep=False)
        read = []
        for rows_a_group in (1_000, 4):
            path = tmp_path / f"{rows_a_group}-{name}.parquet"
            frame.to_parquet(path, row_group_size=rows_a_group, index=False)
            read.append(read_snapshot(SourceSettings(path=str(path), **source), {}))
        assert read[1].base.index.array._pa_array.num_chunks > 1
        return read[0], read[1]

    first_whole, _ = both("snapshot-1.csv")
    second_whole, second_chunked = both("snapshot-2.csv")
    initial = diff(first_whole, KnownState.empty())
    state = apply_acknowledged(KnownState.empty(), initial, initial.desired.index)
    # Rows without fingerprints are compared value by value and come back refreshed.
    stale = KnownState(
        state.users.assign(_hash=np.uint64(0)), state.audience_keys, state.trait_keys
    )

    for known in (state, stale):
        whole, chunked = diff(second_whole, known), diff(second_chunked, known)
        assert _desired(chunked) == _desired(whole) != {}
        assert _kinds(chunked) == _kinds(whole)
        assert chunked.desired.equals(whole.desired)
        assert chunked.refreshed.equals(whole.refreshed)
    assert len(diff(second_chunked, stale).refreshed) > 0


@pytest.mark.parametrize(
    ("sizes", "count"),
    [((50,), 10), ((30, 0, 40, 10, 60), 40), ((30, 0, 40, 10, 60), 400), ((0, 0), 2)],
)
def test_rows_taken_a_chunk_at_a_time_come_in_the_order_asked_with_nulls(
    sizes: tuple[int, ...], count: int
) -> None:
    """Rows in any order, repeated, or negative (null), a few or more than the column holds,
    from a column in any number of chunks (some empty): the values a plain take of the joined
    column gives."""
    values = [f"v{i}" if i % 4 else None for i in range(sum(sizes))]
    bounds = np.cumsum((0, *sizes))
    column = pa.chunked_array(
        [pa.array(values[a:b], pa.string()) for a, b in itertools.pairwise(bounds)], pa.string()
    )
    rng = np.random.default_rng(count)
    rows = rng.integers(-2, len(values), count) if values else np.full(count, -1)

    taken = _taken_rows(column, rows)

    assert taken.to_pylist() == [values[row] if row >= 0 else None for row in rows]


def test_an_inferred_audience_that_lost_its_last_member_still_sends_the_exits(
    tmp_path: Path,
) -> None:
    """An all-empty column the state knows as an audience stays one, so its exits go out."""
    # A CSV column with no value at all has no type to infer an audience from.
    path = tmp_path / "users.csv"
    path.write_text("user_id,VIP Users,plan\nu1,,pro\nu2,,free\n")
    source = SourceSettings(path=str(path))
    before = _state(
        {"u1": {"vip_users": "true", "plan": "pro"}, "u2": {"plan": "free"}},
        audiences=("vip_users",),
        traits=("plan",),
    )

    remembered = read_snapshot(source, {}, known_audiences=before.audience_keys)
    forgotten = read_snapshot(source, {})

    assert remembered.audience_keys == ("vip_users",)
    assert _desired(diff(remembered, before)) == {"u1": {"vip_users": "false", "plan": "pro"}}
    # Without the hint inference has nothing to go on: an empty column reads as a trait.
    assert forgotten.audience_keys == ()
