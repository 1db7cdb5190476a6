"""The users table on disk and back: Parquet conversion, and folding checkpoints in.

The table belongs to the diff engine; this module only keeps it faithfully. Every column keeps
its dtype through a round trip via the pandas metadata Parquet carries (nullable strings stay
nullable strings, arrow-backed; ``uint64`` stays ``uint64``; categoricals stay categorical), the
index keeps its name, and rows are stored sorted by customer id. On disk a string categorical
is kept as its integer codes (:func:`encode_categories`), which Parquet reads far faster than
mostly-null dictionary pages; the tables on either side of the file are pyarrow's own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

DEFAULT_INDEX_NAME = "customer_id"
# Schema metadata listing the categorical columns stored as their integer codes.
_CATEGORIES_META = b"amberflo_sync_categories"


def empty_users() -> pd.DataFrame:
    """The users table of a state that has never been committed: no rows, name and email."""
    index = pd.Index([], dtype="string", name=DEFAULT_INDEX_NAME)
    return pd.DataFrame(
        {
            "name": pd.Series(index=index, dtype="string"),
            "email": pd.Series(index=index, dtype="string"),
        },
        index=index,
    )


def index_column(schema: pa.Schema) -> str:
    """The name of the column holding the customer ids in a table made by :func:`to_table`."""
    metadata = schema.pandas_metadata or {}
    columns = metadata.get("index_columns") or []
    if len(columns) != 1 or not isinstance(columns[0], str):
        raise ValueError("the table carries no customer id index")
    return str(columns[0])


def to_table(users: pd.DataFrame) -> pa.Table:
    """The users table as Arrow, sorted by id; ``ValueError`` if the ids are not usable.

    Ids must be non-null, unique strings: they are the key every later upsert matches on.
    """
    return _checked(_from_pandas(users))


def to_coded_table(users: pd.DataFrame) -> pa.Table:
    """``encode_categories(to_table(users))``, made straight from pandas' category codes.

    What a commit writes: building an Arrow dictionary per categorical column (a validity
    bitmap from the codes) only for :func:`encode_categories` to turn it back into the codes
    was most of the conversion's cost (a million users, twenty audiences: 0.15 s of 0.17 s).
    """
    return _checked(_from_pandas(users, coded=True))


def _checked(table: pa.Table) -> pa.Table:
    """``table`` sorted by id; ``ValueError`` if the ids are not usable."""
    id_column = index_column(table.schema)
    ids = table.column(id_column)
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        raise ValueError(f"customer ids must be strings, not {ids.type}")
    if ids.null_count:
        raise ValueError(f"{ids.null_count} users have a null customer id")
    if len(ids) > 1 and not pc.all(pc.less(ids[:-1], ids[1:])).as_py():
        # Not strictly increasing: sort (Arrow's order is code point order, as pandas' is),
        # then any duplicate sits next to its twin.
        table = table.sort_by([(id_column, "ascending")])
        ids = table.column(id_column)
        twins = pc.equal(ids[:-1], ids[1:])
        if pc.any(twins).as_py():
            first = pc.index(twins, True).as_py()
            raise ValueError(f"customer id {ids[first].as_py()!r} appears more than once")
    return table


def _from_pandas(users: pd.DataFrame, *, coded: bool = False) -> pa.Table:
    """``pa.Table.from_pandas(users, preserve_index=True)``, without its cost on a string index.

    Converting each column, pyarrow probes the Series for attributes, and pandas answers such a
    probe by looking the name up in the Series' index, which builds a hash table of every id
    (0.6 s per million users). So the data is converted with the ids as an ordinary column, and
    the pandas metadata describing the index is taken from converting zero rows. ``coded``:
    string categoricals become their codes, as :func:`encode_categories` stores them.
    """
    if isinstance(users.index, pd.MultiIndex):
        raise TypeError("the users table must be indexed by customer id, not a MultiIndex")
    template = pa.Table.from_pandas(users.iloc[:0], preserve_index=True)
    metadata = template.schema.pandas_metadata
    id_column = index_column(template.schema)
    codes = _string_category_codes(users, template.schema) if coded else {}
    table = pa.Table.from_pandas(
        users.drop(columns=list(codes)).rename_axis(id_column).reset_index(),
        preserve_index=False,
    )
    converted = {entry["field_name"]: entry for entry in table.schema.pandas_metadata["columns"]}
    metadata["columns"] = [
        entry
        if entry["field_name"] == id_column or entry["field_name"] in codes
        else converted[entry["field_name"]]
        for entry in metadata["columns"]
    ]
    schema_metadata = {**(table.schema.metadata or {}), b"pandas": json.dumps(metadata).encode()}
    if codes:
        specs = {name: spec for name, (_, spec) in codes.items()}
        schema_metadata[_CATEGORIES_META] = json.dumps(specs).encode()
    columns = {
        name: codes[name][0] if name in codes else table.column(name)
        for name in template.column_names
    }
    return pa.table(columns).replace_schema_metadata(schema_metadata)


def _string_category_codes(
    users: pd.DataFrame, schema: pa.Schema
) -> dict[str, tuple[pa.Array, dict[str, Any]]]:
    """Per categorical column that Arrow makes a string dictionary of: its codes (-1 = NA) as
    Arrow, and the spec :func:`encode_categories` records for it."""
    coded: dict[str, tuple[pa.Array, dict[str, Any]]] = {}
    for field in schema:
        kind = field.type
        if not pa.types.is_dictionary(kind) or not (
            pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)
        ):
            continue
        series = users[field.name]
        spec = {
            "categories": [str(value) for value in series.cat.categories],
            "large": pa.types.is_large_string(kind.value_type),
            "ordered": kind.ordered,
        }
        # The Categorical's own codes: ``series.cat.codes`` would build a Series around them.
        codes = series.array.codes
        coded[field.name] = (pa.array(codes, type=kind.index_type), spec)
    return coded


def encode_categories(table: pa.Table) -> pa.Table:
    """``table`` with each string categorical stored as its codes (-1 = NA), for Parquet.

    Parquet keeps a dictionary column as dictionary pages plus definition levels, and decoding
    those for twenty mostly-absent audience columns was most of the load time; plain integer
    codes without nulls read about four times faster. The categories go into the schema
    metadata, and :func:`decode_categories` restores the exact dictionary columns.
    """
    # Columns coded already (see :func:`to_coded_table`) keep their entries, first.
    coded: dict[str, Any] = dict(_coded_columns(table.schema))
    table = table.unify_dictionaries()
    for position, field in enumerate(table.schema):
        kind = field.type
        if not pa.types.is_dictionary(kind) or not (
            pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)
        ):
            continue
        column = table.column(position)
        dictionary = column.chunk(0).dictionary if column.num_chunks else pa.array([], pa.string())
        codes = pc.fill_null(
            pa.chunked_array([chunk.indices for chunk in column.chunks], kind.index_type), -1
        )
        coded[field.name] = {
            "categories": dictionary.to_pylist(),
            "large": pa.types.is_large_string(kind.value_type),
            "ordered": kind.ordered,
        }
        table = table.set_column(position, pa.field(field.name, kind.index_type), codes)
    if not coded:
        return table
    return table.replace_schema_metadata(
        {**(table.schema.metadata or {}), _CATEGORIES_META: json.dumps(coded).encode()}
    )


def decode_categories(table: pa.Table) -> pa.Table:
    """Undo :func:`encode_categories`: integer codes back to the dictionary columns."""
    for name, spec in _coded_columns(table.schema).items():
        position = table.schema.get_field_index(name)
        codes = table.column(position).combine_chunks()
        value_type = pa.large_string() if spec["large"] else pa.string()
        kind = pa.dictionary(codes.type, value_type, ordered=spec["ordered"])
        restored = pa.DictionaryArray.from_arrays(
            pc.if_else(pc.less(codes, 0), None, codes),
            pa.array(spec["categories"], value_type),
            ordered=spec["ordered"],
        )
        table = table.set_column(position, pa.field(name, kind), restored)
    metadata = table.schema.metadata or {}
    return table.replace_schema_metadata(
        {key: value for key, value in metadata.items() if key != _CATEGORIES_META}
    )


def coded_columns(schema: pa.Schema) -> list[str]:
    """The columns of a table made by :func:`encode_categories` that hold categorical codes."""
    return list(_coded_columns(schema))


def trait_text_columns(schema: pa.Schema) -> list[str]:
    """The text columns of a users table that hold trait values: every text column but the
    ids, ``name`` and ``email``."""
    own = {index_column(schema), "name", "email"}
    return [
        field.name
        for field in schema
        if field.name not in own
        and (pa.types.is_string(field.type) or pa.types.is_large_string(field.type))
    ]


def _coded_columns(schema: pa.Schema) -> dict[str, Any]:
    """The columns of ``schema`` that hold categorical codes, with their categories."""
    raw = (schema.metadata or {}).get(_CATEGORIES_META)
    if raw is None:
        return {}
    coded: dict[str, Any] = json.loads(raw)
    return {name: spec for name, spec in coded.items() if name in schema.names}


def to_frame(table: pa.Table) -> pd.DataFrame:
    """The users table back from Arrow, with the dtypes and index it was written with.

    ``table`` may hold categoricals as codes (as read from disk): they become categoricals
    straight from their codes, never passing through per-chunk Arrow dictionaries.
    """
    index_dtype = _index_string_dtype(table.schema)
    coded = _coded_columns(table.schema)
    order = [name for name in table.column_names if name != index_column(table.schema)]
    codes = {name: table.column(name).to_numpy() for name in coded}
    # split_blocks keeps one block per column (no consolidation copy); self_destruct frees
    # each Arrow column once converted, so the peak is about one table, not two.
    frame: pd.DataFrame = table.drop_columns(list(coded)).to_pandas(
        split_blocks=True, self_destruct=True
    )
    for name, spec in coded.items():
        dtype = pd.CategoricalDtype(pd.Index(spec["categories"]), ordered=spec["ordered"])
        frame[name] = pd.Categorical.from_codes(codes[name], dtype=dtype)
    if coded:
        frame = frame[order]
    if index_dtype is not None and frame.index.dtype != index_dtype:
        # pyarrow restores extension dtypes for columns but not for the index.
        frame.index = frame.index.astype(index_dtype)
    return frame


def _index_string_dtype(schema: pa.Schema) -> Any:
    """The pandas string dtype the index was written with (None if not a string dtype)."""
    metadata = schema.pandas_metadata or {}
    field = index_column(schema) if metadata.get("index_columns") else None
    for entry in metadata.get("columns", []):
        if entry.get("field_name") == field and entry.get("numpy_type") in ("string", "str"):
            return pd.api.types.pandas_dtype(entry["numpy_type"])
    return None


def upsert(base: pd.DataFrame, updates: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """``base`` with each update's rows replacing or adding rows by id, in order.

    An update row replaces the whole stored row: a column it lacks becomes NA for that row
    (a stale extra such as a row hash must not survive a change). Columns of every frame are
    kept; where a column must now hold NA and its dtype cannot (``uint64``, ``bool``), it
    becomes the pandas nullable counterpart. The result is sorted by id.
    """
    if not updates:
        return base
    frames = [base, *updates]
    sizes = [len(frame) for frame in frames]
    index = _concat_index([frame.index for frame in frames])
    columns = list(dict.fromkeys(column for frame in frames for column in frame.columns))
    data = {
        column: _concat_column(
            [frame[column] if column in frame.columns else None for frame in frames], sizes
        )
        for column in columns
    }
    merged = pd.DataFrame(data, index=index, columns=columns)
    merged = merged[~index.duplicated(keep="last")]
    return merged.sort_index(kind="stable")


def _concat_index(indexes: Sequence[pd.Index]) -> pd.Index:
    reference = next((index for index in indexes if len(index)), indexes[0])
    combined = indexes[0].append(list(indexes[1:]))
    if combined.dtype != reference.dtype:
        combined = combined.astype(reference.dtype)
    return combined.rename(reference.name)


def _concat_column(parts: Sequence[pd.Series | None], sizes: Sequence[int]) -> Any:
    """One column over all frames (``None`` = the frame lacks it), as an array."""
    present = [part for part in parts if part is not None]
    reference = next((part.dtype for part in present if len(part)), present[0].dtype)
    lacking = any(part is None and size for part, size in zip(parts, sizes, strict=True))
    target = _nullable(reference) if lacking else reference
    if isinstance(target, pd.CategoricalDtype):
        target = _union_categories(target, present)
    pieces = [
        _as_dtype(part, target) if part is not None else pd.Series(index=range(size), dtype=target)
        for part, size in zip(parts, sizes, strict=True)
    ]
    return _as_dtype(pd.concat(pieces, ignore_index=True), target).array


def _as_dtype(series: pd.Series, dtype: Any) -> pd.Series:
    """``series`` cast to ``dtype`` where the values allow it, else as it was."""
    if series.dtype == dtype:
        return series
    try:
        return series.astype(dtype)
    except (TypeError, ValueError):
        return series


def _nullable(dtype: Any) -> Any:
    """A dtype that can hold NA: numpy ints and bools map to their pandas nullable types."""
    if isinstance(dtype, np.dtype):
        if dtype.kind == "b":
            return pd.BooleanDtype()
        if dtype.kind in "iu":
            return pd.api.types.pandas_dtype(
                f"{'U' if dtype.kind == 'u' else ''}Int{dtype.itemsize * 8}"
            )
    return dtype


def _union_categories(
    dtype: pd.CategoricalDtype, parts: Sequence[pd.Series]
) -> pd.CategoricalDtype:
    """A categorical dtype whose categories cover every value of ``parts``, reference first."""
    seen: dict[Any, None] = dict.fromkeys(dtype.categories)
    for part in parts:
        values = (
            part.cat.categories
            if isinstance(part.dtype, pd.CategoricalDtype)
            else part.dropna().unique()
        )
        seen.update(dict.fromkeys(values))
    return pd.CategoricalDtype(
        pd.Index(list(seen), dtype=dtype.categories.dtype), ordered=dtype.ordered
    )
