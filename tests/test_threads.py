"""Runs of rows for the passes that take a run a thread."""

from __future__ import annotations

import pytest

from sync.threads import WORKERS, runs_of


@pytest.mark.parametrize("size", [0, 1, 2, 5, 1_000_003])
@pytest.mark.parametrize("per_worker", [1, 4])
def test_runs_cover_every_row_once_in_order_and_none_is_empty(size: int, per_worker: int) -> None:
    runs = runs_of(size, per_worker)

    covered = [row for run in runs for row in range(size)[run]]
    assert covered == list(range(size))
    assert all(run.stop > run.start for run in runs)
    assert len(runs) <= WORKERS * per_worker
