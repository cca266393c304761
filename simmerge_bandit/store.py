"""The DuckDB state store: one file per state home, migrated on every open.

One process owns the file for writing (DuckDB's own file lock enforces it). A second process gets a
:class:`~.errors.StateLocked` naming the holder and, when it is the daemon, pointing at it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import duckdb

from . import journal as _journal
from . import migrations
from .errors import CorruptState, StateLocked
from .paths import artifacts_dir, daemon_file, resolve_home, state_path

log = logging.getLogger(__name__)


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


def _is_corruption(err: Exception) -> bool:
    return isinstance(err, duckdb.IOException) or re.search(r"corrupt|checksum", str(err), re.I) is not None


def _corrupt(home: Path, err: Exception) -> CorruptState:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CorruptState(f"state {state_path(home)} cannot be read ({reason}); move it aside and put back a backup "
                        f"copy of it (rewards a daemon acknowledged since then are replayed from "
                        f"{Store.journal_dir(home)} if still there), or move it aside to start an empty state")


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
        self._journal: _journal.Journal | None = None  # see enable_journal
        self._real = False  # the transaction in progress has begun in DuckDB (not only in the journal)
        self._holder: int | None = None  # the thread whose transaction is in progress
        self.journal_record: int | None = None  # the journal record the last transaction wrote, if any
        #: The catalog's version as :class:`~.catalog.Catalog` last read it (None: read it again).
        self.catalog_version: int | None = None
        #: Called after a transaction failed (rolled back, or its journal record could not be written): caches of
        #: what the transaction wrote must forget it (see :meth:`on_rollback`).
        self._rollback_hooks: list[Callable[[], None]] = []

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, *, upto: str | None = None) -> "Store":
        """Open (creating if needed) and migrate the store in ``home`` (see :func:`paths.resolve_home`)."""
        home_path = resolve_home(home)
        # Private: the home holds the daemon's token and copies of task files (docs/daemon.md, security model).
        home_path.mkdir(mode=0o700, parents=True, exist_ok=True)
        artifacts_dir(home_path).mkdir(mode=0o700, exist_ok=True)
        path = state_path(home_path)
        try:
            db = duckdb.connect(str(path))
        except duckdb.IOException as e:
            if "lock" in str(e).lower():
                raise StateLocked(_lock_message(home_path, e)) from None
            raise _corrupt(home_path, e) from None
        except duckdb.Error as e:
            raise _corrupt(home_path, e) if _is_corruption(e) else e from None
        try:
            os.chmod(path, 0o600)
            migrations.migrate(db, upto=upto)
            if upto is None:
                n = _journal.replay(db, cls.journal_dir(home_path))  # what a daemon acknowledged before it died
                if n:
                    log.info("replayed %d journal records into %s", n, path)
        except duckdb.Error as e:
            db.close()
            if _is_corruption(e):
                raise _corrupt(home_path, e) from None
            raise
        return cls(home_path, db)

    @staticmethod
    def journal_dir(home: Path) -> Path:
        """Where the daemon's write-ahead journal of ``home`` keeps its segment files."""
        return home / "journal"

    def enable_journal(self, interval_s: float = 0.05, memory_limit: str | None = None) -> None:
        """Commit ``transaction(batch_inserts=True)`` blocks that only insert rows to the write-ahead journal
        (:mod:`.journal`) instead of DuckDB: durable on return, moved into DuckDB by a background thread, and
        visible to every statement of this store (each drains the journal first). For the daemon's writer.
        With ``memory_limit`` (DuckDB's, as set), DuckDB's cache of the tables is emptied after each checkpoint."""
        with self.lock:
            if self._journal is None:
                self._journal = _journal.Journal(self.db, self.journal_dir(self.home), interval_s=interval_s,
                                                 wal=self.wal_path,
                                                 memory_limit=memory_limit)

    @property
    def journal(self) -> "_journal.Journal | None":
        """The write-ahead journal when :meth:`enable_journal` turned it on, else None."""
        return self._journal

    @property
    def wal_path(self) -> Path:
        """DuckDB's write-ahead log of this store."""
        return Path(str(state_path(self.home)) + ".wal")

    @property
    def artifacts(self) -> Path:
        """The home's ``artifacts/`` folder: copies of task files, merged models, intermediates."""
        return artifacts_dir(self.home)

    def close(self) -> None:
        """Move every journal record into DuckDB (when the journal is on), then close the database."""
        with self.lock:
            if self._journal is not None:
                self._journal.close()  # every record into DuckDB, then the files go
                self._journal = None
            self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self, batch_inserts: bool = False, sync: bool = True) -> Iterator["Store"]:
        """Run the block in one transaction (nested blocks join the outer one).

        With ``batch_inserts``, consecutive :meth:`insert_rows` calls are merged into one INSERT per table, sent
        before the next other statement or the COMMIT: DuckDB spends about half a millisecond on any statement,
        so the decisions of many suggestions logged in one go cost one statement (the daemon's group commit).
        With the journal enabled, such a block that runs no other statement commits to the journal instead
        (durable when the block exits, see :mod:`.journal`); one that does becomes a DuckDB transaction there.
        With ``sync=False`` a journaled block is only written when it exits: the caller makes it durable with
        ``store.journal.sync()`` before it acknowledges anything (``journal_record`` tells whether it went there).
        """
        if not batch_inserts and self._holder != threading.get_ident():  # not one nested in this thread's own
            self.drain()
        with self.lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            journaled = batch_inserts and self._journal is not None
            self.journal_record = None
            if not journaled:
                self._begin()
            self._depth, self._holder = 1, threading.get_ident()
            self._txn += 1
            self._deferred = {} if batch_inserts else None
            try:
                yield self
                if self._real:
                    self._send_deferred()
            except BaseException:
                real, self._real = self._real, False
                self._depth, self._deferred, self._holder = 0, None, None
                self.catalog_version = None  # it may have been read inside the transaction
                try:
                    if real:
                        self.db.execute("ROLLBACK")
                finally:
                    self._rolled_back()
                raise
            pending, self._deferred, self._depth, self._holder = self._deferred, None, 0, None
            try:
                if self._real:
                    self._real = False
                    self.db.execute("COMMIT")
                elif pending:
                    self.journal_record = self._journal.append([(t, c, rows) for (t, c), rows in pending.items()],
                                                               sync=sync)
            except BaseException:
                self._rolled_back()
                raise

    def on_rollback(self, hook: Callable[[], None]) -> None:
        """Have ``hook()`` called whenever a transaction fails: what it wrote is not in the store."""
        self._rollback_hooks.append(hook)

    def _rolled_back(self) -> None:
        for hook in self._rollback_hooks:
            hook()

    def _begin(self) -> None:
        self.db.execute("BEGIN TRANSACTION")
        self._real = True

    def drain(self) -> None:
        """Move every journal record appended so far into DuckDB (a no-op without the journal).

        Statements call it *before* they take this store's lock: what was acknowledged before a statement
        began is then in DuckDB, and what the writer appends while the statement waits for the lock is
        concurrent with it. Draining under the lock instead would make the writer wait for an ingest, and an
        ingest whose commit checkpoints takes 100-300 ms (DuckDB holds every commit for a checkpoint).
        """
        journal = self._journal
        if journal is not None and journal.has_pending():
            journal.drain()

    def _ready(self) -> None:
        """Before a statement, under the lock: a journal-only transaction becomes a DuckDB one (after the
        journal's earlier records, which its reads must see), and deferred rows are sent."""
        if self._depth:
            if not self._real:
                self.drain()
                self._begin()
            self._send_deferred()

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
        """Run one parameterized statement (``?`` placeholders) after the journal is drained; DuckDB's cursor."""
        if self._holder != threading.get_ident():
            self.drain()
        with self.lock:
            self._ready()
            return self.db.execute(sql, params or [])

    def insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """One multi-row INSERT (DuckDB's executemany prepares per row: ~2 ms a row)."""
        if not rows:
            return
        if self._holder != threading.get_ident():
            self.drain()
        with self.lock:
            if self._deferred is not None:
                self._deferred.setdefault((table, tuple(columns)), []).extend(rows)
                return
            self._ready()
            self._insert(table, columns, rows)

    def _insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        _journal.insert(self.db, table, columns, rows)

    def fetchall(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        """Every row of a parameterized query, as tuples."""
        if self._holder != threading.get_ident():
            self.drain()
        with self.lock:
            self._ready()
            return self.db.execute(sql, params or []).fetchall()

    def fetchone(self, sql: str, params: Sequence[Any] | None = None) -> tuple | None:
        """The first row of a parameterized query, or None."""
        if self._holder != threading.get_ident():
            self.drain()
        with self.lock:
            self._ready()
            return self.db.execute(sql, params or []).fetchone()

    def fetchdicts(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Every row of a parameterized query, as dicts keyed by column name."""
        if self._holder != threading.get_ident():
            self.drain()
        with self.lock:
            self._ready()
            cur = self.db.execute(sql, params or [])
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, row)) for row in cur.fetchall()]

    def applied_migrations(self) -> list[str]:
        """Names of the migrations applied to this database, in order."""
        with self.lock:
            return migrations.applied(self.db)
