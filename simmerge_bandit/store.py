"""The DuckDB state store: one file per state home, migrated on every open.

One process owns the file for writing (DuckDB's own file lock enforces it). A second process gets a
:class:`~.errors.StateLocked` naming the holder and, when it is the daemon, pointing at it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import duckdb
import numpy as np

from . import migrations
from .errors import StateLocked
from .paths import artifacts_dir, daemon_file, resolve_home, state_path


def _lock_message(home: Path, err: Exception) -> str:
    text = str(err)
    m = re.search(r"PID (\d+)", text)
    holder = f"process {m.group(1)}" if m else "another process"
    try:
        info = json.loads(daemon_file(home).read_text())
        if m and int(info.get("pid", -1)) == int(m.group(1)):
            return (f"state {state_path(home)} is held by the simmerge daemon (pid {info['pid']}, port "
                    f"{info.get('port')}); commands that support it go through the daemon's API")
    except (OSError, ValueError):
        pass
    return f"state {state_path(home)} is locked for writing by {holder}; stop it or use the daemon"


def _arrow_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]):
    """Rows as an Arrow table; a column of numpy vectors becomes one list column over their concatenation, without
    a Python float per element."""
    import pyarrow as pa

    data = {}
    for j, name in enumerate(columns):
        col = [row[j] for row in rows]
        if all(isinstance(v, np.ndarray) and v.ndim == 1 for v in col):
            offsets = np.zeros(len(col) + 1, dtype=np.int32)
            np.cumsum([v.shape[0] for v in col], out=offsets[1:])
            data[name] = pa.ListArray.from_arrays(offsets, np.concatenate(col).astype(np.float64, copy=False))
        else:
            data[name] = pa.array([v.tolist() if isinstance(v, np.ndarray) else v for v in col])
    return pa.table(data)


class Store:
    """A migrated connection to ``$SIMMERGE_HOME/state.duckdb``.

    Calls are serialized by a re-entrant lock so that one Store can be shared by the daemon's threads.

    >>> store = Store.open("/tmp/some-home")            # doctest: +SKIP
    >>> with store.transaction():                       # doctest: +SKIP
    ...     store.execute("INSERT INTO ...", [...])
    """

    def __init__(self, home: Path, db: duckdb.DuckDBPyConnection):
        self.home = home
        self.db = db
        self.lock = threading.RLock()
        self._depth = 0
        self._txn = 0  # outer transactions begun: identifies one, for caches that hold within a transaction
        self._deferred: dict[tuple[str, tuple[str, ...]], list] | None = None  # see transaction(batch_inserts)
        #: The catalog's version as :class:`~.catalog.Catalog` last read it (None: read it again).
        self.catalog_version: int | None = None

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, *, upto: str | None = None) -> "Store":
        """Open (creating if needed) and migrate the store in ``home`` (see :func:`paths.resolve_home`)."""
        home_path = resolve_home(home)
        home_path.mkdir(parents=True, exist_ok=True)
        artifacts_dir(home_path).mkdir(exist_ok=True)
        try:
            db = duckdb.connect(str(state_path(home_path)))
        except duckdb.IOException as e:
            if "lock" in str(e).lower():
                raise StateLocked(_lock_message(home_path, e)) from None
            raise
        migrations.migrate(db, upto=upto)
        return cls(home_path, db)

    @property
    def artifacts(self) -> Path:
        return artifacts_dir(self.home)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self, batch_inserts: bool = False) -> Iterator["Store"]:
        """Run the block in one transaction (nested blocks join the outer one).

        With ``batch_inserts``, consecutive :meth:`insert_rows` calls are merged into one INSERT per table, sent
        before the next other statement or the COMMIT: DuckDB spends about half a millisecond on any statement,
        so the decisions of many suggestions logged in one go cost one statement (the daemon's group commit).
        """
        with self.lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            self.db.execute("BEGIN TRANSACTION")
            self._depth = 1
            self._txn += 1
            self._deferred = {} if batch_inserts else None
            try:
                yield self
                self._send_deferred()
            except BaseException:
                self._depth, self._deferred = 0, None
                self.catalog_version = None  # it may have been read inside the transaction
                self.db.execute("ROLLBACK")
                raise
            self._depth, self._deferred = 0, None
            self.db.execute("COMMIT")

    def transaction_id(self) -> int | None:
        """An id of the transaction in progress (None outside one): what is read twice within it is the same."""
        with self.lock:
            return self._txn if self._depth else None

    def _send_deferred(self) -> None:
        if self._deferred:
            pending, self._deferred = self._deferred, {}
            for (table, columns), rows in pending.items():
                self._insert(table, columns, rows)

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> duckdb.DuckDBPyConnection:
        with self.lock:
            self._send_deferred()
            return self.db.execute(sql, params or [])

    def insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """One multi-row INSERT (DuckDB's executemany prepares per row: ~2 ms a row)."""
        if not rows:
            return
        with self.lock:
            if self._deferred is not None:
                self._deferred.setdefault((table, tuple(columns)), []).extend(rows)
                return
            self._insert(table, columns, rows)

    def _insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """One INSERT: a few scalars as statement parameters, anything larger as a scan of an Arrow table of the
        rows. DuckDB binds parameters at about 5 us a value (a decision row carries ~70 numbers); an Arrow scan
        costs a flat ~1 ms a statement, twice a small parameterized INSERT."""
        target = f"INSERT INTO {table} ({', '.join(columns)}) "
        if len(rows) * len(columns) <= 32 and not any(isinstance(v, np.ndarray) for row in rows for v in row):
            one = "(" + ", ".join("?" * len(columns)) + ")"
            self.db.execute(target + "VALUES " + ", ".join([one] * len(rows)), [v for row in rows for v in row])
            return
        _simmerge_rows = _arrow_table(columns, rows)  # noqa: F841 (read by DuckDB's scan of this frame's locals)
        self.db.execute(target + "SELECT * FROM _simmerge_rows")

    def fetchall(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        with self.lock:
            self._send_deferred()
            return self.db.execute(sql, params or []).fetchall()

    def fetchone(self, sql: str, params: Sequence[Any] | None = None) -> tuple | None:
        with self.lock:
            self._send_deferred()
            return self.db.execute(sql, params or []).fetchone()

    def fetchdicts(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        with self.lock:
            self._send_deferred()
            cur = self.db.execute(sql, params or [])
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, row)) for row in cur.fetchall()]

    def applied_migrations(self) -> list[str]:
        with self.lock:
            return migrations.applied(self.db)
