"""Decisions keep their context and operator descriptor in ``vectors``, once each (migration m0012).

The ``decisions`` view must read exactly as the old table did: for decisions migrated from an older store, for
decisions a journal written before the migration replays, and for decisions the engine logs now.
"""

import json
import pickle
import time
import zlib

import numpy as np
import pytest

from simmerge_bandit import migrations
from simmerge_bandit.catalog import Catalog
from simmerge_bandit.engine import Engine, EngineConfig
from simmerge_bandit.journal import HEADER, MAGIC
from simmerge_bandit.migrations import vector_key
from simmerge_bandit.store import Store

from conftest import write_jsonl

OLD_COLUMNS = ("id", "batch", "rank", "task", "models", "operator", "policy", "policy_version", "feature_schema",
               "context", "arm", "predicted", "uncertainty", "propensity", "evaluate", "pair_propensity")


def old_rows(n: int, seed: int = 0) -> list[list]:
    """Decision rows as the old table took them: few distinct contexts and descriptors, as in a real log."""
    rng = np.random.default_rng(seed)
    contexts = [rng.normal(size=6) for _ in range(5)] + [np.array([0.0, 1.0, 0, 0, 0, 0])]
    arms = [np.eye(3)[k] for k in range(3)]
    rows = []
    for i in range(n):
        rows.append([f"d{seed}-{i}", f"b{i // 2}", i % 2, "t", json.dumps(["m1", "m2"]),
                     json.dumps(["op%d" % (i % 3)]), "linucb", "v1", "1", contexts[i % len(contexts)],
                     arms[i % 3], 0.1 * i, None if i == 3 else 0.2, 0.5, i % 4 == 0, None if i % 5 == 0 else 0.25])
    return rows


def as_logged(rows):
    """What reading ``decisions`` must give back for ``rows`` (id order; created_at left out)."""
    return sorted((r[0], *r[1:9], [float(v) for v in r[9]], [float(v) for v in r[10]], *r[11:]) for r in rows)


def read_back(store):
    cols = ", ".join(OLD_COLUMNS)
    return sorted(store.fetchall(f"SELECT {cols} FROM decisions ORDER BY id"))


def test_an_old_decision_log_is_migrated_and_reads_back_unchanged(simmerge_home):
    upto = "m0011_pair_propensity"
    old = Store.open(simmerge_home, upto=upto)
    rows = old_rows(40)
    old.insert_rows("decisions", OLD_COLUMNS, rows)
    old.execute("INSERT INTO rewards (decision_id, seq, reward) VALUES ('d0-0', 1, 0.5)")
    before = old.fetchall("SELECT * FROM decisions ORDER BY id")
    names = [d[0] for d in old.db.execute("SELECT * FROM decisions LIMIT 0").description]
    old.close()

    store = Store.open(simmerge_home)
    assert store.applied_migrations()[-1] == migrations.MIGRATIONS[-1][0]
    after = store.fetchall("SELECT * FROM decisions ORDER BY id")
    # every old column, created_at included, in the old order; columns that later migrations add follow them
    assert [d[0] for d in store.db.execute("SELECT * FROM decisions LIMIT 0").description][:len(names)] == names
    assert [r[:len(names)] for r in after] == before
    assert read_back(store) == as_logged(rows)
    assert store.fetchone("SELECT count(*) FROM vectors")[0] == 6 + 3  # each distinct vector once
    assert store.fetchone("SELECT count(*) FROM decision_log")[0] == 40
    assert store.fetchone("SELECT d.context FROM rewards r JOIN decisions d ON d.id = r.decision_id") is not None
    store.close()


def test_a_journal_record_written_before_the_migration_is_replayed_into_the_new_tables(simmerge_home):
    Store.open(simmerge_home, upto="m0011_pair_propensity").close()
    rows = old_rows(7, seed=1)
    payload = pickle.dumps([("decisions", OLD_COLUMNS, rows)], protocol=5)
    (simmerge_home / "journal").mkdir()
    (simmerge_home / "journal" / "000000000001.log").write_bytes(
        HEADER.pack(MAGIC, len(payload), zlib.crc32(payload), 1, time.time()) + payload)
    store = Store.open(simmerge_home)  # migrates, then replays what a daemon of the old version acknowledged
    assert read_back(store) == as_logged(rows)
    assert store.fetchone("SELECT count(*) FROM vectors")[0] == 6 + 3
    store.close()


@pytest.fixture
def engine_store(simmerge_home, tiny_models, tmp_path):
    store = Store.open(simmerge_home)
    cat = Catalog(store)
    cat.add_model(tiny_models["base"], name="base")
    for key in ("ft_a", "ft_b"):
        cat.add_model(tiny_models[key], name=key, base="base")
    cat.add_task("double", write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"{i}+{i}=", "answer": str(2 * i)}
                                                             for i in range(8)]))
    cat.add_operator("lin", "linear")
    cat.add_operator("ties5", "ties", {"density": 0.5})
    yield store
    store.close()


def test_the_engine_stores_each_vector_once_and_logs_what_the_policy_saw(engine_store):
    store = engine_store
    eng = Engine(store, EngineConfig(eval_budget=0))
    cs = eng.candidates("double")
    for _ in range(30):
        for r in eng.suggest("double", top=4):
            eng.feedback(r["id"], 0.5)
    assert store.fetchone("SELECT count(*) FROM decision_log")[0] == 120
    # 2 ordered pairs' contexts and 2 descriptors, however many decisions
    n_vec = len({vector_key(x) for x in cs.X}) + len({vector_key(z) for z in cs.Z})
    assert store.fetchone("SELECT count(*) FROM vectors")[0] == n_vec == 4
    # what the view gives back is the candidate the policy ranked, bit for bit
    by_id = {r[0]: r for r in store.fetchall("SELECT id, context, arm, models, operator FROM decisions")}
    assert len(by_id) == 120
    for did, x, z, models, op in by_id.values():
        pair = tuple(json.loads(models))
        i = next(j for j in range(len(cs)) if cs.pairs[cs.pair_index[j]] == pair and cs.arms[j] == json.loads(op)[0])
        assert np.array_equal(np.array(x), cs.X[i]) and np.array_equal(np.array(z), cs.Z[i])
    # a fresh engine (nothing at hand) rebuilds the same policy from the log through the view
    live, rebuilt = eng.policy(), Engine(store, EngineConfig(eval_budget=0)).rebuild()
    assert live.n_updates == rebuilt.n_updates == 120
    np.testing.assert_allclose(live.rank(cs.ranked).predicted, rebuilt.rank(cs.ranked).predicted, rtol=1e-10)


def test_a_rolled_back_transaction_makes_the_engine_store_its_vectors_again(engine_store):
    """The engine remembers which vectors the store holds; a transaction that failed after logging must not leave
    it believing so, or later decisions would point at vectors that are not there (and vanish from the view)."""
    store = engine_store
    eng = Engine(store, EngineConfig(eval_budget=0))
    with pytest.raises(RuntimeError):
        with store.transaction():
            eng.suggest("double", top=2)  # the first suggestion stores the vectors ...
            raise RuntimeError("the caller's transaction fails")  # ... and they are rolled back
    assert store.fetchone("SELECT count(*) FROM vectors")[0] == 0
    rows = eng.suggest("double", top=2)
    assert store.fetchone("SELECT count(*) FROM decisions")[0] == 2 == len(rows)


def test_a_failed_journal_append_also_counts_as_a_rollback(engine_store, monkeypatch):
    store = engine_store
    store.enable_journal(interval_s=3600)
    eng = Engine(store, EngineConfig(eval_budget=0))
    from simmerge_bandit import journal as jmod

    def broken(self, batches, sync=True):
        raise jmod.JournalError("disk full")

    eng.suggest("double", top=1)  # one context and one descriptor stored, and the engine knows it
    with monkeypatch.context() as m:
        m.setattr(jmod.Journal, "append", broken)
        with pytest.raises(jmod.JournalError):
            with store.transaction(batch_inserts=True):  # journal-only (no statement): fails at the append
                eng.suggest("double", top=4)  # every candidate: new vectors
    eng.reset = lambda: None  # no reset by the caller: the store's rollback hook alone must do it
    with store.transaction(batch_inserts=True):
        rows = eng.suggest("double", top=4)
    assert store.fetchone("SELECT count(*) FROM decisions")[0] == 5 == 1 + len(rows)
