"""Ordered, named schema migrations.

Each migration is a function of a DuckDB connection. :func:`migrate` runs every migration that the database has
not recorded yet, each in its own transaction together with the row that records it, so a crash mid-migration
leaves the database at the previous level. Append new migrations at the end; never edit or reorder old ones.
"""

from __future__ import annotations

from typing import Callable

import duckdb

Migration = Callable[[duckdb.DuckDBPyConnection], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


@migration
def m0001_models_and_operators(db: duckdb.DuckDBPyConnection) -> None:
    db.execute("""
        CREATE TABLE models (
            name VARCHAR PRIMARY KEY,
            path VARCHAR NOT NULL,
            base VARCHAR,
            architecture VARCHAR,
            model_type VARCHAR,
            dtype VARCHAR,
            n_params BIGINT,
            n_tensors INTEGER,
            size_bytes BIGINT,
            fingerprint VARCHAR NOT NULL,
            tensors VARCHAR NOT NULL,   -- JSON {name: [dtype, shape]}
            config VARCHAR NOT NULL,    -- JSON of config.json
            added_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""")
    db.execute("""
        CREATE TABLE operators (
            name VARCHAR PRIMARY KEY,
            method VARCHAR NOT NULL,
            params VARCHAR NOT NULL,    -- JSON, validated and complete (defaults filled in)
            status VARCHAR NOT NULL DEFAULT 'active',
            added_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            retired_at TIMESTAMP
        )""")


@migration
def m0002_tasks_and_probe_sets(db: duckdb.DuckDBPyConnection) -> None:
    db.execute("""
        CREATE TABLE probe_sets (
            name VARCHAR PRIMARY KEY,
            hash VARCHAR NOT NULL,      -- content hash of the prompts: signatures are keyed by it
            path VARCHAR NOT NULL,      -- copy inside the state home's artifacts/
            n_prompts INTEGER NOT NULL,
            added_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""")
    db.execute("""
        CREATE TABLE tasks (
            name VARCHAR PRIMARY KEY,
            data_path VARCHAR NOT NULL, -- copy inside the state home's artifacts/
            data_hash VARCHAR NOT NULL,
            n_examples INTEGER NOT NULL,
            probe_set VARCHAR NOT NULL,
            metric VARCHAR NOT NULL,     -- evaluator name: exact_match | loglik | external
            eval_command VARCHAR,        -- external evaluator: command template
            metric_path VARCHAR,         -- external evaluator: dotted path of the metric in its JSON output
            added_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""")


def applied(db: duckdb.DuckDBPyConnection) -> list[str]:
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name VARCHAR PRIMARY KEY, "
               "applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)")
    return [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY applied_at, name").fetchall()]


def migrate(db: duckdb.DuckDBPyConnection, upto: str | None = None) -> list[str]:
    """Apply pending migrations in order (stopping after ``upto`` if given); return the names applied."""
    done = set(applied(db))
    ran = []
    for name, fn in MIGRATIONS:
        if name not in done:
            db.execute("BEGIN TRANSACTION")
            try:
                fn(db)
                db.execute("INSERT INTO _migrations (name) VALUES (?)", [name])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            ran.append(name)
        if name == upto:
            break
    return ran
