"""Sorting customer ids in code point order, about four times faster than a string sort.

The state is stored sorted by id, so every new user has to be sorted in, and the first run or
adopt of a million users sorts a million ids. Arrow compares strings one pair at a time
(about a second per million ids); here the first eight bytes of each id become one big-endian
``uint64`` whose numeric order is the ids' byte order, numpy sorts those, and only ids that
share all eight bytes with a neighbour are sorted again as strings. UTF-8 byte order is code
point order, the order Arrow and Python use for strings.
"""

from __future__ import annotations

import bisect

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["insertion_points", "sort_order"]

_WINDOW = 8  # bytes of each id in the numeric key: one uint64
# Stored ids compared one by one in Python, at most, before insertion_points gives up: ids
# that mostly share a long prefix ("customer-000…") are better served by one whole sort.
_TIE_BUDGET = 50_000


def sort_order(ids: pa.Array) -> npt.NDArray[np.intp]:
    """The positions of ``ids`` in ascending order (equal ids keep their order).

    ``ids`` is an Arrow ``string`` or ``large_string`` array; with nulls, Arrow sorts it.
    """
    if ids.null_count or not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        return np.asarray(pc.sort_indices(ids), dtype=np.intp)
    key = _prefix_key(ids)
    # No stable sort needed: ids with equal keys are sorted again below, by id then position.
    order = np.argsort(key).astype(np.intp)
    ranked = key[order]
    tie = ranked[1:] == ranked[:-1]
    if not tie.any():
        return order
    # Ids sharing their first eight bytes sit together: sort each such run as strings.
    tied = np.zeros(len(order), dtype=bool)
    tied[1:] |= tie
    tied[:-1] |= tie
    positions = np.flatnonzero(tied)
    rows = order[positions]
    run = np.cumsum(np.concatenate([[True], ranked[positions[1:]] != ranked[positions[:-1]]]))
    runs = pa.table({"run": run, "id": ids.take(pa.array(rows)), "row": rows})
    within = pc.sort_indices(
        runs, sort_keys=[("run", "ascending"), ("id", "ascending"), ("row", "ascending")]
    )
    order[positions] = rows[np.asarray(within, dtype=np.intp)]
    return order


def _prefix_key(ids: pa.Array) -> npt.NDArray[np.uint64]:
    """Each id's first eight bytes (zero-padded) as a big-endian number.

    A shorter id is a prefix of, or differs before, any id it is padded level with, so the
    numbers never order two ids wrongly; equal numbers are ties for :func:`sort_order`.
    """
    size = len(ids)
    width = np.int64 if pa.types.is_large_string(ids.type) else np.int32
    _validity, offsets_buffer, data_buffer = ids.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=width)[ids.offset : ids.offset + size + 1]
    data = (
        np.frombuffer(data_buffer, dtype=np.uint8)
        if data_buffer is not None
        else np.zeros(0, dtype=np.uint8)
    )
    starts = offsets[:-1].astype(np.int64)
    lengths = offsets[1:].astype(np.int64) - starts
    padded = np.concatenate([data[: int(offsets[-1])], np.zeros(_WINDOW, dtype=np.uint8)])
    window = np.lib.stride_tricks.sliding_window_view(padded, _WINDOW)[starts]
    window[np.arange(_WINDOW) >= lengths[:, None]] = 0
    key: npt.NDArray[np.uint64] = window.view(">u8").ravel().astype(np.uint64)
    return key


def insertion_points(sorted_ids: pa.Array, ids: pa.Array) -> npt.NDArray[np.intp] | None:
    """Per id of ``ids``: how many of ``sorted_ids`` (ascending) sort before it, or None when
    too many of them share their first eight bytes with it to settle that cheaply.

    Folding a few thousand new users into a sorted state of a million needs only where each
    goes, not a sort of all of them: the numeric keys of :func:`sort_order` are ascending
    along ``sorted_ids`` too, so a binary search on them places every id whose key no stored
    id shares, and the few that share one are placed by comparing the ids themselves.
    Both arrays are Arrow ``string`` or ``large_string``; with nulls, or ``sorted_ids`` not
    strictly ascending (checked: one pass), the answer is None too.
    """
    if sorted_ids.null_count or ids.null_count:
        return None
    if len(sorted_ids) > 1 and not pc.all(pc.less(sorted_ids[:-1], sorted_ids[1:])).as_py():
        return None  # not ascending after all: only a sort can tell
    stored, wanted = _prefix_key(sorted_ids), _prefix_key(ids)
    low = np.searchsorted(stored, wanted, side="left")
    high = np.searchsorted(stored, wanted, side="right")
    tied = np.flatnonzero(high > low)
    if int((high[tied] - low[tied]).sum()) > _TIE_BUDGET:
        return None
    points = low.astype(np.intp)
    for position in tied:
        start, stop = int(low[position]), int(high[position])
        run = sorted_ids.slice(start, stop - start).to_pylist()
        points[position] = start + bisect.bisect_left(run, ids[int(position)].as_py())
    return points
