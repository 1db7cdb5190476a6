"""The state store: faithful round trips, atomic commits, checkpoints, corruption, lock, logs."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sync.errors import LockHeldError, StateError
from sync.state import FORMAT_VERSION, StateStore, StoredState
from sync.state._atomic import atomic_write, atomic_write_bytes
from sync.state._frames import decode_categories, encode_categories, to_coded_table, to_table
from sync.state._lazy import RowReader

RUN_1 = "20250101T000000Z-aaaaaa"
RUN_2 = "20250102T000000Z-bbbbbb"
RUN_3 = "20250103T000000Z-cccccc"
REPO = Path(__file__).resolve().parents[1]


def users_frame(
    rows: dict[str, dict[str, object]], index_name: str | None = "user_id"
) -> pd.DataFrame:
    """A users table in the engine's shape: nullable strings, a categorical audience, a hash."""
    ids = list(rows)
    column = lambda key: [rows[i].get(key) for i in ids]  # noqa: E731
    return pd.DataFrame(
        {
            "name": pd.array(column("name"), dtype="string"),
            "email": pd.array(column("email"), dtype="string"),
            "vip_users": pd.Categorical(column("vip_users"), categories=["false", "true"]),
            "total_revenue": pd.array(column("total_revenue"), dtype="string"),
            "_hash": np.array([rows[i].get("_hash", 0) for i in ids], dtype="uint64"),
        },
        index=pd.Index(ids, dtype="string", name=index_name),
    )


ALICE = {
    "name": "Alice",
    "email": "a@x.io",
    "vip_users": "true",
    "total_revenue": "2.5",
    "_hash": 1,
}
BOB = {"name": None, "email": None, "vip_users": None, "total_revenue": "7", "_hash": 2**64 - 1}
CAROL = {"name": "Carol", "email": None, "vip_users": "false", "total_revenue": None, "_hash": 3}


def stored(users: pd.DataFrame, last_run: str | None = None) -> StoredState:
    """A StoredState managing the audience and trait of :func:`users_frame`."""
    return StoredState(users, ("vip_users",), ("total_revenue",), last_run)


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``directory`` with its size and mtime (ns), to prove nothing changed."""
    if not directory.exists():
        return {}
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in [directory, *directory.rglob("*")]
    }


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state")


@pytest.fixture
def committed(store: StateStore) -> StateStore:
    """A store holding Bob, Alice and Carol, committed by RUN_1."""
    store.commit(stored(users_frame({"bob": BOB, "alice": ALICE, "carol": CAROL})), RUN_1)
    return store


# -- round trip ------------------------------------------------------------------------------


def test_load_without_state_is_empty_and_creates_nothing(store: StateStore) -> None:
    """With no folder at all, load returns an empty state and exists() is false."""
    state = store.load()
    assert state.users.empty
    assert list(state.users.columns) == ["name", "email"]
    assert state.users.index.name == "customer_id"
    assert (state.audience_keys, state.trait_keys, state.last_run) == ((), (), None)
    assert not store.exists()
    assert not store.directory.exists()


@pytest.mark.parametrize("index_name", ["user_id", None, "name"])
def test_round_trip_keeps_values_dtypes_index_and_sorts_by_id(
    store: StateStore, index_name: str | None
) -> None:
    """What is committed loads back equal: values, NA, dtypes, index name, keys; rows sorted."""
    users = users_frame({"bob": BOB, "alice": ALICE, "carol": CAROL}, index_name)
    store.commit(stored(users, None), RUN_1)

    state = store.load()

    expected = users.sort_index()
    pd.testing.assert_frame_equal(state.users, expected)
    assert state.users.index.name == index_name
    assert state.users["_hash"].dtype == np.dtype("uint64")
    assert state.users.loc["bob", "_hash"] == 2**64 - 1
    assert state.users.loc["bob", "name"] is pd.NA
    assert (state.audience_keys, state.trait_keys) == (("vip_users",), ("total_revenue",))
    assert state.last_run == RUN_1
    assert store.exists()


def test_round_trip_of_other_dtypes(store: StateStore) -> None:
    """Pandas' default str, nullable ints, floats, bools and timestamps survive a commit."""
    index = pd.Index(["b", "a"], dtype="str", name="id")
    users = pd.DataFrame(
        {
            "name": pd.Series(["B", None], dtype="str", index=index),
            "count": pd.array([5, None], dtype="Int64"),
            "score": [1.5, np.nan],
            "flag": [True, False],
            "seen": pd.to_datetime(["2025-01-01T00:00:00Z", None], utc=True),
        },
        index=index,
    )
    store.commit(StoredState(users), RUN_1)
    pd.testing.assert_frame_equal(store.load().users, users.sort_index())


def test_load_reads_only_the_columns_asked_for(committed: StateStore) -> None:
    """load(columns=...) returns those columns (unknown ones ignored) with the id index."""
    state = committed.load(columns=["_hash", "nope"])
    assert list(state.users.columns) == ["_hash"]
    assert list(state.users.index) == ["alice", "bob", "carol"]


HEAD = ["_hash"]


def test_lazy_load_holds_the_head_of_everyone_and_reads_rows_on_demand(
    committed: StateStore,
) -> None:
    """The head columns come for every user in id order; rows by position equal load()'s."""
    whole = committed.load().users
    lazy = committed.load_lazily(HEAD)

    assert list(lazy.head.columns) == HEAD
    assert lazy.head["_hash"].tolist() == whole["_hash"].tolist()
    assert (lazy.audience_keys, lazy.trait_keys, lazy.last_run) == (
        ("vip_users",),
        ("total_revenue",),
        RUN_1,
    )
    for positions in ([0, 2], [1], [], [0, 1, 2]):
        rows = lazy.rows(np.array(positions, dtype=np.intp))
        pd.testing.assert_frame_equal(rows, whole.iloc[positions])


def test_lazy_load_reads_rows_across_row_groups(store: StateStore) -> None:
    """Rows asked for from many row groups come back in order, with their values."""
    count = 300_000  # more than two row groups of the committed file
    ids = [f"u{n:06d}" for n in range(count)]
    users = pd.DataFrame(
        {
            "name": pd.array([f"n{n}" for n in range(count)], dtype="string"),
            "email": pd.array([None] * count, dtype="string"),
            "_hash": np.arange(count, dtype=np.uint64),
        },
        index=pd.Index(ids, dtype="string", name="user_id"),
    )
    store.commit(StoredState(users), RUN_1)
    positions = np.array([0, 5, 131_071, 131_072, 200_000, count - 1], dtype=np.intp)

    rows = store.load_lazily(HEAD).rows(positions)

    assert rows.index.tolist() == [ids[p] for p in positions]
    assert rows["name"].tolist() == [f"n{p}" for p in positions]
    assert rows["_hash"].tolist() == positions.tolist()


def test_lazy_rows_are_the_same_from_a_file_of_either_encoding(store: StateStore) -> None:
    """Trait text is written as dictionary pages and audience codes as plain pages now; a file
    written the earlier way (codes as dictionary pages, text plain) reads the same rows."""
    count = 300_000  # three row groups, each with its own trait dictionary
    users = users_frame(
        {
            f"u{n:06d}": {
                "name": f"n{n}" if n % 3 else None,
                "email": f"u{n}@x.io",
                "vip_users": (None, "false", "true")[n % 3],
                "total_revenue": None if n % 7 == 0 else str(n % 40),
                "_hash": n,
            }
            for n in range(count)
        }
    )
    store.commit(stored(users), RUN_1)
    now = (store.directory / "state.parquet").read_bytes()
    table = pq.read_table(pa.BufferReader(now))
    coded = {"vip_users", "_last_run"}
    earlier = io.BytesIO()
    pq.write_table(
        table,
        earlier,
        use_dictionary=sorted(coded & set(table.column_names)),
        compression={
            f.name: "lz4" if pa.types.is_large_string(f.type) else "none" for f in table.schema
        },
        row_group_size=131_072,
    )
    group = pq.read_metadata(pa.BufferReader(now)).row_group(0)
    pages = {
        group.column(i).path_in_schema: group.column(i).has_dictionary_page
        for i in range(group.num_columns)
    }
    assert pages["total_revenue"]
    assert not pages["vip_users"]
    assert not pages["email"]

    positions = np.array([0, 1, 7, 131_071, 131_072, 200_003, count - 1], dtype=np.intp)
    expected = store.load().users.iloc[positions]
    for data in (now, earlier.getvalue()):
        reader = RowReader(pa.py_buffer(data), lambda exc: exc, lambda: None)
        pd.testing.assert_frame_equal(
            reader(positions).drop(columns="_last_run", errors="ignore"), expected
        )


def test_lazy_load_with_pending_checkpoints_or_no_commit_matches_load(
    committed: StateStore,
) -> None:
    """A state with checkpoints to fold in is loaded whole, so lazy rows include them."""
    committed.checkpoint(RUN_2, users_frame({"dave": {**ALICE, "_hash": 4}}))
    whole = committed.load().users
    lazy = committed.load_lazily(HEAD)
    assert lazy.head["_hash"].tolist() == whole["_hash"].tolist()
    pd.testing.assert_frame_equal(lazy.rows(np.arange(4, dtype=np.intp)), whole)

    empty = StateStore(committed.directory.parent / "none").load_lazily(HEAD)
    assert len(empty) == 0


def test_lazy_load_of_a_damaged_file_is_a_clear_state_error(committed: StateStore) -> None:
    """A state file that fails its hash is refused by a lazy load as by a full one."""
    path = committed.directory / "state.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="sha256"):
        committed.load_lazily(HEAD)


def test_table_conversion_matches_pyarrow_from_pandas() -> None:
    """The fast conversion produces exactly pyarrow's own table, metadata included."""
    users = users_frame({"alice": ALICE, "bob": BOB})
    expected = pa.Table.from_pandas(users, preserve_index=True)
    assert to_table(users).equals(expected, check_metadata=True)


def test_categoricals_are_stored_as_codes_and_decoded_exactly() -> None:
    """On disk a categorical is its int codes (-1 = NA); decoding restores the same table."""
    users = users_frame({"alice": ALICE, "bob": BOB, "carol": CAROL})
    users["kind"] = pd.Categorical(["x", "y", None], categories=["y", "x"], ordered=True)
    table = to_table(users)
    encoded = encode_categories(table)
    assert encoded.column("vip_users").to_pylist() == [1, -1, 0]
    assert encoded.column("kind").to_pylist() == [1, 0, -1]
    assert decode_categories(encoded).equals(table, check_metadata=True)


@pytest.mark.parametrize("order", [["alice", "bob", "carol"], ["carol", "alice", "bob"]])
def test_coded_conversion_is_the_encoded_conversion(order: list[str]) -> None:
    """Made from category codes, sorted or not, the table is pyarrow's conversion encoded."""
    rows = {"alice": ALICE, "bob": BOB, "carol": CAROL}
    users = users_frame({name: rows[name] for name in order})
    users["kind"] = pd.Categorical(["x", "y", None], categories=["y", "x"], ordered=True)
    users["size"] = pd.Categorical([3, None, 1])  # not text: stays a dictionary
    coded = to_coded_table(users)
    assert coded.equals(encode_categories(to_table(users)), check_metadata=True)
    assert coded.column("user_id").to_pylist() == ["alice", "bob", "carol"]
    assert pa.types.is_dictionary(coded.schema.field("size").type)


def test_encoding_a_coded_table_keeps_its_codes_and_adds_new_ones() -> None:
    """A column added after coding (the store's ``_last_run``) is coded alongside the others."""
    users = users_frame({"alice": ALICE, "bob": BOB, "carol": CAROL})
    runs = pa.array(["r1", None, "r2"]).dictionary_encode()
    stamped = to_table(users).append_column("_last_run", runs)
    fast = to_coded_table(users).append_column("_last_run", runs)
    assert encode_categories(fast).equals(encode_categories(stamped), check_metadata=True)
    assert decode_categories(encode_categories(fast)).equals(stamped, check_metadata=True)


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (pd.Index(["a", "b", "a"], dtype="string", name="user_id"), "'a' appears more than once"),
        (pd.Index(["a", None, "c"], dtype="string", name="user_id"), "null customer id"),
        (pd.Index([1, 2, 3], name="user_id"), "must be strings"),
    ],
)
def test_commit_refuses_unusable_ids_and_keeps_old_state(
    committed: StateStore, index: pd.Index, message: str
) -> None:
    """Duplicate, null or non-string ids are refused before anything is written."""
    before = snapshot(committed.directory)
    users = users_frame({"x": ALICE, "y": BOB, "z": CAROL}).set_axis(index)
    with pytest.raises(ValueError, match=message):
        committed.commit(stored(users), RUN_2)
    assert snapshot(committed.directory) == before


# -- atomicity -------------------------------------------------------------------------------


def test_atomic_write_that_raises_midway_leaves_the_old_file(tmp_path: Path) -> None:
    """A writer that fails after writing some bytes leaves the old content and no temp file."""
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old content")

    def fail_midway(out: object) -> None:
        out.write(b"half of the new")  # type: ignore[attr-defined]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail_midway)
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_atomic_write_reports_the_sha256_of_what_it_wrote(tmp_path: Path) -> None:
    """The digest computed while writing equals the digest of the file on disk."""
    written = atomic_write_bytes(tmp_path / "f", b"abc" * 1000)
    assert written.sha256 == hashlib.sha256((tmp_path / "f").read_bytes()).hexdigest()
    assert written.size == 3000


def test_commit_whose_parquet_write_fails_leaves_the_previous_state(committed: StateStore) -> None:
    """A column Parquet cannot store makes the write raise; the last commit still loads."""
    before = committed.load().users
    users = users_frame({"dave": ALICE})
    interval = pd.ArrowDtype(pa.month_day_nano_interval())
    users["when"] = pd.array([pa.scalar((1, 2, 3), pa.month_day_nano_interval())], dtype=interval)

    with pytest.raises(pa.ArrowNotImplementedError):
        committed.commit(stored(users), RUN_2)

    state = committed.load()
    pd.testing.assert_frame_equal(state.users, before)
    assert state.last_run == RUN_1
    leftovers = [p.name for p in committed.directory.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def copy_files(source: Path, target: Path, *names: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(source / name, target / name)


def test_crash_after_the_commit_point_loads_the_new_state(
    committed: StateStore, tmp_path: Path
) -> None:
    """New manifest, new table still at state.parquet.next, old state.parquet: the new wins."""
    old = tmp_path / "old"
    copy_files(committed.directory, old, "state.parquet")
    new_users = users_frame({"dave": ALICE})
    committed.commit(stored(new_users), RUN_2)
    directory = committed.directory
    (directory / "state.parquet").rename(directory / "state.parquet.next")
    shutil.copy2(old / "state.parquet", directory / "state.parquet")

    state = StateStore(directory).load()

    assert list(state.users.index) == ["dave"]
    assert state.last_run == RUN_2


def test_crash_before_the_commit_point_loads_the_old_state(
    committed: StateStore, tmp_path: Path
) -> None:
    """Old manifest and table, a finished state.parquet.next: the stale next file is ignored."""
    old = tmp_path / "old"
    copy_files(committed.directory, old, "state.parquet", "manifest.json")
    committed.commit(stored(users_frame({"dave": ALICE})), RUN_2)
    directory = committed.directory
    (directory / "state.parquet").rename(directory / "state.parquet.next")
    copy_files(old, directory, "state.parquet", "manifest.json")

    state = StateStore(directory).load()

    assert list(state.users.index) == ["alice", "bob", "carol"]
    assert state.last_run == RUN_1


def test_first_commit_interrupted_before_its_manifest_is_no_state(store: StateStore) -> None:
    """A lone state.parquet.next (first commit stopped early) means nothing was committed."""
    store.commit(stored(users_frame({"alice": ALICE})), RUN_1)
    (store.directory / "manifest.json").unlink()
    (store.directory / "state.parquet").rename(store.directory / "state.parquet.next")
    assert store.load().users.empty


# -- checkpoints -----------------------------------------------------------------------------


def test_pending_checkpoints_are_applied_in_order_on_load(committed: StateStore) -> None:
    """Checkpoint rows replace or add users by id, later checkpoints winning, dtypes kept."""
    changed_bob = {**BOB, "vip_users": "true", "_hash": 20}
    committed.checkpoint(RUN_2, users_frame({"bob": changed_bob, "dave": {**ALICE, "_hash": 4}}))
    committed.checkpoint(RUN_2, users_frame({"dave": {**CAROL, "_hash": 5}}))

    state = StateStore(committed.directory).load()

    assert list(state.users.index) == ["alice", "bob", "carol", "dave"]
    assert state.users.loc["bob", "vip_users"] == "true"
    assert state.users.loc["dave", "name"] == "Carol"
    assert state.users.loc["dave", "_hash"] == 5
    assert state.users["_hash"].dtype == np.dtype("uint64")
    assert state.users["vip_users"].dtype == pd.CategoricalDtype(["false", "true"])
    assert state.users.index.name == "user_id"
    assert state.last_run == RUN_1


def test_commit_folds_checkpoints_and_they_are_never_reapplied(committed: StateStore) -> None:
    """After a commit the checkpoint files are gone, and a leftover one is ignored on load."""
    path = committed.checkpoint(RUN_2, users_frame({"dave": ALICE}))
    saved = path.read_bytes()
    # The run decides what to commit; here it commits without Dave, so Dave must stay absent.
    committed.commit(stored(users_frame({"alice": ALICE})), RUN_2)
    assert not path.exists()

    # A crash between the manifest and the clean-up leaves the file behind.
    path.write_bytes(saved)
    assert list(StateStore(committed.directory).load().users.index) == ["alice"]
    assert committed.info().checkpoints_pending == 0


def test_checkpoint_sequence_continues_across_store_instances(committed: StateStore) -> None:
    """A new StateStore numbers its checkpoints after the committed and pending ones."""
    first = committed.checkpoint(RUN_2, users_frame({"dave": ALICE}))
    second = StateStore(committed.directory).checkpoint(RUN_3, users_frame({"erin": ALICE}))
    assert first.name == f"{RUN_2}-00000001.parquet"
    assert second.name == f"{RUN_3}-00000002.parquet"


def test_checkpoints_without_any_commit_are_recovered_with_their_keys(store: StateStore) -> None:
    """A first run that crashed before committing still leaves its acknowledged users and keys."""
    store.checkpoint(
        RUN_1,
        users_frame({"alice": ALICE}),
        audience_keys=["vip_users"],
        trait_keys=["total_revenue"],
    )
    state = StateStore(store.directory).load()
    assert not store.exists()
    assert list(state.users.index) == ["alice"]
    assert (state.audience_keys, state.trait_keys) == (("vip_users",), ("total_revenue",))
    assert state.last_run is None


def test_checkpoint_keys_join_the_committed_ones_latest_kind_winning(committed: StateStore) -> None:
    """A key a checkpoint lists as a trait stops being an audience; new keys are appended."""
    frame = users_frame({"dave": ALICE})
    committed.checkpoint(RUN_2, frame, audience_keys=["churn_risk"], trait_keys=["vip_users"])
    state = committed.load()
    assert state.audience_keys == ("churn_risk",)
    assert state.trait_keys == ("total_revenue", "vip_users")


def test_managed_keys_are_the_keys_a_load_gives(store: StateStore) -> None:
    """Without reading the table, the keys are a load's: none, committed, then with checkpoints."""
    assert store.managed_keys() == ((), ())
    store.checkpoint(RUN_1, users_frame({"alice": ALICE}), audience_keys=["vip_users"])
    assert store.managed_keys() == (("vip_users",), ())
    store.commit(stored(users_frame({"alice": ALICE})), RUN_1)
    assert store.managed_keys() == (("vip_users",), ("total_revenue",))
    frame = users_frame({"dave": ALICE})
    store.checkpoint(RUN_2, frame, audience_keys=["churn_risk"], trait_keys=["vip_users"])
    state = store.load()
    assert store.managed_keys() == (state.audience_keys, state.trait_keys)
    assert store.managed_keys() == (("churn_risk",), ("total_revenue", "vip_users"))


def test_checkpoint_rows_lacking_a_column_get_na_in_a_nullable_dtype(committed: StateStore) -> None:
    """A checkpoint row replaces the whole row: a uint64 column it lacks becomes UInt64 NA."""
    committed.checkpoint(RUN_2, users_frame({"bob": BOB}).drop(columns=["_hash"]))
    users = committed.load().users
    assert users["_hash"].dtype == pd.UInt64Dtype()
    assert users.loc["bob", "_hash"] is pd.NA
    assert users.loc["alice", "_hash"] == 1


def test_unreadable_checkpoint_names_the_file_and_the_way_out(committed: StateStore) -> None:
    """A damaged checkpoint stops the load with its path and the advice to delete it."""
    path = committed.checkpoint(RUN_2, users_frame({"dave": ALICE}))
    path.write_bytes(b"not parquet at all")
    with pytest.raises(StateError, match="Delete it") as caught:
        committed.load()
    assert str(path) in str(caught.value)


# -- corruption ------------------------------------------------------------------------------


def test_truncated_state_file_is_a_clear_state_error(committed: StateStore) -> None:
    """state.parquet cut to half its size: StateError naming the file and `state reset`."""
    path = committed.directory / "state.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StateError) as caught:
        committed.load()
    message = str(caught.value)
    assert str(path) in message
    assert "amberflo-sync state reset" in message
    assert "backups" in message


def test_edited_state_file_of_the_same_size_fails_the_hash(committed: StateStore) -> None:
    """One flipped byte in state.parquet is caught by the content hash."""
    path = committed.directory / "state.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="sha256"):
        committed.load()


def edit_manifest(store: StateStore, **changes: object) -> None:
    path = store.directory / "manifest.json"
    body = json.loads(path.read_text())
    body.update(changes)
    path.write_text(json.dumps(body))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: (s.directory / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda s: (s.directory / "manifest.json").write_text("[1, 2]"), "not a JSON object"),
        (lambda s: edit_manifest(s, format_version=FORMAT_VERSION + 1), "newer amberflo-sync"),
        (lambda s: edit_manifest(s, format_version="1"), "unknown format_version"),
        (lambda s: edit_manifest(s, content_hash=None), "'content_hash' is missing"),
        (lambda s: edit_manifest(s, row_count=-1), "must be a count"),
        (lambda s: edit_manifest(s, row_count=2), "holds 3 users but"),
        (lambda s: edit_manifest(s, audience_keys=[1]), "must list strings"),
        (lambda s: (s.directory / "manifest.json").unlink(), "manifest.json is missing"),
    ],
)
def test_damaged_manifest_is_a_clear_state_error(
    committed: StateStore, damage: object, message: str
) -> None:
    """A manifest that is unreadable, of another version or inconsistent stops the load."""
    damage(committed)  # type: ignore[operator]
    with pytest.raises(StateError, match=message) as caught:
        committed.load()
    assert "amberflo-sync state reset" in str(caught.value)
    assert str(committed.directory) in str(caught.value)


# -- reset -----------------------------------------------------------------------------------


def test_reset_moves_state_into_a_backup_and_the_next_load_is_empty(committed: StateStore) -> None:
    """Reset moves table, manifest and checkpoints to backups/<UTC>/; history stays."""
    committed.checkpoint(RUN_2, users_frame({"dave": ALICE}))
    committed.record_run({"run_id": RUN_1})
    manifest = (committed.directory / "manifest.json").read_bytes()

    backup = committed.reset()

    assert backup is not None
    assert backup.parent == committed.directory / "backups"
    assert sorted(p.name for p in backup.iterdir()) == [
        "checkpoints",
        "manifest.json",
        "state.parquet",
    ]
    assert (backup / "manifest.json").read_bytes() == manifest
    assert not committed.exists()
    assert committed.load().users.empty
    assert committed.runs() == [{"run_id": RUN_1}]


def test_backup_can_be_restored_by_copying_it_back(committed: StateStore) -> None:
    """The files in a backup are a complete state: copied back, they load as before."""
    before = committed.load().users
    backup = committed.reset()
    assert backup is not None
    copy_files(backup, committed.directory, "state.parquet", "manifest.json")
    pd.testing.assert_frame_equal(committed.load().users, before)


def test_reset_without_state_does_nothing_and_two_resets_do_not_collide(
    committed: StateStore,
) -> None:
    """A second reset finds nothing; resets within one second get distinct folders."""
    first = committed.reset()
    assert committed.reset() is None
    committed.commit(stored(users_frame({"alice": ALICE})), RUN_2)
    second = committed.reset()
    assert first is not None
    assert second is not None
    assert first != second


def test_reset_finishes_an_interrupted_reset(committed: StateStore) -> None:
    """A table left without its manifest is refused, and a reset clears it."""
    (committed.directory / "manifest.json").unlink()
    with pytest.raises(StateError, match="missing"):
        committed.load()
    assert committed.reset() is not None
    assert committed.load().users.empty


# -- lock ------------------------------------------------------------------------------------

HOLD_LOCK = """
import sys
from pathlib import Path
import structlog
from sync.state import StateStore
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
with StateStore(Path(sys.argv[1])).lock():
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def lock_holder(store: StateStore) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the store's lock until its stdin closes."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(store.directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        assert process.stdout.readline() == "locked\n"
        yield process
    finally:
        process.stdin.close()
        process.stdout.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_lock_held_by_another_process_fails_at_once_naming_folder_and_pid(
    store: StateStore, lock_holder: subprocess.Popen[str]
) -> None:
    """While another process holds the lock, lock() raises LockHeldError without waiting."""
    with pytest.raises(LockHeldError) as caught, store.lock():
        pass
    assert str(store.directory) in str(caught.value)
    assert f"pid {lock_holder.pid}" in str(caught.value)
    assert caught.value.exit_code == 4


def test_lock_is_free_again_when_the_holder_exits(
    store: StateStore, lock_holder: subprocess.Popen[str]
) -> None:
    """The kernel releases the lock of a process that is gone, even one that was killed."""
    lock_holder.kill()
    lock_holder.wait(timeout=10)
    with store.lock():
        assert (store.directory / "lock").read_text() == f"{os.getpid()}\n"


def test_lock_is_released_when_the_block_exits(store: StateStore) -> None:
    """Leaving the with block releases the lock; a nested lock() is refused meanwhile."""
    with store.lock(), pytest.raises(LockHeldError), StateStore(store.directory).lock():
        pass
    with store.lock():
        pass
    assert (store.directory / "lock").read_text() == ""


# -- runs.jsonl and run logs -----------------------------------------------------------------


def test_runs_are_appended_and_listed_newest_last(store: StateStore) -> None:
    """record_run appends a line; runs(limit) returns the newest ones, last last."""
    assert store.runs() == []
    for number in range(3):
        store.record_run({"run_id": f"run-{number}", "exit_code": 0})
    assert [r["run_id"] for r in store.runs()] == ["run-0", "run-1", "run-2"]
    assert [r["run_id"] for r in store.runs(limit=2)] == ["run-1", "run-2"]
    assert store.runs(limit=0) == []


def test_torn_last_line_is_skipped_and_the_next_record_is_intact(store: StateStore) -> None:
    """A crash mid-append leaves a torn line: it is skipped, and later appends still parse."""
    store.record_run({"run_id": "run-0"})
    with (store.directory / "runs.jsonl").open("a") as file:
        file.write('{"run_id": "run-1", "exit')
    assert store.runs() == [{"run_id": "run-0"}]
    store.record_run({"run_id": "run-2"})
    assert store.runs() == [{"run_id": "run-0"}, {"run_id": "run-2"}]


def test_run_log_is_created_on_first_write_only(store: StateStore) -> None:
    """A run log with nothing to say leaves no file; written lines are one JSON object each."""
    with store.run_log(RUN_1, "failures") as quiet:
        pass
    assert not quiet.path.exists()

    when = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    with store.run_log(RUN_1, "dead-letter") as log:
        log.write({"source": "events.jsonl", "line": 3, "reason": "bad", "raw": "{", "at": when})
        log.write({"source": "events.jsonl", "line": 4, "reason": "bad", "raw": "é"})
    assert log.path == store.directory / "dead-letter" / f"{RUN_1}.jsonl"
    assert log.count == 2
    lines = [json.loads(line) for line in log.path.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["at"] == "2025-01-01 00:00:00+00:00"
    assert lines[1]["raw"] == "é"
    with pytest.raises(ValueError, match="closed"):
        log.write({"late": True})


def test_run_log_takes_writes_from_many_threads(store: StateStore) -> None:
    """Concurrent writers never interleave within a line."""
    log = store.run_log(RUN_1, "failures")

    def write_many(worker: int) -> None:
        for number in range(200):
            log.write({"customerId": f"{worker}-{number}", "reason": "x" * 500})

    threads = [threading.Thread(target=write_many, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    ids = {json.loads(line)["customerId"] for line in log.path.read_text().splitlines()}
    assert len(ids) == 800
    assert log.count == 800


@pytest.mark.parametrize(
    ("run_id", "kind"), [("../escape", "failures"), (RUN_1, "events"), ("", "failures")]
)
def test_run_log_refuses_unsafe_names(store: StateStore, run_id: str, kind: str) -> None:
    """Run ids must be file-name safe and kinds one of failures/dead-letter."""
    with pytest.raises(ValueError, match=r"run id|kind"):
        store.run_log(run_id, kind)  # type: ignore[arg-type]


# -- info and show ---------------------------------------------------------------------------


def test_info_summarises_without_loading(committed: StateStore) -> None:
    """info reports version, committed users, keys, last run, sizes and pending checkpoints."""
    committed.checkpoint(RUN_2, users_frame({"dave": ALICE, "erin": BOB}))
    info = committed.info()
    assert info.exists
    assert info.format_version == FORMAT_VERSION
    assert info.users == 3
    assert (info.audience_keys, info.trait_keys) == (("vip_users",), ("total_revenue",))
    assert info.last_run == RUN_1
    assert info.state_bytes == (committed.directory / "state.parquet").stat().st_size
    assert info.bytes_on_disk > info.state_bytes
    assert (info.checkpoints_pending, info.pending_rows) == (1, 2)


def test_info_of_a_missing_folder(store: StateStore) -> None:
    """info on a folder that does not exist reports no state."""
    info = store.info()
    assert not info.exists
    assert (info.users, info.bytes_on_disk, info.checkpoints_pending) == (0, 0, 0)


def test_show_returns_one_users_stored_values(committed: StateStore) -> None:
    """show gives name, email and the keys that have a value; None for an unknown id."""
    assert committed.show("carol") == {
        "customer_id": "carol",
        "name": "Carol",
        "email": None,
        "keys": {"vip_users": "false"},
        "last_run": None,
        "committed": True,
    }
    assert committed.show("nobody") is None


def test_show_prefers_the_newest_checkpoint(committed: StateStore) -> None:
    """A user acknowledged since the last commit is shown as in its latest checkpoint."""
    committed.checkpoint(RUN_2, users_frame({"alice": {**ALICE, "total_revenue": "9"}}))
    committed.checkpoint(RUN_2, users_frame({"alice": {**ALICE, "total_revenue": "10"}}))
    shown = committed.show("alice")
    assert shown is not None
    assert shown["keys"] == {"vip_users": "true", "total_revenue": "10"}
    assert shown["committed"] is False


def test_show_reports_the_rows_last_run_when_the_engine_keeps_one(store: StateStore) -> None:
    """A last_run column in the table is what show reports as the user's last run."""
    users = users_frame({"alice": ALICE})
    users["last_run"] = pd.array([RUN_1], dtype="string")
    store.commit(stored(users), RUN_2)
    shown = store.show("alice")
    assert shown is not None
    assert shown["last_run"] == RUN_1


# -- read-only operations --------------------------------------------------------------------


def read_everything(store: StateStore) -> None:
    store.exists()
    store.load()
    store.info()
    store.show("alice")
    store.runs()


def test_read_only_operations_create_no_folder(store: StateStore) -> None:
    """exists, load, info, show and runs on a missing folder leave it missing."""
    read_everything(store)
    assert not store.directory.exists()


def test_read_only_operations_leave_the_folder_byte_and_mtime_identical(
    committed: StateStore,
) -> None:
    """On a folder with a commit, a pending checkpoint and history, reading changes nothing."""
    committed.checkpoint(RUN_2, users_frame({"dave": ALICE}))
    committed.record_run({"run_id": RUN_1})
    before = snapshot(committed.directory)
    read_everything(committed)
    read_everything(StateStore(committed.directory))
    assert snapshot(committed.directory) == before


# -- a state committed as it is built --------------------------------------------------------


def many_users(count: int) -> pd.DataFrame:
    """``count`` users in id order, in the engine's shape, with a few values each."""
    ids = [f"u{n:07d}" for n in range(count)]
    codes = np.where(np.arange(count) % 3 == 0, 1, -1).astype(np.int8)
    return pd.DataFrame(
        {
            "name": pd.array([None] * count, dtype="string"),
            "email": pd.array([f"{n}@x.io" if n % 2 else None for n in range(count)], "string"),
            "vip_users": pd.Categorical.from_codes(codes, categories=["false", "true"]),
            "total_revenue": pd.array([str(n % 97) for n in range(count)], dtype="string"),
            "_hash": np.arange(count, dtype=np.uint64),
        },
        index=pd.Index(ids, dtype="string", name="customer_id"),
    )


def in_parts(users: pd.DataFrame) -> Callable[[int], Iterator[pd.DataFrame]]:
    """``users`` as :meth:`StateStore.commit_delivered` asks for it: parts of ``size`` users."""

    def parts(size: int) -> Iterator[pd.DataFrame]:
        for start in range(0, max(len(users), 1), size):
            yield users.iloc[start : start + size]

    return parts


@pytest.mark.parametrize("count", [0, 5, 300_000])
def test_a_state_written_as_it_is_built_is_the_file_a_commit_writes(
    tmp_path: Path, count: int
) -> None:
    """In parts (three row groups at 300k users) or whole, the same bytes and the same load."""
    users = many_users(count)
    parts, whole = StateStore(tmp_path / "parts"), StateStore(tmp_path / "whole")

    parts.commit_delivered(in_parts(users), ["vip_users"], ["total_revenue"], RUN_1)
    whole.commit(stored(users), RUN_1, delivered=users.index)

    written = (parts.directory / "state.parquet").read_bytes()
    assert written == (whole.directory / "state.parquet").read_bytes()
    assert parts.info().users == count
    loaded = parts.load()
    pd.testing.assert_frame_equal(loaded.users, whole.load().users)
    assert (loaded.audience_keys, loaded.trait_keys) == (("vip_users",), ("total_revenue",))
    if count:
        shown = parts.show(str(users.index[-1]))
        assert shown is not None
        assert shown["last_run"] == RUN_1


def test_parts_out_of_order_are_refused_and_leave_the_old_state(committed: StateStore) -> None:
    """A part whose first id does not follow the last one's is refused; no file changes."""
    before = snapshot(committed.directory)
    users = many_users(4)

    def backwards(size: int) -> Iterator[pd.DataFrame]:
        yield users.iloc[2:]
        yield users.iloc[:2]

    with pytest.raises(ValueError, match="u0000000' is out of order"):
        committed.commit_delivered(backwards, ["vip_users"], ["total_revenue"], RUN_2)
    # Every file as it was, and no temporary one left (the folder itself saw one come and go).
    after = snapshot(committed.directory)
    assert {k: v for k, v in after.items() if k != "."} == {
        k: v for k, v in before.items() if k != "."
    }
