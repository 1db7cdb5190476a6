"""``sort_order``: the order of Python's string sort (code point order, stable), on any ids."""

from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.idorder import insertion_points, sort_order

# Ids that share long prefixes, end inside the numeric key's eight bytes, hold NUL bytes or
# characters of every UTF-8 length: the cases a byte-prefix key could get wrong.
TRICKY = [
    "",
    "a",
    "a\x00",
    "abc",
    "abcdefgh",
    "abcdefgh\x00",
    "abcdefghi",
    "abcdefgg",
    "abcdefghij",
    "abcdefghi",
    "é",
    "e",
    "\U0001f600",
    "ÿ",
    "",
    "usr_0001",
    "usr_00010",
    "10361971",
    "103619712",
]
ids = st.lists(
    st.one_of(
        st.sampled_from(TRICKY),
        st.text(max_size=12),
        st.text(alphabet="ab\x00", max_size=12),
        st.builds(lambda tail: "customer-000" + tail, st.text(alphabet="0123456789", max_size=4)),
    ),
    max_size=60,
)


def python_order(values: list[str]) -> list[int]:
    """Positions in the order of Python's stable sort of the strings."""
    return sorted(range(len(values)), key=lambda i: values[i])


@settings(max_examples=300, deadline=None)
@given(ids, st.sampled_from([pa.string(), pa.large_string()]))
def test_sorts_like_python(values: list[str], kind: pa.DataType) -> None:
    """Any ids, either string type: the same positions as Python's stable sort."""
    assert sort_order(pa.array(values, kind)).tolist() == python_order(values)


@pytest.mark.parametrize("kind", [pa.string(), pa.large_string()])
def test_a_slice_sorts_its_own_ids(kind: pa.DataType) -> None:
    """A slice of a larger array (a non-zero offset) sorts only the ids it shows."""
    values = [f"{n * 7919 % 1000:05d}-id" for n in range(1000)]
    part = pa.array(values, kind).slice(100, 300)
    assert sort_order(part).tolist() == python_order(values[100:400])


def test_many_random_ids_sort_like_python() -> None:
    """Thousands of UUID-like, integer and token ids mixed: Python's order."""
    rng = np.random.default_rng(3)
    values = [
        *(f"{n:032x}" for n in rng.integers(0, 2**62, 3000)),
        *(str(n) for n in rng.integers(0, 10**9, 3000)),
        *(f"usr_{n}" for n in rng.integers(0, 10**6, 3000)),
    ]
    assert sort_order(pa.array(values)).tolist() == python_order(values)


def test_ids_with_nulls_are_sorted_by_arrow() -> None:
    """A null id, which the state never holds, still gets an order: last, as Arrow puts it."""
    assert sort_order(pa.array(["b", None, "a"])).tolist() == [2, 0, 1]


@settings(max_examples=300, deadline=None)
@given(ids, ids, st.sampled_from([pa.string(), pa.large_string()]))
def test_insertion_points_are_where_python_would_insert(
    stored: list[str], wanted: list[str], kind: pa.DataType
) -> None:
    """Any stored ids in order, any ids to place: Python's bisect positions, ties included."""
    ordered = sorted(set(stored))
    points = insertion_points(pa.array(ordered, kind), pa.array(wanted, pa.string()))
    assert points is not None
    assert points.tolist() == [bisect.bisect_left(ordered, value) for value in wanted]


def test_insertion_points_among_many_ids_sharing_a_prefix() -> None:
    """A few ids placed among thousands that share their first eight bytes: exact still."""
    ordered = sorted(f"customer-{n:06d}" for n in range(0, 20_000, 2))
    wanted = ["customer-000001", "customer-019999", "a", "customer-", "customer-1", "d"]
    points = insertion_points(pa.array(ordered), pa.array(wanted))
    assert points is not None
    assert points.tolist() == [bisect.bisect_left(ordered, value) for value in wanted]


@pytest.mark.parametrize(
    ("stored", "wanted"),
    [
        (["b", "a"], ["c"]),  # not ascending
        (["a", "a"], ["c"]),  # not strictly ascending
        (["a", None], ["c"]),  # a null stored id
        (["a", "c"], [None]),  # a null id to place
        ([f"customer-{n:06d}" for n in range(60_000)], ["customer-030000x"]),  # too many ties
    ],
)
def test_insertion_points_give_up_where_only_a_sort_can_tell(
    stored: list[str | None], wanted: list[str | None]
) -> None:
    """Unsorted or null ids, or too many sharing a prefix: None, the caller sorts instead."""
    assert insertion_points(pa.array(stored, pa.string()), pa.array(wanted, pa.string())) is None
