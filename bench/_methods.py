"""The diffs the scale benchmark compares, each run alone in a fresh process.

Every method reads the data of one size (``bench/data/<users>/``) and returns what it found as
``{"added": n, "changed": n, "exited": n}`` (plus per-stage seconds for ``stages``), so the
table can show that all of them agree on the answer, not only how fast they got it.

- ``ours``: ``amberflo-sync run --dry-run`` through the real command line (state + snapshot B).
- ``stages``: the same pipeline stages in process, timed one by one, the state loaded as a
  dry run loads it: load state (the fingerprints), read snapshot, diff (reading the stored
  rows it compares or exits), plan (every customer record built, as a real run does before
  delivery).
- ``floor``: pandas ``read_parquet`` of both snapshots with Arrow dtypes; no diff at all.
- ``duckdb``: a FULL OUTER JOIN of snapshot A and B on the id, every column compared with
  ``IS DISTINCT FROM``; the rows to send come back as an Arrow table.
- ``polars``: the same as a polars full join.

DuckDB and polars diff two snapshots, while ours diffs a snapshot against its own state (what
Amberflo acknowledged), which is what the job must do; both read the same amount of user data.
"""

# Each method imports its own libraries inside it: a process measured for one method must not
# carry another's imports in its peak RSS.
# ruff: noqa: PLC0415

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _data import ID_COLUMN

Counts = dict[str, Any]


def _value_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [name for name in pq.read_schema(path).names if name != ID_COLUMN]


def ours_command(directory: Path) -> list[str]:
    """The real command line of a dry run; its report says what it found."""
    return [
        str(Path(sys.executable).with_name("amberflo-sync")),
        "run",
        "--dry-run",
        "--config",
        str(directory / "sync.toml"),
        "--report",
        str(directory / "report.json"),
    ]


def ours_counts(directory: Path) -> Counts:
    """What the last :func:`ours_command` found, from its JSON report."""
    counts = json.loads((directory / "report.json").read_text())["counts"]
    return {kind: counts[kind] for kind in ("added", "changed", "exited")}


def stages(directory: Path) -> Counts:
    from sync.config import load_settings
    from sync.diff import FINGERPRINTS, KnownState, diff
    from sync.plan import plan_customers
    from sync.snapshot import read_snapshot
    from sync.state import StateStore

    settings = load_settings(directory / "sync.toml", require_api_key=False)
    assert settings.source is not None
    marks = [time.perf_counter()]
    # As a dry run loads it: the fingerprints of everyone now, the rows the diff looks at
    # during the diff.
    stored = StateStore(settings.state.dir).load_lazily(FINGERPRINTS)
    known = KnownState(stored.head, stored.audience_keys, stored.trait_keys, fetch=stored.rows)
    marks.append(time.perf_counter())
    snapshot = read_snapshot(settings.source, settings.keys, known_audiences=known.audience_keys)
    marks.append(time.perf_counter())
    result = diff(snapshot, known, samples=settings.report.samples)
    marks.append(time.perf_counter())
    records = sum(1 for _ in plan_customers(result))
    marks.append(time.perf_counter())
    names = ("load state", "read snapshot", "diff", "plan")
    summary = result.summary
    return {
        "added": summary.added,
        "changed": summary.changed,
        "exited": summary.exited,
        "records": records,
        "stages": {name: marks[i + 1] - marks[i] for i, name in enumerate(names)},
    }


def floor(directory: Path) -> Counts:
    import pandas as pd

    first = pd.read_parquet(directory / "snapshot-a.parquet", dtype_backend="pyarrow")
    second = pd.read_parquet(directory / "snapshot-b.parquet", dtype_backend="pyarrow")
    return {"rows": len(first) + len(second)}


def duckdb(directory: Path) -> Counts:
    import duckdb as db

    first, second = directory / "snapshot-a.parquet", directory / "snapshot-b.parquet"
    differs = " OR ".join(
        f'a."{name}" IS DISTINCT FROM b."{name}"' for name in _value_columns(second)
    )
    # The column names come from our own generated file, not from input.
    query = f"""
        SELECT CASE WHEN a.{ID_COLUMN} IS NULL THEN 'added'
                    WHEN b.{ID_COLUMN} IS NULL THEN 'exited'
                    ELSE 'changed' END AS kind,
               coalesce(b.{ID_COLUMN}, a.{ID_COLUMN}) AS id, b.* EXCLUDE ({ID_COLUMN})
        FROM read_parquet(?) a FULL OUTER JOIN read_parquet(?) b USING ({ID_COLUMN})
        WHERE a.{ID_COLUMN} IS NULL OR b.{ID_COLUMN} IS NULL OR {differs}
    """  # noqa: S608
    connection = db.connect()
    rows = connection.execute(query, [str(first), str(second)]).to_arrow_table()
    return _kind_counts(rows.column("kind").to_pylist())


def polars(directory: Path) -> Counts:
    import polars as pl

    first = pl.scan_parquet(directory / "snapshot-a.parquet")
    second = pl.scan_parquet(directory / "snapshot-b.parquet")
    names = _value_columns(directory / "snapshot-b.parquet")
    joined = first.join(second, on=ID_COLUMN, how="full", suffix="_b", coalesce=False)
    old, new = pl.col(ID_COLUMN), pl.col(f"{ID_COLUMN}_b")
    differs = pl.any_horizontal([pl.col(name).ne_missing(pl.col(f"{name}_b")) for name in names])
    kind = (
        pl.when(old.is_null())
        .then(pl.lit("added"))
        .when(new.is_null())
        .then(pl.lit("exited"))
        .otherwise(pl.lit("changed"))
    )
    rows = (
        joined.filter(old.is_null() | new.is_null() | differs)
        .select(kind.alias("kind"), pl.coalesce(new, old).alias("id"), pl.col(r"^.*_b$"))
        .collect()
    )
    return _kind_counts(rows.get_column("kind").to_list())


def _kind_counts(kinds: list[str]) -> Counts:
    return {kind: kinds.count(kind) for kind in ("added", "changed", "exited")}


IN_PROCESS: dict[str, Callable[[Path], Counts]] = {
    "stages": stages,
    "floor": floor,
    "duckdb": duckdb,
    "polars": polars,
}


def main() -> None:
    """``_methods.py METHOD DIRECTORY``: run one method, print what it found as JSON."""
    method, directory = sys.argv[1], Path(sys.argv[2])
    print(json.dumps(IN_PROCESS[method](directory)))


if __name__ == "__main__":
    main()
