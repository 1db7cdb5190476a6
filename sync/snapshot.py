"""Read an Engage snapshot into a validated :class:`~sync.diff.Snapshot` (the I/O adapter).

Sources: a file, a glob or a folder (every supported file in it, sorted by name); ``.csv``,
``.parquet``, ``.jsonl``/``.ndjson``, and the text formats gzipped (``.csv.gz``). Layouts:

- ``wide``: one row per user, one column per audience or computed trait;
- ``long``: ``(id_column, key_column, value_column)`` rows; ``name_column``/``email_column`` name
  the *keys* whose rows carry the customer's name and email;
- ``membership``: one file per audience listing its members in ``id_column``; the audience's
  name is the file name without its extensions.

Audiences and traits are taken from the configuration, else inferred: boolean columns (wide) or
boolean-looking values (wide: text of true/false/yes/no only; long: every value one of
true/false/yes/no/1/0) are audiences, the rest traits; an empty column is a trait unless the
stored state knows its key as an audience (so an audience that lost its last member still sends
its exits); list audiences that may have no member under ``source.audiences`` to be sure.
An audience cell is a member when it is a boolean true, ``true``/``yes``/``1`` in any case,
or the number 1. Trait values keep their types and are rendered as on the wire
(:func:`sync.keys.wire_value`): an integer column with nulls still renders ``5``.

Rows with a null or empty id (``missing_id``), or rows of one id that disagree
(``conflicting_duplicate``, every row of that id), are left out and reported; identical
duplicates collapse into one. In the long layout a repeat disagrees only when one key of one
user gets two values, and a row without a key is ``missing_key``. A missing column or a bad
setting raises ``ConfigError``; an unreadable file raises ``SourceError``; both name the file
and the fix.

Given the state it will be compared with, :func:`read_snapshot` reads a wide Parquet snapshot
a part at a time and keeps values only for the users the state does not vouch for (see
:mod:`sync.settle`): the others are counted, not held.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import structlog

from sync.config import SourceSettings
from sync.diff import (
    AUDIENCE_DTYPE,
    FINGERPRINTS,
    HASH,
    ID_CHECK,
    ID_HASH,
    INDEX_NAME,
    TEXT_DTYPE,
    KnownState,
    Settled,
    Snapshot,
    TraitValues,
)
from sync.errors import ConfigError, SourceError
from sync.fingerprint import (
    U64,
    HashOrder,
    RecordFingerprint,
    dictionary_codes,
    id_fingerprints,
    order_hashes,
)
from sync.keys import MAX_DIMENSION_LENGTH, format_value, snake_case, wire_value
from sync.settle import Settler, UnsettledError
from sync.threads import WORKERS

__all__ = ["CONFLICTING_DUPLICATE", "MISSING_ID", "Snapshot", "read_snapshot"]

log = structlog.get_logger(__name__)

MISSING_ID: Final = "missing_id"
CONFLICTING_DUPLICATE: Final = "conflicting_duplicate"
MISSING_KEY: Final = "missing_key"

_FORMATS: Final = {".csv": "csv", ".parquet": "parquet", ".jsonl": "json", ".ndjson": "json"}
_SUPPORTED: Final = "use .csv, .parquet, .jsonl or .ndjson (text formats may be gzipped: .csv.gz)"
_MEMBER_WORDS: Final = ("true", "yes", "1")
_BOOLEAN_WORDS: Final = ("true", "false", "yes", "no", "1", "0")
# keys.dimension_safe as an RE2 pattern, so a column is made wire-safe in one Arrow pass.
_UNSAFE: Final = r"[^-_ !.*'()&$@=;:+,?0-9A-Za-z]"
# Floats whose Arrow text equals Python's repr once ".0" is added to integral ones; the rest
# (huge, tiny) take the exact, slower per-value path.
_FIXED_NOTATION: Final = (1e-4, 1e10)
_RESERVED_KEYS: Final = ("name", "email")

Bools = npt.NDArray[np.bool_]
Ints = npt.NDArray[np.intp]
Text: TypeAlias = pa.Array | pa.ChunkedArray
_T = TypeVar("_T")


# -- files -----------------------------------------------------------------------------------


def _format_of(path: Path) -> str | None:
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            return None  # Parquet compresses inside the file; a gzipped one is not readable
    return _FORMATS.get(suffixes[-1]) if suffixes else None


def _stem(path: Path) -> str:
    """The file name without any of its extensions: ``VIP Users.csv.gz`` -> ``VIP Users``."""
    name = path.name
    while True:
        stem, dot, suffix = name.rpartition(".")
        if not dot or not stem or f".{suffix.lower()}" not in (*_FORMATS, ".gz"):
            return name
        name = stem


def resolve_files(path: str) -> list[Path]:
    """The snapshot files a ``source.path`` names: a file, a glob or a folder, sorted.

    Nothing there is a :class:`SourceError` (exit 1); a file of an unknown format is a
    :class:`ConfigError` (exit 2).
    """
    target = Path(path)
    if target.is_dir():
        found = sorted(p for p in target.iterdir() if p.is_file() and _format_of(p))
        if not found:
            raise SourceError(
                f"no snapshot file in folder {target} ({_SUPPORTED}); has the export landed? "
                "Otherwise check source.path"
            )
        return found
    if glob.has_magic(path):
        # The pattern may be absolute (config paths are resolved): Path.glob takes relative ones.
        matches = sorted(Path(p) for p in glob.glob(path) if Path(p).is_file())  # noqa: PTH207
        found = [p for p in matches if _format_of(p)]
        if not found:
            raise SourceError(
                f"no file matching {path} ({_SUPPORTED}); has the export landed? "
                "Otherwise check source.path"
            )
        return found
    if not target.is_file():
        # A missing export is an unreadable source (exit 1), not a configuration error: the
        # same config works once the file lands, and a scheduler should alert, not page a
        # config owner.
        raise SourceError(
            f"snapshot file {target} does not exist; has the export landed? "
            "Otherwise check source.path"
        )
    if _format_of(target) is None:
        raise ConfigError(f"{target}: unsupported format; {_SUPPORTED}")
    return [target]


def _read_file(path: Path, text_columns: Iterable[str], columns: list[str] | None) -> pa.Table:
    """One file as an Arrow table; ``text_columns`` are read as text (ids keep leading zeros).

    ``columns`` limits a Parquet read to those columns (when all exist; else all are read, so
    the caller can name the missing one).
    """
    kind = _format_of(path)
    try:
        if kind == "parquet":
            present = set(pq.read_schema(path).names)
            if columns is not None and present.issuperset(columns):
                return pq.read_table(path, columns=columns)
            return pq.read_table(path)
        if kind == "csv":
            options = pacsv.ConvertOptions(column_types=dict.fromkeys(text_columns, pa.string()))
            return pacsv.read_csv(path, convert_options=options)
        try:
            return pajson.read_json(path)
        except pa.ArrowInvalid:
            # Arrow wants one type per column; Engage traits mix them (1, "gold", true) in the
            # long layout's value column, so read such files value by value instead.
            return _read_json_lines(path)
    except (pa.ArrowInvalid, OSError, EOFError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc


def _read_json_lines(path: Path) -> pa.Table:
    records: list[dict[str, object]] = []
    opener: Callable[..., object] = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:  # type: ignore[attr-defined]
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(
                    f"{path}:{number}: not valid JSON ({exc.msg}); each line must be one object"
                ) from exc
            if not isinstance(record, dict):
                raise SourceError(
                    f"{path}:{number}: expected one JSON object per line, "
                    f"got {type(record).__name__}"
                )
            records.append(record)
    names = dict.fromkeys(name for record in records for name in record)
    columns: dict[str, pa.Array] = {}
    for name in names:
        values = [record.get(name) for record in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array([format_value(value) for value in values], pa.string())
    return pa.table(columns)


def _require(table: pa.Table, path: Path, wanted: Mapping[str, str]) -> None:
    """ConfigError for the first column of ``wanted`` (column -> setting) missing in ``path``."""
    for column, setting in wanted.items():
        if column not in table.column_names:
            raise ConfigError(
                f"column {column!r} not found in {path} (columns: "
                f"{', '.join(table.column_names)}); set {setting}"
            )


@dataclass
class _Origin:
    """Where each row of a concatenation of files came from."""

    files: list[str]
    starts: npt.NDArray[np.int64]  # first row of each file, then the total

    @classmethod
    def of(cls, files: Sequence[Path], tables: Sequence[pa.Table]) -> _Origin:
        sizes = [table.num_rows for table in tables]
        return cls([str(path) for path in files], np.concatenate([[0], np.cumsum(sizes)]))

    rows: Ints | None = None  # the rows of the concatenation these are, if a subset

    def locate(self, rows: Ints) -> tuple[list[str], list[int]]:
        """Source file and 1-based record number of each row."""
        if self.rows is not None:
            rows = self.rows[rows]
        which = np.searchsorted(self.starts, rows, side="right") - 1
        return [self.files[i] for i in which], (rows - self.starts[which] + 1).tolist()

    def subset(self, rows: Ints) -> _Origin:
        """The origin of ``rows`` of this one, numbered from 0."""
        return _Origin(self.files, self.starts, rows if self.rows is None else self.rows[rows])


# -- values ----------------------------------------------------------------------------------


def _flat(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    return array


def _bools(values: pa.Array | pa.ChunkedArray) -> Bools:
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=bool)


def _true_cells(flags: pa.Array) -> Bools:
    """Where ``flags`` is true, a null counting as false.

    ``flags AND is_valid(flags)`` in Kleene logic: a tenth of the time of ``fill_null``, which
    goes through Arrow's generic coalesce kernel (0.10 s a column of 10M cells, 20 columns).
    """
    return _bools(pc.and_kleene(flags, pc.is_valid(flags)))


def _python_text(values: pa.Array, formatter: Callable[[object], str | None]) -> pa.Array:
    return pa.array([formatter(value) for value in values.to_pylist()], pa.string())


def _float_text(values: pa.Array) -> pa.Array:
    """Floats as Python's shortest repr (``2.0``, ``450.5``, ``1e+16``); NaN is absent."""
    values = values.cast(pa.float64())
    numbers = values.fill_null(np.nan).to_numpy(zero_copy_only=False)
    text = pc.cast(values, pa.string())
    low, high = _FIXED_NOTATION
    magnitude = np.abs(numbers)
    fixed = ((magnitude >= low) & (magnitude < high)) | (numbers == 0)
    # Arrow writes integral floats without a fraction ("2"); Python's repr says "2.0".
    integral = fixed & (numbers == np.trunc(numbers))
    text = _replace(text, integral, pc.binary_join_element_wise(_pick(text, integral), ".0", ""))
    slow = ~fixed & ~np.isnan(numbers)
    exact = pa.array([repr(float(number)) for number in numbers[slow]], pa.string())
    text = _replace(text, slow, exact)
    nan = np.isnan(numbers)
    return _replace(text, nan, pa.nulls(int(nan.sum()), pa.string()))


def _few_distinct(values: pa.Array, sample: int = 1 << 16) -> bool:
    """Whether a sample of ``values`` repeats enough that encoding them first pays.

    The sample is large enough to see a column of a few thousand distinct values (products,
    cities) repeat: in a sample of 4096 such a column looked all but unique, and ten million
    of its strings were rendered and hashed one by one (0.9 s of CPU against 0.2 s to encode).
    """
    head = values.slice(0, sample)
    return len(head) == sample and len(pc.unique(head)) * 8 < sample


def _pick(values: pa.Array, mask: Bools) -> pa.Array:
    return values.filter(pa.array(mask))


def _replace(values: pa.Array, mask: Bools, replacements: pa.Array) -> pa.Array:
    """``values`` with the masked slots replaced, in order, by ``replacements``."""
    if not mask.any():
        return values
    return pc.replace_with_mask(values, pa.array(mask), replacements)


# Bytes that keys.dimension_safe keeps (every byte of a non-ASCII character is replaced).
_SAFE_BYTES: Final = np.zeros(256, dtype=bool)
_SAFE_BYTES[list(b"-_ !.*'()&$@=;:+,?0123456789")] = True
_SAFE_BYTES[ord("A") : ord("Z") + 1] = True
_SAFE_BYTES[ord("a") : ord("z") + 1] = True


def _all_safe(data: npt.NDArray[np.uint8]) -> bool:
    """Whether every byte is one :func:`sync.keys.dimension_safe` keeps.

    Looked up 64 KiB at a time into one small buffer, stopping at the first unsafe block: a
    lookup of the whole column made a bool per byte (a quarter of a gigabyte for ten million
    emails) and took 0.9 s where this takes 0.4 s.
    """
    block = 1 << 16
    found = np.empty(min(block, len(data)), dtype=bool)
    for start in range(0, len(data), block):
        part = data[start : start + block]
        if not np.take(_SAFE_BYTES, part, out=found[: len(part)]).all():
            return False
    return True


def _wire_safe(text: pa.Array) -> pa.Array:
    """:func:`sync.keys.dimension_safe` over a column: unsafe characters to ``_``, cut, empty
    to absent."""
    text = text.cast(pa.string())
    # Most columns are already safe: one table lookup over the bytes says so without a regex.
    _, offsets, data = text.buffers()
    if data is not None and len(text):
        ends = np.frombuffer(offsets, dtype=np.int32)[text.offset : text.offset + len(text) + 1]
        used = np.frombuffer(data, dtype=np.uint8)[ends[0] : ends[-1]]
        if not _all_safe(used):
            text = pc.replace_substring_regex(text, pattern=_UNSAFE, replacement="_")
    # Only ASCII is left, so bytes are characters.
    if len(text) and (pc.max(pc.binary_length(text)).as_py() or 0) > MAX_DIMENSION_LENGTH:
        text = pc.utf8_slice_codeunits(text, 0, MAX_DIMENSION_LENGTH)
    # Empty is absent; most columns hold no empty text, and are then returned without a copy.
    empty = pc.equal(pc.binary_length(text), 0)
    if not pc.any(empty).as_py():
        return text
    return pc.if_else(empty, pa.scalar(None, pa.string()), text)


def render(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Trait values as they go on the wire: :func:`sync.keys.wire_value`, a column at a time."""
    array = _flat(values)
    kind = array.type
    if pa.types.is_null(kind):
        return pa.nulls(len(array), pa.string())
    if pa.types.is_boolean(kind):
        return pc.if_else(array, "true", "false")
    if pa.types.is_integer(kind):
        return pc.cast(array, pa.string())
    if pa.types.is_floating(kind):
        if _few_distinct(array):
            # Scores, percentiles, rounded amounts: render each distinct value once.
            encoded = pc.dictionary_encode(array)
            return _float_text(encoded.dictionary).take(encoded.indices)
        return _float_text(array)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _wire_safe(array)
    # Dates, timestamps, decimals, lists, structs: rare and small; exact rendering per value.
    return _python_text(array, wire_value)


def _plain_text(values: pa.Array | pa.ChunkedArray, *, chunked: bool = False) -> Text:
    """Ids, names and emails as text, as they are (no dimension rule); blank is absent.

    ``chunked`` keeps text that comes in chunks (a Parquet row group each) as it is, instead
    of copying it into one array: ids and emails are most of a snapshot's bytes.
    """
    keep = chunked and isinstance(values, pa.ChunkedArray) and _is_text(values.type)
    array = values if keep else _flat(values)
    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        text = array.cast(pa.string())
    elif pa.types.is_integer(kind):
        text = pc.cast(array, pa.string())
    elif pa.types.is_floating(kind) and _integral(array):
        # An integer id column with a null, written by pandas, arrives as floats.
        text = pc.cast(array.cast(pa.int64()), pa.string())
    else:
        text = _python_text(array, format_value)
    # Blank (empty or only whitespace) without trimming a copy of every id first.
    blank = pc.or_(pc.utf8_is_space(text), pc.equal(pc.binary_length(text), 0))
    if not pc.any(blank).as_py():
        return text
    return pc.if_else(blank, pa.scalar(None, pa.string()), text)


def _integral(values: pa.Array) -> bool:
    numbers = values.fill_null(0.0).to_numpy(zero_copy_only=False)
    return bool(np.all(np.isfinite(numbers) & (numbers == np.round(numbers))))


def _members(values: pa.Array | pa.ChunkedArray, where: str) -> Bools:
    """Audience membership per cell: boolean true, true/yes/1 in any case, or the number 1."""
    array = _flat(values)
    kind = array.type
    if pa.types.is_null(kind):
        return np.zeros(len(array), dtype=bool)
    if pa.types.is_boolean(kind):
        return _true_cells(array)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return _true_cells(pc.equal(array, 1))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        words = pc.utf8_lower(pc.utf8_trim_whitespace(array))
        return _true_cells(pc.is_in(words, pa.array(_MEMBER_WORDS)))
    raise ConfigError(
        f"{where} holds {kind} values, which cannot be audience membership; expected booleans "
        "or true/false text (or list it under source.traits)"
    )


def _looks_boolean(values: pa.Array | pa.ChunkedArray, *, numbers: bool) -> bool:
    """Inference: a boolean column, or (text, and with ``numbers`` 0/1) only boolean words."""
    array = _flat(values)
    kind = array.type
    if pa.types.is_boolean(kind):
        return True
    if numbers and (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        present = array.drop_null()
        return len(present) > 0 and bool(
            pc.all(pc.is_in(present.cast(pa.float64()), pa.array([0.0, 1.0]))).as_py()
        )
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        allowed = pa.array(_BOOLEAN_WORDS if numbers else ("true", "false", "yes", "no"))
        # The first thousand cells settle most columns without a pass over all of them.
        return _only_words(array.slice(0, 1000), allowed) is not False and bool(
            _only_words(array, allowed)
        )
    return False


def _only_words(text: pa.Array, allowed: pa.Array) -> bool | None:
    """True: every non-blank cell is one of ``allowed``; False: one is not; None: all blank."""
    words = pc.utf8_lower(pc.utf8_trim_whitespace(text.drop_null()))
    words = words.filter(pc.not_equal(words, ""))  # a blank cell is an empty one
    if len(words) == 0:
        return None
    return bool(pc.all(pc.is_in(words, allowed)).as_py())


# -- keys ------------------------------------------------------------------------------------


def _key_map(names: Sequence[str], overrides: Mapping[str, str]) -> dict[str, str]:
    """Each audience/trait name -> its key; ConfigError on an empty, reserved or shared key."""
    keys: dict[str, str] = {}
    owner: dict[str, str] = {}
    for name in names:
        key = overrides.get(name) or snake_case(name)
        if not key:
            raise ConfigError(
                f"{name!r} gives an empty key; set one under [keys], e.g. {json.dumps(name)} = "
                '"my_key"'
            )
        if key in _RESERVED_KEYS or key.startswith("_"):
            raise ConfigError(
                f"{name!r} gives the key {key!r}, which is reserved for the customer's own "
                f'fields; set another under [keys], e.g. {json.dumps(name)} = "{key}_trait"'
            )
        if key in owner:
            raise ConfigError(
                f"{owner[key]!r} and {name!r} both give the key {key!r}; set one of them "
                f'apart under [keys], e.g. {json.dumps(name)} = "{key}_2"'
            )
        owner[key] = name
        keys[name] = key
    return keys


def _split(
    names: Sequence[str],
    source: SourceSettings,
    is_audience: Callable[[str], bool],
) -> tuple[list[str], list[str]]:
    """Which names are audiences and which traits: as configured, else inferred."""
    if source.audiences is not None and source.traits is not None:
        return list(source.audiences), list(source.traits)
    if source.audiences is not None:
        chosen = set(source.audiences)
        return list(source.audiences), [name for name in names if name not in chosen]
    if source.traits is not None:
        chosen = set(source.traits)
        return [name for name in names if name not in chosen], list(source.traits)
    audiences = [name for name in names if is_audience(name)]
    traits = [name for name in names if name not in set(audiences)]
    log.info("snapshot_keys_inferred", audiences=audiences, traits=traits)
    return audiences, traits


# -- layouts ---------------------------------------------------------------------------------


@dataclass
class _Invalid:
    """Rows left out, collected as columns."""

    ids: list[str | None] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def add(
        self, ids: Sequence[str | None], where: tuple[list[str], list[int]], reason: str
    ) -> None:
        self.ids.extend(ids)
        self.sources.extend(where[0])
        self.rows.extend(where[1])
        self.reasons.extend([reason] * len(ids))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "customer_id": pd.array(self.ids, dtype=TEXT_DTYPE),
                "source": pd.array(self.sources, dtype=TEXT_DTYPE),
                "row": pd.array(self.rows, dtype="int64"),
                "reason": pd.array(self.reasons, dtype=TEXT_DTYPE),
            }
        )

    def counts(self) -> dict[str, int]:
        return {reason: self.reasons.count(reason) for reason in dict.fromkeys(self.reasons)}


@dataclass
class _Users:
    """Users (or rows) as columns: ids, name, email, and per name its members or typed values."""

    ids: Text
    name: Text
    email: Text
    audiences: dict[str, Bools]
    traits: dict[str, pa.Array]
    fingerprints: tuple[U64, U64] | None = None  # of the ids, when already computed
    order: HashOrder | None = None  # of fingerprints[0], when already sorted

    def take(self, rows: Ints) -> _Users:
        """The users at ``rows``: sorted and unique, so as many rows as users are all of them
        (checking that against a range cost two column-sized arrays at the peak)."""
        if len(rows) == len(self.ids):
            return self
        return _Users(
            ids=_take(self.ids, rows),
            name=_take(self.name, rows),
            email=_take(self.email, rows),
            audiences={name: flags[rows] for name, flags in self.audiences.items()},
            traits={name: _take(values, rows) for name, values in self.traits.items()},
            fingerprints=None
            if self.fingerprints is None
            else (self.fingerprints[0][rows], self.fingerprints[1][rows]),
        )


def _take(values: Text, rows: Ints) -> Text:
    return values.take(pa.array(rows, type=pa.int64()))


def _scatter(values: pa.Array, owners: Ints, size: int) -> pa.Array:
    """A column of ``size`` users holding ``values[i]`` at ``owners[i]`` (null elsewhere)."""
    source = np.full(size, -1, dtype=np.int64)
    source[owners] = np.arange(len(owners))
    return values.take(pa.array(source, mask=source < 0))


def _codes(values: pa.Array) -> tuple[Ints, pa.Array]:
    """Dense codes of ``values`` (first seen = 0) and the distinct values."""
    encoded = pc.dictionary_encode(values)
    codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.intp)
    return codes, encoded.dictionary


def _read_all(
    files: Sequence[Path], wanted: Mapping[str, str], *, text: Iterable[str], only: bool
) -> tuple[pa.Table, _Origin]:
    """Every file, checked for the ``wanted`` columns (column -> setting), concatenated.

    ``only`` keeps just the wanted columns (Parquet then reads nothing else).
    """
    tables = []
    for path in files:
        table = _read_file(path, text, list(wanted) if only else None)
        _require(table, path, wanted)
        tables.append(table.select(list(wanted)) if only else table)
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ConfigError(
            f"the snapshot files do not share column types ({', '.join(map(str, files))}): "
            f"{exc}; give every file the same columns"
        ) from exc
    return table, _Origin.of(files, tables)


def _own_columns(source: SourceSettings) -> dict[str, str]:
    """The id, name and email columns (column -> setting): never audiences or traits."""
    own = {source.id_column: "source.id_column"}
    for column, setting in ((source.name_column, "name"), (source.email_column, "email")):
        if column:
            own[column] = f"source.{setting}_column"
    return own


def _optional_text(
    columns: Mapping[str, pa.ChunkedArray], column: str | None, size: int, *, chunked: bool = False
) -> Text:
    """The name or email column (see :func:`_plain_text`), or absent for all ``size`` users."""
    if column is None:
        return pa.nulls(size, pa.string())
    return _plain_text(columns[column], chunked=chunked)


def _without_missing_ids(ids: pa.Array, origin: _Origin, invalid: _Invalid) -> Bools:
    """Rows with an id; the others are recorded as ``missing_id``."""
    missing = _bools(ids.is_null())
    if missing.any():
        where = np.flatnonzero(missing)
        invalid.add([None] * len(where), origin.locate(where), MISSING_ID)
    return ~missing


def _void(ids: pa.Array, rows: Ints, origin: _Origin, invalid: _Invalid, reason: str) -> None:
    if len(rows):
        invalid.add(_take(ids, rows).to_pylist(), origin.locate(rows), reason)


def _wide(files: Sequence[Path], source: SourceSettings, invalid: _Invalid) -> _Users:
    rows, origin = _wide_columns(files, source)
    valid = np.flatnonzero(_without_missing_ids(rows.ids, origin, invalid))
    rows = rows.take(valid)
    rows.fingerprints = id_fingerprints(rows.ids)
    # Sorted once: to find repeated ids here, and to match the snapshot to the state later.
    rows.order = order_hashes(rows.fingerprints[0])
    return rows.take(_deduplicate(rows, origin.subset(valid), invalid))


def _wide_columns(files: Sequence[Path], source: SourceSettings) -> tuple[_Users, _Origin]:
    """Every row of the wide files, as columns.

    The table read is let go before its columns are made ready, and each audience and trait
    column is handed to its task alone, so its row groups are freed as soon as it is ready:
    a trait column is joined into one array here, and holding every column's row groups until
    the last was ready kept them all twice (2.7 GB at the peak of a 10M-user dry run).
    """
    own = _own_columns(source)
    configured = dict.fromkeys(source.audiences or (), "source.audiences")
    configured |= dict.fromkeys(source.traits or (), "source.traits")
    only = source.audiences is not None and source.traits is not None
    table, origin = _read_all(files, {**own, **configured}, text=own, only=only)
    size = table.num_rows
    audiences, traits = _kinds(table, own, source)
    columns = {name: table.column(name) for name in {*own, *audiences, *traits}}
    del table

    def handed_over(name: str) -> pa.ChunkedArray:
        # The id, name and email columns stay: a configuration may list one of them as an
        # audience or trait too (and learns later why it may not).
        return columns[name] if name in own else columns.pop(name)

    # Every column is made ready on a few threads at once: Arrow's kernels release the GIL,
    # and a space has dozens of audience columns.
    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="columns") as pool:
        values = {trait: pool.submit(_flat, handed_over(trait)) for trait in traits}
        flags = {
            audience: pool.submit(_members, handed_over(audience), f"audience column {audience!r}")
            for audience in audiences
        }
        ids = pool.submit(_plain_text, columns[source.id_column], chunked=True)
        name = pool.submit(_optional_text, columns, source.name_column, size, chunked=True)
        email = pool.submit(_optional_text, columns, source.email_column, size, chunked=True)
    rows = _Users(
        ids=ids.result(),
        name=name.result(),
        email=email.result(),
        audiences={audience: made.result() for audience, made in flags.items()},
        traits={trait: made.result() for trait, made in values.items()},
    )
    return rows, origin


def _kinds(
    table: pa.Table, own: Mapping[str, str], source: SourceSettings
) -> tuple[list[str], list[str]]:
    """The audience and trait columns of a wide table (see :func:`_split`)."""
    names = [column for column in table.column_names if column not in own]
    return _split(names, source, lambda name: _looks_boolean(table.column(name), numbers=False))


def _deduplicate(rows: _Users, origin: _Origin, invalid: _Invalid) -> Ints:
    """The rows to keep: one per id; ids whose rows disagree are voided."""
    candidates = np.arange(len(rows.ids))
    assert rows.fingerprints is not None  # set by the caller
    assert rows.order is not None
    # The sorted ids settle the usual case, no repeat at all, faster than a hash table.
    repeated = rows.order.repeated(rows.fingerprints[0])
    if not repeated.any():
        return candidates
    # Only rows whose id fingerprint repeats are compared, value by value, as rendered.
    suspects = candidates[repeated]
    some = rows.take(suspects)
    frame = pd.DataFrame(
        {
            "id": some.ids.to_pylist(),
            "name": some.name.to_pylist(),
            "email": some.email.to_pylist(),
            **{f"a:{name}": flags for name, flags in some.audiences.items()},
            **{f"t:{name}": render(values).to_pylist() for name, values in some.traits.items()},
        },
        index=suspects,
    )
    distinct = frame.drop_duplicates()
    conflicting = frame["id"].isin(set(distinct["id"][distinct["id"].duplicated()]))
    bad = frame.index[conflicting].to_numpy()
    _void(rows.ids, bad, origin, invalid, CONFLICTING_DUPLICATE)
    repeats = frame.index[frame["id"].duplicated() & ~conflicting].to_numpy()
    keep: Bools = ~np.isin(candidates, np.concatenate([bad, repeats]))
    return candidates[keep]


def _long(files: Sequence[Path], source: SourceSettings, invalid: _Invalid) -> _Users:
    wanted = {
        source.id_column: "source.id_column",
        source.key_column: "source.key_column",
        source.value_column: "source.value_column",
    }
    # CSV text stays text: in one value column of mixed keys a type guess means nothing.
    table, origin = _read_all(files, wanted, text=wanted, only=True)
    ids = _plain_text(table.column(source.id_column))
    keys = _plain_text(table.column(source.key_column))
    valid = _without_missing_ids(ids, origin, invalid)
    keyless = valid & _bools(keys.is_null())
    _void(ids, np.flatnonzero(keyless), origin, invalid, MISSING_KEY)
    rows = np.flatnonzero(valid & ~keyless)
    values = _take(_flat(table.column(source.value_column)), rows)
    user_of, user_ids = _codes(_take(ids, rows))
    key_of, key_names = _codes(_take(keys, rows))

    # One value per (user, key): identical repeats collapse; disagreeing ones void the user.
    pair = user_of.astype(np.int64) * len(key_names) + key_of
    conflicting = np.zeros(len(user_ids), dtype=bool)
    repeated = np.flatnonzero(pd.Index(pair).duplicated(keep=False))
    if len(repeated):
        texts = pd.Series(_take(render(values), repeated).to_pylist(), dtype=object)
        spread = texts.groupby(pair[repeated]).nunique(dropna=False)
        bad_pairs = spread.index[spread.to_numpy() > 1].to_numpy()
        conflicting[(bad_pairs // len(key_names)).astype(np.intp)] = True
        _void(ids, rows[conflicting[user_of]], origin, invalid, CONFLICTING_DUPLICATE)
    kept = np.flatnonzero(~conflicting)
    renumber = np.full(len(user_ids), -1, dtype=np.intp)
    renumber[kept] = np.arange(len(kept))
    use = ~np.asarray(pd.Index(pair).duplicated(keep="first"), dtype=bool) & ~conflicting[user_of]

    columns: dict[str, pa.Array] = {}
    for code, key in enumerate(key_names.to_pylist()):
        chosen = np.flatnonzero(use & (key_of == code))
        columns[str(key)] = _scatter(_take(values, chosen), renumber[user_of[chosen]], len(kept))
    absent = pa.nulls(len(kept), pa.string())
    name = _plain_text(columns.pop(source.name_column, absent)) if source.name_column else absent
    email = _plain_text(columns.pop(source.email_column, absent)) if source.email_column else absent
    for configured in (*(source.audiences or ()), *(source.traits or ())):
        if configured not in columns:
            log.info("snapshot_key_without_rows", key=configured)
            columns[configured] = absent
    names = sorted(columns)
    audiences, traits = _split(
        names, source, lambda key: _looks_boolean(columns[key], numbers=True)
    )
    return _Users(
        ids=_take(user_ids, kept),
        name=name,
        email=email,
        audiences={key: _members(columns[key], f"audience {key!r}") for key in audiences},
        traits={key: columns[key] for key in traits},
    )


def _membership(files: Sequence[Path], source: SourceSettings, invalid: _Invalid) -> _Users:
    if source.traits:
        raise ConfigError(
            "the membership layout lists audience members only; remove source.traits or use "
            "the wide or long layout"
        )
    by_audience = {_stem(path): path for path in files}
    chosen = list(source.audiences) if source.audiences is not None else sorted(by_audience)
    lacking = [name for name in chosen if name not in by_audience]
    if lacking:
        raise ConfigError(
            f"no membership file for audience {lacking[0]!r} among "
            f"{', '.join(map(str, files))}; name the file after the audience, e.g. "
            f"'{lacking[0]}.csv', or remove it from source.audiences"
        )
    paths = [by_audience[name] for name in chosen]
    own = _own_columns(source)
    table, origin = _read_all(paths, own, text=own, only=True)
    audience_of = np.searchsorted(origin.starts, np.arange(table.num_rows), side="right") - 1
    ids = _plain_text(table.column(source.id_column))
    rows = np.flatnonzero(_without_missing_ids(ids, origin, invalid))
    user_of, user_ids = _codes(_take(ids, rows))
    columns = dict(zip(table.column_names, table.columns, strict=True))
    name = _take(_optional_text(columns, source.name_column, table.num_rows), rows)
    email = _take(_optional_text(columns, source.email_column, table.num_rows), rows)
    # A user's rows differ by audience, but must not by name or email.
    conflicting = _disagree(user_of, name, len(user_ids)) | _disagree(user_of, email, len(user_ids))
    _void(ids, rows[conflicting[user_of]], origin, invalid, CONFLICTING_DUPLICATE)
    kept = np.flatnonzero(~conflicting)
    renumber = np.full(len(user_ids), -1, dtype=np.intp)
    renumber[kept] = np.arange(len(kept))
    use = np.flatnonzero(~conflicting[user_of])
    owner = renumber[user_of[use]]
    audiences = {}
    for index, audience in enumerate(chosen):
        flags = np.zeros(len(kept), dtype=bool)
        flags[owner[audience_of[rows[use]] == index]] = True
        audiences[audience] = flags
    return _Users(
        ids=_take(user_ids, kept),
        name=_first_present(_take(name, use), owner, len(kept)),
        email=_first_present(_take(email, use), owner, len(kept)),
        audiences=audiences,
        traits={},
    )


def _disagree(owner: Ints, values: pa.Array, size: int) -> Bools:
    """Per user: its rows hold more than one distinct non-null value."""
    present = np.flatnonzero(_bools(values.is_valid()))
    result = np.zeros(size, dtype=bool)
    if len(present):
        texts = pd.Series(_take(values, present).to_pylist(), dtype=object)
        spread = texts.groupby(owner[present]).nunique()
        result[spread.index[spread.to_numpy() > 1].to_numpy()] = True
    return result


def _first_present(values: pa.Array, owner: Ints, size: int) -> pa.Array:
    """Per user, the first non-null value among its rows."""
    present = np.flatnonzero(_bools(values.is_valid()))
    users, first = np.unique(owner[present], return_index=True)
    return _scatter(_take(values, present[first]), users, size)


# -- wide Parquet, read against the state ----------------------------------------------------

# Rows a part at most: a Parquet row group as writers make them. Parts bound what is held at
# once; smaller ones cost more CPU (ten million users in parts of 2**18 rows: 2 s more).
_PART_ROWS: Final = 1 << 20
# Parts a thread at least, so a snapshot of a million users is hashed on every core too.
_PARTS_A_WORKER: Final = 2


@dataclass(frozen=True)
class _SettlingColumns:
    """What a wide Parquet snapshot read against the state reads, and each column's key;
    ``footers`` are its files' Parquet metadata, read once."""

    audiences: list[str]
    traits: list[str]
    keys: dict[str, str]
    read: list[str]
    footers: list[pq.FileMetaData]


def _settling_columns(
    files: Sequence[Path],
    source: SourceSettings,
    key_overrides: Mapping[str, str],
    known_audiences: Collection[str],
) -> _SettlingColumns | None:
    """The columns when ``files`` can be read a part at a time against the state; None for a
    snapshot to read whole (which also reports whatever is wrong with it).

    A part at a time, a column's kind must follow from its type: configured, or a boolean
    (audience) or number (trait) column. Text columns are inferred from their values, and an
    inferred column whose key the state knows as an audience may be one that lost its last
    member (see :func:`_keep_known_audiences`): both need the whole column.
    """
    if source.layout != "wide" or any(_format_of(path) != "parquet" for path in files):
        return None
    try:
        footers = [pq.read_metadata(path) for path in files]
    except (pa.ArrowInvalid, OSError):
        return None
    schemas = [footer.schema.to_arrow_schema() for footer in footers]
    schema = schemas[0]
    if any(not other.equals(schema, check_metadata=False) for other in schemas[1:]):
        return None
    own = _own_columns(source)
    configured = [*(source.audiences or ()), *(source.traits or ())]
    if any(column not in schema.names for column in [*own, *configured]):
        return None
    undecided: list[str] = []

    def typed_audience(name: str) -> bool:
        kind = schema.field(name).type
        if not _is_number(kind):
            undecided.append(name)
        return bool(pa.types.is_boolean(kind))

    names = [name for name in schema.names if name not in own]
    audiences, traits = _split(names, source, typed_audience)
    if undecided:
        return None
    try:
        keys = _key_map([*audiences, *traits], key_overrides)
    except ConfigError:
        return None
    inferred = source.audiences is None and source.traits is None
    if inferred and any(keys[name] in known_audiences for name in traits):
        return None
    return _SettlingColumns(audiences, traits, keys, list(dict.fromkeys([*own, *keys])), footers)


def _part_rows(total: int) -> int:
    """Rows a part for a snapshot of ``total`` rows: :data:`_PARTS_A_WORKER` parts a thread or
    more, of at most :data:`_PART_ROWS` rows."""
    return max(1, min(_PART_ROWS, -(-total // (WORKERS * _PARTS_A_WORKER))))


def _parts(files: Sequence[Path], columns: _SettlingColumns, rows: int) -> Iterator[pa.RecordBatch]:
    """Each file's columns to read, a part at a time (see :func:`_part_rows`)."""
    for path, footer in zip(files, columns.footers, strict=True):
        try:
            parquet = pq.ParquetFile(path, metadata=footer)
            yield from parquet.iter_batches(batch_size=rows, columns=columns.read)
        except (pa.ArrowInvalid, OSError, EOFError) as exc:
            raise SourceError(f"cannot read {path}: {exc}") from exc


def _read_settling(
    files: Sequence[Path],
    source: SourceSettings,
    columns: _SettlingColumns,
    against: Callable[[], KnownState],
    progress: Callable[[int, int, int], None] | None,
) -> Snapshot:
    """The snapshot read a part at a time, settled against the state as each part arrives.

    Parts are hashed and matched on the pool, a part a thread, while the next decodes; the
    first ones hash while the state may still be loading. At most a few parts, the state's
    fingerprints and the users kept are held at once: a dry run of ten million users peaks at
    1.5 GiB so, at 2.5 GiB reading the snapshot whole.
    """
    sizes = [footer.num_rows for footer in columns.footers]
    origin = _Origin([str(path) for path in files], np.concatenate([[0], np.cumsum(sizes)]))
    total = sum(sizes)
    invalid = _Invalid()
    if progress is not None:
        progress(0, total, 0)
    kept: list[_Users] = []
    kept_rows: list[Ints] = []
    nulls = dict.fromkeys(columns.traits, 0)
    start = with_id = 0
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="settler") as waiting,
        ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="parts") as pool,
    ):
        settler = waiting.submit(lambda: Settler(against()))
        pending: deque[Future[_MatchedPart]] = deque()

        def settle_oldest() -> None:
            nonlocal start, with_id
            part = pending.popleft().result()
            missing = np.ones(part.size, dtype=bool)
            missing[part.valid] = False
            where = start + np.flatnonzero(missing)
            if len(where):
                invalid.add([None] * len(where), origin.locate(where), MISSING_ID)
            for name, values in part.users.traits.items():
                nulls[name] += values.null_count
            keep = settler.result().keep(part.positions, part.records, part.members)
            rows = np.flatnonzero(keep)
            kept.append(part.users.take(rows))
            kept_rows.append(start + part.valid[rows])
            start += part.size
            with_id += len(part.valid)
            if progress is not None:
                progress(start, total, len(invalid.ids))

        for part in _ahead(_parts(files, columns, _part_rows(total))):
            pending.append(pool.submit(_matched_part, part, source, columns, settler))
            if len(pending) >= WORKERS:
                settle_oldest()
        while pending:
            settle_oldest()
    if not kept:
        raise UnsettledError("the snapshot files hold no row")
    for name, count in nulls.items():
        if with_id and count == with_id:
            _warn_empty(name)
    users = _joined(kept)
    rows = _deduplicate(users, origin.subset(np.concatenate(kept_rows)), invalid)
    return _snapshot(users.take(rows), columns.keys, invalid, files, settler.result().settled())


def _ahead(items: Iterator[_T]) -> Iterator[_T]:
    """``items``, the next one made on a thread while the caller works on this one."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as thread:
        coming = thread.submit(next, items, None)
        while (item := coming.result()) is not None:
            coming = thread.submit(next, items, None)
            yield item


@dataclass(frozen=True)
class _MatchedPart:
    """One part of a snapshot: its users with an id (and which rows they are), hashed and
    matched to the state."""

    size: int
    valid: Ints
    users: _Users
    records: U64
    members: dict[str, Bools]
    positions: Ints


def _matched_part(
    part: pa.RecordBatch,
    source: SourceSettings,
    columns: _SettlingColumns,
    settler: Future[Settler],
) -> _MatchedPart:
    """One part's users hashed as :func:`_frame` hashes a whole snapshot, and matched."""
    size = part.num_rows
    data = dict(zip(part.schema.names, part.columns, strict=True))
    ids = _plain_text(data[source.id_column])
    valid = np.flatnonzero(~_bools(ids.is_null()))
    users = _Users(
        ids=ids,
        name=_optional_text(data, source.name_column, size),
        email=_optional_text(data, source.email_column, size),
        audiences={
            name: _members(data[name], f"audience column {name!r}") for name in columns.audiences
        },
        traits={name: _flat(data[name]) for name in columns.traits},
    ).take(valid)
    keys = columns.keys
    fingerprint = RecordFingerprint(len(users.ids))
    fingerprint.add_strings("name", users.name)
    fingerprint.add_strings("email", users.email)
    members = {keys[name]: flags for name, flags in users.audiences.items()}
    fingerprint.add_flags(members)
    for name, raw in users.traits.items():
        _trait(fingerprint, keys[name], raw)
    users.fingerprints = id_fingerprints(users.ids)
    positions = settler.result().match(users.fingerprints)
    return _MatchedPart(size, valid, users, fingerprint.finish(), members, positions)


def _joined(parts: Sequence[_Users]) -> _Users:
    """The users of every part, in order, as one, with their id fingerprints (every part's
    are set: it was matched by them) and those sorted, for the deduplication."""
    first = parts[0]

    def text(of: Callable[[_Users], Text]) -> pa.Array:
        return pa.concat_arrays([_flat(of(part)) for part in parts])

    hashes, checks = [], []
    for part in parts:
        assert part.fingerprints is not None
        hashes.append(part.fingerprints[0])
        checks.append(part.fingerprints[1])
    id_hashes = np.concatenate(hashes)
    return _Users(
        ids=text(lambda part: part.ids),
        name=text(lambda part: part.name),
        email=text(lambda part: part.email),
        audiences={
            name: np.concatenate([part.audiences[name] for part in parts])
            for name in first.audiences
        },
        traits={
            name: pa.concat_arrays([part.traits[name] for part in parts]) for name in first.traits
        },
        fingerprints=(id_hashes, np.concatenate(checks)),
        order=order_hashes(id_hashes),
    )


# -- the snapshot ----------------------------------------------------------------------------


_LAYOUTS: Final = {"wide": _wide, "long": _long, "membership": _membership}


def _keep_known_audiences(
    users: _Users,
    source: SourceSettings,
    key_overrides: Mapping[str, str],
    known_audiences: Collection[str],
) -> None:
    """An inferred, entirely empty column whose key the state knows as an audience stays one.

    Inference cannot tell an empty column's kind, and reading it as a trait would make an
    audience that lost its last member stop being managed, so its members would never get
    their ``"false"``. Configured audiences and traits are left as configured.
    """
    if not known_audiences or source.audiences is not None or source.traits is not None:
        return
    for name, values in list(users.traits.items()):
        key = key_overrides.get(name) or snake_case(name)
        if key in known_audiences and values.null_count == len(values):
            del users.traits[name]
            users.audiences[name] = np.zeros(len(values), dtype=bool)
            log.info("snapshot_empty_column_kept_as_audience", column=name, key=key)


def read_snapshot(
    source: SourceSettings,
    key_overrides: Mapping[str, str],
    *,
    known_audiences: Collection[str] = (),
    against: Callable[[], KnownState] | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> Snapshot:
    """Read, validate and normalise the snapshot ``source`` describes.

    ``known_audiences``: the audience keys of the stored state, so an inferred column that is
    empty today keeps the kind it had (see :func:`_keep_known_audiences`).

    ``against`` gives the state the diff will compare with (it may wait for it to load). Wide
    Parquet files are then read a part at a time and matched to it as they arrive: users whose
    stored fingerprint vouches for them are settled (see :mod:`sync.settle`) and only the
    others' values kept. Any other snapshot, or one the state cannot settle, is read whole.
    ``progress`` is then told, after each part, the rows read, the rows in all and the rows
    left out so far.
    """
    reader = _LAYOUTS.get(source.layout)
    if reader is None:
        raise ConfigError(
            f"unknown source.layout {source.layout!r}; use one of {', '.join(_LAYOUTS)}"
        )
    files = resolve_files(source.path)
    if against is not None:
        columns = _settling_columns(files, source, key_overrides, known_audiences)
        if columns is not None:
            try:
                return _read_settling(files, source, columns, against, progress)
            except UnsettledError as reason:
                log.info("snapshot_read_whole", reason=str(reason))
    invalid = _Invalid()
    users = reader(files, source, invalid)
    _keep_known_audiences(users, source, key_overrides, known_audiences)
    keys = _key_map([*users.audiences, *users.traits], key_overrides)
    for name, values in users.traits.items():
        if len(values) and values.null_count == len(values):
            _warn_empty(name)
    return _snapshot(users, keys, invalid, files)


def _warn_empty(column: str) -> None:
    log.warning(
        "snapshot_column_empty",
        column=column,
        hint="an empty column is read as a trait; list audiences under source.audiences",
    )


def _snapshot(
    users: _Users,
    keys: Mapping[str, str],
    invalid: _Invalid,
    files: Sequence[Path],
    settled: Settled | None = None,
) -> Snapshot:
    """The snapshot of validated ``users`` (and of the ``settled`` ones, left out)."""
    frame, traits = _frame(users, keys)
    snapshot = Snapshot(
        base=frame,
        traits=traits,
        audience_keys=tuple(keys[name] for name in users.audiences),
        trait_keys=tuple(keys[name] for name in users.traits),
        key_names={key: name for name, key in keys.items()},
        invalid=invalid.frame(),
        invalid_counts=invalid.counts(),
        files=tuple(str(path) for path in files),
        id_order=users.order,
        settled=settled,
    )
    log.info(
        "snapshot_read",
        files=len(files),
        users=len(frame) + (0 if settled is None else settled.count),
        settled=0 if settled is None else settled.count,
        audiences=len(snapshot.audience_keys),
        traits=len(snapshot.trait_keys),
        invalid=dict(snapshot.invalid_counts),
    )
    return snapshot


def _frame(users: _Users, keys: Mapping[str, str]) -> tuple[pd.DataFrame, dict[str, TraitValues]]:
    """The canonical users frame without the traits, fingerprints included; the traits.

    The audience flags of ``users`` become the frame's codes in place: only their names are
    left in ``users.audiences``.

    Each column is hashed (and a text trait rendered) on a few threads at once, the audiences
    on this one: the columns are independent, and most of their passes release the GIL (ten
    million users with 20 audiences and 5 traits: 3.2 s one column after another, 2.1 s so,
    for 0.3 s more CPU).
    """
    fingerprint = RecordFingerprint(len(users.ids))
    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="frame") as pool:
        own = {
            column: pool.submit(_own_text, fingerprint, column, values)
            for column, values in (("name", users.name), ("email", users.email))
        }
        made = {
            keys[name]: pool.submit(_trait, fingerprint, keys[name], raw)
            for name, raw in users.traits.items()
        }
        index = pool.submit(_text_array, users.ids)
        data: dict[str, object] = {column: text.result() for column, text in own.items()}
        data |= _audience_codes(fingerprint, users, keys)
        traits = {key: values.result() for key, values in made.items()}
        data[HASH] = fingerprint.finish()
        data[ID_HASH], data[ID_CHECK] = users.fingerprints or id_fingerprints(users.ids)
        ids = pd.Index(index.result(), name=INDEX_NAME)
    # Every array here is new and this frame's alone: copying them (the default for a dict)
    # cost seconds at 10M users and a second copy of each column.
    frame = pd.DataFrame(data, index=ids, copy=False)
    return frame[["name", "email", *(keys[n] for n in users.audiences), *FINGERPRINTS]], traits


def _own_text(
    fingerprint: RecordFingerprint, column: str, values: Text
) -> pd.arrays.ArrowStringArray:
    """The customer's name or email: added to the fingerprint, and as the frame holds it."""
    fingerprint.add_strings(column, values)
    return _text_array(values)


def _audience_codes(
    fingerprint: RecordFingerprint, users: _Users, keys: Mapping[str, str]
) -> dict[str, pd.Categorical]:
    """The audiences added to the fingerprint, then each as the frame's categorical codes."""
    fingerprint.add_flags({keys[name]: flags for name, flags in users.audiences.items()})
    codes: dict[str, pd.Categorical] = {}
    for name, flags in users.audiences.items():
        # 1 ("true") for a member, -1 (absent) otherwise, made in place: the flags become the
        # codes, so twenty audiences of ten million users are not held twice (200 MB).
        member = flags.view(np.int8)
        member <<= 1
        member -= 1
        codes[keys[name]] = pd.Categorical.from_codes(member, dtype=AUDIENCE_DTYPE)
    users.audiences = dict.fromkeys(users.audiences, np.zeros(0, dtype=bool))  # spent above
    return codes


def _trait(fingerprint: RecordFingerprint, key: str, raw: pa.Array) -> TraitValues:
    """One computed trait added to the fingerprint, and as the snapshot keeps it."""
    if _is_number(raw.type):
        # Hash the typed numbers (see sync.fingerprint) and leave their text for later:
        # only the users the diff compares or sends are ever rendered.
        fingerprint.add_numbers(key, raw)
        return TraitValues(raw, render, _renders_present(raw))
    if _is_text(raw.type) and _few_distinct(raw):
        # Plans, tiers, product names: each distinct value is rendered and hashed once,
        # and the column stays codes into those few words.
        encoded = pc.dictionary_encode(raw)
        words = render(encoded.dictionary)
        text = pa.DictionaryArray.from_arrays(encoded.indices, words)
        codes = dictionary_codes(text)  # once, for the fingerprint and for presence
        fingerprint.add_coded(key, words, codes)
        # A user's value is there when its code and its word are not null (a null code
        # looks up the last slot, False).
        present = np.append(_bools(words.is_valid()), False)[codes]
        return TraitValues(text, _decoded, present)
    text = render(raw)
    fingerprint.add_strings(key, text)
    return TraitValues.of_text(text)


def _renders_present(values: pa.Array) -> Bools:
    """Per cell of a number or boolean column: :func:`render` gives a value (NaN is absent)."""
    if pa.types.is_floating(values.type):
        # Valid AND not NaN in Kleene logic (a null's NaN test is null, and false AND null is
        # false): one kernel pass, where fill_null's coalesce took 0.13 s a column of 10M.
        return _bools(pc.and_kleene(pc.is_valid(values), pc.invert(pc.is_nan(values))))
    return _bools(values.is_valid())


def _is_text(kind: pa.DataType) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _decoded(values: pa.Array) -> pa.Array:
    """Wire text kept as a dictionary array, as plain text."""
    return values.dictionary_decode()


def _is_number(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind)
    )


def _text_array(values: Text) -> pd.arrays.ArrowStringArray:
    text = values.cast(pa.string())
    return pd.arrays.ArrowStringArray(
        text if isinstance(text, pa.ChunkedArray) else pa.chunked_array([text])
    )
