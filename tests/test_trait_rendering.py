"""Number traits are rendered on demand: only for the users the diff compares or sends, and
exactly as rendering the whole column would."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sync.config import SourceSettings
from sync.diff import FINGERPRINTS, KnownState, Snapshot, apply_acknowledged, diff
from sync.keys import wire_value
from sync.snapshot import read_snapshot

AUDIENCES = ["VIP"]
TRAITS = ["score", "orders", "flag", "plan"]


def _snapshot(path: Path, columns: dict[str, pa.Array]) -> Snapshot:
    pq.write_table(pa.table(columns), path)
    source = SourceSettings(path=str(path), audiences=AUDIENCES, traits=TRAITS)
    return read_snapshot(source, {})


def _columns(ids: list[str], score: list[float | None]) -> dict[str, pa.Array]:
    size = len(ids)
    return {
        "user_id": pa.array(ids),
        "VIP": pa.array([i % 2 == 0 for i in range(size)]),
        "score": pa.array(score, pa.float64()),
        "orders": pa.array([None if i % 3 == 0 else i for i in range(size)], pa.int64()),
        "flag": pa.array([None if i % 4 == 0 else i % 2 == 0 for i in range(size)]),
        "plan": pa.array(["", "pro", None, "free"][i % 4] for i in range(size)),
    }


def _wire(value: object) -> str | None:
    return None if pd.isna(value) else str(value)


SCORES = [1.5, None, math.nan, 2.0, 1e16, 0.1 + 0.2, -0.0, 1e-7]
IDS = [f"u{i}" for i in range(len(SCORES))]


@pytest.fixture
def snapshot(tmp_path: Path) -> Snapshot:
    return _snapshot(tmp_path / "one.parquet", _columns(IDS, SCORES))


def test_presence_matches_the_rendered_text(snapshot: Snapshot) -> None:
    """A trait is present exactly where its wire text is: null, NaN and empty text are absent."""
    for key in ("score", "orders", "flag", "plan"):
        values = snapshot.traits[key]
        assert values.present.tolist() == values.text().is_valid().to_pylist(), key


def test_rendering_some_rows_equals_those_rows_of_rendering_all(snapshot: Snapshot) -> None:
    """text(rows) is the same as rendering every user and then taking those rows."""
    rows = np.array([6, 0, 4, 2, 5, 2])
    for key in ("score", "orders", "flag"):
        values = snapshot.traits[key]
        assert values.text(rows).to_pylist() == values.text().take(pa.array(rows)).to_pylist()


def test_the_full_frame_holds_wire_text(snapshot: Snapshot) -> None:
    """Snapshot.users renders numbers as on the wire: repr floats, plain integers, true/false."""
    users = snapshot.users
    assert users.loc["u0", "score"] == "1.5"
    assert users.loc["u3", "score"] == "2.0"
    assert users.loc["u4", "score"] == "1e+16"
    assert users.loc["u5", "score"] == repr(0.1 + 0.2)
    assert users.loc["u1", "orders"] == "1"
    assert users.loc["u2", "flag"] == "true"
    assert users.loc["u1", "flag"] == "false"
    assert list(users.columns[:6]) == ["name", "email", "vip", "score", "orders", "flag"]


def test_changed_users_are_sent_with_the_same_text_a_full_render_gives(tmp_path: Path) -> None:
    """The diff's desired records carry each sent user's numbers exactly as rendered in full."""
    first = _snapshot(tmp_path / "a.parquet", _columns(IDS, SCORES))
    state = KnownState.empty()
    initial = diff(first, state, samples=0)
    state = apply_acknowledged(state, initial, initial.desired.index)
    moved = [None if s is None else s + 1 for s in SCORES[:4]] + SCORES[4:]
    second = _snapshot(tmp_path / "b.parquet", _columns(IDS, moved))
    result = diff(second, state, samples=0)
    sent = sorted(str(i) for i in result.desired.index)
    # u2's NaN + 1 is still NaN (absent): unchanged. u1's null stays null.
    assert sent == ["u0", "u3"]
    full = second.users
    for customer_id in sent:
        for key in ("score", "orders", "flag", "plan"):
            wanted = _wire(full.loc[customer_id, key])
            assert _wire(result.desired.loc[customer_id, key]) == wanted, key
    assert result.summary.keys[1].key == "score"
    assert result.summary.keys[1].changed == 2


def test_repetitive_text_is_rendered_and_hashed_as_plain_text(tmp_path: Path) -> None:
    """A text trait of few distinct values, kept as codes, has the wire text, presence and
    record fingerprints that rendering and hashing every value gives."""
    words = ["pro", "", None, "a/b c", "free", "  "]
    size = 5000  # enough rows for the reader to see that the values repeat
    ids = [f"u{i}" for i in range(size)]
    path = tmp_path / "plans.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(ids),
                "VIP": pa.array([i % 3 == 0 for i in range(size)]),
                "plan": pa.array([words[i % len(words)] for i in range(size)]),
            }
        ),
        path,
    )
    snapshot = read_snapshot(SourceSettings(path=str(path), audiences=["VIP"], traits=["plan"]), {})
    expected = [wire_value(words[i % len(words)]) for i in range(size)]

    values = snapshot.traits["plan"]
    assert values.text().to_pylist() == expected
    assert values.present.tolist() == [text is not None for text in expected]
    rows = np.array([size - 1, 3, 2, 0, 3])
    assert values.text(rows).to_pylist() == [expected[row] for row in rows]
    plain = Snapshot.from_users(snapshot.users.drop(columns=list(FINGERPRINTS)), ["vip"], ["plan"])
    assert plain.base["_hash"].tolist() == snapshot.base["_hash"].tolist()
