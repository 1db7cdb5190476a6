"""``sort_order``: the order of Python's string sort (code point order, stable), on any ids."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.idorder import sort_order

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
