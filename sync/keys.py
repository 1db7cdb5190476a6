"""Keys and values as they go on the wire.

- :func:`snake_case` turns an audience or computed-trait name into its key exactly as Segment's
  own ``segmentio/go-snakecase`` does ("Order Completed Last 30 Days" ->
  ``order_completed_last_30_days``), byte for byte, quirks included, because the keys must match
  the ones Segment's destination would have written.
- :func:`dimension_safe` applies Amberflo's dimension rule: every character outside
  ``[-_ !.*'()&$@=;:+,?0-9A-Za-z]`` becomes ``_`` and the result is cut to 200 characters. This
  reproduces every example of the destination page (``https://google.com`` ->
  ``https:__google.com``).
- :func:`format_value` renders a value as the string Amberflo stores (dimensions and traits are
  string maps).

numpy and pandas values (``np.int64``, ``pd.NA``, ...) are recognised without importing either
library: a value of theirs can only exist once its library is loaded, so the checks look the
library up in ``sys.modules``. The events command never loads them, and importing pandas would
cost it more start-up time than mapping thousands of events.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import sys
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final

MAX_DIMENSION_LENGTH: Final = 200

_UNSAFE_DIMENSION_CHARS: Final = re.compile(r"[^-_ !.*'()&$@=;:+,?0-9A-Za-z]")


def _is_lower(c: int) -> bool:
    return 0x61 <= c <= 0x7A


def _is_upper(c: int) -> bool:
    return 0x41 <= c <= 0x5A


def _is_digit(c: int) -> bool:
    return 0x30 <= c <= 0x39


def _is_alnum(c: int) -> bool:
    return _is_lower(c) or _is_upper(c) or _is_digit(c)


def snake_case(name: str) -> str:
    """Return ``name`` snake_cased exactly as ``segmentio/go-snakecase`` would.

    The Go code works on UTF-8 bytes and treats every non-ASCII byte as a separator, so this
    port does the same: "café lovers" -> ``caf_lovers``.
    """
    s = name.encode()
    n = len(s)
    idx = 0
    # Already snake_case (lowercase, digits, single inner underscores): returned unchanged.
    while idx < n and (
        _is_lower(s[idx])
        or _is_digit(s[idx])
        or (s[idx] == 0x5F and idx < n - 1 and (_is_lower(s[idx + 1]) or _is_digit(s[idx + 1])))
    ):
        idx += 1
    if idx == n:
        return name
    # A digit right before an uppercase letter starts the next word, not the prefix.
    if idx > 0 and _is_digit(s[idx - 1]):
        idx -= 1
    out = bytearray(s[:idx])
    while idx < n:
        if not _is_alnum(s[idx]):
            idx += 1
            continue
        if out:
            out.append(0x5F)
        while idx < n and (_is_upper(s[idx]) or _is_digit(s[idx])):
            out.append(s[idx] + 0x20 if _is_upper(s[idx]) else s[idx])
            idx += 1
        while idx < n and (_is_lower(s[idx]) or _is_digit(s[idx])):
            out.append(s[idx])
            idx += 1
    return out.decode()


def dimension_safe(value: str) -> str | None:
    """Apply Amberflo's dimension rule; ``None`` when nothing is left (empty means absent)."""
    safe = _UNSAFE_DIMENSION_CHARS.sub("_", value)[:MAX_DIMENSION_LENGTH]
    return safe or None


def is_missing(value: object) -> bool:
    """True for ``None``, NaN, ``pd.NA`` and ``NaT``: the values that mean "absent"."""
    if value is None:
        return True
    if isinstance(value, float):  # np.float64 is a float too
        return math.isnan(value)
    pd = _loaded("pandas")
    if pd is not None and (value is pd.NA or value is pd.NaT):
        return True
    np = _loaded("numpy")
    if np is not None and isinstance(value, np.floating):
        return math.isnan(value)
    return False


def format_value(value: object) -> str | None:
    """Render one value as the string Amberflo stores; ``None`` means absent.

    Booleans become ``true``/``false``, integers ``5`` (never ``5.0``), floats Python's shortest
    repr (``450.5``, ``2.0``), lists their items joined with ``,``, mappings compact JSON with
    sorted keys, timestamps ISO 8601. Strings go as they are.
    """
    if is_missing(value):
        return None
    if isinstance(value, str):
        return value
    np = _loaded("numpy")
    if isinstance(value, bool) or (np is not None and isinstance(value, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, int) or (np is not None and isinstance(value, np.integer)):
        return str(int(value))
    if isinstance(value, float) or (np is not None and isinstance(value, np.floating)):
        return repr(float(value))
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    if isinstance(value, list | tuple) or (np is not None and isinstance(value, np.ndarray)):
        items = (format_value(item) for item in value)
        return ",".join(item for item in items if item is not None)
    return str(value)


def _loaded(name: str) -> Any:
    """The module ``name`` if something imported it already, else ``None`` (never imports)."""
    return sys.modules.get(name)


def wire_value(value: object) -> str | None:
    """Format a value and apply the dimension rule: what a dimension or trait value becomes."""
    text = format_value(value)
    return None if text is None else dimension_safe(text)
