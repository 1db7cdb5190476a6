"""Invariants of the diff over random snapshots, checked against a plain reference model.

The reference model below applies the rules of ``sync.diff``'s docstring one user at a time
with dicts, as a reader would check them by hand; the engine must agree with it on every
random case, and its own round trips (diff, acknowledge, diff again) must send nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import hypothesis.strategies as st
import numpy as np
import numpy.typing as npt
import pandas as pd
from hypothesis import given, settings

from sync.diff import FINGERPRINTS, Diff, KnownState, Snapshot, apply_acknowledged, diff

AUDIENCES = ("vip", "cart", "loyal")
TRAITS = ("plan", "orders")
KEYS = (*AUDIENCES, *TRAITS)
FIELDS = ("name", "email", *KEYS)
Record = dict[str, str | None]

ids = st.sampled_from([f"user-{n}" for n in range(12)])
records = st.fixed_dictionaries(
    {
        "name": st.sampled_from([None, "Ann", "Bob"]),
        "email": st.sampled_from([None, "a@x.io"]),
        **{key: st.sampled_from([None, "true"]) for key in AUDIENCES},
        "plan": st.sampled_from([None, "gold", "silver"]),
        "orders": st.sampled_from([None, "1", "2", "10"]),
    }
)
snapshots = st.dictionaries(ids, records, max_size=12)


def _snapshot(rows: Mapping[str, Record], keys: Sequence[str] = KEYS) -> Snapshot:
    audiences = tuple(key for key in keys if key in AUDIENCES)
    traits = tuple(key for key in keys if key in TRAITS)
    columns = ["name", "email", *audiences, *traits]
    frame = pd.DataFrame(
        {column: [row.get(column) for row in rows.values()] for column in columns},
        index=pd.Index(list(rows), dtype="string", name="customer_id"),
        dtype="string",
    )
    return Snapshot.from_users(frame, audiences, traits)


def _state_rows(state: KnownState) -> dict[str, Record]:
    keys = (*state.audience_keys, *state.trait_keys)
    return {
        str(customer_id): {
            field: None if pd.isna(row[field]) else str(row[field])
            for field in ("name", "email", *keys)
        }
        for customer_id, row in state.users.iterrows()
    }


def _sent(result: Diff) -> dict[str, Record]:
    return {
        str(customer_id): {
            field: None if pd.isna(value) else str(value) for field, value in row.items()
        }
        for customer_id, row in result.desired[list(FIELDS)].iterrows()
    }


def _deliver_all(state: KnownState, snapshot: Snapshot) -> KnownState:
    result = diff(snapshot, state)
    return apply_acknowledged(state, result, result.desired.index)


@dataclass
class Reference:
    """What the docstring's rules say, computed user by user."""

    kinds: dict[str, str]
    desired: dict[str, Record]
    entered: dict[str, int]
    exited: dict[str, int]
    changed: dict[str, int]


def _wanted(row: Record | None, was: Record) -> Record:
    """The desired record of a user from its snapshot row (None: missing) and stored one."""
    if row is None:
        want: Record = {"name": was["name"], "email": was["email"]}
        want.update({key: "false" if was[key] is not None else None for key in AUDIENCES})
        want.update(dict.fromkeys(TRAITS))
        return want
    want = {
        field: row[field] if row[field] is not None else was[field] for field in ("name", "email")
    }
    for key in AUDIENCES:
        if row[key] == "true":
            want[key] = "true"
        else:
            want[key] = "false" if was[key] is not None else None
    want.update({key: row[key] for key in TRAITS})
    return want


def reference(snapshot: Mapping[str, Record], stored: Mapping[str, Record]) -> Reference:
    out = Reference({}, {}, dict.fromkeys(KEYS, 0), dict.fromkeys(KEYS, 0), dict.fromkeys(KEYS, 0))
    for user in sorted(set(snapshot) | set(stored)):
        before = stored.get(user)
        was: Record = (
            dict.fromkeys(FIELDS) if before is None else {f: before.get(f) for f in FIELDS}
        )
        row = snapshot.get(user)
        want = _wanted(row, was)
        if before is None:
            assert row is not None
            kind = "added" if any(row[key] is not None for key in KEYS) else "unchanged"
        elif want == was:
            kind = "unchanged"
        else:
            kind = "changed" if row is not None else "exited"
        out.kinds[user] = kind
        if kind == "unchanged":
            continue
        out.desired[user] = want
        for key in AUDIENCES:
            out.entered[key] += want[key] == "true" and was[key] != "true"
            out.exited[key] += was[key] == "true" and want[key] != "true"
        for key in TRAITS:
            out.changed[key] += want[key] != was[key]
    return out


@settings(max_examples=30, deadline=None)
@given(snapshots)
def test_diff_against_its_own_state_sends_nothing(rows: dict[str, Record]) -> None:
    """diff(a, state after a) sends nothing and counts every user as unchanged."""
    snapshot = _snapshot(rows)
    state = _deliver_all(KnownState.empty(), snapshot)
    result = diff(snapshot, state)
    assert result.summary.to_send == 0
    assert result.summary.unchanged == len(set(rows) | set(_state_rows(state)))


@settings(max_examples=30, deadline=None)
@given(snapshots, snapshots)
def test_engine_agrees_with_the_reference_model(
    first: dict[str, Record], second: dict[str, Record]
) -> None:
    """Kinds, desired records, counts and per-key stats match the plain reference model."""
    state = _deliver_all(KnownState.empty(), _snapshot(first))
    stored = _state_rows(state)
    result = diff(_snapshot(second), state)
    expected = reference(second, stored)

    assert _sent(result) == expected.desired
    assert {str(k): str(v) for k, v in result.kinds.items()} == {
        user: kind for user, kind in expected.kinds.items() if kind != "unchanged"
    }
    summary = result.summary
    counts = {
        kind: list(expected.kinds.values()).count(kind)
        for kind in ("added", "changed", "exited", "unchanged")
    }
    assert (summary.added, summary.changed, summary.exited, summary.unchanged) == (
        counts["added"],
        counts["changed"],
        counts["exited"],
        counts["unchanged"],
    )
    assert sum(counts.values()) == len(set(second) | set(stored))
    for stats in summary.keys:
        if stats.kind == "audience":
            members = sum(row[stats.key] == "true" for row in second.values())
            assert (stats.members, stats.entered, stats.exited) == (
                members,
                expected.entered[stats.key],
                expected.exited[stats.key],
            )
        else:
            assert stats.changed == expected.changed[stats.key]


@settings(max_examples=30, deadline=None)
@given(snapshots, snapshots)
def test_applying_a_diff_gives_the_state_of_the_target(
    first: dict[str, Record], second: dict[str, Record]
) -> None:
    """state(a) + diff(a -> b) acknowledged = a state that b diffs to nothing, as the model says."""
    state_a = _deliver_all(KnownState.empty(), _snapshot(first))
    stored = _state_rows(state_a)
    state_b = _deliver_all(state_a, _snapshot(second))
    assert diff(_snapshot(second), state_b).summary.to_send == 0
    expected = dict(stored)
    expected.update(reference(second, stored).desired)
    assert _state_rows(state_b) == expected
    assert list(state_b.users.index) == sorted(state_b.users.index)


@settings(max_examples=25, deadline=None)
@given(snapshots, snapshots, st.sets(ids))
def test_partial_delivery_resends_exactly_the_unacknowledged(
    first: dict[str, Record], second: dict[str, Record], failed: set[str]
) -> None:
    """Users whose delivery failed, and only they, are sent again by the next diff."""
    state_a = _deliver_all(KnownState.empty(), _snapshot(first))
    result = diff(_snapshot(second), state_a)
    sent = {str(user) for user in result.desired.index}
    acked = sorted(sent - failed)
    after = apply_acknowledged(state_a, result, acked)
    again = diff(_snapshot(second), after)
    assert {str(user) for user in again.desired.index} == sent & failed


@settings(max_examples=25, deadline=None)
@given(snapshots, snapshots)
def test_full_sends_a_superset_that_changes_nothing_more(
    first: dict[str, Record], second: dict[str, Record]
) -> None:
    """--full sends every real change plus resends, with the same desired records."""
    state = _deliver_all(KnownState.empty(), _snapshot(first))
    normal = diff(_snapshot(second), state)
    full = diff(_snapshot(second), state, full=True)
    sent, resent = _sent(normal), _sent(full)
    assert set(sent) <= set(resent)
    assert {user: resent[user] for user in sent} == sent
    assert full.summary.added == normal.summary.added
    assert full.summary.changed == normal.summary.changed
    assert full.summary.exited == normal.summary.exited


@settings(max_examples=25, deadline=None)
@given(snapshots, snapshots)
def test_dropping_a_key_leaves_it_unsent_and_unstored(
    first: dict[str, Record], second: dict[str, Record]
) -> None:
    """A key removed from the configuration is never in what is sent or stored."""
    state = _deliver_all(KnownState.empty(), _snapshot(first))
    kept = tuple(key for key in KEYS if key != "cart")
    result = diff(_snapshot(second, kept), state)
    assert "cart" not in result.desired.columns
    after = apply_acknowledged(state, result, result.desired.index)
    assert "cart" not in after.users.columns
    assert diff(_snapshot(second, kept), after).summary.to_send == 0


def _partial(state: KnownState, asked: list[int]) -> KnownState:
    """``state`` as a dry run loads it: fingerprints only, rows fetched by position on demand
    (each position asked for is appended to ``asked``)."""
    users = state.users

    def fetch(positions: npt.NDArray[np.intp]) -> pd.DataFrame:
        asked.extend(int(position) for position in positions)
        return users.iloc[positions]

    head = users[list(FINGERPRINTS)].reset_index(drop=True)
    return KnownState(head, state.audience_keys, state.trait_keys, fetch=fetch)


@settings(max_examples=30, deadline=None)
@given(snapshots, snapshots, st.booleans())
def test_a_partial_state_diffs_like_the_whole_one(
    first: dict[str, Record], second: dict[str, Record], full: bool
) -> None:
    """Fingerprints plus rows on demand give the same diff, reading only rows it looks at."""
    state = _deliver_all(KnownState.empty(), _snapshot(first))
    snapshot = _snapshot(second)
    asked: list[int] = []
    whole = diff(snapshot, state, full=full)
    partial = diff(snapshot, _partial(state, asked), full=full)

    pd.testing.assert_frame_equal(partial.desired, whole.desired)
    pd.testing.assert_series_equal(partial.kinds, whole.kinds)
    pd.testing.assert_frame_equal(partial.refreshed, whole.refreshed)
    assert partial.summary == whole.summary
    if not full:
        # Stored users whose fingerprint vouches for them are never read: only the others
        # and the exits.
        stored_hash = state.users["_hash"]
        snapshot_hash = snapshot.base["_hash"]
        looked_at = {
            user
            for user in stored_hash.index
            if user not in snapshot_hash.index or stored_hash[user] != snapshot_hash[user]
        }
        read = [str(state.users.index[position]) for position in asked]
        assert len(read) == len(set(read))
        assert set(read) == looked_at
