"""The threads the vectorised passes run on.

numpy's passes and Arrow's kernels release the GIL, so blocks of rows or whole columns handled
on a few threads use every core. One thread a core, at most four: the passes are memory-bound.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

__all__ = ["WORKERS", "map_on_threads", "runs_of"]

WORKERS: Final = min(4, os.cpu_count() or 1)

_T = TypeVar("_T")
_R = TypeVar("_R")


def map_on_threads(work: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """``work`` of each item, in order: on :data:`WORKERS` threads when there are several."""
    if len(items) > 1 and WORKERS > 1:
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            return list(pool.map(work, items))
    return [work(item) for item in items]


def runs_of(size: int, per_worker: int = 1) -> list[slice]:
    """``range(size)`` cut into ``per_worker`` runs a worker of about the same length (none
    empty), for :func:`map_on_threads` to take a run a thread. More runs than threads keep
    fewer of each run's temporary arrays alive at once."""
    step = max(1, -(-size // (WORKERS * per_worker)))
    return [slice(start, min(start + step, size)) for start in range(0, size, step)]
