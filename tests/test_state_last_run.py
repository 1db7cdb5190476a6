"""Which run last delivered each user (``_last_run``): matched on id fingerprints or on ids,
through the store's commits on real files and through ``stamp_last_run`` directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sync.fingerprint import id_fingerprints
from sync.state import StateStore, StoredState
from sync.state._frames import decode_categories
from sync.state._last_run import LAST_RUN_COLUMN, PreviousRuns, RunSource, stamp_last_run

RUN_1 = "20250101T000000Z-aaaaaa"
RUN_2 = "20250102T000000Z-bbbbbb"
RUN_3 = "20250103T000000Z-cccccc"


def users(ids: list[str], *, fingerprints: bool = True) -> pd.DataFrame:
    """An engine-shaped users table for ``ids``, with the id fingerprints unless told not to."""
    frame = pd.DataFrame(
        {"name": pd.array([f"name of {i}" for i in ids], dtype="string")},
        index=pd.Index(ids, dtype="string", name="customer_id"),
    )
    if fingerprints:
        frame["_id_hash"], frame["_id_check"] = id_fingerprints(pa.array(ids, pa.string()))
    return frame


def unread_ids() -> pa.Array:
    """A previous commit's ids that must not be needed: the fingerprints should settle it."""
    raise AssertionError("the ids were read although the fingerprints match")


def last_runs(store: StateStore) -> dict[str, str | None]:
    """Each committed user's ``_last_run``, read from the file itself."""
    table = decode_categories(pq.read_table(store.directory / "state.parquet"))
    ids = table.column("customer_id").to_pylist()
    return dict(zip(ids, table.column(LAST_RUN_COLUMN).to_pylist(), strict=True))


@pytest.mark.parametrize("fingerprints", [True, False], ids=["fingerprints", "ids"])
def test_a_commit_keeps_the_run_of_users_it_did_not_deliver(
    tmp_path: Path, fingerprints: bool
) -> None:
    """Delivered users get the committing run; the others keep the run the last commit named."""
    store = StateStore(tmp_path / "state")
    first = ["u3", "u1", "u2", "u4"]
    store.commit(StoredState(users(first, fingerprints=fingerprints)), RUN_1, delivered=first)
    store.commit(
        StoredState(users([*first, "u0"], fingerprints=fingerprints)),
        RUN_2,
        delivered=["u2", "u0"],
    )

    assert last_runs(store) == {"u0": RUN_2, "u1": RUN_1, "u2": RUN_2, "u3": RUN_1, "u4": RUN_1}


def test_a_run_delivering_every_user_names_it_for_all(tmp_path: Path) -> None:
    """Delivering every row (the state's own sorted ids or any order) names the run for all."""
    store = StateStore(tmp_path / "state")
    store.commit(StoredState(users(["a", "b"])), RUN_1, delivered=["a"])
    table = users(["c", "b", "a"])
    store.commit(StoredState(table), RUN_2, delivered=table.sort_index().index)
    assert last_runs(store) == {"a": RUN_2, "b": RUN_2, "c": RUN_2}
    store.commit(StoredState(table), RUN_3, delivered=["c", "a", "b"])
    assert last_runs(store) == {"a": RUN_3, "b": RUN_3, "c": RUN_3}


def test_colliding_fingerprints_fall_back_to_the_ids() -> None:
    """Two ids given the same 64-bit hash are told apart by matching the ids themselves."""
    old_ids = pa.array(["a", "b", "c"], pa.string())
    old_hash = np.array([7, 8, 9], dtype=np.uint64)
    old_check = np.array([1, 2, 3], dtype=np.uint64)
    previous = PreviousRuns.of_column(
        pa.array([RUN_1, RUN_2, None], pa.string()), (old_hash, old_check), lambda: old_ids
    )
    # "d" is new but shares "b"'s hash (not its check); "c" and "a" are the old users.
    new_ids = pa.array(["a", "c", "d"], pa.string())
    table = pa.table(
        {
            "customer_id": new_ids,
            "_id_hash": pa.array([7, 9, 8], pa.uint64()),
            "_id_check": pa.array([1, 3, 5], pa.uint64()),
        }
    )

    stamped = stamp_last_run(table, new_ids, [RunSource.of_run(pa.array(["c"]), RUN_3)], previous)

    assert stamped.column(LAST_RUN_COLUMN).to_pylist() == [RUN_1, RUN_3, None]


def test_fingerprints_and_ids_name_the_same_runs() -> None:
    """Matching the previous commit on fingerprints alone gives what matching on ids gives."""
    rng = np.random.default_rng(7)
    old = [f"user-{n}" for n in rng.permutation(500)]
    runs = pa.array([[RUN_1, RUN_2, None][n % 3] for n in range(500)], pa.string())
    old_ids = pa.array(old, pa.string())
    new = sorted([*old[:400], *(f"new-{n}" for n in range(50))])
    new_ids = pa.array(new, pa.string())
    new_hash, new_check = id_fingerprints(new_ids)
    table = pa.table({"customer_id": new_ids, "_id_hash": new_hash, "_id_check": new_check})
    sources = [RunSource.of_run(pa.array(new[::7], pa.string()), RUN_3)]

    by_fingerprint = stamp_last_run(
        table,
        new_ids,
        sources,
        PreviousRuns.of_column(runs, id_fingerprints(old_ids), unread_ids),
    )
    by_id = stamp_last_run(
        table, new_ids, sources, PreviousRuns.of_column(runs, None, lambda: old_ids)
    )

    expected = dict(zip(old, runs.to_pylist(), strict=True)) | dict.fromkeys(new[::7], RUN_3)
    assert by_fingerprint.column(LAST_RUN_COLUMN).to_pylist() == [expected.get(i) for i in new]
    assert by_id.column(LAST_RUN_COLUMN).equals(by_fingerprint.column(LAST_RUN_COLUMN))


@pytest.mark.parametrize("fingerprints", [True, False], ids=["fingerprints", "ids"])
def test_a_commit_after_a_load_keeps_the_runs_the_load_read(
    tmp_path: Path, fingerprints: bool
) -> None:
    """Loaded first (as adopt does), the store stamps from the column it read: same runs."""
    store = StateStore(tmp_path / "state")
    first = ["u1", "u2", "u3"]
    store.commit(StoredState(users(first, fingerprints=fingerprints)), RUN_1, delivered=first)
    loaded = StateStore(store.directory)
    assert len(loaded.load().users) == 3

    later = users([*first, "u4"], fingerprints=fingerprints)
    loaded.commit(StoredState(later), RUN_2, delivered=["u2", "u4"])

    assert last_runs(loaded) == {"u1": RUN_1, "u2": RUN_2, "u3": RUN_1, "u4": RUN_2}


def test_a_commit_after_another_stores_commit_does_not_use_what_it_loaded(tmp_path: Path) -> None:
    """A commit landing after the load (another process) is the one the runs come from."""
    first = ["u1", "u2", "u3"]
    StateStore(tmp_path / "state").commit(StoredState(users(first)), RUN_1, delivered=first)
    loaded = StateStore(tmp_path / "state")
    loaded.load()
    StateStore(tmp_path / "state").commit(StoredState(users(first)), RUN_2, delivered=first)

    loaded.commit(StoredState(users(first)), RUN_3, delivered=["u1"])

    assert last_runs(loaded) == {"u1": RUN_3, "u2": RUN_2, "u3": RUN_2}
