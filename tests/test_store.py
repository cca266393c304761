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
