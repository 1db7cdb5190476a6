"""Reading Engage snapshots: layouts, formats, membership, rendering, invalid rows, errors."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings

from sync.config import SourceSettings
from sync.diff import Snapshot, record_fingerprints
from sync.errors import ConfigError, SourceError
from sync.keys import wire_value
from sync.snapshot import read_snapshot, render

Rows = Sequence[Mapping[str, Any]]


def _write_csv(path: Path, rows: Rows) -> Path:
    # By hand, not with pandas: pandas would write an integer column with a null as 3.0.
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    text = out.getvalue()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _write_jsonl(path: Path, rows: Rows) -> Path:
    text = "".join(json.dumps(dict(row)) + "\n" for row in rows)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _write_parquet(path: Path, rows: Rows) -> Path:
    pq.write_table(pa.Table.from_pylist(list(rows)), path)
    return path


WRITERS: dict[str, Callable[[Path, Rows], Path]] = {
    ".csv": _write_csv,
    ".csv.gz": _write_csv,
    ".jsonl": _write_jsonl,
    ".ndjson": _write_jsonl,
    ".jsonl.gz": _write_jsonl,
    ".parquet": _write_parquet,
}


def _read(path: Path | str, **settings: Any) -> Snapshot:
    return read_snapshot(SourceSettings(path=str(path), **settings), {})


def _records(snapshot: Snapshot) -> dict[str, dict[str, str]]:
    """The users as ``{id: {column: value}}`` with absent values left out."""
    users = snapshot.users.drop(columns=["_hash", "_id_hash", "_id_check"])
    return {
        str(customer_id): {
            column: str(value) for column, value in row.items() if not pd.isna(value)
        }
        for customer_id, row in users.iterrows()
    }


WIDE_ROWS: Rows = [
    {"user_id": "u1", "name": "Ann", "VIP Users": True, "orders_count": 3, "plan": "gold"},
    {"user_id": "u2", "name": "Bob", "VIP Users": False, "orders_count": None, "plan": None},
    {"user_id": "u3", "name": None, "VIP Users": None, "orders_count": 12, "plan": "a/b"},
]
WIDE_EXPECTED = {
    "u1": {"name": "Ann", "vip_users": "true", "orders_count": "3", "plan": "gold"},
    "u2": {"name": "Bob"},
    "u3": {"orders_count": "12", "plan": "a_b"},
}


@pytest.mark.parametrize("users", [50, 70_000])
def test_record_fingerprints_are_those_of_the_wire_values(tmp_path: Path, users: int) -> None:
    """However a text column is hashed (a value at a time, or each distinct value once when a
    large sample repeats), and on however many threads, a user's record fingerprint is the one
    its wire values give: the diff trusts it to skip unchanged users. (Number traits are hashed
    by their typed bits, so they are left out here.)"""
    products = [f"sku {n}/{'é' if n % 7 == 0 else ''}" for n in range(300)] + ["", None]
    path = tmp_path / "users.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": [f"u{n}" for n in range(users)],
                "email": [None if n % 5 == 0 else f"user{n}@example.com" for n in range(users)],
                "VIP Users": [None if n % 3 == 0 else n % 2 == 0 for n in range(users)],
                "Last Product": [products[n * 7919 % len(products)] for n in range(users)],
                "Nickname": [f"nick {n}" if n % 4 else None for n in range(users)],
            }
        ),
        path,
        row_group_size=20_000,
    )
    snapshot = _read(path, id_column="user_id", email_column="email")
    assert snapshot.trait_keys == ("last_product", "nickname")
    expected = record_fingerprints(snapshot.users, snapshot.audience_keys, snapshot.trait_keys)
    assert (snapshot.base["_hash"].to_numpy() == expected).all()
    wire = [None if p is None else wire_value(p) for p in products]
    shown = snapshot.users["last_product"]
    expected_text = [wire[n * 7919 % len(products)] for n in range(users)]
    assert shown.astype(object).where(shown.notna(), None).tolist() == expected_text


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_wide_layout_reads_every_format(tmp_path: Path, suffix: str) -> None:
    """A wide snapshot gives the same users from CSV, JSONL, NDJSON, Parquet and gzip."""
    path = WRITERS[suffix](tmp_path / f"users{suffix}", WIDE_ROWS)
    snapshot = _read(path, name_column="name")
    assert _records(snapshot) == WIDE_EXPECTED
    assert snapshot.audience_keys == ("vip_users",)
    assert snapshot.trait_keys == ("orders_count", "plan")
    assert snapshot.key_names == {
        "vip_users": "VIP Users",
        "orders_count": "orders_count",
        "plan": "plan",
    }
    assert snapshot.files == (str(path),)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl.gz", ".parquet"])
def test_long_layout_pivots_rows_into_users(tmp_path: Path, suffix: str) -> None:
    """Long rows become one user each; name/email rows fill the customer's fields."""
    rows = [
        {"id": "u1", "key": "VIP Users", "value": "true"},
        {"id": "u1", "key": "plan", "value": "gold"},
        {"id": "u1", "key": "full_name", "value": "Ann"},
        {"id": "u2", "key": "VIP Users", "value": "no"},
        {"id": "u2", "key": "plan", "value": "silver"},
        {"id": "u2", "key": "mail", "value": "bob@example.com"},
    ]
    path = WRITERS[suffix](tmp_path / f"traits{suffix}", rows)
    snapshot = _read(
        path,
        layout="long",
        id_column="id",
        key_column="key",
        value_column="value",
        name_column="full_name",
        email_column="mail",
    )
    assert _records(snapshot) == {
        "u1": {"name": "Ann", "vip_users": "true", "plan": "gold"},
        "u2": {"email": "bob@example.com", "plan": "silver"},
    }
    assert snapshot.audience_keys == ("vip_users",)
    assert snapshot.trait_keys == ("plan",)


def test_long_layout_keeps_mixed_json_types(tmp_path: Path) -> None:
    """A long JSONL value column mixing numbers, text and booleans renders each by its type."""
    rows = [
        {"id": "u1", "name": "orders_count", "value": 5},
        {"id": "u1", "name": "plan", "value": "gold"},
        {"id": "u1", "name": "Big Spender", "value": True},
        {"id": "u2", "name": "Big Spender", "value": False},
    ]
    snapshot = _read(_write_jsonl(tmp_path / "t.jsonl", rows), layout="long", id_column="id")
    assert _records(snapshot) == {
        "u1": {"orders_count": "5", "plan": "gold", "big_spender": "true"},
        "u2": {},
    }
    assert snapshot.audience_keys == ("big_spender",)


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".parquet"])
def test_membership_layout_names_audiences_after_files(tmp_path: Path, suffix: str) -> None:
    """Each membership file is one audience named after its stem; members are its ids."""
    folder = tmp_path / "members"
    folder.mkdir()
    WRITERS[suffix](folder / f"VIP Users{suffix}", [{"user_id": "u1"}, {"user_id": "u2"}])
    WRITERS[suffix](folder / f"Cart Abandoners{suffix}", [{"user_id": "u2"}])
    (folder / "README.txt").write_text("not a snapshot")
    snapshot = _read(folder, layout="membership")
    assert _records(snapshot) == {
        "u1": {"vip_users": "true"},
        "u2": {"vip_users": "true", "cart_abandoners": "true"},
    }
    assert snapshot.audience_keys == ("cart_abandoners", "vip_users")
    assert snapshot.trait_keys == ()


def test_membership_rows_that_disagree_on_email_are_invalid(tmp_path: Path) -> None:
    """A member listed with two emails is left out; one listed twice the same is kept."""
    _write_csv(
        tmp_path / "A.csv",
        [{"user_id": "u1", "email": "a@x.io"}, {"user_id": "u2", "email": "b@x.io"}],
    )
    _write_csv(
        tmp_path / "B.csv",
        [{"user_id": "u1", "email": "other@x.io"}, {"user_id": "u2", "email": "b@x.io"}],
    )
    snapshot = _read(tmp_path, layout="membership", email_column="email")
    assert _records(snapshot) == {"u2": {"email": "b@x.io", "a": "true", "b": "true"}}
    assert snapshot.invalid_counts == {"conflicting_duplicate": 2}


def test_glob_and_folder_read_every_matching_file_in_order(tmp_path: Path) -> None:
    """A glob or a folder reads every supported file, sorted by name, as one snapshot."""
    _write_csv(tmp_path / "part-2.csv", [{"user_id": "u2", "vip": True}])
    _write_parquet(tmp_path / "part-1.parquet", [{"user_id": "u1", "vip": True}])
    by_glob = _read(tmp_path / "part-*")
    by_folder = _read(tmp_path)
    assert (
        by_glob.files
        == by_folder.files
        == (
            str(tmp_path / "part-1.parquet"),
            str(tmp_path / "part-2.csv"),
        )
    )
    assert (
        _records(by_glob)
        == _records(by_folder)
        == {
            "u1": {"vip": "true"},
            "u2": {"vip": "true"},
        }
    )


@pytest.mark.parametrize(
    ("cell", "member"),
    [
        (True, True),
        ("true", True),
        ("TRUE", True),
        ("Yes", True),
        ("1", True),
        (1, True),
        (1.0, True),
        (False, False),
        ("false", False),
        ("no", False),
        ("0", False),
        (0, False),
        ("", False),
        (None, False),
    ],
)
def test_audience_membership_spellings(tmp_path: Path, cell: object, member: bool) -> None:
    """An audience cell is a member for true, true/yes/1 in any case or 1; else not."""
    path = _write_jsonl(tmp_path / "s.jsonl", [{"user_id": "u1", "VIP": cell, "plan": "x"}])
    snapshot = _read(path, audiences=["VIP"])
    assert ("vip" in _records(snapshot)["u1"]) is member


def test_integers_with_nulls_render_without_a_fraction(tmp_path: Path) -> None:
    """An integer column with nulls renders 5, not 5.0, from CSV and from Parquet."""
    rows = [{"user_id": "u1", "orders": 5}, {"user_id": "u2", "orders": None}]
    for path in (
        _write_csv(tmp_path / "s.csv", rows),
        _write_parquet(tmp_path / "s.parquet", rows),
    ):
        assert _records(_read(path))["u1"] == {"orders": "5"}


def test_lists_floats_and_booleans_render_as_on_the_wire(tmp_path: Path) -> None:
    """Lists join with commas, floats keep Python's repr, booleans as traits become text."""
    rows = [
        {"user_id": "u1", "skus": ["a", "b"], "revenue": 450.0, "score": 0.5, "paid": True},
        {"user_id": "u2", "skus": None, "revenue": 1e-7, "score": None, "paid": False},
    ]
    snapshot = _read(
        _write_jsonl(tmp_path / "s.jsonl", rows), traits=["skus", "revenue", "score", "paid"]
    )
    assert _records(snapshot) == {
        "u1": {"skus": "a,b", "revenue": "450.0", "score": "0.5", "paid": "true"},
        "u2": {"revenue": "1e-07", "paid": "false"},
    }


def test_inference_picks_boolean_columns_as_audiences(tmp_path: Path) -> None:
    """Boolean columns (or yes/no text) are audiences; ids, names, numbers and text are not."""
    rows = [
        {"user_id": "u1", "email": "a@x.io", "VIP": "yes", "Churned": True, "count": 1, "t": "x"},
        {"user_id": "u2", "email": "b@x.io", "VIP": "no", "Churned": False, "count": 0, "t": "y"},
    ]
    snapshot = _read(_write_jsonl(tmp_path / "s.jsonl", rows), email_column="email")
    assert snapshot.audience_keys == ("vip", "churned")
    assert snapshot.trait_keys == ("count", "t")


def test_key_overrides_replace_snake_case(tmp_path: Path) -> None:
    """A [keys] override names the key of one audience; the others stay snake_cased."""
    path = _write_csv(
        tmp_path / "s.csv", [{"user_id": "u1", "Order Completed 30d": True, "VIP Users": True}]
    )
    snapshot = read_snapshot(SourceSettings(path=str(path)), {"Order Completed 30d": "oc_30"})
    assert snapshot.audience_keys == ("oc_30", "vip_users")


def test_colliding_keys_are_a_config_error_naming_both(tmp_path: Path) -> None:
    """Two names with one snake_case key stop the run, naming both and the [keys] fix."""
    path = _write_csv(tmp_path / "s.csv", [{"user_id": "u1", "VIP Users": True, "vip-users": True}])
    with pytest.raises(ConfigError, match=r"'VIP Users' and 'vip-users'.*\[keys\]"):
        _read(path)


def test_invalid_rows_are_counted_and_kept_by_reason(tmp_path: Path) -> None:
    """Missing ids and disagreeing duplicates are left out and listed; identical ones collapse."""
    rows = [
        {"user_id": "u1", "vip": True, "plan": "a"},
        {"user_id": "", "vip": True, "plan": "a"},
        {"user_id": "u2", "vip": True, "plan": "a"},
        {"user_id": "u2", "vip": True, "plan": "a"},
        {"user_id": "u3", "vip": True, "plan": "a"},
        {"user_id": "u3", "vip": True, "plan": "b"},
        {"user_id": None, "vip": False, "plan": None},
    ]
    path = _write_csv(tmp_path / "s.csv", rows)
    snapshot = _read(path)
    assert sorted(_records(snapshot)) == ["u1", "u2"]
    assert snapshot.invalid_counts == {"missing_id": 2, "conflicting_duplicate": 2}
    invalid = snapshot.invalid.sort_values("row").to_dict("records")
    assert [(row["customer_id"], row["row"], row["reason"]) for row in invalid] == [
        (None, 2, "missing_id"),
        ("u3", 5, "conflicting_duplicate"),
        ("u3", 6, "conflicting_duplicate"),
        (None, 7, "missing_id"),
    ]
    assert {row["source"] for row in invalid} == {str(path)}


def test_long_layout_conflicting_values_void_the_user(tmp_path: Path) -> None:
    """Two different values for one key of one user leave every row of that user out."""
    rows = [
        {"user_id": "u1", "name": "plan", "value": "gold"},
        {"user_id": "u1", "name": "plan", "value": "gold"},
        {"user_id": "u2", "name": "plan", "value": "gold"},
        {"user_id": "u2", "name": "plan", "value": "silver"},
        {"user_id": "u2", "name": "vip", "value": "true"},
    ]
    snapshot = _read(_write_csv(tmp_path / "s.csv", rows), layout="long")
    assert _records(snapshot) == {"u1": {"plan": "gold"}}
    assert snapshot.invalid_counts == {"conflicting_duplicate": 3}


def test_ids_keep_leading_zeros_in_csv(tmp_path: Path) -> None:
    """CSV ids are read as text, so "007" stays "007"."""
    snapshot = _read(_write_csv(tmp_path / "s.csv", [{"user_id": "007", "vip": True}]))
    assert list(snapshot.users.index) == ["007"]


@pytest.mark.parametrize(
    ("make", "settings", "expectation"),
    [
        pytest.param(
            lambda p: _write_csv(p / "s.csv", [{"id": "u1"}]),
            {},
            pytest.raises(
                ConfigError, match=r"column 'user_id' not found in .*s\.csv.*set source\.id_column"
            ),
            id="missing-id-column",
        ),
        pytest.param(
            lambda p: _write_csv(p / "s.csv", [{"user_id": "u1"}]),
            {"audiences": ["VIP"]},
            pytest.raises(ConfigError, match=r"column 'VIP' not found.*source\.audiences"),
            id="missing-audience-column",
        ),
        pytest.param(
            lambda p: p / "nothing-*.csv",
            {},
            pytest.raises(SourceError, match=r"no file matching"),
            id="no-file-matching",
        ),
        pytest.param(
            lambda p: p / "absent.csv",
            {},
            pytest.raises(SourceError, match=r"does not exist.*export landed"),
            id="missing-file",
        ),
        pytest.param(
            lambda p: (p / "s.xlsx").write_text("x") and p / "s.xlsx",
            {},
            pytest.raises(ConfigError, match=r"unsupported format"),
            id="unsupported-format",
        ),
        pytest.param(
            lambda p: (p / "s.parquet").write_bytes(b"not parquet at all") and p / "s.parquet",
            {},
            pytest.raises(SourceError, match=r"cannot read .*s\.parquet"),
            id="corrupt-parquet",
        ),
        pytest.param(
            lambda p: (p / "s.jsonl").write_text('{"user_id": "u1"}\n{oops\n') and p / "s.jsonl",
            {},
            pytest.raises(SourceError, match=r"s\.jsonl:2: not valid JSON"),
            id="corrupt-jsonl-line",
        ),
        pytest.param(
            lambda p: _write_csv(p / "s.csv", [{"user_id": "u1", "vip": True}]),
            {"layout": "membership", "traits": ["vip"]},
            pytest.raises(ConfigError, match=r"membership layout lists audience members only"),
            id="membership-with-traits",
        ),
        pytest.param(
            lambda p: _write_csv(p / "s.csv", [{"user_id": "u1", "vip": True}]),
            {},
            nullcontext(),
            id="valid",
        ),
    ],
)
def test_bad_sources_raise_clear_errors(
    tmp_path: Path,
    make: Callable[[Path], Path],
    settings: dict[str, Any],
    expectation: AbstractContextManager[object],
) -> None:
    """Config problems raise ConfigError and unreadable files SourceError, naming the file."""
    path = make(tmp_path)
    with expectation:
        _read(path, **settings)


def test_reserved_key_is_a_config_error(tmp_path: Path) -> None:
    """A trait whose key would be "email" clashes with the customer's email and is refused."""
    path = _write_csv(tmp_path / "s.csv", [{"user_id": "u1", "Email": "a@b.c"}])
    with pytest.raises(ConfigError, match=r"reserved.*\[keys\]"):
        _read(path)


@pytest.mark.parametrize("listed_as", ["audiences", "traits"])
def test_the_email_column_listed_as_a_key_is_the_reserved_key_error(
    tmp_path: Path, listed_as: str
) -> None:
    """The email column configured as an audience or trait too is refused for its key, not
    lost on the way: it is still the customer's email column while the snapshot is read."""
    path = _write_parquet(tmp_path / "s.parquet", [{"user_id": "u1", "email": "a@b.c"}])
    with pytest.raises(ConfigError, match=r"reserved.*\[keys\]"):
        _read(path, id_column="user_id", email_column="email", **{listed_as: ["email"]})


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(min_value=-1e6, max_value=1e6).map(lambda x: round(x, 2)),
        ),
        min_size=1,
        max_size=50,
    )
)
def test_float_rendering_matches_wire_value(values: list[float]) -> None:
    """Column-wise float rendering gives exactly keys.wire_value for every value."""
    assert render(pa.array(values, pa.float64())).to_pylist() == [wire_value(v) for v in values]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=250)), min_size=1, max_size=30))
def test_text_rendering_matches_wire_value(values: list[str | None]) -> None:
    """Column-wise text rendering (dimension rule) gives exactly keys.wire_value."""
    assert render(pa.array(values, pa.string())).to_pylist() == [wire_value(v) for v in values]


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "engage"


@pytest.mark.parametrize("number", [1, 2])
def test_bundled_wide_and_long_samples_hold_the_same_users(number: int) -> None:
    """The sample snapshots read the same users and values in the wide and long layouts."""
    fields = {"name_column": "name", "email_column": "email"}
    wide = _read(EXAMPLES / f"snapshot-{number}.csv", **fields)
    long = _read(EXAMPLES / "long" / f"snapshot-{number}.csv", layout="long", **fields)
    membership = _read(
        EXAMPLES / "membership" / f"snapshot-{number}", layout="membership", **fields
    )
    assert _records(wide) == _records(long)
    assert wide.invalid_counts == {"missing_id": 1, "conflicting_duplicate": 2}
    assert set(membership.audience_keys) == set(wide.audience_keys)
    members = {
        user: {key: value for key, value in values.items() if key in wide.audience_keys}
        for user, values in _records(membership).items()
    }
    assert all(
        members[user] == {k: v for k, v in values.items() if k in wide.audience_keys}
        for user, values in _records(wide).items()
        if user in members
    )


def test_long_rows_without_a_key_are_invalid(tmp_path: Path) -> None:
    """A long row with an id but no key is left out as missing_key; its user's other rows stay."""
    rows = [
        {"user_id": "u1", "name": "", "value": "gold"},
        {"user_id": "u1", "name": "plan", "value": "gold"},
    ]
    snapshot = _read(_write_csv(tmp_path / "s.csv", rows), layout="long")
    assert _records(snapshot) == {"u1": {"plan": "gold"}}
    assert snapshot.invalid_counts == {"missing_key": 1}


def test_a_snapshot_in_many_row_groups_reads_as_in_one(tmp_path: Path) -> None:
    """Ids and emails kept in their Parquet chunks give the users, fingerprints and invalid
    rows that the same rows in one chunk give, duplicates across chunks included."""
    rows: list[dict[str, Any]] = [
        {"user_id": f"u{i % 37}" if i % 11 else " ", "email": f"e{i % 37}@x.io", "vip": i % 3 == 0}
        for i in range(100)
    ]
    rows[50] = {**rows[13], "vip": not rows[13]["vip"]}  # a repeat of u13 that disagrees
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "many.parquet", row_group_size=7)
    pq.write_table(table, tmp_path / "one.parquet")
    chunked = _read(tmp_path / "many.parquet", email_column="email")
    whole = _read(tmp_path / "one.parquet", email_column="email")
    assert pq.read_metadata(tmp_path / "many.parquet").num_row_groups > 1
    pd.testing.assert_frame_equal(chunked.users, whole.users)
    assert chunked.invalid_counts == whole.invalid_counts
    assert chunked.invalid["customer_id"].tolist() == whole.invalid["customer_id"].tolist()
    assert chunked.invalid["row"].tolist() == whole.invalid["row"].tolist()
