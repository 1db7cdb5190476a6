"""Settle snapshot users against the stored fingerprints while the snapshot is read.

A snapshot user matched to a stored row whose record fingerprint equals its own is unchanged:
the diff would not look at one of its values (see :mod:`sync.diff`). A reader that knows the
state can therefore match each part of the snapshot as it arrives and keep values only for
the users left: new ones, and those whose fingerprint differs or is unknown. At ten million
users that is a few hundred thousand rows kept instead of every value of every user.

The :class:`Settler` gives up (:class:`UnsettledError`) where only the whole snapshot can decide:
a state without id fingerprints, two stored rows or two snapshot users with one id
fingerprint, or an id fingerprint whose second word disagrees. The reader then reads the
snapshot whole, as it would without a state.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from sync.diff import KnownState, Settled, merge_run, stored_fingerprints
from sync.fingerprint import U64, UNKNOWN, order_hashes, row_bits

__all__ = ["Settler", "UnsettledError"]

Bools = npt.NDArray[np.bool_]
Ints = npt.NDArray[np.intp]


class UnsettledError(Exception):
    """The stored fingerprints cannot settle this snapshot part by part: read it whole."""


class Settler:
    """Matches parts of a snapshot to ``state`` (:meth:`match`, on any thread) and settles the
    users it vouches for (:meth:`keep`, one part at a time).

    Raises :class:`UnsettledError` when the state cannot settle anything: no stored row, a row
    without id fingerprints, or two rows with one id fingerprint.
    """

    def __init__(self, state: KnownState) -> None:
        stored = stored_fingerprints(state) if len(state.users) else None
        if stored is None:
            raise UnsettledError("the state has no users with id fingerprints")
        self._id_hash, self._id_check, self._record = stored
        bits = row_bits(len(self._id_hash))
        order = state.id_order
        self._order = (
            order if order is not None and order.bits == bits else order_hashes(self._id_hash)
        )
        if self._order.repeated(self._id_hash).any():
            raise UnsettledError("two stored users share an id fingerprint")
        self._seen = np.zeros(len(self._id_hash), dtype=bool)
        self._matched = 0
        self._count = 0
        self._members: dict[str, int] = {}

    def match(self, ids: tuple[U64, U64]) -> Ints:
        """Per user of one part (``ids``: its id fingerprints), its stored row, or -1.

        Reads the state only, so parts may be matched on several threads at once.
        """
        hashes, checks = ids
        if len(hashes) >> self._order.bits:
            raise UnsettledError("a part too large to sort with its row numbers")
        positions = np.empty(len(hashes), dtype=np.intp)
        packed = order_hashes(hashes, self._order.bits).packed
        merge_run(packed, hashes, self._order, self._id_hash, positions)
        del packed
        matched = positions >= 0
        if not np.array_equal(self._id_check[positions[matched]], checks[matched]):
            raise UnsettledError("an id fingerprint matched a stored one with another second word")
        return positions

    def keep(self, positions: Ints, records: U64, members: Mapping[str, Bools]) -> Bools:
        """Per user of one part: whether the diff needs its values (it is not settled).

        ``positions`` are the part's stored rows (:meth:`match`), ``records`` its record
        fingerprints and ``members`` its members per audience key (counted for the settled
        users). One part at a time: this counts what the diff will need of them.
        """
        matched = np.flatnonzero(positions >= 0)
        at = positions[matched]
        # Stored rows are unique, so a row held twice is one id given twice in the snapshot:
        # whether the copies agree is for the whole snapshot's deduplication to say.
        self._seen[at] = True
        self._matched += len(at)
        if np.count_nonzero(self._seen) != self._matched:
            raise UnsettledError("an id repeats in the snapshot")
        stored = self._record[at]
        vouched = (stored == records[matched]) & (stored != UNKNOWN)
        keep = np.ones(len(positions), dtype=bool)
        keep[matched[vouched]] = False
        settled = ~keep
        for key, flags in members.items():
            self._members[key] = self._members.get(key, 0) + int(np.count_nonzero(flags & settled))
        self._count += len(positions) - int(np.count_nonzero(keep))
        return keep

    def settled(self) -> Settled:
        """What the snapshot's diff needs to know of the users settled so far."""
        return Settled(count=self._count, seen=self._seen, members=dict(self._members))
