"""Customer records planned from a diff."""

from __future__ import annotations

import pandas as pd

from sync.diff import KnownState, Snapshot, apply_acknowledged, diff
from sync.model import CustomerRecord
from sync.plan import plan_customers


def _snapshot(rows: dict[str, dict[str, str | None]]) -> Snapshot:
    columns = ["name", "email", "vip", "cart", "plan"]
    frame = pd.DataFrame(
        {column: [row.get(column) for row in rows.values()] for column in columns},
        index=pd.Index(list(rows), dtype="string", name="customer_id"),
        dtype="string",
    )
    return Snapshot.from_users(frame, ("vip", "cart"), ("plan",))


def test_records_carry_values_and_the_keys_to_remove() -> None:
    """Traits hold the managed keys with a value; removed_traits the ones now absent."""
    first = _snapshot({"u1": {"name": "Ann", "vip": "true", "plan": "gold"}})
    result = diff(first, KnownState.empty())
    state = apply_acknowledged(KnownState.empty(), result, result.desired.index)
    second = _snapshot({"u1": {"email": "ann@x.io", "cart": "true"}, "u2": {"plan": "p"}})
    records = list(plan_customers(diff(second, state)))
    assert records == [
        CustomerRecord(
            customer_id="u1",
            name="Ann",
            email="ann@x.io",
            traits={"vip": "false", "cart": "true"},
            removed_traits=frozenset({"plan"}),
        ),
        CustomerRecord(
            customer_id="u2",
            name=None,
            email=None,
            traits={"plan": "p"},
            removed_traits=frozenset({"vip", "cart"}),
        ),
    ]


def test_an_exit_keeps_its_stored_name_and_drops_its_traits() -> None:
    """An exited user's record says "false" for its audiences and removes its traits."""
    first = _snapshot({"u1": {"name": "Ann", "vip": "true", "plan": "gold"}})
    result = diff(first, KnownState.empty())
    state = apply_acknowledged(KnownState.empty(), result, result.desired.index)
    (record,) = plan_customers(diff(_snapshot({}), state))
    assert record == CustomerRecord(
        customer_id="u1",
        name="Ann",
        traits={"vip": "false"},
        removed_traits=frozenset({"cart", "plan"}),
    )


def test_every_user_to_send_is_planned_once_across_chunks() -> None:
    """A plan larger than one conversion chunk yields each user exactly once, in order."""
    rows: dict[str, dict[str, str | None]] = {
        f"user-{n:05d}": {"vip": "true"} for n in range(25_000)
    }
    result = diff(_snapshot(rows), KnownState.empty())
    ids = [record.customer_id for record in plan_customers(result)]
    assert ids == list(rows)
    assert len(set(ids)) == 25_000


def test_nothing_to_send_plans_nothing() -> None:
    """An empty diff gives no records."""
    assert list(plan_customers(diff(_snapshot({}), KnownState.empty()))) == []
