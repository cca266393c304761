"""Ordered, named schema migrations.

Each migration is a function of a DuckDB connection. :func:`migrate` runs every migration that the database has
not recorded yet, each in its own transaction together with the row that records it, so a crash mid-migration
leaves the database at the previous level. Append new migrations at the end; never edit or reorder old ones.
"""

from __future__ import annotations

import json
from typing import Callable

import duckdb
import numpy as np

from .bulk import insert
from .vectors import vector_key  # noqa: F401 (re-exported: callers import it from here)

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


@migration
def m0003_signatures(db: duckdb.DuckDBPyConnection) -> None:
    # Keys are content keys (fingerprints and hashes, not names), so a changed model or probe set simply misses
    # the cache and is recomputed; nothing has to be invalidated.
    db.execute("""
        CREATE TABLE signatures (
            fingerprint VARCHAR NOT NULL,  -- model fingerprint
            part VARCHAR NOT NULL,         -- functional | structural
            context VARCHAR NOT NULL,      -- functional: probe set content hash; structural: base fingerprint
            version VARCHAR NOT NULL,      -- signature version + digest of the signature config
            model VARCHAR NOT NULL,        -- catalog name it was computed under (informational)
            status VARCHAR NOT NULL,       -- ok | absent
            reason VARCHAR,                -- why absent (no tokenizer, no base, ...)
            meta VARCHAR NOT NULL,         -- JSON: sizes, layouts, hashes
            seconds DOUBLE,
            computed_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (fingerprint, part, context, version)
        )""")
    db.execute("""
        CREATE TABLE signature_arrays (
            fingerprint VARCHAR NOT NULL,
            part VARCHAR NOT NULL,
            context VARCHAR NOT NULL,
            version VARCHAR NOT NULL,
            name VARCHAR NOT NULL,
            dtype VARCHAR NOT NULL,        -- numpy dtype string, little-endian (e.g. <f4)
            shape VARCHAR NOT NULL,        -- JSON list
            data BLOB NOT NULL,            -- raw array bytes, C order
            PRIMARY KEY (fingerprint, part, context, version, name)
        )""")
    db.execute("""
        CREATE TABLE pair_features (
            fingerprint_a VARCHAR NOT NULL,
            fingerprint_b VARCHAR NOT NULL,
            context VARCHAR NOT NULL,      -- probe set hash | base fingerprint of a | base fingerprint of b
            version VARCHAR NOT NULL,      -- feature schema version / signature versions
            mode VARCHAR NOT NULL,         -- sketch | exact
            model_a VARCHAR NOT NULL,
            model_b VARCHAR NOT NULL,
            task VARCHAR NOT NULL,
            feature_values VARCHAR NOT NULL,  -- JSON {name: value}
            absent_reasons VARCHAR NOT NULL,  -- JSON {name: reason}
            computed_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (fingerprint_a, fingerprint_b, context, version, mode)
        )""")


@migration
def m0004_engine(db: duckdb.DuckDBPyConnection) -> None:
    # The decision log is the source of truth; policy_state is a snapshot rebuilt from it when missing or stale.
    db.execute("""
        CREATE TABLE decisions (
            id VARCHAR PRIMARY KEY,
            batch VARCHAR NOT NULL,        -- one suggest call
            rank INTEGER NOT NULL,         -- 0 = the policy's choice
            task VARCHAR NOT NULL,
            models VARCHAR NOT NULL,       -- JSON list of model names, in merge order
            operator VARCHAR NOT NULL,     -- JSON list of operator names, one per merge step
            policy VARCHAR NOT NULL,
            policy_version VARCHAR NOT NULL,
            feature_schema VARCHAR NOT NULL,
            context DOUBLE[] NOT NULL,     -- x: what the policy saw for this candidate
            arm DOUBLE[] NOT NULL,         -- z: the operator descriptor
            predicted DOUBLE,
            uncertainty DOUBLE,
            propensity DOUBLE NOT NULL,
            evaluate BOOLEAN NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""")
    db.execute("CREATE SEQUENCE reward_seq START 1")
    db.execute("""
        CREATE TABLE rewards (
            decision_id VARCHAR PRIMARY KEY,
            seq BIGINT NOT NULL DEFAULT nextval('reward_seq'),
            reward DOUBLE NOT NULL,
            raw_score DOUBLE,
            source VARCHAR NOT NULL DEFAULT 'feedback',
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""")
    db.execute("""
        CREATE TABLE policy_state (
            policy VARCHAR PRIMARY KEY,
            last_seq BIGINT NOT NULL,      -- rewards with seq <= last_seq are in the snapshot
            arrays BLOB NOT NULL,          -- numpy .npz (arrays only, never pickles)
            meta VARCHAR NOT NULL,         -- JSON
            updated_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""")
    db.execute("""
        CREATE TABLE eval_queue (
            decision_id VARCHAR PRIMARY KEY,
            state VARCHAR NOT NULL DEFAULT 'queued',   -- queued | running | done | failed
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error VARCHAR,
            not_before TIMESTAMP,
            result VARCHAR,                            -- JSON: merged path, raw score, reward
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            updated_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""")


@migration
def m0006_evaluations_and_jobs(db: duckdb.DuckDBPyConnection) -> None:
    # Scores of source models, so a reward's denominator is measured once per (model, task data, metric).
    db.execute("""
        CREATE TABLE evaluations (
            fingerprint VARCHAR NOT NULL,
            task VARCHAR NOT NULL,
            data_hash VARCHAR NOT NULL,
            metric VARCHAR NOT NULL,
            score DOUBLE NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (fingerprint, task, data_hash, metric)
        )""")


@migration
def m0007_model_tasks(db: duckdb.DuckDBPyConnection) -> None:
    # The tasks a model was fine-tuned for (optional): suggestions for a task pair at least one of its experts.
    db.execute("ALTER TABLE models ADD COLUMN tasks VARCHAR")  # JSON list, NULL = unknown


@migration
def m0005_merge_table(db: duckdb.DuckDBPyConnection) -> None:
    # The full merge table of a micro-zoo: ground truth for replay and the decision-quality benchmark.
    # One row per (models, operator, task); a failed merge or evaluation is a row with status 'failed'.
    db.execute("""
        CREATE TABLE merge_table (
            zoo_key VARCHAR NOT NULL,       -- build key of the zoo (zoo.json "key") the models come from
            model_a VARCHAR NOT NULL,
            model_b VARCHAR NOT NULL,
            model_c VARCHAR,                -- third model of a 3-way merge, else NULL
            operator VARCHAR NOT NULL,
            method VARCHAR NOT NULL,
            params VARCHAR NOT NULL,        -- JSON, validated
            task VARCHAR NOT NULL,
            metric VARCHAR NOT NULL,
            score DOUBLE,                   -- raw score of the merge; NULL when it failed
            normalized_score DOUBLE,        -- score / best source's score, clipped to [0, 2] (evaluators.normalize)
            best_source_score DOUBLE,
            score_a DOUBLE,
            score_b DOUBLE,
            score_c DOUBLE,
            base_score DOUBLE,
            status VARCHAR NOT NULL,        -- ok | failed
            error VARCHAR,
            merge_seed UBIGINT,             -- seed given to the merge kernels (random methods)
            merge_seconds DOUBLE,
            eval_seconds DOUBLE,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""")
    db.execute("CREATE INDEX merge_table_case ON merge_table (zoo_key, model_a, model_b, task)")


@migration
def m0009_catalog_version(db: duckdb.DuckDBPyConnection) -> None:
    db.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value BIGINT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('catalog_version', 0)")


@migration
def m0010_reward_seq_unique(db: duckdb.DuckDBPyConnection) -> None:
    # The engine numbers rewards itself (it is the only writer and learns in this order), so a reward can join
    # the daemon's batched INSERT instead of costing an INSERT ... RETURNING of its own; two writers that ever
    # numbered the same reward would be refused here rather than fold in an ambiguous order.
    db.execute("CREATE UNIQUE INDEX rewards_seq ON rewards (seq)")


@migration
def m0011_pair_propensity(db: duckdb.DuckDBPyConnection) -> None:
    # The probability the policy gave the decision's pair (the sum over its operators), so replay can weigh the
    # operator given the pair (propensity / pair_propensity) rather than the (pair, operator) draw as a whole.
    # NULL for chains and for decisions logged before it existed.
    db.execute("ALTER TABLE decisions ADD COLUMN pair_propensity DOUBLE")


#: The decision log's columns, in table order (``context_key`` and ``arm_key`` name rows of ``vectors``).
DECISION_LOG_COLUMNS = ("id", "batch", "rank", "task", "models", "operator", "policy", "policy_version",
                        "feature_schema", "context_key", "arm_key", "predicted", "uncertainty", "propensity",
                        "evaluate", "created_at", "pair_propensity", "arm_schema")


@migration
def m0012_decision_vectors(db: duckdb.DuckDBPyConnection) -> None:
    # A decision row carried its context (42 doubles) and its operator's descriptor (25) inline: 70% of its
    # bytes, though a task has only (pairs x feature versions) contexts and a dozen descriptors. Stored once in
    # `vectors` and referenced by key, a decision is ~150 bytes instead of ~700; DuckDB's write-ahead log per
    # 40,000 decisions went from 48 MB to 7 MB, its memory from 109 MB to 3 MB per 240,000 decisions, and a
    # checkpoint's transient allocation from up to +170 MB to +25 MB (measured). `decisions` stays, as a view.
    db.execute("CREATE TABLE vectors (key BIGINT PRIMARY KEY, v DOUBLE[] NOT NULL)")
    db.execute("""
        CREATE TABLE decision_log (
            id VARCHAR PRIMARY KEY,
            batch VARCHAR NOT NULL,        -- one suggest call
            rank INTEGER NOT NULL,         -- 0 = the policy's choice
            task VARCHAR NOT NULL,
            models VARCHAR NOT NULL,       -- JSON list of model names, in merge order
            operator VARCHAR NOT NULL,     -- JSON list of operator names, one per merge step
            policy VARCHAR NOT NULL,
            policy_version VARCHAR NOT NULL,
            feature_schema VARCHAR NOT NULL,
            context_key BIGINT NOT NULL,   -- x: what the policy saw for this candidate (a row of vectors)
            arm_key BIGINT NOT NULL,       -- z: the operator descriptor (a row of vectors)
            predicted DOUBLE,
            uncertainty DOUBLE,
            propensity DOUBLE NOT NULL,
            evaluate BOOLEAN NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            pair_propensity DOUBLE
        )""")
    # Keys are computed here, in Python, row by row (a million decisions: a few seconds, once), with the function
    # the engine uses, and the old rows are joined to them by id (not to their vectors by value, a join on lists
    # of doubles). The rows are streamed, every key first (a statement on this connection would end the
    # stream), then inserted.
    rel = db.sql("SELECT id, context, arm FROM decisions")
    reader = rel.to_arrow_reader(50_000) if hasattr(rel, "to_arrow_reader") else rel.record_batch(50_000)
    vectors: dict[int, np.ndarray] = {}
    keys: list[list] = []
    for batch in reader:
        cols = []
        for name in ("context", "arm"):
            col = batch.column(name)
            offsets, flat = col.offsets.to_numpy(), col.values.to_numpy(zero_copy_only=False)
            out = []
            for i in range(len(col)):
                v = flat[offsets[i]:offsets[i + 1]]
                k = vector_key(v)
                if k not in vectors:
                    vectors[k] = np.array(v, dtype=np.float64)
                out.append(k)
            cols.append(out)
        keys.extend([did, kx, kz] for did, kx, kz in zip(batch.column("id").to_pylist(), *cols))
    if keys:
        db.execute("CREATE TEMP TABLE _decision_keys (id VARCHAR, context_key BIGINT, arm_key BIGINT)")
        insert(db, "_decision_keys", ("id", "context_key", "arm_key"), keys)
        insert(db, "vectors", ("key", "v"), [[k, v] for k, v in vectors.items()])
        db.execute("""
            INSERT INTO decision_log SELECT d.id, d.batch, d.rank, d.task, d.models, d.operator, d.policy,
                d.policy_version, d.feature_schema, k.context_key, k.arm_key, d.predicted, d.uncertainty,
                d.propensity, d.evaluate, d.created_at, d.pair_propensity
            FROM decisions d JOIN _decision_keys k USING (id)""")
        moved = db.execute("SELECT count(*) FROM decision_log").fetchone()[0]
        if moved != len(keys):
            raise RuntimeError(f"m0012: {moved} of {len(keys)} decisions moved; nothing was changed")
        db.execute("DROP TABLE _decision_keys")
    db.execute("DROP TABLE decisions")
    db.execute("""
        CREATE VIEW decisions AS
        SELECT d.id, d.batch, d.rank, d.task, d.models, d.operator, d.policy, d.policy_version, d.feature_schema,
               x.v AS context, z.v AS arm, d.predicted, d.uncertainty, d.propensity, d.evaluate, d.created_at,
               d.pair_propensity
        FROM decision_log d JOIN vectors x ON x.key = d.context_key JOIN vectors z ON z.key = d.arm_key""")


@migration
def m0013_reward_scores(db: duckdb.DuckDBPyConnection) -> None:
    # A reward of a multi-task target keeps each task's raw score beside the aggregate (JSON {task: score}).
    db.execute("ALTER TABLE rewards ADD COLUMN scores VARCHAR")


@migration
def m0014_arm_schema(db: duckdb.DuckDBPyConnection) -> None:
    # The operator descriptor became a versioned schema of named coordinates (descriptor.py): a decision records
    # the version its descriptor was made in, `arm_schemas` the coordinates of each version. Decisions logged
    # before have none (NULL, also for journal records of an older daemon): layout 1, recorded here as '1'.
    from .descriptor import LEGACY_VERSION, legacy_schema

    db.execute("ALTER TABLE decision_log ADD COLUMN arm_schema VARCHAR")
    db.execute("""
        CREATE TABLE arm_schemas (
            version VARCHAR PRIMARY KEY,
            coordinates VARCHAR NOT NULL,  -- JSON [[name, low, high], ...] in vector order
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""")
    db.execute("INSERT INTO arm_schemas (version, coordinates) VALUES (?, ?)",
               [LEGACY_VERSION, json.dumps(legacy_schema().coordinates_json())])
    db.execute("""
        CREATE OR REPLACE VIEW decisions AS
        SELECT d.id, d.batch, d.rank, d.task, d.models, d.operator, d.policy, d.policy_version, d.feature_schema,
               x.v AS context, z.v AS arm, d.predicted, d.uncertainty, d.propensity, d.evaluate, d.created_at,
               d.pair_propensity, coalesce(d.arm_schema, '1') AS arm_schema
        FROM decision_log d JOIN vectors x ON x.key = d.context_key JOIN vectors z ON z.key = d.arm_key""")


@migration
def m0015_searches_and_families(db: duckdb.DuckDBPyConnection) -> None:
    # Budgeted searches (search.py): one row per (target, policy), one step per evaluation it spent.
    db.execute("""
        CREATE TABLE searches (
            id VARCHAR PRIMARY KEY,
            target VARCHAR NOT NULL,        -- the target's key
            policy VARCHAR NOT NULL,
            budget INTEGER NOT NULL,
            state VARCHAR NOT NULL,         -- running | done | stopped | failed
            best_decision VARCHAR,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            updated_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""")
    db.execute("""
        CREATE TABLE search_steps (
            search_id VARCHAR NOT NULL,
            n INTEGER NOT NULL,
            decision_id VARCHAR NOT NULL,
            error VARCHAR,                  -- why its merge or evaluation failed (it still spent an evaluation)
            PRIMARY KEY (search_id, n)
        )""")
    # Operator families: the engine chooses the values of these parameters inside their ranges per suggestion,
    # and each decision records the values it chose (NULL: the operator's own parameters).
    db.execute("ALTER TABLE operators ADD COLUMN ranges VARCHAR")   # JSON {param: [low, high]}
    db.execute("ALTER TABLE decision_log ADD COLUMN params VARCHAR")  # JSON [params of each step]
    db.execute("""
        CREATE OR REPLACE VIEW decisions AS
        SELECT d.id, d.batch, d.rank, d.task, d.models, d.operator, d.policy, d.policy_version, d.feature_schema,
               x.v AS context, z.v AS arm, d.predicted, d.uncertainty, d.propensity, d.evaluate, d.created_at,
               d.pair_propensity, coalesce(d.arm_schema, '1') AS arm_schema, d.params
        FROM decision_log d JOIN vectors x ON x.key = d.context_key JOIN vectors z ON z.key = d.arm_key""")


@migration
def m0016_merge_table_halves_and_tags(db: duckdb.DuckDBPyConnection) -> None:
    # `simmerge zoo table` writes each merge's raw score on the two fixed halves of the task's eval examples (so
    # an operator can be chosen on one half and scored on the other) and each source's tagged tasks (JSON lists:
    # the default target of a merge, the union of its sources' tasks, rebuilt from the table alone). The index is
    # dropped around the ALTERs: DuckDB releases before 1.1 refuse to alter a table that an index depends on.
    db.execute("DROP INDEX IF EXISTS merge_table_case")
    for column, kind in (("score_h0", "DOUBLE"), ("score_h1", "DOUBLE"), ("tasks_a", "VARCHAR"),
                         ("tasks_b", "VARCHAR"), ("tasks_c", "VARCHAR")):
        db.execute(f"ALTER TABLE merge_table ADD COLUMN {column} {kind}")
    db.execute("CREATE INDEX merge_table_case ON merge_table (zoo_key, model_a, model_b, task)")


@migration
def m0017_task_eval_options(db: duckdb.DuckDBPyConnection) -> None:
    # An evaluator's own settings for a task, as JSON (NULL: none): the lm-eval evaluator's task, metric, include
    # folder and arguments. One column for every evaluator, so a new evaluator needs no new migration.
    db.execute("ALTER TABLE tasks ADD COLUMN eval_options VARCHAR")


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
