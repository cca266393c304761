"""The arm descriptor as a versioned schema (descriptor.py), and the homes it must not break (issues 17 and 20).

A method registered while the process runs, a home written with the old descriptor layout, and a home whose log
holds a decision made with a huge parameter: each opens, suggests, rebuilds its policies and replays. The homes
are copies of one history built once per module on real tiny checkpoints (decisions, rewards, snapshots).
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner

from simmerge_bandit import descriptor
from simmerge_bandit.catalog import Catalog
from simmerge_bandit.cli import cli
from simmerge_bandit.engine import Engine
from simmerge_bandit.errors import InvalidInput
from simmerge_bandit.methods import REGISTRY, register, unregister
from simmerge_bandit.migrations import MIGRATIONS, migrate, vector_key
from simmerge_bandit.paths import state_path
from simmerge_bandit.policies import make_policy
from simmerge_bandit.store import Store

from conftest import write_jsonl

ROOT = Path(__file__).resolve().parent.parent
REWARDS = 12  # rewarded decisions in the history


# ---- the old layout, written out by hand (engine.py's operator_descriptor before descriptor.py) ----

OLD_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
               "della", "della_linear", "slerp", "nuslerp", "model_stock")
OLD_PARAMS = ("weight", "density", "t", "lambda", "gamma", "epsilon", "normalize", "rescale", "filter_wise",
              "nuslerp_flatten", "nuslerp_row_wise")


def old_descriptor(op: dict) -> np.ndarray:
    z = np.zeros(len(OLD_METHODS) + len(OLD_PARAMS) + 2)
    z[OLD_METHODS.index(op["method"])] = 1.0
    for i, key in enumerate(OLD_PARAMS):
        v = op["params"].get(key)
        if v is not None:
            z[len(OLD_METHODS) + i] = float(v)
    z[-2] = 1.0 if REGISTRY[op["method"]].consensus else 0.0
    z[-1] = 1.0 if REGISTRY[op["method"]].random else 0.0
    return z


OLD_VIEW = """
    CREATE VIEW decisions AS
    SELECT d.id, d.batch, d.rank, d.task, d.models, d.operator, d.policy, d.policy_version, d.feature_schema,
           x.v AS context, z.v AS arm, d.predicted, d.uncertainty, d.propensity, d.evaluate, d.created_at,
           d.pair_propensity
    FROM decision_log d JOIN vectors x ON x.key = d.context_key JOIN vectors z ON z.key = d.arm_key"""


# ---- the history ----

@pytest.fixture(scope="module")
def history(tmp_path_factory, tiny_models) -> Path:
    """A home with three operators, REWARDS rewarded decisions of the default policy, and snapshots of it and of a
    predictor fitted on the log."""
    home = tmp_path_factory.mktemp("history") / "home"
    store = Store.open(home)
    cat = Catalog(store)
    cat.add_model(tiny_models["base"], name="base")
    for key in ("ft_a", "ft_b"):
        cat.add_model(tiny_models[key], name=key, base="base")
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(8)]
    cat.add_task("double", write_jsonl(home.parent / "d.jsonl", rows))
    cat.add_operator("lin", "linear")
    cat.add_operator("ties5", "ties", {"density": 0.5})
    cat.add_operator("slerp", "slerp", {"t": 0.3})
    eng = Engine(store)
    score = {"lin": 0.9, "ties5": 0.5, "slerp": 0.7}
    while store.fetchone("SELECT count(*) FROM rewards")[0] < REWARDS:
        for r in eng.suggest("double", top=2):
            eng.feedback(r["id"], score[r["operator"]])
    eng.fit_predictor(model="linear")
    store.close()
    return home


@pytest.fixture
def home(history, simmerge_home) -> Path:
    shutil.copytree(history, simmerge_home)
    return simmerge_home


@pytest.fixture
def demo_method():
    """The worked example of docs/extending/merge-method.md, for a test to register while the process runs (and
    removed from the registry after it)."""
    block = re.findall(r"```python\n(.*?)```", (ROOT / "docs/extending/merge-method.md").read_text(), flags=re.S)[0]
    ns: dict = {}
    exec(block, ns)
    yield ns["SPEC"]
    if REGISTRY.get(ns["SPEC"].name) is ns["SPEC"]:
        unregister(ns["SPEC"].name)


def _arrays(pol) -> dict:
    return {k: v for k, v in pol.snapshot()[0].items() if "rng" not in k}


def _assert_same_state(a, b):
    a, b = _arrays(a), _arrays(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-9, atol=1e-12, err_msg=k)


# ---- the schema ----

def test_the_schema_is_named_versioned_and_independent_of_registry_order():
    schema = descriptor.current()
    assert schema.version.startswith(f"{descriptor.LAYOUT}-") and len(set(schema.names)) == len(schema)
    shuffled = dict(reversed(list(REGISTRY.items())))
    assert descriptor.schema_of(shuffled).version == schema.version
    z = schema.describe({"method": "ties", "params": {"density": 0.25, "weight": 0.5}})
    named = dict(zip(schema.names, z))
    assert named["method:ties"] == named["family:task_arithmetic"] == named["sparsification:magnitude"] == 1
    assert named["flag:consensus"] == 1 and named["flag:random"] == 0 and named["flag:uses_base"] == 1
    assert named["param:density"] == 0.25 and named["param:weight"] == pytest.approx(0.5)   # (0.5 + 1) / 3
    assert named["param:t"] == 0 and named["method:linear"] == 0


def test_a_new_method_or_parameter_is_a_new_version_mapped_by_name(demo_method):
    register(demo_method)
    new = descriptor.current()
    old = descriptor.schema_of({k: v for k, v in REGISTRY.items() if k != "demo_lerp"})
    assert new.version != old.version and set(old.names) < set(new.names)
    m = descriptor.mapping(old, new)
    for j, name in enumerate(new.names):
        assert m.source[j] == old.index.get(name, -1)
    assert descriptor.mapping(new, old) is None  # a removed method: nothing to map what was learned on it to
    legacy = descriptor.mapping(descriptor.legacy_schema(), new)
    ops = [{"method": "linear", "params": {"weight": 0.5, "normalize": True}},
           {"method": "ties", "params": REGISTRY["ties"].validate({"density": 0.3})},
           {"method": "slerp", "params": {"t": 0.7}}]
    for op in ops:  # layout 1's raw values are recovered from today's, coordinate by coordinate
        z_new, z_old = new.describe(op), old_descriptor(op)
        back = np.zeros_like(z_old)
        kept = legacy.source >= 0
        back[legacy.source[kept]] = legacy.scale[kept] * z_new[kept] + legacy.offset[kept]
        np.testing.assert_allclose(back, z_old, atol=1e-12)


def test_the_methods_page_is_generated_from_the_registry():
    assert (ROOT / "docs" / "methods.md").read_text() == descriptor.methods_markdown(), \
        "docs/methods.md is stale: python -m simmerge_bandit.descriptor --methods-doc > docs/methods.md"


# ---- issue 20: huge and repeated parameters ----

def test_huge_and_repeated_parameters_are_refused_in_one_line(simmerge_home):
    store = Store.open(simmerge_home)
    cat = Catalog(store)
    for method, params in (("linear", {"weight": 1e200}), ("task_arithmetic", {"lambda": 1e308}),
                           ("ties", {"weight": -11}), ("linear", {"weight": float("inf")})):
        with pytest.raises(InvalidInput, match="out of range|finite"):
            cat.add_operator("big", method, params)
    with pytest.raises(InvalidInput, match="mapping"):
        cat.add_operator("big", "linear", [1])
    assert cat.operators() == []
    store.close()
    runner = CliRunner()
    out = runner.invoke(cli, ["operator", "add", "big", "--method", "linear", "--param", "weight=1e200"])
    assert out.exit_code == 1 and out.output.count("\n") == 1 and "out of range" in out.output
    out = runner.invoke(cli, ["operator", "add", "d", "--method", "ties", "--param", "density=0.3",
                              "--param", "density=0.9"])
    assert out.exit_code == 2 and "density is given twice" in out.output and "Traceback" not in out.output
    listed = runner.invoke(cli, ["operator", "list", "--json"], catch_exceptions=False)
    assert json.loads(listed.output) == []


# ---- homes with history ----

def test_a_method_added_at_run_time_to_a_home_with_history(home, demo_method):
    """Register a method module in a running process, next to a home whose decisions, rewards and snapshots were
    made without it: the same engine and a fresh one suggest it, learn from it, rebuild and replay."""
    store = Store.open(home)
    before = descriptor.current().version
    eng = Engine(store)
    assert {r[0] for r in store.fetchall("SELECT arm_schema FROM decisions")} == {before}
    assert eng.policy().n_updates == REWARDS and eng.suggest("double", top=1)  # loaded in the old schema
    register(demo_method)
    Catalog(store).add_operator("lerp", "demo_lerp", {"alpha": 0.3})
    rows = eng.suggest("double", top=8)                      # the engine that loaded the old schema's policies
    assert eng.policy().n_updates == REWARDS
    now = descriptor.current().version
    logged = dict(store.fetchall("SELECT id, arm_schema FROM decisions"))
    assert {logged[r["id"]] for r in rows} == {now}
    kept = descriptor.logged_schemas(store)                 # the coordinates of every version logged
    assert kept[now].names == descriptor.current().names and "method:demo_lerp" not in kept[before].names
    lerp = next(r for r in rows if r["operator"] == "lerp")
    eng.feedback(lerp["id"], 1.2)
    _assert_same_state(eng.policy(), Engine(store).rebuild())
    assert eng.policy().n_updates == REWARDS + 1
    # the fitted predictor is mapped, not rebuilt: it still knows its fit and ranks the new operator
    pred = eng.policy("predictor")
    assert pred.summary()["n"] == REWARDS and pred.n_updates == REWARDS + 1
    assert {r["operator"] for r in eng.suggest("double", top=8, policy="predictor")} >= {"lerp", "lin"}
    assert eng.suggest("double", top=1, policy="linucb@predictor")
    store.close()
    runner = CliRunner()
    out = runner.invoke(cli, ["policy", "rebuild", "--json"], catch_exceptions=False)
    assert json.loads(out.output)["n_updates"] == REWARDS + 1
    out = runner.invoke(cli, ["replay", "--policy", "fixed:lin", "--policy", "linucb-hybrid", "--estimator", "snips",
                              "--json"], catch_exceptions=False)
    assert out.exit_code == 0 and json.loads(out.output)


def _downgrade(home: Path, before: str) -> duckdb.DuckDBPyConnection:
    """The home's state as the release before migration ``before`` stored it: a database migrated up to the one
    before, holding every row of the current one that fits it (columns added since are left out). The current
    state is attached read-only as ``h``."""
    state = state_path(home)
    new = state.with_name("current.duckdb")
    state.rename(new)
    names = [n for n, _ in MIGRATIONS]
    db = duckdb.connect(str(state))
    migrate(db, upto=names[names.index(before) - 1])
    db.execute(f"ATTACH '{new}' AS h (READ_ONLY)")
    for (table,) in db.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                               "AND table_name <> '_migrations'").fetchall():
        have = {r[0] for r in db.execute(f"SELECT column_name FROM duckdb_columns() WHERE database_name = 'h' "
                                         f"AND table_name = '{table}'").fetchall()}
        cols = ", ".join(c for (c,) in db.execute(f"SELECT column_name FROM duckdb_columns() WHERE table_name = "
                                                    f"'{table}' AND database_name = current_database() "
                                                    "ORDER BY column_index").fetchall() if c in have)
        db.execute(f"DELETE FROM {table}")  # (rows a migration seeded, like meta's)
        db.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM h.{table}")
    return db


def test_a_home_with_the_old_descriptor_layout_opens_and_works(home):
    """Decisions and snapshots as the release before the arm schema wrote them (25-wide descriptors, no version,
    the database before migration m0014): the migration reads them as version '1', the bandit is rebuilt from the
    log and equals a rebuild, the predictor is mapped and predicts exactly what it did."""
    db = _downgrade(home, "m0014_arm_schema")
    assert "arm_schema" not in {r[0] for r in db.execute("DESCRIBE decision_log").fetchall()}
    ops = {name: {"method": m, "params": json.loads(p)} for name, m, p in
           db.execute("SELECT name, method, params FROM operators").fetchall()}
    log = db.execute("SELECT d.id, d.operator, d.context, r.reward, d.propensity FROM h.decisions d "
                     "LEFT JOIN h.rewards r ON r.decision_id = d.id ORDER BY r.seq NULLS LAST").fetchall()
    for did, op, *_ in log:                                   # every logged descriptor in layout 1
        z = old_descriptor(ops[json.loads(op)[-1]])
        db.execute("INSERT OR IGNORE INTO vectors VALUES (?, ?)", [vector_key(z), z.tolist()])
        db.execute("UPDATE decision_log SET arm_key = ? WHERE id = ?", [vector_key(z), did])
    rewarded = [r for r in log if r[3] is not None]
    X = np.array([r[2] for r in rewarded])
    arms = [json.loads(r[1])[-1] for r in rewarded]
    Z_old = np.array([old_descriptor(ops[a]) for a in arms])
    y = np.array([r[3] for r in rewarded])
    hybrid = make_policy("linucb-hybrid", seed=0)
    hybrid.update_many([(x, a, z, r, p) for x, a, z, r, p in zip(X, arms, Z_old, y, [r[4] for r in rewarded])])
    predictor = make_policy("predictor", model="linear", seed=0).fit(X, Z_old, arms, y)
    for name, pol in (("linucb-hybrid", hybrid), ("predictor", predictor)):
        arrays, meta = pol.snapshot()
        old_meta = json.loads(db.execute("SELECT meta FROM policy_state WHERE policy = ?", [name]).fetchone()[0])
        meta["feature_schema"] = old_meta["feature_schema"]            # no arm_schema, no arm_coordinates
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        db.execute("UPDATE policy_state SET arrays = ?, meta = ? WHERE policy = ?",
                   [buf.getvalue(), json.dumps(meta), name])
    db.close()

    store = Store.open(home)                                  # migrates
    assert {r[0] for r in store.fetchall("SELECT arm_schema FROM decisions")} == {"1"}
    assert len(json.loads(store.fetchone("SELECT coordinates FROM arm_schemas WHERE version = '1'")[0])) == 25
    eng = Engine(store)
    live = eng.policy()
    assert live.n_updates == REWARDS and live.snapshot()[1]["k"] == len(descriptor.current())
    _assert_same_state(live, Engine(store).rebuild())
    mapped = eng.policy("predictor")
    Z_new = np.array([descriptor.operator_descriptor(ops[a]) for a in arms])
    np.testing.assert_allclose(mapped.predict(X, Z_new), predictor.predict(X, Z_old), atol=1e-9)
    for policy in ("linucb-hybrid", "predictor", "linucb@predictor", "random"):
        assert eng.suggest("double", top=3, policy=policy)
    meta = json.loads(store.fetchone("SELECT meta FROM policy_state WHERE policy = 'linucb-hybrid'")[0])
    assert meta["arm_schema"] == descriptor.current().version
    assert [c[0] for c in meta["arm_coordinates"]] == list(descriptor.current().names)
    store.close()


def test_a_home_whose_log_holds_a_huge_parameter_opens_and_works(home, caplog):
    """Issue 20: an operator stored with weight=1e200 (before parameters were bounded), a decision logged with its
    descriptor and a NaN propensity, and feedback on it. Every policy still suggests, rebuilds and reports the
    reward it skips."""
    store = Store.open(home)
    store.execute("INSERT INTO operators (name, method, params) VALUES ('big', 'linear', ?)",
                  [json.dumps({"weight": 1e200, "normalize": True})])
    row = store.fetchdicts("SELECT * FROM decision_log LIMIT 1")[0]
    z = old_descriptor({"method": "linear", "params": {"weight": 1e200, "normalize": True}})
    store.execute("INSERT INTO vectors VALUES (?, ?)", [vector_key(z), z.tolist()])
    row.update(id="bad", operator='["big"]', arm_key=vector_key(z), propensity=float("nan"), arm_schema=None)
    store.execute(f"INSERT INTO decision_log ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                  list(row.values()))
    eng = Engine(store)
    with caplog.at_level(logging.WARNING):
        assert eng.feedback("bad", 0.5)["status"] == "recorded"
        rebuilt = eng.rebuild()
    assert rebuilt.n_updates == REWARDS
    assert re.search(r"skipped 1 logged reward.*#13 \(operator big\): propensity nan", caplog.text)
    for policy in ("linucb-hybrid", "random", "predictor"):
        rows = eng.suggest("double", top=12, policy=policy)
        assert "big" in {r["operator"] for r in rows}
        assert all(np.isfinite(r["propensity"]) and 0 < r["propensity"] <= 1 for r in rows)
    z_big = eng.candidates("double").Z[[o["name"] for o in eng.candidates("double").operators].index("big")]
    assert ((0 <= z_big) & (z_big <= 1)).all()
    store.close()
    out = CliRunner().invoke(cli, ["policy", "rebuild", "--json"], catch_exceptions=False)
    assert json.loads(out.output)["n_updates"] == REWARDS
