"""Synthetic Engage snapshots for the scale benchmark, built column by column in Arrow.

Snapshot A holds ``users`` users; snapshot B is A one sync later: about 1.2% of A's users
changed (an audience entered or left, or a trait moved), 0.3% gone and 0.5% new, in a fresh
row order (a warehouse export promises none). Both are wide Parquet files, zstd-compressed,
shaped like Engage's warehouse ``users`` table: ``user_id``, ``email``, twenty audience
columns and five computed traits.

Ids look like real Segment user ids, which are whatever the customer's own systems use:
mostly UUIDs, some database integers, some prefixed random tokens. Everything is derived from
one seed, so a size is generated the same way every time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ID_COLUMN: Final = "user_id"
EMAIL_COLUMN: Final = "email"
# Twenty audiences with the membership rates real ones spread over (a few big, most small).
AUDIENCES: Final = {
    "Active Last 7 Days": 0.35,
    "Active Last 30 Days": 0.55,
    "High Value Customers": 0.04,
    "Cart Abandoners 7d": 0.06,
    "Newsletter Subscribers": 0.30,
    "Trial Users": 0.08,
    "Churn Risk": 0.05,
    "Power Users": 0.03,
    "Mobile App Users": 0.40,
    "Viewed Pricing 14d": 0.10,
    "Enterprise Leads": 0.01,
    "Dormant 90 Days": 0.15,
    "Invited Teammate": 0.07,
    "Used Feature X": 0.12,
    "Support Ticket 30d": 0.02,
    "NPS Promoters": 0.09,
    "NPS Detractors": 0.03,
    "Referral Program": 0.02,
    "Upgraded Last 30 Days": 0.01,
    "Beta Testers": 0.005,
}
TRAITS: Final = (
    "Lifetime Value",
    "Orders Count",
    "Plan",
    "Last Product Viewed",
    "Churn Score",
)
CHANGED: Final = 0.012
NEW: Final = 0.005
GONE: Final = 0.003

_FIRST: Final = [
    "james",
    "mary",
    "john",
    "patricia",
    "robert",
    "jennifer",
    "michael",
    "linda",
    "william",
    "elizabeth",
    "david",
    "barbara",
    "richard",
    "susan",
    "joseph",
    "jessica",
    "thomas",
    "sarah",
    "charles",
    "karen",
    "wei",
    "li",
    "ana",
    "carlos",
    "sofia",
    "lucas",
    "emma",
    "noah",
    "olivia",
    "liam",
    "mia",
    "yuki",
    "hiro",
    "priya",
    "arjun",
    "fatima",
    "omar",
    "chen",
    "ivan",
    "olga",
]
_LAST: Final = [
    "smith",
    "johnson",
    "williams",
    "brown",
    "jones",
    "garcia",
    "miller",
    "davis",
    "rodriguez",
    "martinez",
    "hernandez",
    "lopez",
    "gonzalez",
    "wilson",
    "anderson",
    "thomas",
    "taylor",
    "moore",
    "jackson",
    "martin",
    "lee",
    "perez",
    "thompson",
    "white",
    "harris",
    "sanchez",
    "clark",
    "ramirez",
    "lewis",
    "robinson",
    "walker",
    "young",
    "allen",
    "king",
    "wright",
    "scott",
    "nguyen",
    "kim",
    "patel",
    "singh",
    "muller",
    "rossi",
    "dubois",
    "silva",
    "tanaka",
]
_DOMAINS: Final = [
    "gmail.com",
    "yahoo.com",
    "outlook.com",
    "hotmail.com",
    "icloud.com",
    "proton.me",
    "acme.io",
    "example.org",
    "globex.com",
    "initech.com",
    "umbrella.co",
    "hooli.xyz",
]
_PLANS: Final = ("free", "starter", "pro", "business", "enterprise")
_HEX: Final = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_BASE62: Final = np.frombuffer(
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", dtype=np.uint8
)


def _fixed_width(chars: np.ndarray) -> pa.Array:
    """An ``(n, width)`` uint8 matrix as an Arrow string array of n strings."""
    count, width = chars.shape
    offsets = np.arange(count + 1, dtype=np.int32) * width
    data = np.ascontiguousarray(chars).tobytes()
    return pa.StringArray.from_buffers(count, pa.py_buffer(offsets), pa.py_buffer(data))


def _uuids(rng: np.random.Generator, count: int) -> pa.Array:
    digits = _HEX[rng.integers(0, 16, (count, 32), dtype=np.uint8)]
    digits[:, 12] = ord("4")  # version 4
    digits[:, 16] = _HEX[8 + rng.integers(0, 4, count)]  # variant 10xx
    dash = np.full((count, 1), ord("-"), dtype=np.uint8)
    parts = (digits[:, :8], dash, digits[:, 8:12], dash, digits[:, 12:16], dash)
    return _fixed_width(np.hstack([*parts, digits[:, 16:20], dash, digits[:, 20:]]))


def _tokens(rng: np.random.Generator, count: int) -> pa.Array:
    body = _BASE62[rng.integers(0, 62, (count, 22), dtype=np.uint8)]
    prefix = np.tile(np.frombuffer(b"usr_", dtype=np.uint8), (count, 1))
    return _fixed_width(np.hstack([prefix, body]))


def _integers(rng: np.random.Generator, count: int, start: int) -> pa.Array:
    values = start + rng.choice(count * 4, count, replace=False)
    return pc.cast(pa.array(values), pa.string())


def make_ids(rng: np.random.Generator, count: int, *, start: int) -> pa.Array:
    """``count`` distinct ids: 70% UUIDs, 20% database integers (from ``start``), 10% tokens.

    Kinds are interleaved at random, as they are when a company changed id schemes.
    """
    kinds = rng.choice(3, count, p=[0.7, 0.2, 0.1])
    parts = [
        _uuids(rng, int((kinds == 0).sum())),
        _integers(rng, int((kinds == 1).sum()), start),
        _tokens(rng, int((kinds == 2).sum())),
    ]
    order = np.argsort(kinds, kind="stable")
    combined = pa.concat_arrays([part.cast(pa.string()) for part in parts])
    placed = np.empty(count, dtype=np.int64)
    placed[order] = np.arange(count)
    return combined.take(pa.array(placed))


def _emails(rng: np.random.Generator, count: int) -> pa.Array:
    def pick(words: tuple[str, ...] | list[str]) -> pa.Array:
        return pa.array(words).take(pa.array(rng.integers(0, len(words), count)))

    number = pc.cast(pa.array(rng.integers(1, 10_000, count)), pa.string())
    email = pc.binary_join_element_wise(
        pick(_FIRST), ".", pick(_LAST), number, "@", pick(_DOMAINS), ""
    )
    missing = pa.array(rng.random(count) < 0.04)
    return pc.if_else(missing, pa.scalar(None, pa.string()), email)


def _audience(rng: np.random.Generator, count: int, rate: float, number: int) -> pa.Array:
    members = rng.random(count) < rate
    if number % 3 == 0:
        # Some warehouses leave non-members null rather than false.
        return pa.array(members, mask=~members)
    return pa.array(members)


def _traits(rng: np.random.Generator, count: int) -> dict[str, pa.Array]:
    ltv = np.round(rng.lognormal(4.0, 1.5, count), 2)
    orders = rng.poisson(3.0, count)
    products = np.char.add("sku-", np.arange(5_000).astype(str))
    return {
        "Lifetime Value": pa.array(ltv, mask=rng.random(count) < 0.25),
        "Orders Count": pa.array(orders, mask=rng.random(count) < 0.25),
        "Plan": pa.array(_PLANS).take(
            pa.array(rng.choice(len(_PLANS), count, p=[0.6, 0.2, 0.12, 0.06, 0.02]))
        ),
        "Last Product Viewed": pa.array(products).take(
            pa.array(rng.integers(0, len(products), count), mask=rng.random(count) < 0.3)
        ),
        "Churn Score": pa.array(np.round(rng.random(count), 3), mask=rng.random(count) < 0.1),
    }


def _users(rng: np.random.Generator, count: int, *, id_start: int) -> pa.Table:
    columns: dict[str, pa.Array] = {
        ID_COLUMN: make_ids(rng, count, start=id_start),
        EMAIL_COLUMN: _emails(rng, count),
    }
    for number, (name, rate) in enumerate(AUDIENCES.items()):
        columns[name] = _audience(rng, count, rate, number)
    columns.update(_traits(rng, count))
    return pa.table(columns)


def _moved(rng: np.random.Generator, name: str, column: pa.Array) -> pa.Array:
    """Every value of a trait column moved to another one (null becomes a value)."""
    count = len(column)
    if name == "Lifetime Value":
        step = np.round(rng.random(count) * 50, 2) + 0.01
        return pc.round(pc.add(pc.fill_null(column, 0.0), pa.array(step)), 2)
    if name == "Orders Count":
        return pc.add(pc.fill_null(column, 0), 1)
    if name == "Plan":
        return pc.if_else(pc.equal(pc.fill_null(column, ""), "free"), "starter", "free")
    if name == "Last Product Viewed":
        # Products launched since the last snapshot: never a value the user held.
        launched = np.char.add("sku-", np.arange(5_000, 5_100).astype(str))
        return pa.array(launched).take(pa.array(rng.integers(0, len(launched), count)))
    if name == "Churn Score":
        shifted = pc.add(pc.fill_null(column, 0.0), 0.5)
        wrapped = pc.if_else(pc.greater_equal(shifted, 1.0), pc.subtract(shifted, 1.0), shifted)
        return pc.round(wrapped, 3)
    raise ValueError(name)


def _change(rng: np.random.Generator, table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table`` with one audience flipped or one trait moved on each of ``rows``."""
    count = table.num_rows
    what = np.full(count, -1, dtype=np.int64)
    names = [*AUDIENCES, *TRAITS]
    what[rows] = rng.integers(0, len(names), len(rows))
    for index, name in enumerate(names):
        hit = pa.array(what == index)
        column = table.column(name).combine_chunks()
        if name in AUDIENCES:
            member = pc.fill_null(column, False)
            if column.null_count:
                # A column that leaves non-members null keeps doing so.
                flipped = pc.if_else(member, pa.scalar(None, pa.bool_()), True)
            else:
                flipped = pc.invert(member)
        else:
            flipped = _moved(rng, name, column)
        table = table.set_column(
            table.schema.get_field_index(name), name, pc.if_else(hit, flipped, column)
        )
    return table


@dataclass(frozen=True)
class Snapshots:
    """The two snapshot files of one size."""

    first: Path
    second: Path


def write_snapshots(directory: Path, users: int, *, seed: int = 7) -> Snapshots:
    """Write snapshot A and B of ``users`` users into ``directory`` (Parquet, zstd)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    first = _users(rng, users, id_start=10_000_000)
    gone = rng.random(users) < GONE
    changed = np.flatnonzero(~gone & (rng.random(users) < CHANGED / (1 - GONE)))
    kept = _change(rng, first, changed).filter(pa.array(~gone))
    # New users' integer ids start above every old one, so no id comes back.
    fresh = _users(rng, int(users * NEW), id_start=10_000_000 + 8 * users)
    second = pa.concat_tables([kept, fresh])
    second = second.take(pa.array(rng.permutation(second.num_rows)))
    paths = Snapshots(directory / "snapshot-a.parquet", directory / "snapshot-b.parquet")
    pq.write_table(first, paths.first, compression="zstd")
    pq.write_table(second, paths.second, compression="zstd")
    return paths
