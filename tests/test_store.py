import subprocess
import sys
import textwrap

import duckdb
import pytest

from simmerge_bandit import migrations
from simmerge_bandit.errors import StateLocked
from simmerge_bandit.store import Store


def test_blank_database_reaches_current_schema(simmerge_home):
    store = Store.open(simmerge_home)
    assert store.applied_migrations() == [name for name, _ in migrations.MIGRATIONS]
    tables = {r[0] for r in store.fetchall("SELECT table_name FROM information_schema.tables")}
    assert {"models", "operators", "tasks", "probe_sets", "_migrations"} <= tables
    assert (simmerge_home / "artifacts").is_dir() and (simmerge_home / "state.duckdb").is_file()
    store.close()
    # Re-opening runs nothing new.
    store = Store.open(simmerge_home)
    assert migrations.migrate(store.db) == []


def test_old_database_is_migrated_and_keeps_its_rows(simmerge_home):
    first = migrations.MIGRATIONS[0][0]
    old = Store.open(simmerge_home, upto=first)
    assert old.applied_migrations() == [first]
    old.execute("INSERT INTO operators (name, method, params) VALUES ('keep', 'linear', '{}')")
    old.close()
    store = Store.open(simmerge_home)
    assert store.applied_migrations() == [name for name, _ in migrations.MIGRATIONS]
    assert store.fetchone("SELECT method FROM operators WHERE name = 'keep'") == ("linear",)


def test_failed_migration_rolls_back_with_its_record(simmerge_home, monkeypatch):
    def broken(db):
        db.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("boom")

    Store.open(simmerge_home).close()
    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS + [("m9999_broken", broken)])
    with pytest.raises(RuntimeError):
        Store.open(simmerge_home)
    db = duckdb.connect(str(simmerge_home / "state.duckdb"))
    assert db.execute("SELECT count(*) FROM _migrations WHERE name = 'm9999_broken'").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'half_done'"
                      ).fetchone() == (0,)


def test_transaction_rolls_back_on_error(simmerge_home):
    store = Store.open(simmerge_home)
    with pytest.raises(ValueError):
        with store.transaction():
            store.execute("INSERT INTO operators (name, method, params) VALUES ('x', 'linear', '{}')")
            raise ValueError
    assert store.fetchone("SELECT count(*) FROM operators") == (0,)


def test_second_writer_gets_a_clear_message_naming_the_holder(simmerge_home):
    Store.open(simmerge_home).close()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from simmerge_bandit.store import Store
        s = Store.open({str(simmerge_home)!r}); print("ready", flush=True); time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StateLocked) as err:
            Store.open(simmerge_home)
        assert f"process {holder.pid}" in str(err.value)
    finally:
        holder.kill()
        holder.wait()


def test_insert_rows_round_trips_through_both_paths(simmerge_home):
    """A few scalars go as parameters, vectors and bigger batches through an Arrow scan: same rows either way."""
    import numpy as np

    store = Store.open(simmerge_home)
    store.execute("CREATE TABLE t (name VARCHAR, n BIGINT, x DOUBLE, v DOUBLE[], b BLOB, flag BOOLEAN)")
    cols = ("name", "n", "x", "v", "b", "flag")
    small = [["a", 1, None, [1.0, 2.0], b"\x00\x01", True]]
    vectors = [["b", 2, 0.5, np.array([3.0, 4.0, 5.0]), None, False], ["c", None, None, np.array([]), b"", None]]
    many = [[f"m{i}", i, i / 3, [float(i)], bytes([i]), i % 2 == 0] for i in range(40)]
    for rows in (small, vectors, many):
        store.insert_rows("t", cols, rows)
    with store.transaction(batch_inserts=True):  # deferred: sent as one statement before the read below
        store.insert_rows("t", cols, [["d", 7, 1.5, np.array([9.0]), None, True]])
        store.insert_rows("t", cols, [["e", 8, None, [], None, False]])
        assert store.fetchone("SELECT count(*) FROM t WHERE name IN ('d', 'e')") == (2,)
    got = {r[0]: r[1:] for r in store.fetchall("SELECT * FROM t")}
    assert got["a"] == (1, None, [1.0, 2.0], b"\x00\x01", True)
    assert got["b"] == (2, 0.5, [3.0, 4.0, 5.0], None, False)
    assert got["c"] == (None, None, [], b"", None)
    assert got["m39"] == (39, 13.0, [39.0], b"\x27", False)
    assert got["d"] == (7, 1.5, [9.0], None, True) and got["e"] == (8, None, [], None, False)
    assert len(got) == 45
    store.close()


def test_catalog_version_is_cached_and_moves_with_changes_and_rollbacks(simmerge_home):
    from simmerge_bandit.catalog import Catalog

    store = Store.open(simmerge_home)
    cat, other = Catalog(store), Catalog(store)
    v0 = cat.version()
    other.add_operator("lin", "linear")  # another Catalog on the same store: the cached version moves too
    assert cat.version() == v0 + 1
    with pytest.raises(RuntimeError):
        with store.transaction():
            cat.add_operator("gone", "linear")
            assert cat.version() == v0 + 2
            raise RuntimeError
    assert cat.version() == v0 + 1 == store.fetchone("SELECT value FROM meta WHERE key = 'catalog_version'")[0]
    store.close()
