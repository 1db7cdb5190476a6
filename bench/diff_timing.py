"""How long the Engage diff takes end to end, and its peak memory, on synthetic users.

Prepares (once per size, in ``--dir``) two wide Parquet snapshots of ``--users`` users with 20
audiences and 5 computed traits (the second with about 1% of users changed, 0.5% gone and 0.5%
new) and the committed state of the first. Then, in a fresh process so that peak RSS is the
run's own, times what one run does before delivery: load the state, read the snapshot, diff,
and build every customer record of the plan. DuckDB's FULL OUTER JOIN of the same two files is
timed as the yardstick.

    .venv/bin/python bench/diff_timing.py [--users 1000000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import itertools
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sync.config import SourceSettings
from sync.diff import KnownState, apply_acknowledged, diff
from sync.plan import plan_customers
from sync.snapshot import read_snapshot
from sync.state import StateStore, StoredState

AUDIENCES = 20
RUN_ID = "20260101T000000Z-000000"


def _snapshot(users: int, seed: int, ids: np.ndarray) -> pa.Table:
    rng = np.random.default_rng(seed)
    columns: dict[str, pa.Array] = {"user_id": pa.array(ids)}
    for number in range(AUDIENCES):
        columns[f"Audience {number:02d}"] = pa.array(rng.random(users) < 0.1)
    columns["total_revenue_180_days"] = pa.array(np.round(rng.random(users) * 1000, 2))
    orders = rng.integers(0, 50, users)
    columns["orders_count"] = pa.array(orders, mask=rng.random(users) < 0.2)
    columns["plan"] = pa.array(rng.choice(["free", "pro", "enterprise"], users))
    columns["last_product"] = pa.array(
        np.char.add("sku-", rng.integers(0, 10_000, users).astype(str))
    )
    columns["churn_score"] = pa.array(np.round(rng.random(users), 3))
    return pa.table(columns)


def _changed(table: pa.Table, seed: int) -> pa.Table:
    """About 1% of users changed, 0.5% gone, 0.5% new (in Arrow: pandas would make the integer
    column with nulls a float column, which changes every value's text)."""
    rng = np.random.default_rng(seed)
    users = table.num_rows
    touched = pa.array(rng.random(users) < 0.01)
    flipped = pc.if_else(touched, pc.invert(table["Audience 00"]), table["Audience 00"])
    revenue = table["total_revenue_180_days"]
    raised = pc.if_else(touched, pc.add(revenue, 1.0), revenue)
    table = table.set_column(table.schema.get_field_index("Audience 00"), "Audience 00", flipped)
    table = table.set_column(
        table.schema.get_field_index("total_revenue_180_days"), "total_revenue_180_days", raised
    )
    kept = table.filter(pa.array(rng.random(users) >= 0.005))
    fresh = table.take(pa.array(rng.choice(users, users // 200, replace=False)))
    fresh = fresh.set_column(
        0, "user_id", pa.array([f"new-{i:09d}" for i in range(fresh.num_rows)])
    )
    combined = pa.concat_tables([kept, fresh])
    return combined.take(pa.array(rng.permutation(combined.num_rows)))


def prepare(directory: Path, users: int) -> None:

    directory.mkdir(parents=True, exist_ok=True)
    first, second = directory / "snapshot-1.parquet", directory / "snapshot-2.parquet"
    if (directory / "state" / "state.parquet").exists() and second.exists():
        return
    rng = np.random.default_rng(0)
    ids = np.char.add("user-", np.char.zfill(rng.permutation(users).astype(str), 9))
    table = _snapshot(users, 1, ids)
    pq.write_table(table, first)
    pq.write_table(_changed(table, 2), second)
    snapshot = read_snapshot(SourceSettings(path=str(first)), {})
    result = diff(snapshot, KnownState.empty(), samples=0)
    state = apply_acknowledged(KnownState.empty(), result, result.desired.index)
    StateStore(directory / "state").commit(
        StoredState(
            users=state.users, audience_keys=state.audience_keys, trait_keys=state.trait_keys
        ),
        RUN_ID,
    )


def measure(directory: Path) -> None:

    marks = [("start", time.perf_counter())]
    stored = StateStore(directory / "state").load()
    known = KnownState(stored.users, stored.audience_keys, stored.trait_keys)
    marks.append(("load state", time.perf_counter()))
    snapshot = read_snapshot(SourceSettings(path=str(directory / "snapshot-2.parquet")), {})
    marks.append(("read snapshot", time.perf_counter()))
    result = diff(snapshot, known)
    marks.append(("diff", time.perf_counter()))
    records = sum(1 for _ in plan_customers(result))
    marks.append(("plan", time.perf_counter()))
    for (_, before), (name, after) in itertools.pairwise(marks):
        print(f"{name:>14}: {after - before:6.2f} s")
    print(f"{'total':>14}: {marks[-1][1] - marks[0][1]:6.2f} s")
    summary = result.summary
    print(
        f"users {summary.in_snapshot}, added {summary.added}, changed {summary.changed}, "
        f"exited {summary.exited}, to send {summary.to_send} ({records} records)"
    )
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


def duckdb_join(directory: Path) -> None:
    started = time.perf_counter()
    connection = duckdb.connect()
    changed = connection.execute(
        """
        SELECT count(*) FROM read_parquet(?) a
        FULL OUTER JOIN read_parquet(?) b USING (user_id)
        WHERE a.user_id IS NULL OR b.user_id IS NULL
           OR a.total_revenue_180_days IS DISTINCT FROM b.total_revenue_180_days
           OR a."Audience 00" IS DISTINCT FROM b."Audience 00"
        """,
        [str(directory / "snapshot-1.parquet"), str(directory / "snapshot-2.parquet")],
    ).fetchone()
    print(f"duckdb full outer join: {time.perf_counter() - started:.2f} s ({changed} rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()) / "amberflo-sync-bench"
    )
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = args.dir / str(args.users)
    if args.measure:
        measure(directory)
        return
    prepare(directory, args.users)
    command = [sys.executable, __file__, "--measure", "--users", str(args.users)]
    subprocess.run([*command, "--dir", str(args.dir)], check=True)
    duckdb_join(directory)


if __name__ == "__main__":
    main()
