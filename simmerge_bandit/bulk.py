"""Bulk inserts into DuckDB: one INSERT for many rows (statement parameters for a few scalars, an Arrow scan for
anything larger). Used by the store, the journal's ingest and the migrations."""

from __future__ import annotations

from typing import Any, Sequence

import duckdb

#: Tables keyed by their content: inserting a row whose key is already there is a no-op, not an error (two
#: writers, or one that forgot what it stored after a reset, may both add the same vector).
CONTENT_ADDRESSED = frozenset({"vectors"})


def insert(db: duckdb.DuckDBPyConnection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
           stamped: Sequence[str] = ()) -> None:
    """One INSERT of ``rows``: a few scalars as statement parameters, anything larger as a scan of an Arrow table.

    DuckDB binds parameters at about 5 us a value (a decision row carries ~70 numbers); an Arrow scan costs a flat
    ~1 ms a statement, twice a small parameterized INSERT. With ``stamped``, each row carries one more value, a
    unix time, which fills those columns as ``current_timestamp`` would have at that time.
    """
    import numpy as np

    targets = [*columns, *stamped]
    verb = "INSERT OR IGNORE" if table in CONTENT_ADDRESSED else "INSERT"
    sql = f"{verb} INTO {table} ({', '.join(targets)}) "
    width = len(columns) + (1 if stamped else 0)
    small = len(rows) * width <= 32 and not any(isinstance(v, np.ndarray) for row in rows for v in row)
    if small:
        one = "(" + ", ".join(["?"] * len(columns) + ["to_timestamp(?)::TIMESTAMP"] * len(stamped)) + ")"
        params = [v for row in rows for v in (*row[:len(columns)], *[row[-1]] * len(stamped))]
        db.execute(sql + "VALUES " + ", ".join([one] * len(rows)), params)
        return
    names = [f"c{j}" for j in range(width)]
    _simmerge_rows = _arrow_table(names, rows)  # noqa: F841 (read by DuckDB's scan of this frame's locals)
    select = names[:len(columns)] + [f"to_timestamp({names[-1]})::TIMESTAMP"] * len(stamped)
    db.execute(sql + f"SELECT {', '.join(select)} FROM _simmerge_rows")


def _arrow_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]):
    """Rows as an Arrow table; a column of numpy vectors becomes one list column over their concatenation, without
    a Python float per element."""
    import numpy as np
    import pyarrow as pa

    data = {}
    for j, name in enumerate(columns):
        col = [row[j] for row in rows]
        first = next((v for v in col if v is not None), None)
        if not isinstance(first, np.ndarray):  # a column of scalars (the rows of one INSERT share their types)
            try:
                data[name] = pa.array(col)
                continue
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):  # an odd row: the general path below
                pass
        if first is not None and all(isinstance(v, np.ndarray) and v.ndim == 1 for v in col):
            offsets = np.zeros(len(col) + 1, dtype=np.int32)
            np.cumsum([v.shape[0] for v in col], out=offsets[1:])
            data[name] = pa.ListArray.from_arrays(offsets, np.concatenate(col).astype(np.float64, copy=False))
        else:
            data[name] = pa.array([v.tolist() if isinstance(v, np.ndarray) else v for v in col])
    return pa.table(data)
