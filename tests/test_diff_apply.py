"""``apply_acknowledged`` on a state as the store loads it (the fast path, which reuses the
stored columns) gives exactly what it gives on the same state handed over in plain form."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from sync.diff import HASH, KnownState, Snapshot, apply_acknowledged, diff
from sync.state import StateStore, StoredState

AUDIENCES = ("vip", "cart")
TRAITS = ("plan",)
RUN = "20250101T000000Z-aaaaaa"
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
