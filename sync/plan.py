"""The customer records to send for a diff (pure).

Each user to send becomes one :class:`~sync.model.CustomerRecord`: ``traits`` holds its managed
keys that have a value, ``removed_traits`` the managed keys that are now absent (so merge mode
deletes a trait that went null, and leaves keys this job does not manage alone), ``name`` and
``email`` come from the desired record (``None`` when unknown).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import pandas as pd
import pyarrow as pa

from sync.diff import TEXT_DTYPE, Diff
from sync.model import CustomerRecord

# Rows converted to Python objects at a time: large enough to amortise Arrow's per-call cost,
# small enough that a plan of ten million users never holds more than this in Python objects.
_CHUNK: Final = 10_000


def plan_customers(result: Diff) -> Iterator[CustomerRecord]:
    """Yield the customer record of every user to send, in the order of ``result.desired``."""
    desired = result.desired
    keys = (*result.audience_keys, *result.trait_keys)
    for start in range(0, len(desired), _CHUNK):
        chunk = desired.iloc[start : start + _CHUNK]
        ids = [str(value) for value in chunk.index]
        names = _values(chunk, "name")
        emails = _values(chunk, "email")
        columns = [(key, _values(chunk, key)) for key in keys]
        for row, customer_id in enumerate(ids):
            traits: dict[str, str] = {}
            removed: list[str] = []
            for key, values in columns:
                value = values[row]
                if value is None:
                    removed.append(key)
                else:
                    traits[key] = value
            yield CustomerRecord(
                customer_id=customer_id,
                name=names[row],
                email=emails[row],
                traits=traits,
                removed_traits=frozenset(removed),
            )


def _values(chunk: pd.DataFrame, column: str) -> list[str | None]:
    """A column of the chunk as Python strings, ``None`` for absent."""
    text = chunk[column].astype(TEXT_DTYPE)
    values: list[str | None] = pa.array(text.array, type=pa.string()).to_pylist()
    return values
